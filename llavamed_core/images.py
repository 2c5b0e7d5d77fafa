"""The project's one image loader: any image file → the 8-bit RGB picture the model sees.

Every place that reads an image (``chat``, ``serve``, ``eval vqa``, ``data validate``, training,
``data view``) calls :func:`load_image`, so a scan looks the same to the model in training, in
evaluation and behind the API.

- Ordinary images (PNG, JPEG, TIFF, …) through Pillow: transparency flattened on white, 16-bit and
  float greyscale stretched over their own range, the first frame of a multi-frame file.
- DICOM (``pydicom``): the Modality LUT (Rescale Slope/Intercept, so CT is in Hounsfield units),
  then a window — ``ImageOptions.window`` (``"C,W"`` or a preset such as ``lung``), else the file's
  own VOI LUT or Window Center/Width, else the image's full range — with the linear window of
  DICOM PS3.3 C.11.2.1.2.1; MONOCHROME1 inverted; RGB, YBR and palette colour converted to RGB;
  one frame of a multi-frame file (default: the middle one).
- NIfTI (``.nii``, ``.nii.gz``, ``nibabel``): reoriented to the closest canonical (RAS+)
  orientation, one slice of one plane (default: the middle axial slice), shown in the radiological
  convention (patient's right on the image's left, anterior / superior at the top); the same
  windows, else the header's ``cal_min``/``cal_max`` display range, else the full range.

``pydicom`` and ``nibabel`` (the ``[medical]`` extra) are imported only when such a file is met.
Nothing identifying is read from a DICOM file: only pixel, geometry and display attributes are
touched, :class:`RenderInfo` carries only those, and errors name the file, never its contents.

Run ``llavamed data view FILE --out view.png`` to see the rendering of one file.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError, DependencyError, LlavamedError, data_error

__all__ = ["as_rgb", 
    "image_problem",
    "load_record_image",
    "ImageOptions",
    "RenderInfo",
    "WINDOW_PRESETS",
    "PLANES",
    "IMAGE_SUFFIXES",
    "MEDICAL_SUFFIXES",
    "load_image",
    "render_image",
    "save_view",
    "image_kind",
    "is_image_name",
    "parse_window",
    "window_linear",
]

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (50.0, 400.0),
}
"""Named CT windows as ``(center, width)`` in Hounsfield units: the typical values of
Radiopaedia's "Windowing (CT)" article (chest lungs W1500/L−600, mediastinum W350/L50,
bones W1800/L400, brain W80/L40, abdomen soft tissue W400/L50)."""

PLANES = ("axial", "coronal", "sagittal")
"""The planes a NIfTI volume can be cut in."""

MEDICAL_SUFFIXES = (".dcm", ".dicom", ".nii", ".nii.gz")
"""File name endings of DICOM and NIfTI files (DICOM files are also recognised by content)."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp") + MEDICAL_SUFFIXES
"""File name endings that mark an image file (e.g. a path typed in a chat message)."""

_MAX_INFLATED = 1 << 30  # a gzipped NIfTI sent as bytes may not inflate past 1 GiB
_PIP_HINT = "pip install 'llavamed[medical]'  (or: pip install {pkg})"


@dataclass(frozen=True)
class ImageOptions:
    """How to turn a DICOM or NIfTI file into one 8-bit picture (ordinary images ignore these).

    Options that do not apply to a file's format are ignored (``frame`` for NIfTI, ``plane`` for
    DICOM), so one set of options serves a folder of mixed files; an index out of range is an error.
    """

    window: str | None = None
    """``"C,W"`` (center, width in the image's real units, e.g. HU for CT) or a preset name from
    :data:`WINDOW_PRESETS`; ``None`` = the file's own window, else the full range."""
    frame: int | None = None
    """DICOM: 0-based frame of a multi-frame file (default: the middle frame, ``n // 2``)."""
    slice_index: int | None = None
    """NIfTI: 0-based slice along the plane's axis of the canonical volume (default: the middle)."""
    plane: str = "axial"
    """NIfTI: ``axial``, ``coronal`` or ``sagittal``."""
    volume: int | None = None
    """NIfTI: 0-based volume of a 4-D file (required for 4-D files)."""

    def __post_init__(self) -> None:
        if self.window is not None:
            parse_window(self.window)
        if self.plane not in PLANES:
            raise ConfigError(f"--plane {self.plane!r}: expected one of {', '.join(PLANES)}")
        for name in ("frame", "slice_index", "volume"):
            value = getattr(self, name)
            if value is not None and value < 0:
                flag = "--slice" if name == "slice_index" else f"--{name}"
                raise ConfigError(f"{flag} {value}: must be 0 or more (indices start at 0)")


@dataclass(frozen=True)
class RenderInfo:
    """What :func:`render_image` did: geometry and display settings only, nothing identifying."""

    kind: str
    """``image``, ``dicom`` or ``nifti``."""
    width: int
    height: int
    window: tuple[float, float] | None = None
    """The ``(center, width)`` applied, or ``None`` (a range stretch, or a colour image)."""
    window_source: str = "none"
    """``option``, ``preset:<name>``, ``file`` (Window Center/Width), ``file-voi-lut``,
    ``file-cal-range`` (NIfTI cal_min/cal_max), ``full-range`` or ``none`` (colour, 8-bit)."""
    modality: str | None = None
    """The DICOM Modality (``CT``, ``MR``, …)."""
    photometric: str | None = None
    """The DICOM Photometric Interpretation."""
    frame: int | None = None
    frames: int | None = None
    plane: str | None = None
    slice_index: int | None = None
    slices: int | None = None
    volume: int | None = None
    volumes: int | None = None
    value_range: tuple[float, float] | None = None
    """Min and max of the (rescaled) values of the picture before windowing."""

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (``None`` fields left out)."""
        out = {k: v for k, v in self.__dict__.items() if v is not None}
        for key in ("window", "value_range"):
            if key in out:
                out[key] = [float(x) for x in out[key]]
        return out


def parse_window(text: str) -> tuple[float, float]:
    """``(center, width)`` of ``"C,W"`` or a preset name.

    Raises:
        ConfigError: neither a preset nor two numbers, or a width below 1.
    """
    key = text.strip().lower()
    if key in WINDOW_PRESETS:
        return WINDOW_PRESETS[key]
    parts = key.split(",")
    try:
        center, width = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--window {text!r}: expected CENTER,WIDTH (e.g. -600,1500) or one of "
                          f"{', '.join(WINDOW_PRESETS)}") from None
    if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
        raise ConfigError(f"--window {text!r}: the width must be a number of at least 1 "
                          f"(DICOM PS3.3 C.11.2.1.2)")
    return center, width


def window_linear(x: Any, center: float, width: float) -> Any:
    """DICOM's linear VOI window (PS3.3 C.11.2.1.2.1) onto 0–255, as floats.

    ``x <= c - 0.5 - (w-1)/2`` → 0; ``x > c - 0.5 + (w-1)/2`` → 255; otherwise
    ``((x - (c - 0.5)) / (w-1) + 0.5) * 255``. A width of 1 is a threshold at ``c - 0.5``.
    """
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    if width <= 1:
        return np.where(x <= lo, 0.0, 255.0)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.where(x <= lo, 0.0, np.where(x > hi, 255.0, y))


def _window_linear_exact(x: Any, center: float, width: float) -> Any:
    """PS3.3 C.11.2.1.3.2 LINEAR_EXACT onto 0–255."""
    import numpy as np

    y = ((x - center) / width + 0.5) * 255.0
    return np.where(x <= center - width / 2, 0.0, np.where(x > center + width / 2, 255.0, y))


def _window_sigmoid(x: Any, center: float, width: float) -> Any:
    """PS3.3 C.11.2.1.3.1 SIGMOID onto 0–255."""
    import numpy as np

    return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))


def _stretch(x: Any, lo: float, hi: float) -> Any:
    """``lo`` → 0, ``hi`` → 255, linear between, clipped (a flat image is black)."""
    import numpy as np

    if not hi > lo:
        return np.zeros_like(x, dtype=np.float64)
    return np.clip((x - lo) * (255.0 / (hi - lo)), 0.0, 255.0)


def _to_uint8(y: Any) -> Any:
    import numpy as np

    return np.clip(np.rint(np.nan_to_num(y, nan=0.0)), 0, 255).astype(np.uint8)


def is_image_name(name: str | os.PathLike) -> bool:
    """Whether a file name ends like an image, DICOM or NIfTI file (``x.nii.gz`` included)."""
    low = str(name).lower()
    return low.endswith(IMAGE_SUFFIXES)


def image_kind(head: bytes, name: str = "") -> str:
    """``dicom``, ``nifti`` or ``image`` from a file's first bytes (at least 352) and name.

    DICOM: ``DICM`` at byte 128 (Part 10 files), or a ``.dcm``/``.dicom`` name. NIfTI: the
    ``sizeof_hdr`` and magic of a NIfTI-1 or NIfTI-2 header, gzipped or not.
    """
    low = name.lower()
    if head[128:132] == b"DICM" or low.endswith((".dcm", ".dicom")):
        return "dicom"
    if head[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 600)
        except zlib.error:
            return "image"
    if _is_nifti_header(head):
        return "nifti"
    return "image"


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1"):
        return int.from_bytes(head[:4], "little") == 348 or int.from_bytes(head[:4], "big") == 348
    if len(head) >= 12 and head[4:7] in (b"n+2", b"ni2"):
        return int.from_bytes(head[:4], "little") == 540 or int.from_bytes(head[:4], "big") == 540
    return False


def load_image(source: str | os.PathLike | bytes, options: ImageOptions | None = None, *,
               name: str | None = None, max_pixels: int | None = None) -> Any:
    """Decode an image, DICOM or NIfTI file into the 8-bit RGB ``PIL.Image`` the model sees.

    Args:
        source: a path, or the file's bytes.
        options: window, frame, slice, plane and volume for DICOM/NIfTI (default: the file's own).
        name: what to call the source in error messages (default: the path, or "the image data").
        max_pixels: refuse a picture with more pixels than this before decoding its pixels.

    Returns:
        An RGB ``PIL.Image``.

    Raises:
        DataError: missing file, unreadable or truncated file, no pixel data, bad index.
        DependencyError: a DICOM/NIfTI file without ``pydicom``/``nibabel``, or a compressed
            DICOM without a decoder for its transfer syntax.
    """
    return render_image(source, options, name=name, max_pixels=max_pixels)[0]


def load_record_image(path: str | os.PathLike, source: object, record: object,
                      options: ImageOptions | None = None, *, then: str | None = None) -> Any:
    """:func:`load_image` for the image a data record names; a problem names the record.

    Args:
        path: the image file.
        source: the file holding the record (questions, conversations), for messages.
        record: the record's id.
        options: how a DICOM/NIfTI file is rendered.
        then: a sentence added to the hint (``"answers so far are kept and a rerun resumes"``).

    Raises:
        DataError: ``SOURCE, record ID, field 'image': PATH: image file not found`` (or the reason
            it does not decode), hinting what to do.
        DependencyError: as :func:`load_image`.
    """
    try:
        return load_image(path, options)
    except DataError as exc:
        missing = not Path(path).expanduser().is_file()
        hint = ("check --images (the folder the records' image paths are relative to)" if missing
                else exc.hint or "replace or remove the file")
        raise data_error(source, record, "image", exc.message, f"{hint}; {then}" if then else hint) from None


def image_problem(path: str | os.PathLike, header_only: bool = False) -> tuple[str, str] | None:
    """What is wrong with an image file, or ``None`` when it renders as :func:`load_image` does.

    Args:
        path: the file.
        header_only: for an ordinary image read only the header (a cheap pass over a training
            set; the pixels decode when the batch is built). DICOM and NIfTI files are rendered in
            full either way: truncation, missing pixel data or a 4-D volume show only then.

    Returns:
        ``None``, ``("image-missing", "file not found")`` or ``("image-corrupt", REASON)``, the
        reason :func:`load_image` gives (``"does not decode as an image (…)"``, ``"the DICOM file
        has no pixel data …"``).
    """
    path = Path(path)
    if not path.is_file():
        return "image-missing", "file not found"
    try:
        if header_only:
            with open(path, "rb") as fh:
                header_only = image_kind(fh.read(1024), path.name) == "image"
        if header_only:
            from PIL import Image

            try:
                with Image.open(path) as im:
                    im.size  # noqa: B018 - reading the header is the check
            except (Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError) as exc:
                raise _pillow_problem(str(path), exc) from None
        else:
            load_image(path)
    except LlavamedError as exc:  # DependencyError too: a DICOM file without pydicom is not usable
        return "image-corrupt", exc.message.removeprefix(f"{path}: ")[:200]
    return None


def render_image(source: str | os.PathLike | bytes, options: ImageOptions | None = None, *,
                 name: str | None = None, max_pixels: int | None = None) -> tuple[Any, RenderInfo]:
    """Like :func:`load_image`, and also say how the picture was made (:class:`RenderInfo`)."""
    options = options or ImageOptions()
    if isinstance(source, (bytes, bytearray, memoryview)):
        data: bytes | None = bytes(source)
        where = name or "the image data"
        head = data[:1024]
        file_name = name or ""
    else:
        path = Path(source).expanduser()
        where = name or str(path)
        if not path.is_file():
            raise DataError(f"{where}: image file not found", "check the path")
        data = None
        with open(path, "rb") as fh:
            head = fh.read(1024)
        file_name = path.name
    kind = image_kind(head, file_name)
    src: Any = io.BytesIO(data) if data is not None else path
    if kind == "dicom":
        return _render_dicom(src, where, options, max_pixels, head)
    if kind == "nifti":
        return _render_nifti(data if data is not None else path, where, options, max_pixels)
    return _render_ordinary(src, where, max_pixels)


def save_view(source: str | os.PathLike, out: str | os.PathLike,
              options: ImageOptions | None = None) -> tuple[Path, RenderInfo]:
    """Write the picture the model sees (before its own resize/pad) as an 8-bit RGB PNG.

    Args:
        source: an image, DICOM or NIfTI file.
        out: the PNG to write (replaced atomically; nothing is written on error).
        options: window, frame, slice, plane and volume.

    Returns:
        ``(out, info)``.

    Raises:
        ConfigError: ``out`` does not end in ``.png``.
        DataError, DependencyError: as :func:`load_image`.
    """
    from .io import atomic_write_bytes, check_out_not_overlapping

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the view is written as PNG; give a path ending in .png")
    check_out_not_overlapping(out, [("FILE", source)])
    image, info = render_image(source, options)
    red, green, blue = image.split()
    if red.tobytes() == green.tobytes() == blue.tobytes():
        image = red  # a grey picture: the same pixels in a third of the bytes
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return atomic_write_bytes(out, buf.getvalue()), info


# --- ordinary images ----------------------------------------------------------------------------

def _render_ordinary(src: Any, where: str, max_pixels: int | None) -> tuple[Any, RenderInfo]:
    from PIL import Image

    try:
        with Image.open(src) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise DataError(f"{where}: the image has {im.width}x{im.height} pixels, over the "
                                f"limit of {max_pixels:,}", "downscale it first")
            im.load()
            rgb = as_rgb(im)
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise _pillow_problem(where, exc) from None
    return rgb, RenderInfo("image", rgb.width, rgb.height)


def _pillow_problem(where: str, exc: BaseException) -> DataError:
    """The :class:`DataError` for an exception Pillow raised opening or decoding ``where``."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return DataError(f"{where}: does not decode as an image, DICOM or NIfTI file",
                         "give a PNG, JPEG, TIFF, … image, a DICOM file (.dcm) or a NIfTI "
                         "volume (.nii, .nii.gz)")
    if isinstance(exc, Image.DecompressionBombError):
        return DataError(f"{where}: the image claims too many pixels (decompression-bomb guard)",
                         "downscale it first")
    return DataError(f"{where}: does not decode as an image ({_first_line(exc)})",
                     "replace the file (it is truncated or corrupt)")


def as_rgb(im: Any) -> Any:
    """An 8-bit RGB copy of ``im``: alpha flattened on white, deep greys stretched to 0–255 (the one
    conversion every reader uses: chat, eval, training, serve and figure extraction)."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(_to_uint8(_stretch(arr, float(arr.min()), float(arr.max()))),
                               "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


# --- DICOM --------------------------------------------------------------------------------------

def _import(module: str, package: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DependencyError(f"reading {what} files needs the '{package}' package, which is not "
                              f"installed", _PIP_HINT.format(pkg=package)) from None


# Packages that decode each compressed transfer syntax (pydicom's decoder plugins).
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",   # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",   # JPEG Extended (12-bit)
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",   # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",   # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",   # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",           # RLE Lossless
}


def _render_dicom(src: Any, where: str, options: ImageOptions, max_pixels: int | None,
                  head: bytes) -> tuple[Any, RenderInfo]:
    _import("pydicom", "pydicom", "DICOM")
    import numpy as np
    import pydicom
    from pydicom.errors import InvalidDicomError

    # pydicom warns about odd element values with the values in the message: keep them out of
    # every log (nothing identifying may be printed).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A file without the Part 10 preamble is read only when it starts like a DICOM data set
        # (group 0002 or 0008), as old exports and some scanners write them.
        raw_dataset = head[128:132] != b"DICM" and head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x08")
        try:
            ds = pydicom.dcmread(src, force=raw_dataset)
        except InvalidDicomError:
            raise DataError(f"{where}: not a DICOM file (no 'DICM' marker, and it does not start "
                            f"like a DICOM data set)", "give a DICOM Part 10 file") from None
        except Exception as exc:  # pydicom raises many types on corrupt headers
            raise DataError(f"{where}: the DICOM header does not parse ({type(exc).__name__})",
                            "replace the file (it is truncated or corrupt)") from None
        modality = _text(ds, "Modality")
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            what = f"Modality {modality}" if modality else "no Modality"
            if modality == "SR":
                what += ", a structured report"
            raise DataError(f"{where}: the DICOM file has no pixel data ({what}); nothing to show",
                            "give an image DICOM file (CT, MR, CR, DX, US, …)")
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if rows <= 0 or cols <= 0:
            raise DataError(f"{where}: the DICOM file declares a {rows}x{cols} image",
                            "replace the file (its Rows/Columns are missing or zero)")
        if max_pixels is not None and rows * cols > max_pixels:
            raise DataError(f"{where}: the image has {cols}x{rows} pixels, over the limit of "
                            f"{max_pixels:,}", "downscale it first")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        frame = frames // 2 if options.frame is None else options.frame
        if frame >= frames:
            raise DataError(f"{where}: frame {frame} is out of range: the file has {frames} "
                            f"frame{'s' if frames != 1 else ''} (0–{frames - 1})",
                            "choose a frame with --frame N (counted from 0)")
        if frames > 1:  # decode only the frame shown (a long cine loop need not fit in memory)
            ds.pixel_array_options(index=frame)
        arr = _decode_pixels(ds, where)
        photometric = _text(ds, "PhotometricInterpretation") or "MONOCHROME2"
        info = dict(kind="dicom", modality=modality or None, photometric=photometric,
                    frame=frame, frames=frames)
        if photometric == "PALETTE COLOR":
            rgb = _palette_to_rgb(arr, ds, where)
            return _finish(rgb, info, None, "none", None)
        if arr.ndim == 3:  # RGB (pydicom converts YBR to RGB as it decodes)
            bits = int(ds.get("BitsStored", 8) or 8)
            rgb = arr if bits <= 8 else _to_uint8(arr.astype(np.float64) * (255.0 / (2 ** bits - 1)))
            return _finish(rgb.astype(np.uint8), info, None, "none", None)
        values = _modality_values(arr, ds)
        y, window, source = _dicom_window(values, ds, options)
        if photometric == "MONOCHROME1":
            y = 255.0 - y
        return _finish(_to_uint8(y), info, window, source, values)


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip().upper() if value is not None else ""


def _decode_pixels(ds: Any, where: str) -> Any:
    """The stored pixel values (all frames); typed errors for truncation and missing decoders."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        return ds.pixel_array
    except ValueError as exc:
        text = str(exc)
        if "less than expected" in text or "shorter than" in text:
            return _raise_truncated(where, text)
        raise DataError(f"{where}: the pixel data does not decode ({_safe_reason(text)})",
                        "replace the file (it is truncated or corrupt)") from None
    except (RuntimeError, NotImplementedError) as exc:
        if ts is not None and ts.is_compressed:
            pkg = _DECODER_PACKAGES.get(str(ts), "python-gdcm")
            raise DependencyError(f"{where}: the pixel data is compressed as '{ts.name}' ({ts}), "
                                  f"and no installed decoder reads it", f"pip install {pkg}") from None
        raise DataError(f"{where}: the pixel data does not decode ({type(exc).__name__})",
                        "replace the file (it is truncated or corrupt)") from None
    except Exception as exc:  # decoders raise many types on corrupt data
        raise DataError(f"{where}: the pixel data does not decode ({type(exc).__name__})",
                        "replace the file (it is truncated or corrupt)") from None


def _raise_truncated(where: str, text: str) -> Any:
    import re

    m = re.search(r"\((\d+) vs (\d+) bytes\)", text)
    sizes = f" ({int(m.group(1)):,} of {int(m.group(2)):,} bytes)" if m else ""
    raise DataError(f"{where}: the pixel data is shorter than the header declares{sizes}: the file "
                    f"is truncated", "copy or export the file again")


def _safe_reason(text: str) -> str:
    # pydicom's pixel errors hold sizes and attribute names, not values; keep one short line.
    return text.splitlines()[0][:160] if text else "unknown"


def _modality_values(arr: Any, ds: Any) -> Any:
    """Stored values → real-world values: Rescale Slope/Intercept or the Modality LUT (HU for CT)."""
    import numpy as np
    from pydicom.pixels import apply_modality_lut

    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)


def _dicom_window(values: Any, ds: Any, options: ImageOptions) -> tuple[Any, Any, str]:
    """(0–255 floats, window applied, where it came from)."""
    import numpy as np

    if options.window is not None:
        center, width = parse_window(options.window)
        key = options.window.strip().lower()
        return window_linear(values, center, width), (center, width), (
            f"preset:{key}" if key in WINDOW_PRESETS else "option")
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        from pydicom.pixels import apply_voi

        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        out = np.asarray(apply_voi(values, ds, index=0), dtype=np.float64)
        return out * (255.0 / (2 ** bits - 1)), None, "file-voi-lut"
    center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = _text(ds, "VOILUTFunction") or "LINEAR"
        if function == "SIGMOID":
            return _window_sigmoid(values, center, width), (center, width), "file"
        if function == "LINEAR_EXACT":
            return _window_linear_exact(values, center, width), (center, width), "file"
        if width >= 1:
            return window_linear(values, center, width), (center, width), "file"
    return _stretch(values, float(np.nanmin(values)), float(np.nanmax(values))), None, "full-range"


def _first_number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        if not isinstance(value, (int, float)) and hasattr(value, "__len__") and not isinstance(value, str):
            value = value[0] if len(value) else None
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _palette_to_rgb(arr: Any, ds: Any, where: str) -> Any:
    import numpy as np
    from pydicom.pixels import apply_color_lut

    try:
        rgb = np.asarray(apply_color_lut(arr, ds))
    except Exception as exc:  # a missing or malformed palette
        raise DataError(f"{where}: the palette colour lookup table is unusable "
                        f"({type(exc).__name__})", "replace the file") from None
    top = float(2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1)
    return _to_uint8(rgb.astype(np.float64) * (255.0 / top))


def _finish(arr8: Any, info: dict, window: Any, source: str, values: Any) -> tuple[Any, RenderInfo]:
    import numpy as np
    from PIL import Image

    mode = "L" if arr8.ndim == 2 else "RGB"
    img = Image.fromarray(np.ascontiguousarray(arr8), mode).convert("RGB")
    value_range = None
    if values is not None and np.isfinite(values).any():
        value_range = (float(np.nanmin(values)), float(np.nanmax(values)))
    return img, RenderInfo(width=img.width, height=img.height, window=window, window_source=source,
                           value_range=value_range, **info)


# --- NIfTI --------------------------------------------------------------------------------------

def _render_nifti(src: Any, where: str, options: ImageOptions,
                  max_pixels: int | None) -> tuple[Any, RenderInfo]:
    _import("nibabel", "nibabel", "NIfTI")
    import nibabel as nib
    import numpy as np

    img = _open_nifti(src, where)
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or len(shape) > 4:
        raise DataError(f"{where}: a {len(shape)}-D NIfTI ({'x'.join(map(str, shape))} voxels); "
                        f"only 3-D volumes and 4-D series can be shown", "give a 3-D or 4-D file")
    volumes = shape[3] if len(shape) == 4 else None
    if volumes is not None:
        if options.volume is None:
            raise DataError(f"{where}: a 4-D NIfTI ({'x'.join(map(str, shape))} voxels, {volumes} "
                            f"volumes); choose one volume", f"add --volume N (0–{volumes - 1})")
        if options.volume >= volumes:
            raise DataError(f"{where}: volume {options.volume} is out of range: the file has "
                            f"{volumes} volumes (0–{volumes - 1})", "choose another --volume")
    try:
        canon = nib.as_closest_canonical(img)
        axis = PLANES.index(options.plane)
        axis = {0: 2, 1: 1, 2: 0}[axis]  # axial cuts z, coronal y, sagittal x (RAS+ axes)
        n = int(canon.shape[axis])
        index = n // 2 if options.slice_index is None else options.slice_index
        if index >= n:
            raise DataError(f"{where}: slice {index} is out of range: the {options.plane} plane has "
                            f"{n} slices (0–{n - 1})", "choose another --slice")
        plane_shape = [s for i, s in enumerate(canon.shape[:3]) if i != axis]
        if max_pixels is not None and plane_shape[0] * plane_shape[1] > max_pixels:
            raise DataError(f"{where}: the {options.plane} slice has {plane_shape[0]}x"
                            f"{plane_shape[1]} pixels, over the limit of {max_pixels:,}",
                            "downscale it first")
        index_tuple: list[Any] = [slice(None)] * len(canon.shape)
        index_tuple[axis] = index
        if volumes is not None:
            index_tuple[3] = options.volume
        for extra in range(4, len(canon.shape)):
            index_tuple[extra] = 0
        plane = np.asarray(canon.dataobj[tuple(index_tuple)], dtype=np.float64)
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many types on short or corrupt data
        raise DataError(f"{where}: the NIfTI voxel data does not read ({type(exc).__name__}: "
                        f"{_first_line(exc)})", "replace the file (it is truncated or corrupt)") from None
    # Radiological display: rows from anterior/superior down, columns from the patient's right.
    plane = plane.T[::-1, ::-1]
    header = img.header
    if options.window is not None:
        center, width = parse_window(options.window)
        key = options.window.strip().lower()
        y, window, source = window_linear(plane, center, width), (center, width), (
            f"preset:{key}" if key in WINDOW_PRESETS else "option")
    else:
        cal_min, cal_max = float(header.get("cal_min", 0) or 0), float(header.get("cal_max", 0) or 0)
        if cal_max > cal_min:
            y, window, source = _stretch(plane, cal_min, cal_max), None, "file-cal-range"
        else:
            finite = plane[np.isfinite(plane)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
            y, window, source = _stretch(plane, lo, hi), None, "full-range"
    info = dict(kind="nifti", plane=options.plane, slice_index=index, slices=n,
                volume=options.volume if volumes is not None else None, volumes=volumes)
    return _finish(_to_uint8(y), info, window, source, plane)


def _open_nifti(src: Any, where: str) -> Any:
    import nibabel as nib

    try:
        if isinstance(src, Path):
            return nib.load(str(src))
        raw = src
        if raw[:2] == b"\x1f\x8b":
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            raw = inflater.decompress(raw, _MAX_INFLATED)
            if inflater.unconsumed_tail:
                raise DataError(f"{where}: the gzipped NIfTI inflates past {_MAX_INFLATED:,} bytes",
                                "send a smaller volume")
        kind = nib.Nifti2Image if raw[4:7] in (b"n+2", b"ni2") else nib.Nifti1Image
        return kind.from_bytes(raw)
    except DataError:
        raise
    except (zlib.error, gzip.BadGzipFile, EOFError):
        raise DataError(f"{where}: the gzipped NIfTI is truncated or corrupt",
                        "replace the file") from None
    except Exception as exc:  # nibabel raises many types on bad headers
        raise DataError(f"{where}: the NIfTI header does not read ({type(exc).__name__}: "
                        f"{_first_line(exc)})", "replace the file (it is truncated or corrupt)") from None
