"""The GPU check in one command: serving, ``eval vqa`` and training figures on one GPU, as JSON and Markdown.

Parts (each in its own subprocess with its own time limit, so a failure or a hang is recorded as
one line and the rest still run; ``results.json`` and ``results.md`` in ``--out`` are rewritten
after every part, so a cut-off run still leaves what it measured):

- ``serve``: ``llavamed serve`` on a randomly initialised ~0.6B ``llava-med-v1.5``-shaped model
  in bf16 (the builder of ``benchmarks/serve_load.py --size 0.5b``), 1/8/32 concurrent clients,
  batching vs ``--max-batch 1`` (requests/s, p50/p99; target ≥ 3× at 32 clients); the server's
  requests/s at 32 clients ÷ the standalone engine's on the same requests at batch 32 (target
  ≥ 0.8); a 4-token request sent while a batch of 256-token answers runs: its latency ÷ the long
  batch's duration (target ≤ 0.25).
- ``eval``: ``benchmarks/eval_throughput.py`` (``eval vqa`` batched vs one question at a time with
  plain ``generate``; target ≥ 10×).
- ``train``: 30 optimizer steps (batch 16) of the ``instruct`` stage of the same model (bf16 mixed precision,
  SDPA) through ``llavamed_core.train.train(TrainConfig(...))`` — plain, ``packing``, DeepSpeed
  ZeRO-2 and FSDP2 (one process each), LoRA, QLoRA (when bitsandbytes imports): tokens/s, MFU,
  peak memory, and which mechanism engaged (FSDP-wrapped modules, DeepSpeed stage, LoRA
  parameters), read from the Trainer after the run.

MFU = 6 · N · tokens/s ÷ the card's dense bf16 peak, with N the language model's parameters
without its input embedding table (the matrices every token goes through forward and backward)
and tokens/s the steady rate after 5 warm-up steps, all non-padding tokens (image tokens
included). The frozen vision tower's forward pass and the attention scores are not counted, so
the figure is a lower bound.

Run::

    python benchmarks/gpu_suite.py --out results/            # one GPU, ≤ 8 minutes
    python benchmarks/gpu_suite.py --out /tmp/s --smoke      # CPU, tiny model, a smoke run
    python benchmarks/gpu_suite.py --out r --only train --budget-s 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

PARTS = ("serve", "eval", "train")
TRAIN_ROWS = ("plain", "packing", "lora", "qlora", "fsdp2", "zero2", "zero3")
# Dense bf16 peak (TFLOP/s) by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))
# Seconds each job may take (GPU run / smoke run); the overall --budget-s caps them further.
# Smoke limits are loose: they only catch a hang on a slow, shared CPU machine.
JOB_LIMIT_S = {"serve": (200, 300), "eval": (100, 200), "train": (75, 200)}
WARMUP_STEPS = 5


# ----------------------------------------------------------------------------- shared helpers
def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak in TFLOP/s (``None`` for an unknown card or the CPU)."""
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _settings(smoke: bool) -> dict:
    """Sizes of every part (GPU run or CPU smoke run)."""
    if smoke:
        return {"device": "cpu", "size": "tiny", "clients": [1, 8], "requests": 16, "max_tokens": 8,
                "ratio_requests": 16, "ratio_rounds": 1, "long_requests": 4, "long_tokens": 48, "short_tokens": 4,
                "eval_args": ["--device", "cpu", "--size", "tiny", "--questions", "16", "--batch-size", "16",
                              "--max-new-tokens", "8", "--threads", "1"],
                "train_steps": 2, "train_batch": 2, "api_processes": 2}
    return {"device": "cuda", "size": "0.5b", "clients": [1, 8, 32], "requests": 32, "max_tokens": 32,
            "ratio_requests": 128, "ratio_rounds": 2, "long_requests": 16, "long_tokens": 256, "short_tokens": 4,
            "eval_args": ["--device", "cuda", "--size", "0.5b", "--questions", "64", "--batch-size", "32",
                          "--max-new-tokens", "32"],
            "train_steps": 30, "train_batch": 16, "api_processes": 4}


def _ensure_checkpoint(work: Path, s: dict) -> Path:
    """The suite's model (built once by the first part that needs it, with serve_load's builder)."""
    from serve_load import build_checkpoint

    ckpt = work / "ckpt"
    if not (ckpt / "config.json").is_file():
        info = build_checkpoint(s["size"], s["device"], ckpt)
        _write_json(work / "ckpt-info.json", info)
    return ckpt


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


# ----------------------------------------------------------------------------- serve part
def serve_part(work: Path, result_path: Path, s: dict) -> None:
    import asyncio

    import serve_load as sl

    res: dict = {"part": "serve", "status": "running", "levels": []}
    ckpt = _ensure_checkpoint(work, s)
    info = json.loads((work / "ckpt-info.json").read_text())
    res.update(device=_device_name(s["device"]), parameters=info["parameters"], max_tokens=s["max_tokens"])
    images = sl.make_images(16, 64 if s["size"] == "tiny" else info["image_size"])
    bad = sl.malformed_bodies()
    cpu_threads = 1 if s["device"] == "cpu" else None
    top = max(s["clients"])
    res["max_clients"] = top
    # The third server answers HTTP in several API processes over its one engine process
    # (--api-processes): whether that lifts the server toward the standalone engine, at the most
    # clients (the H200 run before it spent ~500 ms per request reading and preparing at 32).
    many = s["api_processes"]
    for label, max_batch, extra in (("batching", 32, []), ("max-batch 1", 1, []),
                                    (f"batching, {many} API processes", 32, ["--api-processes", str(many)])):
        log_path = work / f"server-{max_batch}{'-api' if extra else ''}.log"
        proc, url = sl.start_server(ckpt, max_batch, s["device"], log_path, extra, cpu_threads)
        try:
            for n in ((1, top) if max_batch > 1 else (1,)):  # warm-up: first batches of a new size are slow
                asyncio.run(sl.run_level(url, n, n, images, s["max_tokens"], [], 0))
            for n in (s["clients"] if not extra else [top]):
                seen = len(log_path.read_text(errors="replace").splitlines())
                lv = asyncio.run(sl.run_level(url, n, max(s["requests"], n), images, s["max_tokens"], bad, 10))
                lv["config"] = label
                lv.update(sl.server_batches(log_path.read_text(errors="replace").splitlines()[seen:]))
                res["levels"].append(lv)
                _write_json(result_path, res)
            if max_batch > 1 and not extra:
                # The standalone engine in this process, alternating with the server (the same
                # moment's machine for both); idle while the server runs.
                engine = sl.load_engine(ckpt, s["device"], images, top, s["max_tokens"], cpu_threads)
                if s["device"].startswith("cuda"):  # the engine's attention policy, as the server's applies it
                    import torch

                    res["cudnn_attention"] = bool(torch.backends.cuda.cudnn_sdp_enabled())
                res.update(sl.server_over_engine(url, log_path, engine, s["device"], images, top,
                                                 max(top, s["ratio_requests"] // s["ratio_rounds"]),
                                                 s["ratio_rounds"], s["max_tokens"]))
                _write_json(result_path, res)
                mixed = sl.measure_short_during_long(url, images, s["long_requests"], s["long_tokens"],
                                                     s["short_tokens"])
                res["short_during_long"] = mixed
                _write_json(result_path, res)
            if extra:  # its valid requests alone, as the server-over-engine measure counts them
                measured = sl.server_measure(url, log_path, top, max(top, s["ratio_requests"] // s["ratio_rounds"]),
                                             images, s["max_tokens"])
                res["api_processes"] = {"processes": many, "server_at_max_clients": measured,
                                        "over_engine": measured["req_per_s"] / res["engine_standalone"]["mean_req_per_s"],
                                        "over_one_process": measured["req_per_s"]
                                        / res["server_at_max_clients"]["mean_req_per_s"]}
                _write_json(result_path, res)
        finally:
            sl.stop_server(proc)
    by = {(r["config"], r["clients"]): r for r in res["levels"]}
    res["batching_ratio_at_max_clients"] = by[("batching", top)]["req_per_s"] / by[("max-batch 1", top)]["req_per_s"]
    res["api_processes_over_one_at_max_clients"] = (by[(f"batching, {many} API processes", top)]["req_per_s"]
                                                    / by[("batching", top)]["req_per_s"])
    _write_json(result_path, res)

    # The server's scheduler alone on that engine (servers stopped): what the arrival pattern costs.
    res["engine_standalone"]["closed_loop"] = sl.closed_loops(
        engine, s["device"], images, max(top, s["ratio_requests"] // s["ratio_rounds"]), top, s["max_tokens"],
        res["server_at_max_clients"]["turnaround_ms"])
    res["status"] = "ok"
    _write_json(result_path, res)


# ----------------------------------------------------------------------------- eval part
def eval_part(work: Path, result_path: Path, s: dict) -> None:
    """``eval_throughput.py`` as llavamed runs it; on CUDA once more with PyTorch's cuDNN attention
    left on (``LLAVAMED_CUDNN_SDPA=1``), the comparison behind turning it off."""
    res: dict = {"part": "eval", "status": "running"}

    def run(env: dict) -> dict:
        cmd = [sys.executable, str(HERE / "eval_throughput.py"), *s["eval_args"], "--json"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise RuntimeError(f"eval_throughput.py exited {proc.returncode}: {tail[-1] if tail else ''}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    res.update(run({}))
    _write_json(result_path, res)
    if s["device"].startswith("cuda"):
        res["cudnn_attention_on"] = run({"LLAVAMED_CUDNN_SDPA": "1"})
    res["status"] = "ok"
    _write_json(result_path, res)


# ----------------------------------------------------------------------------- train part
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lm_matmul_params(model) -> int:
    """Language-model parameters without the input embedding table (see the module docstring)."""
    def numel(p) -> int:  # ZeRO-3 leaves a partitioned parameter empty here; ds_numel is its size
        return int(getattr(p, "ds_numel", 0) or p.numel())

    lm = model.model.language_model
    emb = lm.get_input_embeddings()
    n = sum(numel(p) for p in lm.parameters()) - (numel(emb.weight) if emb is not None else 0)
    return n + sum(numel(p) for p in model.lm_head.parameters())


def _mechanism(trainer) -> dict:
    """What actually wrapped the model in this run, read from the Trainer."""
    import torch

    wrapped = trainer.model_wrapped
    out: dict = {"wrapper": type(wrapped).__name__, "model_class": type(trainer.model).__name__,
                 "attn_implementation": getattr(getattr(trainer.model, "config", None), "_attn_implementation", None),
                 "bf16": bool(trainer.args.bf16), "collator": type(trainer.data_collator).__name__}
    fsdp2 = fsdp1 = 0
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch
        FSDPModule = ()  # noqa: N806
    from torch.distributed.fsdp import FullyShardedDataParallel

    for mod in list(trainer.model.modules()) + ([wrapped] if isinstance(wrapped, torch.nn.Module) else []):
        fsdp2 += isinstance(mod, FSDPModule) if FSDPModule else 0
        fsdp1 += isinstance(mod, FullyShardedDataParallel)
    out["fsdp2_modules"] = int(fsdp2)
    out["fsdp1_modules"] = int(fsdp1)
    out["fsdp_enabled"] = bool(getattr(trainer, "is_fsdp_enabled", False))
    out["deepspeed_enabled"] = bool(getattr(trainer, "is_deepspeed_enabled", False))
    if out["deepspeed_enabled"]:
        out["deepspeed_stage"] = trainer.accelerator.deepspeed_config["zero_optimization"]["stage"]
    lora = [(n, p) for n, p in trainer.model.named_parameters() if "lora_" in n]
    out["lora_params"] = sum(p.numel() for _, p in lora)
    out["lora_trainable_params"] = sum(p.numel() for _, p in lora if p.requires_grad)
    out["quantized_4bit_modules"] = sum(type(m).__name__ == "Linear4bit" for m in trainer.model.modules())
    out["cudnn_attention"] = bool(torch.backends.cuda.cudnn_sdp_enabled()) if torch.cuda.is_available() else None
    return out


def _install_probe(probe: dict) -> None:
    """Wrap llavamed's Trainer class (read-only): per-step times and tokens, and the mechanism after training."""
    from transformers import TrainerCallback

    import llavamed_core.train.run as run_mod

    original = run_mod._make_trainer_classes

    class StepClock(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            probe.setdefault("steps", []).append((time.perf_counter(), float(self.trainer.real_tokens)))

    def patched():
        trainer_cls, reporter, no_final = original()

        class ProbedTrainer(trainer_cls):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self.add_callback(StepClock(self))

            def train(self, *a, **kw):
                out = super().train(*a, **kw)
                probe["mechanism"] = _mechanism(self)
                base = self.accelerator.unwrap_model(self.model)
                base = base.get_base_model() if hasattr(base, "get_base_model") else base  # PEFT
                probe["lm_matmul_params"] = _lm_matmul_params(base)
                return out

        return ProbedTrainer, reporter, no_final

    run_mod._make_trainer_classes = patched


def train_part(row: str, work: Path, result_path: Path, s: dict) -> None:
    import importlib.util

    res: dict = {"part": f"train:{row}", "row": row, "status": "running"}
    if row in ("zero2", "zero3", "fsdp2"):  # one process, but a process group (DeepSpeed otherwise looks for MPI)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if s["device"] == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from llavamed_core.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unavailable = None
    if row == "packing" and "packing" not in fields:
        unavailable = "not available: TrainConfig has no packing setting in this version"
    elif row in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        unavailable = "not available: deepspeed is not installed"
    elif row == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        unavailable = "not available: bitsandbytes is not installed"
    elif row == "qlora" and s["device"] == "cpu":
        unavailable = "skipped on CPU (QLoRA on CPU is covered by tests/test_train_mechanisms.py)"
    if unavailable:
        res.update(status="skipped", reason=unavailable)
        _write_json(result_path, res)
        return

    import shutil

    import torch
    from transformers.utils import logging as hf_logging

    from llavamed_core.train import train
    from train_throughput import make_data

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if s["device"] == "cpu":
        torch.set_num_threads(1)
    ckpt = _ensure_checkpoint(work, s)
    data = work / "train-data"
    if not (data / "train.json").is_file():
        make_data(data, s["train_steps"] * s["train_batch"], seed=0, max_words=120)
    extra = {"plain": {}, "packing": {"packing": True}, "zero2": {"deepspeed": "zero2"}, "zero3": {"deepspeed": "zero3"}, "fsdp2": {"fsdp": True},
             "lora": {"lora": True, "merge": False}, "qlora": {"qlora": True, "merge": False}}[row]
    out = work / f"train-out-{row}"
    cfg = TrainConfig(stage="instruct", model=ckpt, data=data / "train.json", images=data / "images", out=out,
                      global_batch=s["train_batch"], per_device_batch=s["train_batch"], max_steps=s["train_steps"],
                      learning_rate=2e-5, save_steps=10**9, device=s["device"], overwrite=True,
                      attn_implementation="sdpa", **extra)
    res["settings"] = {k: v for k, v in dataclasses.asdict(cfg).items()
                       if k in ("stage", "global_batch", "per_device_batch", "max_steps", "attn_implementation",
                                *extra)}
    probe: dict = {}
    _install_probe(probe)
    result = train(cfg)
    dev = _device_name(s["device"])
    steps = probe.get("steps", [])
    k = min(WARMUP_STEPS, max(0, len(steps) - 2))
    steady = None
    if len(steps) - k >= 2 and steps[-1][0] > steps[k][0]:
        steady = (steps[-1][1] - steps[k][1]) / (steps[-1][0] - steps[k][0])
    n_mat = probe.get("lm_matmul_params")
    peak = peak_tflops(dev)
    res.update(
        status="ok", device=dev, steps=result.steps, samples_per_step=result.global_batch,
        total_params=result.total_params, trainable_params=result.trainable_params, lm_matmul_params=n_mat,
        tokens_per_s_run=result.tokens_per_s, tokens_per_s_steady=steady, padding_share=result.padding_share,
        train_runtime_s=result.train_runtime_s, final_loss=result.final_loss,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if s["device"].startswith("cuda") else None,
        peak_tflops=peak,
        mfu=(6 * n_mat * steady / (peak * 1e12)) if (peak and n_mat and steady) else None,
        mechanism=probe.get("mechanism"))
    _write_json(result_path, res)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".run"), ignore_errors=True)


# ----------------------------------------------------------------------------- report
def _f(x, fmt: str = "{:.2f}", none: str = "–") -> str:
    return none if x is None else fmt.format(x)


def _mechanism_text(m: dict | None) -> str:
    if not m:
        return "–"
    bits = [m.get("wrapper", "?")]
    if m.get("fsdp2_modules"):
        bits.append(f"FSDP2 ×{m['fsdp2_modules']}")
    if m.get("fsdp1_modules"):
        bits.append(f"FSDP1 ×{m['fsdp1_modules']}")
    if m.get("deepspeed_enabled"):
        bits.append(f"DeepSpeed ZeRO-{m.get('deepspeed_stage')}")
    if m.get("lora_params"):
        bits.append(f"LoRA {m['lora_trainable_params'] / 1e6:.1f}M trained")
    if m.get("quantized_4bit_modules"):
        bits.append(f"4-bit ×{m['quantized_4bit_modules']}")
    if m.get("collator") == "PackingCollator":
        bits.append("packed rows")
    bits.append(f"attn {m.get('attn_implementation')}")
    if m.get("cudnn_attention") is not None:
        bits.append("cuDNN attention " + ("on" if m["cudnn_attention"] else "off"))
    return ", ".join(bits)


def render_markdown(report: dict) -> str:
    lines = [f"# GPU suite — {report.get('device') or '?'}", "",
             f"Started {report['started']}"
             f"{' at commit ' + report['commit'] if report.get('commit') else ''}, "
             f"{report['elapsed_s']:.0f} s so far, budget {report['budget_s']} s"
             f"{' (smoke run: tiny model on CPU)' if report['smoke'] else ''}.", ""]
    parts = report["parts"]
    lines += ["## Serving", ""]
    sv = parts.get("serve")
    if not sv or sv.get("status") not in ("ok", "running"):
        lines += [f"- {_reason(sv)}", ""]
    if sv and sv.get("levels"):
        lines += ["| config | clients | requests | req/s | p50 ms | p99 ms | malformed → 4xx | errors | mean batch |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sv["levels"]:
            lines.append(f"| {r['config']} | {r['clients']} | {r['requests']} | {r['req_per_s']:.2f} | "
                         f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['malformed_4xx']} | {r['errors']} | "
                         f"{_f(r.get('mean_batch'), '{:.1f}')} |")
        lines.append("")
    if sv:
        lines.append("| figure | value | target |")
        lines.append("|---|---:|---|")
        top = sv.get("max_clients", "?")
        lines.append(f"| batching ÷ max-batch 1 at {top} clients (req/s) | {_f(sv.get('batching_ratio_at_max_clients'))}× | ≥ 3× |")
        if sv.get("threads_over_loop_at_max_clients") is not None:
            lines.append(f"| every image prepared in 8 threads ÷ small ones on the event loop, {top} clients "
                         f"(req/s) | {_f(sv['threads_over_loop_at_max_clients'])}× | — |")
        lines.append(f"| server at {top} clients ÷ standalone engine at batch {top} (req/s) | "
                     f"{_f(sv.get('server_over_engine'))} | ≥ 0.8 |")
        api = sv.get("api_processes")
        if api:
            lines.append(f"| {api['processes']} API processes ÷ 1, {top} clients, valid requests (req/s) | "
                         f"{_f(api['over_one_process'])}× | — |")
            lines.append(f"| server with {api['processes']} API processes at {top} clients ÷ standalone engine "
                         f"at batch {top} (req/s) | {_f(api['over_engine'])} | ≥ 0.8 |")
        for cl in (sv.get("engine_standalone") or {}).get("closed_loop", []):
            lines.append(f"| the scheduler alone, {top} closed-loop clients, turnaround {cl['turnaround_ms']:.0f} ms "
                         f"÷ standalone engine (req/s) | "
                         f"{_f(cl.get('ratio', cl['req_per_s'] / sv['engine_standalone']['req_per_s']))} | — |")
        sd = sv.get("short_during_long") or {}
        lines.append(f"| 4-token request during {sd.get('long_requests', '?')}×{sd.get('long_max_tokens', '?')}-token "
                     f"batch: latency ÷ batch duration | {_f(sd.get('ratio'))} | ≤ 0.25 |")
        lines.append("")
    lines += ["## eval vqa", ""]
    ev = parts.get("eval")
    if ev and ev.get("status") == "ok":
        lines += ["| cuDNN attention | questions | one at a time q/s | batched q/s | speedup | identical answers | target |",
                  "|---|---:|---:|---:|---:|---|---|"]
        state = {False: "off (llavamed)", True: "on"}.get(ev.get("cudnn_attention"), "PyTorch's default")
        for e, label in ((ev, state),
                         (ev.get("cudnn_attention_on"), "on (`LLAVAMED_CUDNN_SDPA=1`)")):
            if e:
                lines.append(f"| {label} | {e['questions']} | {e['one_at_a_time_qps']} | {e['batched_qps']} | "
                             f"{e['speedup']}× | {e['same_answers']} | ≥ 10× |")
        lines.append("")
    else:
        lines += [f"- {_reason(ev)}", ""]
    lines += ["## Training", "",
              "| run | tokens/s (steady) | tokens/s (whole run) | MFU | peak memory GiB | final loss | mechanism |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for row in TRAIN_ROWS:
        t = parts.get(f"train:{row}")
        if t and t.get("status") == "ok":
            lines.append(f"| {row} | {_f(t['tokens_per_s_steady'], '{:,.0f}')} | {_f(t['tokens_per_s_run'], '{:,.0f}')} | "
                         f"{_f(t['mfu'] * 100 if t['mfu'] is not None else None, '{:.1f}%')} | "
                         f"{_f(t['peak_memory_gib'], '{:.1f}')} | {_f(t['final_loss'], '{:.3f}')} | "
                         f"{_mechanism_text(t.get('mechanism'))} |")
        elif t is not None or "train" in report["selected"]:
            lines.append(f"| {row} | {_reason(t)} | | | | | |")
    lines += ["", "MFU target for the plain run: ≥ 35 %. MFU = 6·N·tokens/s ÷ dense bf16 peak; N = language model "
              "without its input embedding.", ""]
    return "\n".join(lines)


def _reason(part: dict | None) -> str:
    if part is None:
        return "not run"
    if part.get("status") == "ok":
        return "ok"
    return f"{part.get('status')}: {part.get('reason') or part.get('error') or ''}".strip()


# ----------------------------------------------------------------------------- orchestration
def _read_lines(log: Path) -> list[str]:
    try:
        return [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return []


def _where_stuck(log: Path) -> str:
    """The innermost frame of the last stack the child dumped on SIGUSR1 (faulthandler)."""
    lines = _read_lines(log)
    starts = [i for i, ln in enumerate(lines) if ln.startswith(("Stack (most recent", "Current thread", "Thread 0x"))]
    if not starts:
        return ""
    frame = next((ln for ln in lines[starts[-1] + 1:] if ln.startswith("File ")), "")
    return f"; it was at {frame.replace('File ', '')}" if frame else ""


def _last_error_line(log: Path) -> str:
    lines = _read_lines(log)
    if not lines:
        return "no output"
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln:
            return ln[:400]
    return lines[-1][:400] if lines else "no output"


def _commit() -> str | None:
    """The repository's commit (with ``+`` when the working tree differs), if git can tell."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def run_job(job: str, work: Path, logs: Path, limit_s: float, smoke: bool) -> dict:
    """Run one part in its own process group; return its result dict (or the error)."""
    result_path = work / f"{job.replace(':', '-')}.json"
    result_path.unlink(missing_ok=True)
    log = logs / f"{job.replace(':', '-')}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", job, "--work", str(work),
           "--result", str(result_path)] + (["--smoke"] if smoke else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGUSR1)  # faulthandler: where it is stuck, into the log
            time.sleep(1.5)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    res = json.loads(result_path.read_text()) if result_path.is_file() else {"part": job}
    res["wall_s"] = time.perf_counter() - t0
    if rc is None:
        res["status"] = "timeout"
        res["error"] = (f"stopped after its {limit_s:.0f} s limit (results so far kept){_where_stuck(log)}; "
                        f"log: {log.name}")
    elif rc != 0:
        res["status"] = "error"
        res["error"] = f"{_last_error_line(log)} (exit {rc}; log: {log.name})"
    return res


def child_main(args: argparse.Namespace) -> None:
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=False)  # the parent asks "where are you?" on timeout
    # Fault injection for the suite's own test: GPU_SUITE_FAULT="eval:crash,train:plain:hang".
    for fault in filter(None, os.environ.get("GPU_SUITE_FAULT", "").split(",")):
        job, _, kind = fault.rpartition(":")
        if job == args.child and kind == "crash":
            raise RuntimeError(f"injected fault in {job}")
        if job == args.child and kind == "hang":
            time.sleep(10**6)
    s = _settings(args.smoke)
    work, result = Path(args.work), Path(args.result)
    if args.child == "serve":
        serve_part(work, result, s)
    elif args.child == "eval":
        eval_part(work, result, s)
    elif args.child.startswith("train:"):
        train_part(args.child.split(":", 1)[1], work, result, s)
    else:
        raise SystemExit(f"unknown part {args.child}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for results.json, results.md and the parts' logs")
    ap.add_argument("--only", default=",".join(PARTS),
                    help="comma-separated parts: serve, eval, train, or train rows like train:plain,train:lora")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="overall seconds; parts that would start past it are skipped (default 430; 1500 with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the suite itself)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    if not args.out:
        ap.error("--out is required")
    if args.budget_s is None:
        args.budget_s = 1500.0 if args.smoke else 430.0

    import tempfile

    selected = [p.strip() for p in args.only.split(",") if p.strip()]
    for p in selected:
        if p not in PARTS and not (p.startswith("train:") and p.split(":", 1)[1] in TRAIN_ROWS):
            ap.error(f"--only {p}: expected serve, eval, train or train:<{'|'.join(TRAIN_ROWS)}>")
    jobs = []
    for p in PARTS:
        if p in selected:
            jobs += [f"train:{r}" for r in TRAIN_ROWS] if p == "train" else [p]
    jobs += [p for p in selected if p.startswith("train:") and p not in jobs]
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": args.smoke, "budget_s": args.budget_s,
              "selected": selected, "device": None, "parts": {}, "elapsed_s": 0.0, "commit": _commit()}

    def flush() -> None:
        report["elapsed_s"] = time.perf_counter() - start
        _write_json(out / "results.json", report)
        (out / "results.md").write_text(render_markdown(report))

    flush()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        work = Path(tmp)
        for job in jobs:
            left = args.budget_s - (time.perf_counter() - start)
            limit = min(JOB_LIMIT_S[job.split(":")[0]][1 if args.smoke else 0], left)
            if limit < 15:
                report["parts"][job] = {"part": job, "status": "skipped",
                                        "reason": f"the overall budget of {args.budget_s:.0f} s was spent"}
                flush()
                continue
            print(f"[gpu_suite] {job} (limit {limit:.0f} s) …", flush=True)
            res = run_job(job, work, logs, limit, args.smoke)
            report["parts"][job] = res
            report["device"] = report["device"] or res.get("device")
            print(f"[gpu_suite] {job}: {res.get('status')} in {res['wall_s']:.0f} s"
                  f"{'  ' + _reason(res) if res.get('status') != 'ok' else ''}", flush=True)
            flush()
    flush()
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
