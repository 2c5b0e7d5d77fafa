"""DICOM and NIfTI read as they come: windowing, frames, slices, errors, and no patient data leaked.

Runs on the real sample files that pydicom and nibabel ship (read from their folders directly:
``pydicom.data.get_testdata_files()`` tries to download). Every rendering is checked against an
independent computation written here: the DICOM standard's linear window (PS3.3 C.11.2.1.2.1)
and pydicom's own ``apply_modality_lut`` + ``apply_voi_lut``, and nibabel's raw voxel array
flipped by hand from the file's orientation codes.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nibabel as nib  # the [medical] extra, in [dev]
import pydicom

from llavamed_core.errors import ConfigError, DataError, DependencyError
from llavamed_core.images import ImageOptions, load_image, render_image
from serve_helpers import tiny_engine  # noqa: F401  (a fixture)
from test_serve_browser import CHROMIUM, browser  # noqa: F401  (a fixture)

DCM = Path(pydicom.__file__).parent / "data" / "test_files"
NII = Path(nib.__file__).parent / "tests" / "data"
CT, MR = DCM / "CT_small.dcm", DCM / "MR_small.dcm"


def grey(img) -> np.ndarray:
    """The single grey channel of a rendered RGB image (asserting the three are equal)."""
    a = np.asarray(img)
    assert a.ndim == 3 and a.shape[2] == 3
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    return a[..., 0]


def standard_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written out branch by branch, output range 0..255 (floats)."""
    out = np.empty_like(x, dtype=np.float64)
    for idx, v in np.ndenumerate(x):
        if v <= c - 0.5 - (w - 1) / 2:
            out[idx] = 0.0
        elif v > c - 0.5 + (w - 1) / 2:
            out[idx] = 255.0
        else:
            out[idx] = ((v - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    return out


def pydicom_window(path: Path, center: float | None = None, width: float | None = None) -> np.ndarray:
    """pydicom's modality LUT + VOI window, rescaled from its output range onto 0..255."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    values = apply_modality_lut(ds.pixel_array, ds)
    y = apply_voi_lut(values, ds, prefer_lut=False)
    # pydicom's output range (processing.apply_windowing): the stored range, through the rescale.
    bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    lo, hi = lo * slope + intercept, hi * slope + intercept
    return (y - lo) / (hi - lo) * 255.0


def hounsfield(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


# --- DICOM windowing ----------------------------------------------------------------------------

@pytest.mark.parametrize("window,cw", [("lung", (-600, 1500)), ("bone", (400, 1800)),
                                        ("40,400", (40, 400)), ("0,1", (0, 1))])
def test_ct_window_is_the_standards_formula_in_hounsfield_units(window, cw):
    img, info = render_image(CT, ImageOptions(window=window))
    hu = hounsfield(CT)
    assert hu.min() == -896 and hu.max() == 1167  # Rescale Intercept −1024 applied
    got = grey(img).astype(np.float64)
    expected = standard_window(hu, *cw)
    assert np.array_equal(got, np.rint(expected))
    assert np.abs(got - pydicom_window(CT, *cw)).max() <= 0.5 + 1e-9
    assert info.window == (float(cw[0]), float(cw[1])) and info.modality == "CT"
    assert len(np.unique(got)) > (1 if cw[1] == 1 else 50)


def test_default_is_the_files_own_window_else_the_full_range():
    mr, info = render_image(MR)  # Window Center 600 / Width 1600 in the file
    assert info.window_source == "file" and info.window == (600.0, 1600.0)
    assert np.abs(grey(mr).astype(float) - pydicom_window(MR)).max() <= 0.5 + 1e-9
    ct, info = render_image(CT)  # no window in the file: min → 0, max → 255
    hu = hounsfield(CT)
    assert info.window_source == "full-range" and info.value_range == (-896.0, 1167.0)
    assert np.array_equal(grey(ct), np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255))


def test_monochrome1_is_shown_inverted(tmp_path):
    ds = pydicom.dcmread(MR)
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    assert np.array_equal(grey(load_image(path)), 255 - grey(load_image(MR)))


def test_multi_frame_takes_the_middle_frame_or_the_one_asked():
    two = DCM / "SC_rgb_rle_2frame.dcm"
    frames = pydicom.dcmread(two).pixel_array
    default, info = render_image(two)
    assert info.frame == 1 and info.frames == 2 and info.window_source == "none"
    assert np.array_equal(np.asarray(default), frames[1])
    first = np.asarray(load_image(two, ImageOptions(frame=0)))
    assert np.array_equal(first, frames[0])
    assert np.array_equal(first, np.asarray(load_image(DCM / "SC_rgb_rle.dcm")))  # same picture, 1 frame
    with pytest.raises(DataError, match=r"frame 2 is out of range: the file has 2 frames \(0–1\)"):
        load_image(two, ImageOptions(frame=2))


def test_ybr_and_16_bit_colour_become_the_same_rgb():
    rgb = np.asarray(load_image(DCM / "SC_rgb_rle.dcm")).astype(int)
    assert np.array_equal(np.asarray(load_image(DCM / "SC_rgb_rle_16bit.dcm")), rgb)
    for name in ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        ybr = np.asarray(load_image(DCM / name)).astype(int)
        assert np.abs(ybr - rgb).mean() < 2 and np.abs(ybr - rgb).max() <= 8, name  # YBR→RGB rounding


def test_compressed_files_equal_the_uncompressed_one():
    ref = grey(load_image(MR, ImageOptions(window="600,1600")))
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"):
        assert np.array_equal(grey(load_image(DCM / name, ImageOptions(window="600,1600"))), ref), name


def test_a_compressed_syntax_without_decoder_names_syntax_and_package(cli, tmp_path):
    r = cli("data", "view", DCM / "JPEGLSNearLossless_08.dcm", "--out", tmp_path / "v.png")
    assert r.exit_code == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("Error: ") and "JPEG-LS Lossy (Near-Lossless)" in lines[0]
    assert "1.2.840.10008.1.2.4.81" in lines[0]
    assert lines[1] == "Hint: pip install pylibjpeg pylibjpeg-libjpeg" and len(lines) == 2
    assert not (tmp_path / "v.png").exists()


# --- NIfTI --------------------------------------------------------------------------------------

def _canonical_by_hand(path: Path) -> np.ndarray:
    """The voxel array flipped to RAS+ from the file's orientation codes (no as_closest_canonical)."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float64)
    codes = nib.aff2axcodes(img.affine)
    assert set(codes) <= {"L", "R", "A", "P", "S", "I"} and codes[1:] in (("A", "S"), ("P", "S"))
    if codes[0] == "L":
        data = data[::-1]
    if codes[1] == "P":
        data = data[:, ::-1]
    return data


def _stretch(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.rint(np.clip((a - lo) / (hi - lo) * 255, 0, 255))


def test_nifti_slices_in_each_plane_come_from_the_canonical_volume():
    path = NII / "anatomical.nii"  # stored L-A-S: the x axis must be flipped to reach RAS+
    ras = _canonical_by_hand(path)
    assert nib.aff2axcodes(nib.load(str(path)).affine)[0] == "L"
    cuts = {"axial": lambda k: ras[:, :, k], "coronal": lambda k: ras[:, k, :],
            "sagittal": lambda k: ras[k, :, :]}
    for plane, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        for index in (None, 3):
            img, info = render_image(path, ImageOptions(plane=plane, slice_index=index))
            k = ras.shape[axis] // 2 if index is None else index
            # radiological display: superior/anterior at the top, the patient's right on the left
            plane2d = cuts[plane](k).T[::-1, ::-1]
            assert info.slice_index == k and info.slices == ras.shape[axis]
            assert np.array_equal(grey(img), _stretch(plane2d, plane2d.min(), plane2d.max()))
    with pytest.raises(DataError, match=r"slice 25 is out of range: the axial plane has 25 slices"):
        load_image(path, ImageOptions(slice_index=25))


def test_a_4d_nifti_needs_a_volume_and_uses_the_header_display_range():
    path = NII / "functional.nii"
    with pytest.raises(DataError, match=r"a 4-D NIfTI \(17x21x3x20 voxels, 20 volumes\)") as exc:
        load_image(path)
    assert exc.value.hint == "add --volume N (0–19)"
    img, info = render_image(path, ImageOptions(volume=7, window="2000,3000"))
    data = _canonical_by_hand(path)[:, :, 1, 7].T[::-1, ::-1]
    assert info.volume == 7 and info.volumes == 20 and info.slice_index == 1
    assert np.array_equal(grey(img), np.rint(standard_window(data, 2000, 3000)))
    img, info = render_image(path, ImageOptions(volume=7))  # cal_min/cal_max of the header
    hdr = nib.load(str(path)).header
    assert info.window_source == "file-cal-range"
    assert np.array_equal(grey(img), _stretch(data, float(hdr["cal_min"]), float(hdr["cal_max"])))


def test_bytes_and_paths_render_alike():
    gz = NII / "example4d.nii.gz"
    opts = ImageOptions(volume=1, plane="coronal")
    assert np.array_equal(np.asarray(load_image(gz.read_bytes(), opts)), np.asarray(load_image(gz, opts)))
    assert np.array_equal(np.asarray(load_image(CT.read_bytes(), ImageOptions(window="lung"))),
                          np.asarray(load_image(CT, ImageOptions(window="lung"))))


# --- the command, errors, dependencies ------------------------------------------------------------

def test_data_view_writes_exactly_what_the_model_gets(cli, tmp_path):
    from PIL import Image

    out = tmp_path / "view.png"
    r = cli("data", "view", CT, "--out", out, "--window", "lung", "--json")
    assert r.exit_code == 0, r
    info = json.loads(r.stdout)
    assert info["window"] == [-600.0, 1500.0] and info["window_source"] == "preset:lung"
    assert info["out"] == str(out) and (info["width"], info["height"]) == (128, 128)
    with Image.open(out) as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")),
                              np.asarray(load_image(CT, ImageOptions(window="lung"))))
    r = cli("data", "view", NII / "anatomical.nii", "--out", out, "--plane", "sagittal", "--slice", "4")
    assert r.exit_code == 0 and r.stdout.strip() == str(out) and "sagittal slice 4 of 33" in r.stderr


@pytest.mark.parametrize("make,args,message", [
    (lambda d: DCM / "MR_truncated.dcm", [], "the pixel data is shorter than the header declares (8,130 of 8,192 bytes)"),
    (lambda d: DCM / "test-SR.dcm", [], "the DICOM file has no pixel data (Modality SR, a structured report)"),
    (lambda d: NII / "functional.nii", [], "a 4-D NIfTI (17x21x3x20 voxels, 20 volumes); choose one volume"),
    (lambda d: _write(d / "notes.dcm", b"plain text, not DICOM" * 30), [], "not a DICOM file"),
    (lambda d: _write(d / "notes.txt", b"plain text" * 100), [], "does not decode as an image, DICOM or NIfTI file"),
    (lambda d: _write(d / "cut.nii.gz", (NII / "example4d.nii.gz").read_bytes()[:3000]), ["--volume", "0"],
     "the NIfTI voxel data does not read"),
])
def test_bad_files_give_one_line_errors(cli, tmp_path, make, args, message):
    src = make(tmp_path)
    r = cli("data", "view", src, "--out", tmp_path / "v.png", *args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and r.stdout == "" and "Traceback" not in r.stderr
    assert lines[0].startswith(f"Error: {src}: ") and message in lines[0] and lines[1].startswith("Hint: ")
    assert len(lines) == 2 and not (tmp_path / "v.png").exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_options_are_usage_errors(cli, tmp_path):
    for args, text in ((["--window", "lungs"], "expected CENTER,WIDTH"), (["--window", "40,0"], "at least 1"),
                       (["--plane", "oblique"], "axial, coronal, sagittal"), (["--frame", "-1"], "0 or more")):
        r = cli("data", "view", CT, "--out", tmp_path / "v.png", *args)
        assert r.exit_code == 1 and text in r.stderr and r.stderr.startswith("Error: "), args
    with pytest.raises(ConfigError):
        ImageOptions(window="1,2,3")
    png = tmp_path / "photo.png"  # an output over its own input is refused, the input kept
    from PIL import Image

    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(png)
    before = png.read_bytes()
    r = cli("data", "view", png, "--out", png)
    assert r.exit_code == 1 and "is the same path as FILE" in r.stderr and png.read_bytes() == before
    r = cli("data", "view", png, "--out", tmp_path / "photo.jpg")
    assert r.exit_code == 1 and "give a path ending in .png" in r.stderr


def test_ordinary_images_load_as_before_with_transparency_on_white(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2] = (200, 10, 10, 255)  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(path)
    got = np.asarray(load_image(path))
    assert (got[:2] == (200, 10, 10)).all() and (got[2:] == 255).all()
    jpg = tmp_path / "b.jpg"
    Image.fromarray(np.full((8, 8, 3), 77, np.uint8)).save(jpg)
    with Image.open(jpg) as im:
        assert np.array_equal(np.asarray(load_image(jpg)), np.asarray(im.convert("RGB")))


def test_missing_pydicom_is_a_one_line_error_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom → ImportError
    with pytest.raises(DependencyError) as exc:
        load_image(CT)
    assert "needs the 'pydicom' package" in exc.value.message
    assert exc.value.hint.startswith("pip install 'llavamed[medical]'")


def test_pydicom_and_nibabel_are_imported_only_for_medical_files(tmp_path):
    code = ("import sys\n"
            "from PIL import Image\n"
            "import llavamed_core.images, llavamed_core.infer.session, llavamed_core.serve.images\n"
            "import llavamed_core.eval.answers, llavamed_core.data.validate, llavamed_core.train.dataset\n"
            "import llavamed_cli.main\n"
            f"Image.new('RGB', (8, 8)).save({str(tmp_path / 'a.png')!r})\n"
            f"llavamed_core.images.load_image({str(tmp_path / 'a.png')!r})\n"
            "assert 'pydicom' not in sys.modules and 'nibabel' not in sys.modules, 'imported'\n"
            f"llavamed_core.images.load_image({str(CT)!r})\n"
            "assert 'pydicom' in sys.modules and 'nibabel' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# --- data validate and training read the same pixels --------------------------------------------------

def test_validate_and_training_see_the_same_picture(cli, tmp_path, tiny_ckpt):
    import shutil

    from PIL import Image
    from transformers import AutoProcessor

    from llavamed_core.train.dataset import build_dataset, load_training_conversations

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(CT, images / "ct.dcm")
    shutil.copy(DCM / "MR_truncated.dcm", images / "cut.dcm")
    shutil.copy(NII / "anatomical.nii", images / "brain.nii")
    recs = [{"id": i, "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A scan."}]}
        for i, name in (("ct", "ct.dcm"), ("cut", "cut.dcm"), ("brain", "brain.nii"))]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(recs))
    r = cli("data", "validate", data, "--images", images, "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 1 and rep["ok"] == 2
    (problem,) = [p for kind in rep["examples"].values() for p in kind]
    assert problem["record"] == "cut" and "shorter than the header declares" in problem["message"]
    with pytest.raises(DataError, match="record cut.*shorter than the header declares"):
        load_training_conversations(data, images)

    data.write_text(json.dumps([recs[0], recs[2]]))
    convs = load_training_conversations(data, images)
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    ds, _ = build_dataset(convs, processor, images, max_length=512)
    for i, (src, name) in enumerate(((images / "ct.dcm", "ct"), (images / "brain.nii", "brain"))):
        view = tmp_path / f"{name}.png"
        assert cli("data", "view", src, "--out", view).exit_code == 0
        with Image.open(view) as im:  # the picture `data view` shows, read back from disk
            expected = processor.image_processor(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"][0]
        assert ds[i]["pixel_values"].equal(expected)


# --- patient data never leaks -------------------------------------------------------------------

PHI = {"PatientName": "Zqxplanted^Phiname", "PatientID": "PHIID93817", "PatientBirthDate": "19230405",
       "InstitutionName": "Qzphi General Hospital", "AccessionNumber": "ACC55512QZ",
       "ReferringPhysicianName": "Drqz^Phidoctor"}
MARKERS = ("Zqxplanted", "Phiname", "PHIID93817", "19230405", "Qzphi", "ACC55512QZ", "Drqz", "Phidoctor")


def _plant(src: Path, dst: Path) -> Path:
    ds = pydicom.dcmread(src)
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.save_as(dst)
    raw = dst.read_bytes()
    assert all(m.encode() in raw for m in MARKERS)  # the markers are really in the file
    return dst


def _assert_clean(what: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for marker in MARKERS:
        assert marker.encode() not in data and marker.lower().encode() not in data.lower(), (what, marker)


@pytest.mark.parametrize("transport", ["chat", "eval"])
def test_patient_data_never_reaches_any_output(cli, tmp_path, tiny_ckpt, transport):
    scans = tmp_path / "scans"
    scans.mkdir()
    ct = _plant(CT, scans / "ct.dcm")
    sr = _plant(DCM / "test-SR.dcm", scans / "report.dcm")
    work = tmp_path / "out"
    work.mkdir()
    outputs: list[tuple[str, str]] = []
    greedy = ["--temperature", "0", "--max-new-tokens", "4"]
    if transport == "chat":
        r = cli("chat", ct, "--model", tiny_ckpt, "--prompt", "What is shown?", "--json", "--window", "lung", *greedy)
        assert r.exit_code == 0 and json.loads(r.stdout)["image"] == str(ct)
        outputs.append(("chat --json", r.stdout + r.stderr))
        r = cli("chat", sr, "--model", tiny_ckpt, "--prompt", "What is shown?", *greedy)
        assert r.exit_code == 1 and "no pixel data" in r.stderr
        outputs.append(("chat error", r.stdout + r.stderr))
        transcript = work / "chat.json"
        r = cli("chat", "--model", tiny_ckpt, *greedy,
                input=f"/image {ct}\nWhat is shown?\n/image {sr}\n/save {transcript}\n/exit\n")
        assert r.exit_code == 0 and transcript.exists() and "no pixel data" in r.stderr
        assert json.loads(transcript.read_text())[0]["image"] == str(ct)
        outputs.append(("chat repl", r.stdout + r.stderr))
        r = cli("data", "view", ct, "--out", work / "view.png", "--json")
        assert r.exit_code == 0
        outputs.append(("data view", r.stdout + r.stderr))
        r = cli("data", "view", sr, "--out", work / "sr.png")
        assert r.exit_code == 1
        outputs.append(("data view error", r.stdout + r.stderr))
    else:
        questions = work / "test.json"
        questions.write_text(json.dumps([{"id": "q1", "image": "ct.dcm", "answer_type": "CLOSED",
                                          "conversations": [{"from": "human", "value": "<image>\nIs it a CT?"},
                                                            {"from": "gpt", "value": "yes"}]}]))
        r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", questions, "--images", scans,
                "--out", work / "ev", "--window", "lung", "--json", *greedy)
        assert r.exit_code == 0, r
        assert [json.loads(x)["question_id"] for x in (work / "ev" / "answers.jsonl").read_text().splitlines()] == ["q1"]
        outputs.append(("eval", r.stdout + r.stderr))
        # the window is part of the run's settings: another window does not resume these answers
        r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", questions, "--images", scans,
                "--out", work / "ev", "--window", "bone", *greedy)
        assert r.exit_code == 1 and "image_options" in r.stderr and "--overwrite" in r.stderr
        outputs.append(("eval resume refused", r.stdout + r.stderr))
        questions.write_text(questions.read_text().replace("ct.dcm", "report.dcm"))
        r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", questions, "--images", scans,
                "--out", work / "ev2", *greedy)
        assert r.exit_code == 1 and "record q1, field 'image'" in r.stderr and "no pixel data" in r.stderr
        outputs.append(("eval error", r.stdout + r.stderr))
    for what, text in outputs:
        _assert_clean(what, text)
    written = [p for p in work.rglob("*") if p.is_file()]
    assert written
    for path in written:
        _assert_clean(str(path), path.read_bytes())


def test_serve_renders_dicom_and_nifti_data_urls_and_logs_no_patient_data(tmp_path, tiny_ckpt):
    import httpx

    from serve_helpers import image_message, start_cli_server

    ct = _plant(CT, tmp_path / "ct.dcm")
    sr = _plant(DCM / "test-SR.dcm", tmp_path / "report.dcm")
    log = tmp_path / "serve.log"
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    srv = start_cli_server(["--model", str(tiny_ckpt), "--log-requests"], log)
    answers = []
    try:
        url = srv.url
        # The page's preview route: the same picture as `data view` (here the lung preset).
        r = httpx.post(f"{url}/v1/images/render", timeout=60,
                       json={"url": f"data:application/dicom;window=lung;base64,{b64(ct)}"})
        assert r.status_code == 200, r.text
        answers.append(r.text)
        png = base64.b64decode(r.json()["url"].partition(",")[2])
        from io import BytesIO

        from PIL import Image

        with Image.open(BytesIO(png)) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")),
                                  np.asarray(load_image(CT, ImageOptions(window="lung"))))
        # NIfTI as browsers send .nii.gz (application/gzip) with a volume parameter
        gz = NII / "example4d.nii.gz"
        r = httpx.post(f"{url}/v1/images/render", timeout=60,
                       json={"url": f"data:application/gzip;volume=1;base64,{b64(gz)}"})
        assert r.status_code == 200, r.text
        with Image.open(BytesIO(base64.b64decode(r.json()["url"].partition(",")[2]))) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(load_image(gz, ImageOptions(volume=1))))
        r = httpx.post(f"{url}/v1/images/render", timeout=60,
                       json={"url": f"data:application/gzip;base64,{b64(gz)}"})
        assert r.status_code == 400 and "choose one volume" in r.json()["error"]["message"]
        # The chat API with a DICOM data URL, then a structured report (400, no pixel data)
        body = {"messages": image_message(f"data:application/dicom;base64,{b64(ct)}"), "max_tokens": 4,
                "temperature": 0}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        answers.append(r.text)
        body["messages"] = image_message(f"data:application/dicom;base64,{b64(sr)}")
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and "no pixel data" in r.json()["error"]["message"]
        answers.append(r.text)
    finally:
        srv.stop()
    text = log.read_text()
    assert "/v1/chat/completions" in text and " body " in text  # request logging was on
    for i, a in enumerate(answers):
        _assert_clean(f"response {i}", a)
    _assert_clean("server log", text)



@pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (apt-get install chromium)")
def test_web_page_shows_the_servers_rendering_of_a_dicom_upload(browser, tmp_path, tiny_ckpt, tiny_engine):
    from io import BytesIO

    from PIL import Image

    from llavamed_core.serve.config import ServeConfig
    from serve_helpers import ThreadServer

    cdp = browser
    ct = _plant(CT, tmp_path / "ct.dcm")
    with ThreadServer(ServeConfig(model=tiny_ckpt, port=0), engine_loader=lambda: tiny_engine) as srv:
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=srv.url + "/")
        cdp.wait_for("document.readyState === 'complete' && "
                     "document.getElementById('status').className === 'ready'")

        def upload(path: Path) -> None:
            doc = cdp.call("DOM.getDocument")
            node = cdp.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#image-input")
            cdp.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(path)])

        upload(ct)
        cdp.wait_for("document.getElementById('preview').style.display === 'flex'")
        src = cdp.js("document.getElementById('preview-img').src")
        assert src.startswith("data:image/png;base64,")
        with Image.open(BytesIO(base64.b64decode(src.partition(",")[2]))) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(load_image(CT)))
        # The chat request carries the rendered PNG, which the model answers about.
        cdp.js("document.getElementById('max-tokens').value = '4'")
        cdp.type_into("#question", "What is shown?")
        cdp.click("#send")
        cdp.wait_for("document.querySelector('.msg.assistant')?.dataset.state === 'done'")
        assert cdp.js("state.history[0].content[0].image_url.url") == src
        # A 4-D NIfTI cannot be shown without a volume: the page says why.
        upload(NII / "functional.nii")
        err = cdp.wait_for("document.querySelector('.msg.error')?.textContent")
        assert "a 4-D NIfTI" in err and "choose one volume" in err


def test_a_forwarded_request_carries_the_rendered_png_not_the_dicom_file():
    """With ``--engine vllm`` the server forwards OpenAI messages: DICOM is sent as what the model sees."""
    from io import BytesIO

    from PIL import Image

    from llavamed_core.serve.config import ServeLimits
    from llavamed_core.serve.protocol import decode_images, parse_chat_request
    from serve_helpers import data_url, image_message, png_bytes, random_image

    limits = ServeLimits()
    png_url = data_url(png_bytes(random_image(0)))
    for url, expected in ((f"data:application/dicom;window=lung;base64,{base64.b64encode(CT.read_bytes()).decode()}",
                           load_image(CT, ImageOptions(window="lung"))), (png_url, None)):
        chat = parse_chat_request({"messages": image_message(url)}, limits)
        decode_images(chat, limits)
        sent = chat.openai_messages()[0]["content"][0]["image_url"]["url"]
        if expected is None:
            assert sent == url  # ordinary images travel unchanged
            continue
        assert sent.startswith("data:image/png;base64,")
        with Image.open(BytesIO(base64.b64decode(sent.partition(",")[2]))) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected))
        assert np.array_equal(np.asarray(chat.images[0].image), np.asarray(expected))


def _two_ct_questions(tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(CT, images / "ct.dcm")
    questions = tmp_path / "test.json"
    questions.write_text(json.dumps([{"id": f"q{i}", "image": "ct.dcm", "answer_type": "CLOSED",
                                      "conversations": [{"from": "human", "value": "<image>\nIs it a CT?"},
                                                        {"from": "gpt", "value": "yes"}]} for i in range(2)]))
    return questions, images


def test_eval_worker_spec_carries_the_image_options(tmp_path, tiny_ckpt, capsys):
    """A worker's spec file (the parent's ``asdict`` as JSON) gives the worker the same options."""
    from dataclasses import asdict

    from llavamed_core.eval.answers import VQAEvalConfig, _worker_main

    questions, images = _two_ct_questions(tmp_path)
    (tmp_path / "ev").mkdir()
    cfg = VQAEvalConfig(dataset=questions, out=tmp_path / "ev", images=images, model=tiny_ckpt,
                        max_new_tokens=2, image_options=ImageOptions(frame=5, window="lung"))
    spec = dict(asdict(cfg), shard=[0, 1])
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in spec.items()}))
    assert _worker_main(str(path)) == 1
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("LLAVAMED_ERROR ")][-1]
    assert "frame 5 is out of range: the file has 1 frame (0–0)" in json.loads(line.split(" ", 1)[1])["message"]


@pytest.mark.slow
def test_eval_worker_processes_get_the_image_options(cli, tmp_path, tiny_ckpt):
    """``--nproc 2`` sends the options to each worker: a frame out of range fails there, by record."""
    questions, images = _two_ct_questions(tmp_path)
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", questions, "--images", images, "--out",
            tmp_path / "ev", "--nproc", "2", "--frame", "5", "--max-new-tokens", "2")
    assert r.exit_code == 1 and "frame 5 is out of range: the file has 1 frame (0–0)" in r.stderr
    assert "field 'image'" in r.stderr and "Traceback" not in r.stderr
