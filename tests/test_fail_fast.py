"""Mistakes a new user makes fail at once, with a one-line error: wrong paths before torch is
imported, misspelt names with a "did you mean" hint (DNS failures: tests/test_data_download_http.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Runs the CLI and reports on stderr whether torch was imported by the time it exited.
WRAPPER = """
import sys, runpy
sys.argv = ["llavamed", *sys.argv[1:]]
try:
    runpy.run_module("llavamed_cli.main", run_name="__main__")
finally:
    sys.stderr.write("\\ntorch imported: %s\\n" % ("torch" in sys.modules))
"""


def _run(*args):
    return subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_train_with_a_wrong_model_path_fails_before_torch(tmp_path):
    (tmp_path / "imgs").mkdir()
    data = tmp_path / "d.json"
    data.write_text("[]")
    missing = tmp_path / "no-such-checkpoint"
    r = _run("train", "instruct", "--model", missing, "--data", data, "--images", tmp_path / "imgs",
             "--out", tmp_path / "out")
    assert r.returncode == 1, r.stderr
    assert f"Error: --model {missing}: checkpoint directory not found" in r.stderr
    assert "torch imported: False" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_train_with_a_missing_data_file_fails_before_torch(tmp_path, tiny_ckpt):
    (tmp_path / "imgs").mkdir()
    r = _run("train", "instruct", "--model", tiny_ckpt, "--data", tmp_path / "nope.json",
             "--images", tmp_path / "imgs", "--out", tmp_path / "out")
    assert r.returncode == 1, r.stderr
    assert f"--data {tmp_path / 'nope.json'}: file not found" in r.stderr
    assert "torch imported: False" in r.stderr


@pytest.mark.parametrize("call,expected", [
    (lambda: __import__("llavamed_core.model.presets", fromlist=["x"]).get_preset("llava-med-v15"),
     "did you mean 'llava-med-v1.5'?"),
    (lambda: __import__("llavamed_core.train.stages", fromlist=["x"]).get_stage("instrct"),
     "did you mean 'instruct'?"),
    (lambda: __import__("llavamed_core.eval.answers", fromlist=["x"]).resolve_dataset("slakee", "data", "test"),
     "did you mean 'slake'?"),
])
def test_misspelt_names_get_a_suggestion(call, expected):
    from llavamed_core.errors import LlavamedError

    with pytest.raises(LlavamedError) as ei:
        call()
    assert ei.value.hint.startswith(expected)


def test_no_suggestion_for_a_name_far_from_all():
    from llavamed_core.errors import did_you_mean

    assert did_you_mean("zzzz", ["vqa-rad", "slake"]) == "choose one of: vqa-rad, slake"
    assert did_you_mean("slak", ["vqa-rad", "slake"]).startswith("did you mean 'slake'?")
