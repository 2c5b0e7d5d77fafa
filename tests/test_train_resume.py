"""A resumed run equals the uninterrupted one: weights, losses, optimizer, schedule, data order.

Run A trains N steps without a stop and writes a Trainer checkpoint every k steps; checkpoint-k is
exactly what a run killed after step k leaves behind. Run C resumes from it into another --out and
must end with A's weights (every tensor, within float noise) and log, at step k+1, A's loss. The
data (16 records, 4 per step: 4 steps an epoch) puts the resume point in the middle of the second
epoch, where the data order of the resumed epoch matters. The learning rate is high enough that a
resume that lost the weights, the optimizer state or the batch order could not match.

Modes: full training, LoRA, ZeRO-3, ZeRO-2 with LoRA and FSDP in one process (DeepSpeed and FSDP
in a world of one); ZeRO-2 under torchrun with two CPU processes (DDP, ZeRO-3, FSDP and ZeRO-2 with
LoRA too, marked slow); and the filed case, a run killed with SIGKILL and rerun with --resume auto.

A checkpoint whose weights do not match the model (a renamed tensor), is truncated or corrupt, or
was written by another kind of run stops the resume with a one-line error naming what is wrong.
"""

from __future__ import annotations

import importlib.util
import json
import re
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
                       global_batch=4, save_steps=K, learning_rate=1e-3, seed=7, lora_r=4, lora_alpha=8,
                       keep_checkpoints=True, **kw)


def _losses(ckpt: Path) -> dict[int, float]:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def _assert_same_tensors(a: dict, c: dict) -> None:
    import torch

    assert a.keys() == c.keys(), set(a) ^ set(c)
    differ = [k for k in a if not torch.allclose(a[k].float(), c[k].float(), atol=1e-5, rtol=0)]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def _assert_resume_matches(root: Path, trained_file: str, a: str = "A", c: str = "C") -> None:
    import torch

    a_run, c_run = root / f"{a}.run", root / f"{c}.run"
    # The test can fail: the weights moved well beyond the tolerance between step K and step N.
    at_k = weights_file(a_run / f"checkpoint-{K}", trained_file)
    at_n = weights_file(a_run / f"checkpoint-{N}", trained_file)
    assert max((at_k[k] - at_n[k]).abs().max().item() for k in at_k) > 1e-3
    # Every tensor of the outputs and of the last Trainer checkpoints is A's.
    _assert_same_tensors(weights(root / a), weights(root / c))
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


MODES = {  # name: (TrainConfig options, the trained weights file of a Trainer checkpoint)
    "full": ({}, "model.safetensors"),
    "lora": ({"lora": True}, "adapter_model.safetensors"),
    "zero3": ({"deepspeed": "zero3"}, "model.safetensors"),
    "zero2-lora": ({"deepspeed": "zero2", "lora": True}, "adapter_model.safetensors"),
    "fsdp": ({"fsdp": True}, "model.safetensors"),
}
ENGINE = {"zero3": "DEEPSPEED", "zero2-lora": "DEEPSPEED", "fsdp": "FSDP"}


@pytest.fixture(scope="module")
def runs(tiny_ckpt, synth_data, tmp_path_factory):
    """``runs(mode)``: run A (N steps, a checkpoint every K) and run C resumed from A's
    checkpoint-K, in one process (DeepSpeed and FSDP in a world of one), made once per mode."""
    from llavamed_core.train import train

    done: dict[str, tuple] = {}

    def get(mode: str) -> tuple:
        if mode not in done:
            if MODES[mode][0].get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
                pytest.skip("deepspeed is not installed (pip install 'llavamed[deepspeed]')")
            root = tmp_path_factory.mktemp(f"resume_{mode}")
            data, images, opts = _data(synth_data, root), synth_data / "images", MODES[mode][0]
            train(_config(tiny_ckpt, data, images, root / "A", **opts))
            result = train(_config(tiny_ckpt, data, images, root / "C", **opts,
                                   resume=str(root / "A.run" / f"checkpoint-{K}")))
            done[mode] = (root, data, images, result)
        return done[mode]

    return get


@pytest.fixture
def full_run(runs):
    return runs("full")


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_equals_uninterrupted_run(runs, mode):
    root, _, _, result = runs(mode)
    assert result.steps == N and result.resumed_from == root / "A.run" / f"checkpoint-{K}"
    if mode in ENGINE:  # the sharding named really ran
        assert result.mechanism["distributed"] == ENGINE[mode], result.mechanism
    _assert_resume_matches(root, MODES[mode][1])


def test_resume_auto_after_sigkill_equals_uninterrupted_run(runs, tiny_ckpt):
    """The filed case: the same command killed with SIGKILL after its checkpoint at step K, then
    run again with --resume auto, ends where the uninterrupted run A ends."""
    import os
    import signal
    import time

    from llavamed_core.train import train

    root, data, images, _ = runs("full")
    args = [sys.executable, "-m", "llavamed_cli.main", "train", "instruct", "--model", str(tiny_ckpt),
            "--data", str(data), "--images", str(images), "--out", str(root / "B"), "--max-steps", str(N),
            "--global-batch", "4", "--save-steps", str(K), "--lr", "1e-3", "--seed", "7", "--keep-checkpoints"]
    state = root / "B.run" / f"checkpoint-{K}" / "trainer_state.json"
    proc = subprocess.Popen(args, env=dict(os.environ, **ENV), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (root / "B").exists()
    result = train(_config(tiny_ckpt, data, images, root / "B", resume="auto"))
    assert result.resumed_from is not None and result.resumed_from.parent == root / "B.run"
    if result.resumed_from.name == f"checkpoint-{K}":
        _assert_resume_matches(root, "model.safetensors", c="B")
    else:  # the kill came after the last checkpoint: nothing left to train
        _assert_same_tensors(weights(root / "A"), weights(root / "B"))


def _copy_checkpoint(root: Path, dst: Path) -> Path:
    ckpt = dst / "ckpt" / f"checkpoint-{K}"
    shutil.copytree(root / "A.run" / f"checkpoint-{K}", ckpt)
    return ckpt


def _cli_resume(cli, tiny_ckpt, full_run, tmp_path, ckpt, *extra):
    root, data, images, _ = full_run
    return cli("train", "instruct", "--model", tiny_ckpt, "--data", data, "--images", images,
               "--out", tmp_path / "C", "--max-steps", str(N), "--global-batch", "4", "--save-steps", str(K),
               "--lr", "1e-3", "--seed", "7", "--resume", ckpt, "--keep-checkpoints", *extra)


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


def _rename_in_safetensors(path: Path, key: str) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state[key + "_renamed"] = state.pop(key)
    save_file(state, str(path), metadata={"format": "pt"})


def _rename_in_torch_file(path: Path, key: str, deepspeed: bool) -> None:
    import torch

    obj = torch.load(path, weights_only=not deepspeed)
    state = obj["module"] if deepspeed else obj
    state[key + "_renamed"] = state.pop(key)
    torch.save(obj, path)


@pytest.mark.parametrize("mode", ["lora", "zero2-lora", "fsdp"])
def test_renamed_tensor_fails_naming_it(runs, tiny_ckpt, tmp_path, mode):
    """The loaders that would let a mismatch pass (PEFT's, DeepSpeed's for LoRA, accelerate's for
    FSDP2) are checked by name first."""
    from llavamed_core.errors import TrainingError
    from llavamed_core.train import train

    root, data, images, _ = runs(mode)
    ckpt = _copy_checkpoint(root, tmp_path)
    lora_key = "model.language_model.layers.1.self_attn.v_proj.lora_B"
    if mode == "lora":
        key = f"base_model.model.{lora_key}.weight"
        _rename_in_safetensors(ckpt / "adapter_model.safetensors", key)
    elif mode == "zero2-lora":
        key = f"base_model.model.{lora_key}.default.weight"
        _rename_in_torch_file(ckpt / f"global_step{K}" / "mp_rank_00_model_states.pt", key, deepspeed=True)
    else:
        key = "model.language_model.layers.1.mlp.up_proj.weight"
        _rename_in_torch_file(ckpt / "pytorch_model_fsdp.bin", key, deepspeed=False)
    name = re.escape(key)
    with pytest.raises(TrainingError, match=rf"missing {name}; unexpected {name}_renamed"):
        train(_config(tiny_ckpt, data, images, tmp_path / "C", **MODES[mode][0], resume=str(ckpt)))
    assert not (tmp_path / "C").exists()


def test_sharded_weights_load_strictly_one_shard_at_a_time(tmp_path):
    """A Trainer checkpoint of a large model comes in shards with an index: every tensor loads."""
    import torch

    from llavamed_core.model import build_from_preset, save_checkpoint
    from llavamed_core.train.resume import load_full_weights

    source, processor = build_from_preset("tiny", seed=5)
    save_checkpoint(source, processor, tmp_path / "sharded", max_shard_bytes=200_000)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    target, _ = build_from_preset("tiny", seed=6)
    load_full_weights(target, tmp_path / "sharded")
    want, got = source.state_dict(), target.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


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


@pytest.mark.parametrize("mode", [
    pytest.param(["--deepspeed", "zero2"], id="zero2"),
    # The same under the other mechanisms (about a minute each on two cores).
    pytest.param([], id="ddp", marks=pytest.mark.slow),
    pytest.param(["--deepspeed", "zero3"], id="zero3", marks=pytest.mark.slow),
    pytest.param(["--fsdp"], id="fsdp", marks=pytest.mark.slow),
    pytest.param(["--deepspeed", "zero2", "--lora", "--lora-r", "4", "--lora-alpha", "8"], id="zero2-lora",
                 marks=pytest.mark.slow),
])
def test_two_process_resume_equals_uninterrupted_run(tiny_ckpt, synth_data, tmp_path, mode):
    """Under torchrun the sampler's epoch must reach every rank, and each rank restores its own
    RNG state; the data order of the resumed epoch is the uninterrupted run's."""
    if "--deepspeed" in mode and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install 'llavamed[deepspeed]')")
    import os

    data, images = _data(synth_data, tmp_path), synth_data / "images"

    def run(out: str, *extra: str) -> dict:
        args = [sys.executable, "-m", "llavamed_cli.main", "train", "instruct", "--model", str(tiny_ckpt),
                "--data", str(data), "--images", str(images), "--out", str(tmp_path / out),
                "--max-steps", str(N), "--global-batch", "4", "--save-steps", str(K), "--lr", "1e-3",
                "--seed", "7", "--nproc", "2", "--master-port", str(_free_port()), "--json", "--keep-checkpoints",
                *mode, *extra]
        r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=dict(os.environ, **ENV))
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)

    run("A")
    res = run("C", "--resume", str(tmp_path / "A.run" / f"checkpoint-{K}"))
    assert res["world_size"] == 2 and res["steps"] == N
    _assert_resume_matches(tmp_path, "adapter_model.safetensors" if "--lora" in mode else "model.safetensors")
