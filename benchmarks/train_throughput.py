"""Trained tokens per second and the share of padding: length-grouped batches vs random batches.

Both runs train the same model from the same initial weights on the same data for the same number
of samples (the same epochs), through :func:`llavamed_core.train.train`, in this process. The baseline
is what the original LLaVA code did by default: random batches, each padded to its longest sample
(our ``PaddingCollator`` behind a random sampler). The contender groups samples of similar length
into batches (``LengthGroupedSampler`` over the lengths computed when tokenizing, no image read).
Results are compared on a held-out set (mean loss on the answer tokens): equal results, less
padding, more tokens per second. With ``--packing`` a third run trains as ``train --packing`` does
(``TrainConfig(packing=True)``): the baseline's random batches, each packed end to end into ONE row
with no padding, the language model attending within each sample only (SDPA per sample, no mask
tensor; ``llavamed_core.train.packed_attention``), and is compared with the length-grouped run.

The data mimics LLaVA-Med's instruction set: 1–4 question/answer turns about one image, answers
whose lengths follow a long-tailed (log-normal) distribution like figure captions and GPT-4
answers, so that random batches waste much of their width on padding.

Run::

    python benchmarks/train_throughput.py                     # CPU (1 thread), a small model (hidden 256, 4 layers)
    python benchmarks/train_throughput.py --packing           # + a third run with --packing
    python benchmarks/train_throughput.py --device cuda --hidden 1024 --layers 8 --samples 4096
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
from pathlib import Path

WORDS = ("the image shows a chest x-ray ct scan mri histology stain with a lesion mass nodule in the "
         "upper left lower right lung liver kidney brain tissue section cells nuclei bright dark round "
         "small large region of interest there is no evidence of effusion pneumothorax fracture "
         "consolidation opacity normal abnormal finding patient figure arrow indicates").split()
QUESTIONS = ["What does the image show?", "Is there a lesion?", "Where is the lesion located?",
             "What is the modality of this image?", "Describe the findings.", "What do the arrows indicate?"]


def make_data(folder: Path, n: int, seed: int, max_words: int) -> tuple[Path, Path, Path]:
    """Write images and two conversation files (train, held-out) with long-tailed answer lengths."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    nprng = np.random.default_rng(seed)
    for i in range(32):
        Image.fromarray(nprng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")

    def answer() -> str:
        words = min(max_words, max(1, int(rng.lognormvariate(math.log(18), 1.0))))
        return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."

    def record(i: int) -> dict:
        turns = []
        for t in range(rng.choice([1, 1, 2, 3, 4])):
            q = rng.choice(QUESTIONS)
            turns += [{"from": "human", "value": (q + "\n<image>") if t == 0 else q},
                      {"from": "gpt", "value": answer()}]
        return {"id": f"b{i}", "image": f"{i % 32}.png", "conversations": turns}

    train = folder / "train.json"
    held = folder / "heldout.json"
    train.write_text(json.dumps([record(i) for i in range(n)]))
    held.write_text(json.dumps([record(n + i) for i in range(max(32, n // 8))]))
    return train, held, images


def heldout_loss(ckpt: Path, data: Path, images: Path, device: str, batch: int) -> float:
    """Mean loss on the assistant tokens of ``data`` (teacher forcing), the checkpoint as saved."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavamed_core.records import load_conversations
    from llavamed_core.train.dataset import PaddingCollator, build_dataset

    processor = AutoProcessor.from_pretrained(ckpt)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).to(device).eval()
    ds, _ = build_dataset(load_conversations(data), processor, images, 2048)
    collate = PaddingCollator(processor.tokenizer.pad_token_id)
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(ds), batch):
            b = {k: v.to(device) for k, v in collate([ds[j] for j in range(i, min(len(ds), i + batch))]).items()}
            labels = b.pop("labels")
            logits = model(**b).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += loss.item()
            count += (target != -100).sum().item()
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=384, help="training conversations")
    ap.add_argument("--epochs", type=float, default=2.0, help="passes over the data (both runs)")
    ap.add_argument("--batch", type=int, default=16, help="samples per optimizer step (one process)")
    ap.add_argument("--hidden", type=int, default=256, help="language-model width")
    ap.add_argument("--layers", type=int, default=4, help="language-model layers")
    ap.add_argument("--max-words", type=int, default=160, help="longest answer in words")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch (1 keeps timings steady on a shared machine)")
    ap.add_argument("--packing", action="store_true",
                    help="also train with --packing (samples end to end in one row per batch) and compare it "
                         "with length-grouped batches")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()

    import torch

    if args.device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would print that it found no GPU
    from transformers.utils import logging as hf_logging

    from llavamed_core.model import build_from_preset, save_checkpoint
    from llavamed_core.train import TrainConfig, train

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    heads = max(1, args.hidden // 64)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, processor = build_from_preset(
            "tiny", seed=args.seed,
            text_overrides={"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                            "num_hidden_layers": args.layers, "num_attention_heads": heads,
                            "num_key_value_heads": heads, "max_position_embeddings": 2048})
        save_checkpoint(model, processor, tmp / "ckpt")
        n_params = sum(p.numel() for p in model.parameters())
        del model
        train_file, held, images = make_data(tmp / "data", args.samples, args.seed, args.max_words)
        rows = {}
        runs = [("random batches (baseline)", False, False), ("length-grouped (llavamed)", True, False)]
        if args.packing:
            runs.append(("packed (--packing)", False, True))
        for name, grouped, packing in runs:
            cfg = TrainConfig(stage="instruct", model=tmp / "ckpt", data=train_file, images=images,
                              out=tmp / ("packed" if packing else "grouped" if grouped else "random"),
                              epochs=args.epochs, learning_rate=args.lr, global_batch=args.batch,
                              per_device_batch=args.batch, seed=args.seed, group_by_length=grouped,
                              save_steps=10**9, device=device, overwrite=True, max_length=2048,
                              **({"packing": True} if packing else {}))
            r = train(cfg)
            rows[name] = {"tokens_per_s": r.tokens_per_s, "padding_share": r.padding_share,
                          "steps": r.steps, "runtime_s": r.train_runtime_s, "final_loss": r.final_loss,
                          "heldout_loss": heldout_loss(cfg.out, held, images, device, args.batch)}
        base, ours = rows["random batches (baseline)"], rows["length-grouped (llavamed)"]
        summary = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                   "parameters": n_params, "samples": args.samples, "batch": args.batch, "runs": rows,
                   "tokens_per_s_ratio": ours["tokens_per_s"] / base["tokens_per_s"],
                   "heldout_loss_difference": ours["heldout_loss"] - base["heldout_loss"]}
        if args.packing:
            packed = rows["packed (--packing)"]
            summary["packing_tokens_per_s_ratio"] = packed["tokens_per_s"] / ours["tokens_per_s"]
            summary["packing_heldout_loss_difference"] = packed["heldout_loss"] - ours["heldout_loss"]
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"train throughput — {summary['device']}, {n_params / 1e6:.1f}M parameters, "
          f"{args.samples} samples, batch {args.batch}, {args.epochs:g} epoch(s) each")
    print(f"{'':28s} {'tokens/s':>10s} {'padding':>8s} {'steps':>6s} {'runtime s':>10s} {'held-out loss':>14s}")
    for name, row in rows.items():
        print(f"{name:28s} {row['tokens_per_s']:10.0f} {row['padding_share'] * 100:7.1f}% {row['steps']:6d} "
              f"{row['runtime_s']:10.1f} {row['heldout_loss']:14.4f}")
    print(f"tokens/s ratio (length-grouped / random): {summary['tokens_per_s_ratio']:.2f}x; "
          f"held-out loss difference {summary['heldout_loss_difference']:+.4f}")
    if args.packing:
        print(f"tokens/s ratio (packed / length-grouped): {summary['packing_tokens_per_s_ratio']:.2f}x "
              f"(target >= 1.25x); held-out loss difference {summary['packing_heldout_loss_difference']:+.4f}")


if __name__ == "__main__":
    main()
