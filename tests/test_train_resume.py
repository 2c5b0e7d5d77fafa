"""A resumed run equals the uninterrupted one: weights, losses, optimizer, schedule, data order.

Run A trains N steps without a stop and writes a Trainer checkpoint every k steps; checkpoint-k is
exactly what a run killed after step k leaves behind. Run C resumes from it into another --out and
must end with A's weights (every tensor, within float noise) and log, at step k+1, A's loss. The
data (16 records, 4 per step: 4 steps an epoch) puts the resume point in the middle of the second
epoch, where the data order of the resumed epoch matters. The learning rate is high enough that a
resume that lost the weights, the optimizer state or the batch order could not match.

A checkpoint whose weights do not match the model (a renamed tensor), is truncated or corrupt, or
was written by another kind of run stops the resume with a one-line error naming what is wrong.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import weights

N, K = 10, 5  # steps in all; the checkpoint the resume starts from
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _data(synth_data: Path, folder: Path) -> Path:
    records = json.loads((synth_data / "instruct.json").read_text())[:16]
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


def _config(tiny_ckpt: Path, data: Path, images: Path, out: Path, **kw):
    from llavamed_core.train import TrainConfig

    return TrainConfig(stage="instruct", model=tiny_ckpt, data=data, images=images, out=out, max_steps=N,
                       global_batch=4, save_steps=K, learning_rate=1e-3, seed=7, lora_r=4, lora_alpha=8, **kw)


def _losses(ckpt: Path) -> dict[int, float]:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def _assert_same_tensors(a: dict, c: dict) -> None:
    import torch

    assert a.keys() == c.keys(), set(a) ^ set(c)
    differ = [k for k in a if not torch.allclose(a[k].float(), c[k].float(), atol=1e-5, rtol=0)]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def _assert_resume_matches(root: Path, trained_file: str) -> None:
    import torch

    a_run, c_run = root / "A.run", root / "C.run"
    # The test can fail: the weights moved well beyond the tolerance between step K and step N.
    at_k, at_n = weights_file(a_run / f"checkpoint-{K}", trained_file), weights_file(a_run / f"checkpoint-{N}", trained_file)
    assert max((at_k[k] - at_n[k]).abs().max().item() for k in at_k) > 1e-3
    # Every tensor of the outputs and of the last Trainer checkpoints is A's.
    _assert_same_tensors(weights(root / "A"), weights(root / "C"))
    _assert_same_tensors(at_n, weights_file(c_run / f"checkpoint-{N}", trained_file))
    la, lc = _losses(a_run / f"checkpoint-{N}"), _losses(c_run / f"checkpoint-{N}")
    assert sorted(la) == sorted(lc) == list(range(1, N + 1))
    # C's first loss after the resume is A's at step K+1, and so is every later one.
    for step in range(K + 1, N + 1):
        assert lc[step] == pytest.approx(la[step], abs=1e-6), (step, la, lc)
    assert torch.isfinite(torch.tensor(list(lc.values()))).all()


def weights_file(ckpt: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / name))


@pytest.fixture(scope="module")
def full_run(tiny_ckpt, synth_data, tmp_path_factory):
    """Run A (full training, N steps, a checkpoint every K) and run C resumed from A's checkpoint-K."""
    from llavamed_core.train import train

    root = tmp_path_factory.mktemp("resume_full")
    data = _data(synth_data, root)
    images = synth_data / "images"
    train(_config(tiny_ckpt, data, images, root / "A"))
    result = train(_config(tiny_ckpt, data, images, root / "C", resume=str(root / "A.run" / f"checkpoint-{K}")))
    return root, data, images, result


def test_full_resume_equals_uninterrupted_run(full_run):
    root, _, _, result = full_run
    assert result.steps == N and result.resumed_from == root / "A.run" / f"checkpoint-{K}"
    _assert_resume_matches(root, "model.safetensors")


def test_lora_resume_equals_uninterrupted_run(tiny_ckpt, synth_data, tmp_path):
    from llavamed_core.train import train

    data, images = _data(synth_data, tmp_path), synth_data / "images"
    train(_config(tiny_ckpt, data, images, tmp_path / "A", lora=True))
    train(_config(tiny_ckpt, data, images, tmp_path / "C", lora=True,
                  resume=str(tmp_path / "A.run" / f"checkpoint-{K}")))
    _assert_resume_matches(tmp_path, "adapter_model.safetensors")


def _copy_checkpoint(root: Path, dst: Path) -> Path:
    ckpt = dst / "ckpt" / f"checkpoint-{K}"
    shutil.copytree(root / "A.run" / f"checkpoint-{K}", ckpt)
    return ckpt


def _cli_resume(cli, tiny_ckpt, full_run, tmp_path, ckpt, *extra):
    root, data, images, _ = full_run
    return cli("train", "instruct", "--model", tiny_ckpt, "--data", data, "--images", images,
               "--out", tmp_path / "C", "--max-steps", str(N), "--global-batch", "4", "--save-steps", str(K),
               "--lr", "1e-3", "--seed", "7", "--resume", ckpt, *extra)


def _one_line_error(res, *needles: str) -> str:
    assert res.exit_code == 1, res
    err = res.stderr
    assert "Traceback" not in err, err
    line = next(ln for ln in err.splitlines() if ln.startswith("Error:"))
    for n in needles:
        assert n in line, (n, line)
    assert "Hint:" in err
    return line


def test_renamed_weight_fails_naming_the_key(cli, tiny_ckpt, full_run, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _copy_checkpoint(full_run[0], tmp_path)
    state = load_file(str(ckpt / "model.safetensors"))
    gone = "language_model.model.layers.1.mlp.up_proj.weight"
    state["language_model.model.layers.1.mlp.up_prj.weight"] = state.pop(gone)
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    res = _cli_resume(cli, tiny_ckpt, full_run, tmp_path, ckpt)
    _one_line_error(res, str(ckpt), f"missing {gone}", "unexpected language_model.model.layers.1.mlp.up_prj.weight")
    assert not (tmp_path / "C").exists()


def test_missing_weight_fails_naming_the_key(tiny_ckpt, full_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from llavamed_core.errors import TrainingError
    from llavamed_core.train import train

    root, data, images, _ = full_run
    ckpt = _copy_checkpoint(root, tmp_path)
    state = load_file(str(ckpt / "model.safetensors"))
    del state["multi_modal_projector.linear_1.bias"]
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TrainingError, match=r"missing multi_modal_projector\.linear_1\.bias"):
        train(_config(tiny_ckpt, data, images, tmp_path / "C", resume=str(ckpt)))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                                  "trainer_state.json"])
def test_truncated_checkpoint_file_is_a_one_line_error(cli, tiny_ckpt, full_run, tmp_path, name):
    ckpt = _copy_checkpoint(full_run[0], tmp_path)
    _truncate(ckpt / name)
    res = _cli_resume(cli, tiny_ckpt, full_run, tmp_path, ckpt)
    _one_line_error(res, name)
    assert not (tmp_path / "C").exists() and not (tmp_path / "C.run").exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "model.safetensors"])
def test_overwritten_checkpoint_file_is_a_one_line_error(cli, tiny_ckpt, full_run, tmp_path, name):
    # Same size, bytes garbled in the middle: the header still reads.
    ckpt = _copy_checkpoint(full_run[0], tmp_path)
    path = ckpt / name
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = b"\xff" * min(4096, len(data) - mid)
    path.write_bytes(bytes(data))
    res = _cli_resume(cli, tiny_ckpt, full_run, tmp_path, ckpt)
    _one_line_error(res, str(ckpt))
    assert not (tmp_path / "C").exists()


def test_resuming_a_full_checkpoint_as_lora_is_refused(cli, tiny_ckpt, full_run, tmp_path):
    ckpt = _copy_checkpoint(full_run[0], tmp_path)
    res = _cli_resume(cli, tiny_ckpt, full_run, tmp_path, ckpt, "--lora")
    _one_line_error(res, "full-weight run", "LoRA")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", [["--deepspeed", "zero2"]], ids=["zero2"])
def test_two_process_resume_equals_uninterrupted_run(tiny_ckpt, synth_data, tmp_path, mode):
    if mode[0] == "--deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install 'llavamed[deepspeed]')")
    import os

    data, images = _data(synth_data, tmp_path), synth_data / "images"

    def run(out: str, *extra: str) -> dict:
        args = [sys.executable, "-m", "llavamed_cli.main", "train", "instruct", "--model", str(tiny_ckpt),
                "--data", str(data), "--images", str(images), "--out", str(tmp_path / out),
                "--max-steps", str(N), "--global-batch", "4", "--save-steps", str(K), "--lr", "1e-3",
                "--seed", "7", "--nproc", "2", "--master-port", str(_free_port()), "--json", *mode, *extra]
        r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=dict(os.environ, **ENV))
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)

    run("A")
    res = run("C", "--resume", str(tmp_path / "A.run" / f"checkpoint-{K}"))
    assert res["world_size"] == 2 and res["steps"] == N
    _assert_resume_matches(tmp_path, "model.safetensors")
