"""Hostile input → the exact one-line error, and nothing lost or changed on disk.

Each test gives a command something it must refuse and checks three things: exit status 1, the
``Error: … / Hint: …`` lines naming the file (and record and field where there is one), and the
disk: inputs hashed before and after are the same, no output (or half-written temporary) exists.

Covered: an ``--out`` that is, contains or lies inside an input, for every command with
``--overwrite`` (symlinks resolved); ``data prepare`` images that are symbolic links out of the
release; image paths outside ``--images`` (``../``, absolute) in ``data validate`` and ``train``;
empty inputs; JSON nested too deeply, UTF-16 and binary files; a full disk while saving; a corrupt
checkpoint given to ``train``; ``<image>`` typed into ``chat --prompt``; ``--report-to`` without
its package; ``instruct gen`` where every request fails, or more than ``--max-failures``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from llavamed_core.errors import DataError, StorageError

GOOD = {"id": "r1", "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "yes"}]}


def tree_state(root: Path) -> dict[str, str]:
    """Every file (sha256), folder and symbolic link under ``root``, to compare before/after."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link -> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def error_lines(res) -> list[str]:
    """The stderr lines, checked to be exactly ``Error: …`` and ``Hint: …`` (no traceback), besides
    the ``[task] n/total`` progress lines printed when stderr is not a terminal."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("[")]
    assert res.exit_code == 1, res
    assert "Traceback" not in res.stderr + res.stdout
    assert len(lines) == 2 and lines[0].startswith("Error: ") and lines[1].startswith("Hint: "), lines
    return lines


def make_rad(root: Path) -> Path:
    """A small VQA-RAD release (JSON + image folder) at ``root``."""
    images = root / "VQA_RAD Image Folder"
    images.mkdir(parents=True)
    for i, name in enumerate(("a.jpg", "b.jpg")):
        Image.new("RGB", (8, 8), (40 * i, 90, 10)).save(images / name)
    recs = [{"qid": i, "image_name": img, "question": "Is it normal?", "answer": ans, "answer_type": "CLOSED",
             "phrase_type": "test_freeform" if i == 2 else "freeform"}
            for i, (img, ans) in enumerate([("a.jpg", "yes"), ("b.jpg", "no"), ("b.jpg", "yes")])]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs))
    return root


def make_images(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (32, 24), (30 * i, 80, 160)).save(folder / name)
    return folder


# -- outputs that would destroy their own input ---------------------------------------------------

@pytest.mark.parametrize("where, relation", [
    ("same", "is the same path as --src"),
    ("inside", "is inside --src"),
    ("contains", "contains --src"),
    ("symlink", "is the same path as --src"),
])
def test_prepare_refuses_an_out_overlapping_src_even_with_overwrite(cli, tmp_path, where, relation):
    src = make_rad(tmp_path / "raw" / "release")
    (tmp_path / "link").symlink_to(src)
    src_arg = {"contains": src / "VQA_RAD Dataset Public.json"}.get(where, src)
    out = {"same": src, "inside": src / "prepared", "contains": src,
           "symlink": tmp_path / "link"}[where]
    before = tree_state(tmp_path)
    res = cli("data", "prepare", "vqa-rad", "--src", src_arg, "--out", out, "--overwrite")
    err, hint = error_lines(res)
    assert err == f"Error: --out {out} {relation} {src_arg}: writing there could destroy the input"
    assert hint.startswith("Hint: choose an --out apart from --src")
    assert tree_state(tmp_path) == before  # the release is intact, and nothing was written


def test_prepare_with_a_separate_out_still_works(cli, tmp_path):
    src = make_rad(tmp_path / "raw")
    res = cli("data", "prepare", "vqa-rad", "--src", src, "--out", tmp_path / "prepared", "--json")
    assert res.exit_code == 0, res
    assert json.loads(res.stdout)["splits"]["train"]["questions"] == 2


def _inputs(tmp_path: Path, tiny_ckpt: Path) -> dict[str, Path]:
    """Directories that stand for each command's inputs (only the overlap check reads them)."""
    paths = {}
    for name in ("base", "delta", "target", "adapter", "llm", "vision"):
        paths[name] = tmp_path / name
        shutil.copytree(tiny_ckpt, paths[name])
    paths["images"] = make_images(tmp_path / "images", "a.png")
    paths["data"] = tmp_path / "data.json"
    paths["data"].write_text(json.dumps([GOOD]))
    return paths


OVERWRITE_COMMANDS = {
    "weights convert": (lambda p: ["weights", "convert", p["base"], "--out", p["base"]],
                        "--out {base} is the same path as SRC {base}"),
    "weights apply-delta": (lambda p: ["weights", "apply-delta", "--base", p["base"], "--delta", p["delta"],
                                       "--out", p["delta"] / "merged"],
                            "--out {delta}/merged is inside --delta {delta}"),
    "weights make-delta": (lambda p: ["weights", "make-delta", "--base", p["base"], "--target", p["target"],
                                      "--out", p["target"].parent],
                           "--out {root} contains --base {base}"),
    "weights merge-lora": (lambda p: ["weights", "merge-lora", "--adapter", p["adapter"], "--out", p["adapter"]],
                           "--out {adapter} is the same path as --adapter {adapter}"),
    "weights init": (lambda p: ["weights", "init", "--llm", p["llm"], "--vision", p["vision"],
                                "--out", p["vision"]],
                     "--out {vision} is the same path as --vision {vision}"),
    "train --out": (lambda p: ["train", "instruct", "--model", p["base"], "--data", p["data"],
                               "--images", p["images"], "--out", p["images"], "--max-steps", "1"],
                    "--out {images} is the same path as --images {images}"),
    "train --run-dir": (lambda p: ["train", "instruct", "--model", p["base"], "--data", p["data"],
                                   "--images", p["images"], "--out", p["images"].parent / "new",
                                   "--run-dir", p["base"] / "run", "--max-steps", "1"],
                        "--run-dir {base}/run is inside --model {base}"),
}


@pytest.mark.parametrize("command", sorted(OVERWRITE_COMMANDS))
def test_every_overwrite_command_refuses_an_out_overlapping_an_input(cli, tiny_ckpt, tmp_path, command):
    paths = _inputs(tmp_path, tiny_ckpt)
    args, message = OVERWRITE_COMMANDS[command]
    before = tree_state(tmp_path)
    res = cli(*args(paths), "--overwrite")
    err, _ = error_lines(res)
    want = message.format(root=tmp_path, **{k: str(v) for k, v in paths.items()})
    assert err == f"Error: {want}: writing there could destroy the input"
    assert tree_state(tmp_path) == before


# -- prepare: symbolic links out of the release ------------------------------------------------------

def test_prepare_refuses_an_image_linking_out_of_the_release(cli, tmp_path):
    src = make_rad(tmp_path / "raw")
    secret = tmp_path / "elsewhere" / "secret.jpg"
    secret.parent.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    link = src / "VQA_RAD Image Folder" / "b.jpg"
    link.unlink()
    link.symlink_to(secret)
    before = tree_state(tmp_path)
    res = cli("data", "prepare", "vqa-rad", "--src", src, "--out", tmp_path / "out")
    err, hint = error_lines(res)
    assert err == (f"Error: {src / 'VQA_RAD Dataset Public.json'}, record 1, field 'image': {link} is a "
                   f"symbolic link to {secret}, outside {src / 'VQA_RAD Image Folder'}")
    assert "--follow-symlinks" in hint
    assert tree_state(tmp_path) == before and not (tmp_path / "out").exists()

    # Asked for explicitly, the linked image is copied (a real file, not a link).
    res = cli("data", "prepare", "vqa-rad", "--src", src, "--out", tmp_path / "out", "--follow-symlinks")
    assert res.exit_code == 0, res
    copied = tmp_path / "out" / "images" / "b.jpg"
    assert not copied.is_symlink() and copied.read_bytes() == secret.read_bytes()


def test_prepare_keeps_links_inside_the_release(cli, tmp_path):
    src = make_rad(tmp_path / "raw")
    link = src / "VQA_RAD Image Folder" / "b.jpg"
    link.unlink()
    link.symlink_to("a.jpg")  # a link within the image folder is fine
    res = cli("data", "prepare", "vqa-rad", "--src", src, "--out", tmp_path / "out")
    assert res.exit_code == 0, res


# -- image paths outside --images ---------------------------------------------------------------------

@pytest.mark.parametrize("image, problem", [
    ("../outside.png", "'../outside.png' goes up with '..', outside the images folder"),
    ("sub/../../outside.png", "'sub/../../outside.png' goes up with '..', outside the images folder"),
    ("ABSOLUTE", "'ABSOLUTE' is an absolute path, outside the images folder"),
])
def test_image_paths_outside_images_are_refused(cli, tiny_ckpt, tmp_path, image, problem):
    make_images(tmp_path, "outside.png")  # exists, so only the path rule can refuse it
    images = make_images(tmp_path / "images", "a.png")
    image = image.replace("ABSOLUTE", str(tmp_path / "outside.png"))
    problem = problem.replace("ABSOLUTE", str(tmp_path / "outside.png"))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([GOOD, dict(GOOD, id="bad-7", image=image)]))
    where = f"{data}, record bad-7, field 'image': {problem}"

    res = cli("data", "validate", data, "--images", images)
    assert res.exit_code == 1, res
    assert "image-path" in res.stdout
    assert error_lines(res)[0] == f"Error: {data}: 1 problem(s) in 1 record(s)"
    res = cli("data", "validate", data, "--images", images, "--json")
    report = json.loads(res.stdout)
    assert report["by_kind"] == {"image-path": 1}
    assert report["examples"]["image-path"] == [{"record": "bad-7", "message": where}]

    res = cli("train", "instruct", "--model", tiny_ckpt, "--data", data, "--images", images,
              "--out", tmp_path / "out", "--max-steps", "1")
    err, hint = error_lines(res)
    assert err == f"Error: {where}"
    assert hint == "Hint: image paths are relative to the --images folder; move the file there"
    assert not (tmp_path / "out").exists()


# -- empty inputs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["", "[]", "  \n", "[\n]\n"])
def test_empty_data_files_are_errors(cli, tiny_ckpt, tmp_path, content):
    data = tmp_path / "data.json"
    data.write_text(content)
    images = make_images(tmp_path / "images", "a.png")
    want = f"Error: {data}: no records (the file is empty or an empty list)"
    assert error_lines(cli("data", "validate", data))[0] == want
    assert error_lines(cli("train", "instruct", "--model", tiny_ckpt, "--data", data, "--images", images,
                           "--out", tmp_path / "out"))[0] == want
    assert not (tmp_path / "out").exists()
    # Evaluation datasets and chat-benchmark questions are read by the same readers.
    from llavamed_core.records import load_conversations, load_qa50

    with pytest.raises(DataError, match="no records"):
        load_conversations(data, require_image=False, strict=False)
    with pytest.raises(DataError, match="no questions"):
        load_qa50(data)


def test_empty_prepare_and_instruct_inputs_are_errors(cli, tmp_path):
    src = make_rad(tmp_path / "raw")
    rad = src / "VQA_RAD Dataset Public.json"
    rad.write_text("[]")
    before = tree_state(tmp_path)
    err, _ = error_lines(cli("data", "prepare", "vqa-rad", "--src", src, "--out", tmp_path / "out"))
    assert err == f"Error: {rad}: no records (the file is empty or an empty list)"
    assert tree_state(tmp_path) == before

    for content in ("", "[]", "{}", '{"chest_xray": [], "mri": []}'):
        figs = tmp_path / "figs.json"
        figs.write_text(content)
        res = cli("instruct", "gen", "--input", figs, "--output", tmp_path / "gen.jsonl",
                  "--base-url", "http://127.0.0.1:9/v1")
        assert error_lines(res)[0] == f"Error: {figs}: no figure records (the file is empty or an empty list)"
        assert not (tmp_path / "gen.jsonl").exists()


# -- files that are not what they claim ----------------------------------------------------------------

def _hostile_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    p = tmp_path / f"{kind}.json"
    if kind == "deep":
        p.write_text("[" * 200_000 + "]" * 200_000)
        return p, f"Error: {p}: JSON nested too deeply to read"
    if kind == "deep-jsonl":
        p.write_text('{"a": ' * 100_000 + "1" + "}" * 100_000 + "\n")
        return p, f"Error: {p}: JSON nested too deeply to read"
    if kind == "utf16":
        p.write_text(json.dumps([GOOD]), encoding="utf-16")
        return p, f"Error: {p}: not UTF-8 text (UTF-16 text)"
    if kind == "utf16-nobom":
        p.write_bytes(json.dumps([GOOD]).encode("utf-16-le"))
        return p, f"Error: {p}: not UTF-8 text (UTF-16 text)"
    if kind == "latin1":
        text = json.dumps([dict(GOOD, id=f"r{i}") for i in range(100)] + [dict(GOOD, id="caf\u00e9")],
                          ensure_ascii=False)
        p.write_bytes(text.encode("latin-1"))
        return p, f"Error: {p}: not UTF-8 text (invalid UTF-8 at byte {text.index(chr(0xe9)):,})"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    return p, f"Error: {p}: not UTF-8 text (a binary file)"


@pytest.mark.parametrize("kind", ["deep", "deep-jsonl", "utf16", "utf16-nobom", "latin1", "binary"])
def test_unreadable_files_name_the_file(cli, tiny_ckpt, tmp_path, kind):
    path, want = _hostile_file(tmp_path, kind)
    images = make_images(tmp_path / "images", "a.png")
    assert error_lines(cli("data", "validate", path))[0] == want
    assert error_lines(cli("train", "instruct", "--model", tiny_ckpt, "--data", path, "--images", images,
                           "--out", tmp_path / "out"))[0] == want
    assert error_lines(cli("instruct", "gen", "--input", path, "--output", tmp_path / "gen.jsonl",
                           "--base-url", "http://127.0.0.1:9/v1"))[0] == want
    assert error_lines(cli("instruct", "post", "--input", path, "--output", tmp_path / "post.json"))[0] == want
    assert not (tmp_path / "out").exists() and not (tmp_path / "gen.jsonl").exists()
    assert not (tmp_path / "post.json").exists()


def test_unreadable_release_file_in_prepare(cli, tmp_path):
    src = make_rad(tmp_path / "raw")
    rad = src / "VQA_RAD Dataset Public.json"
    rad.write_text(rad.read_text(), encoding="utf-16")
    before = tree_state(tmp_path)
    err, _ = error_lines(cli("data", "prepare", "vqa-rad", "--src", src, "--out", tmp_path / "out"))
    assert err == f"Error: {rad}: not UTF-8 text (UTF-16 text)"
    assert tree_state(tmp_path) == before


# -- a full disk while saving ----------------------------------------------------------------------------

def _full_disk_after_half(where):
    """A stand-in for ``open`` in the checkpoint writer: its file fails as a full disk does, after
    storing half of the first write (``where="write"``) or when the data is flushed (``"fsync"``)."""
    import builtins

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            if where == "write":
                self.fh.write(bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def fileno(self):
            self.fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    return lambda path, mode="r", *a, **kw: Full(builtins.open(path, mode, *a, **kw))


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_during_a_checkpoint_save(cli, tmp_path, monkeypatch, where):
    import llavamed_core.model.shards as shards

    out = tmp_path / "ckpt"
    assert cli("weights", "init", "--preset", "tiny", "--out", out).exit_code == 0
    before = tree_state(tmp_path)
    monkeypatch.setattr(shards, "open", _full_disk_after_half(where), raising=False)
    for target, extra in ((tmp_path / "new", []), (out, ["--overwrite"])):
        res = cli("weights", "init", "--preset", "tiny", "--seed", "3", "--out", target, *extra)
        err, hint = error_lines(res)
        assert err == (f"Error: {target}: no space left on device while writing model.safetensors; "
                       "nothing half-written was left")
        assert hint == "Hint: free some disk space (or choose another output) and rerun"
        # No partial folder, no half file; the checkpoint that was there is untouched.
        assert tree_state(tmp_path) == before


def test_full_disk_during_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    import llavamed_core.io as io_mod

    path = tmp_path / "summary.json"
    io_mod.atomic_write_json(path, {"old": True})

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_mod.os, "fsync", fsync)
    with pytest.raises(StorageError) as info:
        io_mod.atomic_write_json(path, {"new": True, "pad": "x" * 10_000})
    assert info.value.message == f"{path}: no space left on device; nothing half-written was left"
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_full_disk_during_a_jsonl_append_keeps_the_complete_lines(tmp_path):
    from llavamed_core.io import JsonlAppender, read_jsonl

    path = tmp_path / "answers.jsonl"

    class HalfThenFull:
        """A file whose next write stores half the text, then fails as a full disk does."""

        def __init__(self, fh):
            self.fh = fh

        def write(self, text):
            self.fh.write(text[: len(text) // 2])
            self.fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

    with JsonlAppender(path) as w:
        w.write({"question_id": 1, "text": "kept"})
        w._fh = HalfThenFull(w._fh)
        with pytest.raises(StorageError) as info:
            w.write({"question_id": 2, "text": "x" * 100})
        w._fh = w._fh.fh
    assert info.value.message == f"{path}: no space left on device; the complete records written so far are kept"
    assert not path.read_text().endswith("\n")  # the half line is on disk ...
    with JsonlAppender(path) as w:  # ... and the rerun's open cuts it before appending
        w.write({"question_id": 2, "text": "again"})
    assert [(r["question_id"], r["text"]) for r in read_jsonl(path)] == [(1, "kept"), (2, "again")]


# -- a corrupt checkpoint given to train ---------------------------------------------------------------

@pytest.mark.parametrize("damage, problem", [
    ("truncate", "truncated: tensor "),
    ("zeros", "not a safetensors file (header length 0)"),
])
def test_corrupt_checkpoint_given_to_train(cli, tiny_ckpt_copy, tmp_path, damage, problem):
    weights = tiny_ckpt_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\0" * 64)
    images = make_images(tmp_path / "images", "a.png")
    (tmp_path / "data.json").write_text(json.dumps([GOOD]))
    before = tree_state(tiny_ckpt_copy)
    res = cli("train", "instruct", "--model", tiny_ckpt_copy, "--data", tmp_path / "data.json",
              "--images", images, "--out", tmp_path / "out", "--max-steps", "1")
    err, hint = error_lines(res)
    assert err.startswith(f"Error: {weights}: could not load the checkpoint ({problem}")
    assert hint == "Hint: the file is incomplete or corrupt; write or download it again"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()
    assert tree_state(tiny_ckpt_copy) == before


# -- chat, train --report-to, instruct gen -------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["<image>\nWhat is shown?", "What is shown? <image>"])
def test_image_marker_typed_into_chat_prompt(cli, tmp_path, prompt):
    image = make_images(tmp_path, "a.png") / "a.png"
    # --model points nowhere: the prompt is refused before anything is loaded.
    res = cli("chat", image, "--prompt", prompt, "--model", tmp_path / "no-model")
    err, hint = error_lines(res)
    assert err == "Error: --prompt contains '<image>': the image is not given in the text"
    assert "IMAGE argument" in hint


@pytest.mark.parametrize("report_to, package", [("tensorboard", "tensorboard"), ("none,wandb", None),
                                                ("wandb", "wandb")])
def test_report_to_without_its_package_fails_before_training(cli, tiny_ckpt, tmp_path, monkeypatch,
                                                             report_to, package):
    import llavamed_core.train.preflight as preflight

    monkeypatch.setattr(preflight, "_installed", lambda module: False)
    images = make_images(tmp_path / "images", "a.png")
    (tmp_path / "data.json").write_text(json.dumps([GOOD]))
    res = cli("train", "instruct", "--model", tiny_ckpt, "--data", tmp_path / "data.json", "--images", images,
              "--out", tmp_path / "out", "--max-steps", "1", "--report-to", report_to)
    err, hint = error_lines(res)
    if package is None:
        assert err == f"Error: --report-to {report_to}: 'none' cannot be combined with other names"
    else:
        assert err == f"Error: --report-to {report_to}: the '{package}' package is not installed"
        assert hint == f"Hint: pip install {package}, or drop --report-to {report_to}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()


def test_report_to_check_passes_when_installed(monkeypatch):
    import llavamed_core.train.preflight as preflight
    from llavamed_core.errors import ConfigError

    monkeypatch.setattr(preflight, "_installed", lambda module: module in ("tensorboardX", "wandb"))
    assert preflight.check_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert preflight.check_report_to("none") == [] and preflight.check_report_to(None) == []
    with pytest.raises(ConfigError, match="unknown integration 'tensorbored'"):
        preflight.check_report_to("tensorbored")


def _figs(path: Path, n: int) -> Path:
    path.write_text(json.dumps([{"pair_id": f"p{i}", "fig_caption": f"Figure {i} shows a lesion number {i}."}
                                for i in range(n)]))
    return path


def test_instruct_gen_exits_1_when_every_request_fails(cli, tmp_path, monkeypatch):
    from llm_server import LLMServer, error

    monkeypatch.setenv("LLAVAMED_HOME", str(tmp_path / "home"))
    figs = _figs(tmp_path / "figs.json", 3)
    out = tmp_path / "gen.jsonl"
    with LLMServer() as srv:
        srv.script("", *[error(400, message="model not allowed")] * 3)
        res = cli("instruct", "gen", "--input", figs, "--output", out, "--base-url", srv.url,
                  "--concurrency", "1")
    err, hint = error_lines(res)
    failures = tmp_path / "gen.failures.jsonl"
    assert err == f"Error: all 3 requests failed (HTTP 400: 3); listed in {failures}"
    assert hint == "Hint: check the endpoint, model name and quota, then rerun the same command"
    assert sorted(json.loads(ln)["pair_id"] for ln in failures.read_text().splitlines()) == ["p0", "p1", "p2"]
    assert out.read_text() == ""


def test_instruct_gen_stops_past_max_failures_and_keeps_the_answers(cli, tmp_path, monkeypatch):
    from llm_server import LLMServer, error

    monkeypatch.setenv("LLAVAMED_HOME", str(tmp_path / "home"))
    figs = _figs(tmp_path / "figs.json", 10)
    out = tmp_path / "gen.jsonl"
    with LLMServer() as srv:
        for i in (1, 2):
            srv.script(f"lesion number {i}.", error(400, message="refused"))
        res = cli("instruct", "gen", "--input", figs, "--output", out, "--base-url", srv.url,
                  "--concurrency", "1", "--max-failures", "1")
        err, hint = error_lines(res)
        failures = tmp_path / "gen.failures.jsonl"
        assert err == ("Error: 2 requests failed, more than --max-failures 1 (HTTP 400: 2); stopped with 1 "
                       f"answered (kept in {out}); failures listed in {failures}")
        assert hint == "Hint: fix the cause (endpoint, model, quota), then rerun the same command: it resumes"
        assert [json.loads(ln)["pair_id"] for ln in out.read_text().splitlines()] == ["p0"]
        # Stopped: p1 and p2 failed, p3 at most was in flight; p4 onwards were never asked ...
        assert len(srv.completion_requests()) <= 4
        # ... and the rerun (under the limit now) resumes: every pair ends answered exactly once.
        res = cli("instruct", "gen", "--input", figs, "--output", out, "--base-url", srv.url,
                  "--concurrency", "1", "--max-failures", "1", "--json")
        assert res.exit_code == 0, res
    ids = [json.loads(ln)["pair_id"] for ln in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"p{i}" for i in range(10))
