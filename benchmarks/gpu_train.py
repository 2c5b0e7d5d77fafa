"""GPU training check: 50 ``instruct`` steps of a randomly initialised ~0.5B LLaVA, tokens/s and peak memory.

The model is the ``llava-med-v1.5`` architecture (Mistral-7B width, CLIP ViT-L/14-336, 576 image
tokens per image, 2-layer GELU projector) cut to 2 text layers and 12 vision layers, randomly
initialised and saved as a checkpoint; then :func:`llavamed_core.train.train` runs the instruct
stage on it exactly as ``llavamed train instruct`` would: bf16 mixed precision and tf32 when the
GPU has them, flash-attention 2 when ``flash_attn`` imports (else SDPA), length-grouped batches.
Data: synthetic multi-turn conversations about 336-px images. Prints one line of figures and, with
``--json``, a JSON object. Runs unattended in well under two minutes on one H100.

Run::

    python benchmarks/gpu_train.py                 # one GPU: ~0.5B model, 50 steps
    python benchmarks/gpu_train.py --tiny          # CPU smoke run: tiny preset, 5 steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import make_data  # noqa: E402


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny preset on CPU (a smoke run of this script)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 50; 5 with --tiny)")
    ap.add_argument("--batch", type=int, default=8, help="samples per step (one GPU, no accumulation)")
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=12)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would print that it found no GPU

    import torch
    from transformers.utils import logging as hf_logging

    from llavamed_core.model import build_from_preset, save_checkpoint
    from llavamed_core.model.checkpoint import resolve_attn_implementation
    from llavamed_core.train import TrainConfig, train

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --tiny for the CPU smoke run")
    steps = args.steps or (5 if args.tiny else 50)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.tiny:
            model, processor = build_from_preset("tiny", seed=0)
        else:
            model, processor = build_from_preset("llava-med-v1.5", seed=0, dtype=torch.bfloat16,
                                                 text_overrides={"num_hidden_layers": args.text_layers},
                                                 vision_overrides={"num_hidden_layers": args.vision_layers})
        n_params = sum(p.numel() for p in model.parameters())
        save_checkpoint(model, processor, tmp / "ckpt")
        del model
        train_file, _, images = make_data(tmp / "data", steps * args.batch, seed=0, max_words=120)
        built = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(stage="instruct", model=tmp / "ckpt", data=train_file, images=images, out=tmp / "out",
                          global_batch=args.batch, per_device_batch=args.batch, max_steps=steps,
                          learning_rate=2e-5, save_steps=10**9, device=device,
                          gradient_checkpointing=args.gradient_checkpointing)
        result = train(cfg)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    figures = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "parameters": n_params, "trainable_parameters": result.trainable_params,
        "attention": resolve_attn_implementation(device),
        "precision": "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32",
        "steps": result.steps, "batch": args.batch, "samples": result.samples,
        "tokens_per_s": result.tokens_per_s, "padding_share": result.padding_share,
        "train_runtime_s": result.train_runtime_s, "s_per_step": result.train_runtime_s / max(1, result.steps),
        "final_loss": result.final_loss, "peak_gpu_memory_gib": peak, "setup_s": built,
        "total_s": time.perf_counter() - t0,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    mem = f"{peak:.1f} GiB" if peak is not None else "n/a"
    print(f"gpu_train — {figures['device']}: {_count(n_params)} parameters ({_count(result.trainable_params)} "
          f"trained), {figures['precision']}, attention {figures['attention']}, {result.steps} steps × batch "
          f"{args.batch}: {result.tokens_per_s:,.0f} tokens/s, {figures['s_per_step']:.3f} s/step, "
          f"padding {result.padding_share * 100:.1f}%, peak GPU memory {mem}, final loss {result.final_loss:.3f}, "
          f"total {figures['total_s']:.0f} s")


if __name__ == "__main__":
    main()
