"""Outputs get the permissions of the umask, like any file ``open``/``mkdir`` makes.

The atomic writers build files and folders under temporary names (``mkstemp``/``mkdtemp``, which
create them private: 0600/0700) and rename them into place. Here every kind of output is written
under umask 022 (→ files 0644, folders 0755) and under umask 077 (→ 0600/0700), and every file and
folder of it is checked: a saved checkpoint, a prepared dataset (from source images that are
0600 themselves), a downloaded file, extracted images, JSON outputs and a replaced file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from http_fixtures import FileServer, jpeg_bytes, make_tarball


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """``relative path → octal mode`` of ``root`` and everything under it (links not followed)."""
    out = {".": oct(stat.S_IMODE(root.lstat().st_mode))}
    for p in sorted(root.rglob("*")):
        out[p.relative_to(root).as_posix()] = oct(stat.S_IMODE(p.lstat().st_mode))
    return out


def expected(root: Path, umask: int) -> dict[str, str]:
    """What :func:`modes` must say: files ``0o666 & ~umask``, folders ``0o777 & ~umask``."""
    out = {".": oct(0o777 & ~umask)}
    for p in sorted(root.rglob("*")):
        out[p.relative_to(root).as_posix()] = oct((0o777 if p.is_dir() else 0o666) & ~umask)
    return out


def test_saved_checkpoint(umask, tmp_path):
    from llavamed_core.model import build_from_preset, save_checkpoint

    model, processor = build_from_preset("tiny", seed=0)
    out = save_checkpoint(model, processor, tmp_path / "ckpt", max_shard_bytes=200_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # the sharded path, with its index
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    assert modes(out) == expected(out, umask)
    # Replacing it (--overwrite) gives the same.
    out = save_checkpoint(model, processor, tmp_path / "ckpt", overwrite=True)
    assert modes(out) == expected(out, umask)


def test_prepared_dataset_from_private_source_images(umask, tmp_path):
    from PIL import Image

    from llavamed_core.data.prepare import PrepareConfig, prepare_vqa

    src = tmp_path / "raw"
    (src / "VQA_RAD Image Folder").mkdir(parents=True)
    for name, colour in (("a.jpg", 10), ("b.jpg", 200)):
        path = src / "VQA_RAD Image Folder" / name
        Image.new("RGB", (8, 8), (colour, 50, 50)).save(path)
        path.chmod(0o600)  # the copy's mode comes from the umask, not from the source
    recs = [{"qid": i, "image_name": img, "question": q, "answer": a, "answer_type": at,
             "phrase_type": "test_freeform" if i == 2 else "freeform", "question_type": "PRES"}
            for i, (img, q, a, at) in enumerate([("a.jpg", "Is it normal?", "yes", "CLOSED"),
                                                 ("b.jpg", "What organ?", "lung", "OPEN"),
                                                 ("b.jpg", "Is there a mass?", "no", "CLOSED")])]
    (src / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs))
    out = tmp_path / "prepared"
    prepare_vqa(PrepareConfig(dataset="vqa-rad", src=src, out=out))
    assert {"train.json", "test.json", "prepare.json", "images", "images/a.jpg", "images/b.jpg"} <= set(modes(out))
    assert modes(out) == expected(out, umask)


def test_downloaded_file_and_extracted_images(umask, tmp_path):
    from llavamed_core.data.extract import ExtractConfig, extract_figures
    from llavamed_core.http import HttpClient, HttpConfig

    with FileServer() as srv:
        srv.add("files/data.json", b'{"a": 1}\n' * 1000)
        srv.add("pmc/PMC1.tar.gz", make_tarball({"PMC1/f1.jpg": jpeg_bytes(1), "PMC1/f2.jpg": jpeg_bytes(2)}))
        dl = tmp_path / "dl"
        with HttpClient(HttpConfig(retries=1)) as client:
            client.download(srv.url("files/data.json"), dl / "sub" / "data.json")
        assert (dl / "sub" / "data.json").stat().st_size == 9000
        assert modes(dl) == expected(dl, umask)

        urls = tmp_path / "urls.jsonl"
        urls.write_text("".join(json.dumps({"pmc_tar_url": srv.url("pmc/PMC1.tar.gz"), "image_file_path": m,
                                            "pair_id": pid}) + "\n"
                                for m, pid in (("PMC1/f1.jpg", "p1"), ("PMC1/f2.jpg", "p2"))))
        out = tmp_path / "images"
        res = extract_figures(ExtractConfig(urls=urls, out=out, workers=1, keep_tarballs=True,
                                            http=HttpConfig(retries=1)))
        assert res.extracted == 2
        assert {"p1.jpg", "p2.jpg", "tarballs", "tarballs/PMC1.tar.gz"} <= set(modes(out))
        assert "failures.jsonl" not in modes(out)  # nothing failed: no empty failures file
        assert modes(out) == expected(out, umask)


def test_json_outputs_and_a_replaced_private_file(umask, tmp_path):
    from llavamed_core.io import JsonlAppender, atomic_dir, atomic_write_bytes, atomic_write_json, write_records_json

    out = tmp_path / "outputs"
    atomic_write_json(out / "a" / "summary.json", {"x": 1})
    write_records_json(out / "records.json", [{"id": 1}])
    atomic_write_bytes(out / "blob.bin", b"\0\1")
    with JsonlAppender(out / "answers.jsonl") as w:
        w.write({"question_id": 1, "text": "ok"})
    with atomic_dir(out / "built") as tmp:
        (tmp / "inner").mkdir()
        atomic_write_json(tmp / "inner" / "x.json", [])
    private = out / "private.json"
    private.write_text("{}")
    private.chmod(0o600)
    atomic_write_json(private, {"replaced": True})  # a replaced file gets the umask's mode too
    assert json.loads(private.read_text()) == {"replaced": True}
    assert modes(out) == expected(out, umask)


def test_cli_weights_init_under_umask(cli, umask, tmp_path):
    res = cli("weights", "init", "--preset", "tiny", "--out", tmp_path / "ckpt")
    assert res.exit_code == 0, res
    assert modes(tmp_path / "ckpt") == expected(tmp_path / "ckpt", umask)
