"""Each parallelism and adapter flag engages the mechanism it names, in one process (the way a
user tries ZeRO or FSDP on one GPU), read back from what accelerate prepared — not only "it exited 0".

- ``--deepspeed zero2|zero3`` and ``--fsdp`` without ``--nproc``: a distributed world of one, no
  MPI; the engine is DeepSpeed at the stage asked, or the model is FSDP2-sharded (DTensor
  parameters, one unit per vision-encoder and decoder layer); the environment is restored after.
- ``--qlora`` on the CPU (bitsandbytes' CPU backend): only the language model's linear layers are
  4-bit, only the adapters and the projector train, the parameter count is the logical one.
- ``--gpus N`` beyond the GPUs present, and ``eval vqa --nproc`` on a GPU machine (mocked CUDA).

Two-process runs (DDP, ZeRO-2/3, FSDP2 under torchrun) are in ``test_train_distributed.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from train_helpers import changed_groups, check_generates, weights

FAST = ["--global-batch", "8", "--max-steps", "2"]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _config(tiny_ckpt, synth_data, out, **kw):
    from llavamed_core.train import TrainConfig

    base = dict(stage="instruct", model=tiny_ckpt, data=synth_data / "instruct.json", images=synth_data / "images",
                out=out, global_batch=8, max_steps=2, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_fsdp_wraps_the_layers_the_model_has(tiny_ckpt):
    """The bug: accelerate's default (``_no_split_modules``) names CLIPTextEmbeddings, absent from Llava."""
    from transformers import LlavaForConditionalGeneration

    from llavamed_core.train.parallel import fsdp_config, fsdp_wrap_classes

    names = fsdp_wrap_classes(tiny_ckpt)
    assert names == ["CLIPEncoderLayer", "LlamaDecoderLayer"]
    model = LlavaForConditionalGeneration.from_pretrained(tiny_ckpt)
    present = {type(m).__name__ for m in model.modules()}
    assert "CLIPTextEmbeddings" in model._no_split_modules and "CLIPTextEmbeddings" not in present
    assert set(names) <= present
    assert fsdp_config(names)["transformer_layer_cls_to_wrap"] == names


def _same_update(base: dict, straight: dict, other: dict) -> bool:
    """``other`` made the same update to ``base`` as ``straight``, to 1 % of the update's size."""
    change = max((straight[k] - base[k]).abs().max().item() for k in base)
    diff = max((other[k] - straight[k]).abs().max().item() for k in base)
    return change > 0 and diff <= 0.01 * change


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'llavamed[deepspeed]')")
def test_one_process_zero2_zero3_fsdp_engage_and_leave_no_world_behind(cli, tiny_ckpt, synth_data, tmp_path):
    """ZeRO-2, ZeRO-3 and FSDP2 in a single process, one after another in this Python process; each
    makes the plain run's update (one process: the same batches, the same arithmetic)."""
    import torch.distributed as dist

    from llavamed_core.train import train

    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                             "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")}
    assert before["WORLD_SIZE"] is None and not dist.is_initialized()
    res = train(_config(tiny_ckpt, synth_data, tmp_path / "plain"))
    assert res.mechanism["distributed"] == "NO" and res.mechanism["wrapper"] == "LlavaForConditionalGeneration"
    base, plain = weights(tiny_ckpt), weights(tmp_path / "plain")

    # ZeRO-2 through the CLI, the way a user tries it: no --nproc, no MPI.
    out = tmp_path / "zero2"
    r = cli("train", "instruct", "--model", tiny_ckpt, "--data", synth_data / "instruct.json",
            "--images", synth_data / "images", "--out", out, *FAST, "--deepspeed", "zero2", "--set", "device=cpu",
            "--keep-checkpoints")
    assert r.exit_code == 0, r
    assert "mpi4py" not in r.stderr and "Traceback" not in r.stderr
    assert "DeepSpeed ZeRO-2, 1 process(es)" in r.stdout  # the summary says what ran
    mech = json.loads((tmp_path / "zero2.run" / "mechanism.json").read_text())
    assert mech["distributed"] == "DEEPSPEED" and mech["wrapper"] == "DeepSpeedEngine" and mech["zero_stage"] == 2
    assert _same_update(base, plain, weights(out))

    res = train(_config(tiny_ckpt, synth_data, tmp_path / "zero3", deepspeed="zero3"))
    mech = res.mechanism
    assert mech["wrapper"] == "DeepSpeedEngine" and mech["zero_stage"] == 3 and mech["world_size"] == 1
    assert 0 < mech["sharded_params"] <= mech["params"]  # partitioned (small ones may stay whole)
    assert _same_update(base, plain, weights(tmp_path / "zero3"))

    res = train(_config(tiny_ckpt, synth_data, tmp_path / "fsdp", fsdp=True))
    mech = res.mechanism
    assert mech["distributed"] == "FSDP" and mech["fsdp_version"] == 2
    assert mech["wrapper"] == "FSDPLlavaForConditionalGeneration"
    assert mech["fsdp_units"]["CLIPEncoderLayer"] == 2 and mech["fsdp_units"]["LlamaDecoderLayer"] == 2
    assert mech["sharded_params"] == mech["params"] == 64  # every parameter a DTensor
    # Gathered to one standard checkpoint: the plain layout, loads with transformers alone.
    assert _same_update(base, plain, weights(tmp_path / "fsdp"))
    assert changed_groups(base, plain) == {"projector": True, "language_model": True, "vision_tower": False}
    check_generates(tmp_path / "fsdp", synth_data / "images" / "train_00005.png")

    # Nothing of those worlds is left: a plain run after them is a plain run again.
    assert {k: os.environ.get(k) for k in before} == before and not dist.is_initialized()
    res = train(_config(tiny_ckpt, synth_data, tmp_path / "plain2"))
    assert res.mechanism["distributed"] == "NO" and weights(tmp_path / "plain2").keys() == plain.keys()
    assert all((weights(tmp_path / "plain2")[k] == plain[k]).all() for k in plain)


def test_single_process_world_only_where_none_is_set(monkeypatch):
    from llavamed_core.train.parallel import single_process_world

    with single_process_world(False) as made:
        assert not made and "WORLD_SIZE" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: the launcher's world stays
    with single_process_world(True) as made:
        assert not made and os.environ["WORLD_SIZE"] == "2" and "MASTER_PORT" not in os.environ
    monkeypatch.delenv("WORLD_SIZE")
    with single_process_world(True) as made:
        assert made and os.environ["WORLD_SIZE"] == "1" and os.environ["RANK"] == "0"
        assert int(os.environ["MASTER_PORT"]) > 0
    assert "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ


def test_lora_trains_only_adapters_and_the_projector(cli, tiny_ckpt, synth_data, tmp_path):
    out = tmp_path / "lora"
    r = cli("train", "finetune", "--model", tiny_ckpt, "--data", synth_data / "train.json",
            "--images", synth_data / "images", "--out", out, "--lora", "--lora-r", "4", "--lora-alpha", "8",
            *FAST, "--json")
    assert r.exit_code == 0, r
    mech = json.loads(r.stdout)["mechanism"]
    # 2 decoder layers × 7 projections (q k v o gate up down) carry adapters; A and B of each train,
    # plus the projector's trained copy (2 linear layers × weight, bias); nothing else.
    assert mech["lora_layers"] == 14 and mech["trainable_params"] == 14 * 2 + 4
    assert mech["trainable_outside_adapters"] == [] and mech["linear_4bit"] == {}


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'llavamed[qlora]')")
def test_qlora_on_cpu_quantises_only_the_language_model(cli, tiny_ckpt, synth_data, tmp_path):
    import torch

    out = tmp_path / "qlora"
    common = ["--model", tiny_ckpt, "--data", synth_data / "train.json", "--images", synth_data / "images",
              "--lora-r", "4", "--lora-alpha", "8", *FAST, "--json"]
    r = cli("train", "finetune", *common, "--out", out, "--qlora")
    assert r.exit_code == 0, r
    res = json.loads(r.stdout)
    mech = res["mechanism"]
    # The language model's 14 linear layers are 4-bit; vision tower, projector and lm_head are not.
    assert mech["linear_4bit"] == {"language_model": 14}
    assert mech["lora_layers"] == 14 and mech["trainable_outside_adapters"] == []
    assert res["steps"] == 2 and res["final_loss"] is not None

    # The count is the logical one (a 4-bit weight is not its packed half-size storage): the same as LoRA's.
    r = cli("train", "finetune", *common, "--out", tmp_path / "lora", "--lora", "--max-steps", "1")
    lora = json.loads(r.stdout)
    assert (res["trainable_params"], res["total_params"]) == (lora["trainable_params"], lora["total_params"])

    # The merged output is a normal full-precision checkpoint: the base reloaded, adapters merged.
    before, after = weights(tiny_ckpt), weights(out)
    assert set(after) == set(before) and all(t.dtype == torch.float32 for t in after.values())
    assert changed_groups(before, after) == {"projector": True, "language_model": True, "vision_tower": False}
    check_generates(out, synth_data / "images" / "train_00006.png")


def test_qlora_without_bitsandbytes_is_one_clear_error(monkeypatch):
    import sys

    from llavamed_core.errors import DependencyError
    from llavamed_core.train.lora import quantization_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(DependencyError) as exc:
        quantization_config("cpu")
    assert "bitsandbytes" in exc.value.message and "llavamed[qlora]" in exc.value.hint


def test_qlora_refuses_sharding(cli, tiny_ckpt, synth_data, tmp_path):
    r = cli("train", "finetune", "--model", tiny_ckpt, "--data", synth_data / "train.json",
            "--images", synth_data / "images", "--out", tmp_path / "o", "--qlora", "--fsdp", *FAST)
    assert r.exit_code == 1 and "--qlora with --fsdp/--deepspeed" in r.stderr and "Hint:" in r.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------- GPUs counted (mocked CUDA)
@pytest.fixture
def one_gpu(monkeypatch):
    """This machine seems to have one CUDA GPU (nothing touches it: the checks come first)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_train_gpus_beyond_those_present_stops_before_launch(cli, tiny_ckpt, synth_data, tmp_path, one_gpu,
                                                             monkeypatch):
    import llavamed_core.launch as launcher

    launched = []
    monkeypatch.setattr(launcher, "launch", lambda *a, **k: launched.append(a) or 0)
    r = cli("train", "instruct", "--model", tiny_ckpt, "--data", synth_data / "instruct.json",
            "--images", synth_data / "images", "--out", tmp_path / "out", "--gpus", "2", *FAST)
    assert r.exit_code == 1, r
    assert "--gpus 2: this machine has 1 CUDA GPU(s)" in r.stderr and "Hint: use --gpus 1" in r.stderr
    assert "invalid device ordinal" not in r.stderr and "Traceback" not in r.stderr
    assert launched == [] and not (tmp_path / "out").exists()


def test_eval_workers_get_one_gpu_each_or_none(monkeypatch, tmp_path):
    """``--nproc`` workers are CPU processes that see no GPU; ``--gpus`` workers see one GPU each."""
    from llavamed_core.errors import ConfigError
    from llavamed_core.eval.answers import VQAEvalConfig, _worker_device, _worker_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    cfg = VQAEvalConfig(dataset=tmp_path / "t.json", out=tmp_path / "o", model=tmp_path / "m", nproc=2)
    assert _worker_device(cfg) == "cpu"
    assert [_worker_env(k, 2, 0)["CUDA_VISIBLE_DEVICES"] for k in range(2)] == ["", ""]
    cfg = VQAEvalConfig(dataset=tmp_path / "t.json", out=tmp_path / "o", model=tmp_path / "m", gpus=2)
    assert _worker_device(cfg) == "cuda"
    assert [_worker_env(k, 2, 2)["CUDA_VISIBLE_DEVICES"] for k in range(2)] == ["3", "5"]
    cfg = VQAEvalConfig(dataset=tmp_path / "t.json", out=tmp_path / "o", model=tmp_path / "m", nproc=2,
                        device="cuda")
    with pytest.raises(ConfigError) as exc:
        _worker_device(cfg)
    assert "--gpus 2" in exc.value.hint


def test_eval_nproc_on_a_gpu_machine_runs_cpu_workers(cli, tiny_ckpt, synth_data, tmp_path, one_gpu):
    """End to end with CUDA mocked in the parent: the workers (real processes) load on the CPU."""
    out = tmp_path / "ev"
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", synth_data / "test.json", "--out", out,
            "--max-new-tokens", "4", "--limit", "4", "--nproc", "2", "--json")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["generation"]["processes"] == 2
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", synth_data / "test.json", "--out", tmp_path / "ev2",
            "--max-new-tokens", "4", "--gpus", "2")
    assert r.exit_code == 1 and "--gpus 2: this machine has 1 CUDA GPU(s)" in r.stderr


def test_lora_on_a_16bit_model_trains_in_one_dtype(tiny_ckpt):
    """ZeRO-3 partitions all trained tensors as one buffer and asserts one dtype: under DeepSpeed on a
    GPU the model is held in bf16, and fp32 adapters beside the bf16 projector copy stopped the run
    (seen on an H200). Checked here on the CPU: the wrapped model trains in the model's dtype."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from llavamed_core.train import apply_stage_freezing
    from llavamed_core.train.lora import lora_config, wrap_lora

    for dtype in (torch.bfloat16, torch.float32):
        model = LlavaForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=dtype)
        apply_stage_freezing(model, ("projector", "language_model"))
        peft_model = wrap_lora(model, lora_config(4, 8, 0.0), linear_projector=False)
        trained = {p.dtype for p in peft_model.parameters() if p.requires_grad}
        assert trained == {dtype}
