"""Peak memory of ``llavamed weights apply-delta`` against loading both models whole.

Builds a synthetic LLaMA-shaped base model (~``--size-gb`` of fp16 weights, several shards) and a
LLaVA-Med-shaped delta (4 extra embedding/output rows, a projector with no base) in a temporary
directory, then runs, each in its own process:

- ours: ``llavamed weights apply-delta --base B --delta D --out O`` (streaming);
- baseline: the original approach — load every tensor of both models into memory, add the base
  into the delta in place, save the result (sharded safetensors).

Peak RSS of each process comes from ``os.wait4`` (the kernel's ``ru_maxrss`` for that child).
Both outputs are compared tensor by tensor. The temporary directory is deleted at the end.

Run::

    python benchmarks/delta_memory.py                  # ~2 GB model (a few minutes on 2 cores)
    python benchmarks/delta_memory.py --size-gb 0.05   # quick check
    python benchmarks/delta_memory.py --format bin     # .bin shards (mmap path)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, VOCAB, EXTRA_ROWS, MM_HIDDEN = 2048, 5504, 32000, 4, 1024


def _layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def model_shapes(size_gb: float, delta: bool) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a LLaMA-like model of about ``size_gb`` GB in fp16."""
    rows = VOCAB + (EXTRA_ROWS if delta else 0)
    shapes = {"model.embed_tokens.weight": (rows, HIDDEN)}
    per_layer = sum(_numel(s) for s in _layer_shapes(0).values()) * 2
    fixed = 2 * rows * HIDDEN * 2
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    for i in range(layers):
        shapes.update(_layer_shapes(i))
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (rows, HIDDEN)
    if delta:
        shapes["model.mm_projector.weight"] = (HIDDEN, MM_HIDDEN)
        shapes["model.mm_projector.bias"] = (HIDDEN,)
    return shapes


def write_model(path: Path, shapes: dict[str, tuple[int, ...]], scale: float, seed: int, fmt: str,
                shard_bytes: int = 500_000_000) -> int:
    """Write random fp16 tensors as shards (one shard in memory at a time); returns bytes."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = 2 * _numel(shape)
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map, total = {}, 0
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    for i, group in enumerate(groups, 1):
        fname = f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}"
        part = {k: (torch.randn(shapes[k], generator=gen) * scale).to(torch.float16) for k in group}
        if fmt == "safetensors":
            save_file(part, str(path / fname), metadata={"format": "pt"})
        else:
            torch.save(part, path / fname)
        for k, t in part.items():
            weight_map[k] = fname
            total += t.numel() * 2
        del part
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (path / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    return total


def baseline_worker(base: Path, delta: Path, out: Path) -> None:
    """The original approach: both models whole in memory, add in place, save."""
    import torch
    from safetensors.torch import load_file, save_file

    def load(d: Path) -> dict:
        state = {}
        for f in sorted(d.glob("*.safetensors")):
            state.update(load_file(f))
        for f in sorted(d.glob("*.bin")):
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state

    b, dl = load(base), load(delta)
    for name, param in dl.items():
        if name not in b:
            continue
        bp = b[name]
        if param.shape == bp.shape:
            param += bp
        else:
            param[: bp.shape[0], : bp.shape[1]] += bp
    out.mkdir()
    shard, size, i = {}, 0, 0
    for name, t in dl.items():
        shard[name] = t
        size += t.numel() * t.element_size()
        if size > 2_000_000_000:
            i += 1
            save_file(shard, str(out / f"model-{i:05d}.safetensors"))
            shard, size = {}, 0
    if shard:
        save_file(shard, str(out / f"model-{i + 1:05d}.safetensors"))


def run_measured(cmd: list[str]) -> tuple[int, float, int]:
    """Run a command; return (peak RSS bytes, seconds, exit code)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        sys.stderr.write(err[-3000:])
    return usage.ru_maxrss * 1024, seconds, proc.returncode


def compare_outputs(a: Path, b: Path) -> int:
    """Number of tensors that differ between two safetensors directories (read one at a time)."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        m = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                m.update({k: f for k in fh.keys()})
        return m

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return len(set(ia) ^ set(ib))
    bad = 0
    for k in ia:
        with safe_open(str(ia[k]), "pt") as fa, safe_open(str(ib[k]), "pt") as fb:
            if not torch.equal(fa.get_tensor(k).view(torch.int16), fb.get_tensor(k).view(torch.int16)):
                bad += 1
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of the base model in GB (fp16)")
    ap.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the models (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON (last line)")
    ap.add_argument("--baseline-worker", nargs=3, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--build-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_worker:
        baseline_worker(*args.baseline_worker)
        return
    if args.build_worker:
        base_bytes = write_model(args.build_worker / "base", model_shapes(args.size_gb, False), 0.02, 0, args.format)
        delta_bytes = write_model(args.build_worker / "delta", model_shapes(args.size_gb, True), 0.002, 1, args.format)
        shards = len(list((args.build_worker / "base").glob("*.bin" if args.format == "bin" else "*.safetensors")))
        print(f"built base {base_bytes / 1e9:.2f} GB ({shards} shards) and delta {delta_bytes / 1e9:.2f} GB, "
              f"{args.format}", flush=True)
        return

    # The parent stays small (no torch imported before the measured runs): a forked child's
    # ru_maxrss starts from its parent's high-water mark.
    tmp = Path(tempfile.mkdtemp(prefix="delta-memory-", dir=args.workdir))
    try:
        t0 = time.monotonic()
        subprocess.run([sys.executable, __file__, "--build-worker", str(tmp), "--size-gb", str(args.size_gb),
                        "--format", args.format], check=True)
        print(f"(built in {time.monotonic() - t0:.0f} s)", flush=True)
        ours_peak, ours_s, rc1 = run_measured([sys.executable, "-m", "llavamed_cli.main", "weights", "apply-delta",
                                               "--base", str(tmp / "base"), "--delta", str(tmp / "delta"),
                                               "--out", str(tmp / "ours")])
        base_peak, base_s, rc2 = run_measured([sys.executable, __file__, "--baseline-worker",
                                               str(tmp / "base"), str(tmp / "delta"), str(tmp / "baseline")])
        if rc1 or rc2:
            raise SystemExit(f"a run failed (ours exit {rc1}, baseline exit {rc2})")
        differing = compare_outputs(tmp / "ours", tmp / "baseline")
        print(f"ours     (streaming apply-delta): peak RSS {ours_peak / 2**20:8.0f} MiB  {ours_s:6.1f} s")
        print(f"baseline (both models in memory): peak RSS {base_peak / 2**20:8.0f} MiB  {base_s:6.1f} s")
        print(f"ratio ours/baseline: {ours_peak / base_peak:.1%} (target <= 25%)")
        print(f"outputs identical: {differing == 0} ({differing} tensors differ)")
        if args.json:
            print(json.dumps({"format": args.format, "size_gb": args.size_gb, "ours_peak_bytes": ours_peak,
                              "ours_s": ours_s, "baseline_peak_bytes": base_peak, "baseline_s": base_s,
                              "ratio": ours_peak / base_peak, "tensors_differing": differing}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
