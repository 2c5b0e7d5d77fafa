"""``apply-delta`` and ``make-delta``: LLaVA-Med's delta weights, streamed tensor by tensor.

LLaVA-Med v1 was released as a *delta* against LLaMA-7B (the LLaMA licence forbade sharing the
weights). The original semantics, kept here:

- every delta tensor is added to the base tensor of the same name;
- the token embedding and the output matrix (``*embed_tokens.weight``, ``*lm_head.weight``) of
  the delta have extra rows for the tokens LLaVA added (``[PAD]``, ``<im_patch>``, ``<im_start>``,
  ``<im_end>``): only the rows the base has are added, the extra rows are taken as stored;
- tensors the base model cannot have (the projector ``mm_projector``, a vision tower) are taken
  as stored;
- ``make-delta`` is the inverse (target minus base, same rules).

``apply-delta`` adds exactly as the original tool did (in place, in the stored dtype; the sum is
correctly rounded, so the bits are the original's). ``make-delta`` also makes the round trip
exact: where ``base + (target - base)`` would not round back to the target it moves the delta by
one unit in the last place until it does, so ``apply-delta(make-delta(T)) == T`` bit for bit
wherever the dtype allows it (the result counts any element where it cannot), and then
``make-delta(apply-delta(D)) == D`` for every delta ``D`` that ``make-delta`` wrote.

Nothing is held whole: tensors are read and written in chunks (:mod:`.shards`), validated in
full (names, shapes, dtypes) before the first byte is written, into a temporary directory that
is renamed at the end (a killed run leaves no complete-looking output). ``to_hf`` sends the
summed tensors straight through :func:`llavamed_core.model.convert.convert_source`, writing a
standard Hugging Face Llava checkpoint without an intermediate copy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError
from ..io import atomic_dir
from ..progress import ProgressCallback
from .compat import finalize_checkpoint_files
from .shards import (DEFAULT_CHUNK_BYTES, CheckpointReader, OutTensor, TensorSpec, WriteOptions, WriteResult,
                     copy_aux_files, element_size, write_tensors)

__all__ = ["ApplyDeltaConfig", "MakeDeltaConfig", "DeltaResult", "apply_delta", "make_delta",
           "DeltaSource", "NO_BASE_MARKERS", "ROW_EXTENDABLE"]

NO_BASE_MARKERS = ("mm_projector", "multi_modal_projector", "vision_tower")
"""Name fragments of tensors a base LLM cannot have: taken as stored."""

ROW_EXTENDABLE = ("embed_tokens.weight", "lm_head.weight")
"""Name endings of the matrices whose delta may have extra rows (added tokens)."""

BASE_ONLY_IGNORED = (".rotary_emb.inv_freq",)
"""Base tensors a delta may lack: rotary buffers that 2023 LLaMA conversions saved and that
transformers recomputes from the config."""

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass
class ApplyDeltaConfig(WriteOptions):
    """Options of ``weights apply-delta`` (and the output options of :class:`~.shards.WriteOptions`).

    Attributes:
        base: the base model directory (e.g. LLaMA-7B in Hugging Face format), or a Hub id
            ``org/name[@revision]`` (as for every model path here).
        delta: the delta directory (e.g. ``microsoft/llava-med-7b-delta``).
        dtype: cast base and delta to this dtype first (the original tool loaded both in
            float16); default: keep the stored dtypes, which must then match tensor by tensor.
        to_hf: write a standard Hugging Face Llava checkpoint instead of the original layout.
        vision: CLIP directory for ``to_hf`` (the v1 checkpoint has no vision tower inside).
    """

    base: Path
    delta: Path
    dtype: str | None = None
    to_hf: bool = False
    vision: Path | None = None


@dataclass
class MakeDeltaConfig(WriteOptions):
    """Options of ``weights make-delta`` (and the output options of :class:`~.shards.WriteOptions`).

    Attributes:
        base: the base model directory.
        target: the full model directory (original layout, same tensor names as the base).
        dtype: cast base and target to this dtype first; default: keep the stored dtypes.
    """

    base: Path
    target: Path
    dtype: str | None = None


@dataclass
class DeltaResult(WriteResult):
    """What ``apply-delta`` / ``make-delta`` did (and the output counts of :class:`~.shards.WriteResult`).

    Attributes:
        mode: ``"apply"`` or ``"make"``.
        combined: tensors added to (apply) or subtracted from (make) the base.
        taken_as_stored: tensors with no base, copied as they are.
        extra_rows: ``{name: rows}`` of embedding/output matrices whose extra rows were copied.
        dropped: base-only tensors left out (rotary buffers).
        inexact_elements: elements where ``base + delta`` cannot round to the target in the stored
            dtype (make-delta; 0 means the round trip is bit-exact).
        inexact_tensors: names of the tensors holding those elements.
        copied_files: non-weight files copied (config, tokenizer, ...).
        notes: remarks (legacy formats loaded whole, ...).
        convert: the conversion report when ``to_hf`` was used.
    """

    mode: str
    combined: int = 0
    taken_as_stored: list[str] = field(default_factory=list)
    extra_rows: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    inexact_elements: int = 0
    inexact_tensors: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    convert: Any = None


@dataclass
class _Op:
    name: str
    shape: tuple[int, ...]
    dtype: Any
    overlap: int  # elements combined with the base (0: taken as stored)


def _resolve_dtype(name: str | None) -> Any:
    import torch

    if name is None:
        return None
    if name not in _DTYPES:
        raise ConfigError(f"--dtype {name}: unknown", "use float16, bfloat16 or float32")
    return getattr(torch, _DTYPES[name])


def _wide(dtype: Any) -> Any:
    """A float wide enough that one rounding back to ``dtype`` is the correctly rounded result."""
    import torch

    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _plan(base: CheckpointReader, other: CheckpointReader, mode: str, cast: Any,
          result: DeltaResult) -> list[_Op]:
    """Check every name, shape and dtype; return the operations in the other model's order.

    Raises:
        ModelError: naming the first bad tensor (and how many more there are).
    """
    what = "delta" if mode == "apply" else "target"
    problems: list[str] = []
    ops: list[_Op] = []
    for name, o in other.tensors.items():
        dtype = cast if cast is not None else o.dtype
        if cast is not None and not o.dtype.is_floating_point:
            problems.append(f"tensor {name}: {what} dtype {o.dtype} is not a float; --dtype cannot cast it")
            continue
        b = base.tensors.get(name)
        if b is None:
            if any(m in name for m in NO_BASE_MARKERS):
                ops.append(_Op(name, o.shape, dtype, 0))
                result.taken_as_stored.append(name)
            else:
                problems.append(f"tensor {name} is in the {what} but not in the base")
            continue
        if cast is None and b.dtype != o.dtype:
            problems.append(f"tensor {name}: {what} dtype {o.dtype} but base dtype {b.dtype}")
            continue
        if not o.dtype.is_floating_point or not b.dtype.is_floating_point:
            problems.append(f"tensor {name}: dtype {o.dtype} is not a float; deltas are float tensors")
            continue
        if o.shape == b.shape:
            ops.append(_Op(name, o.shape, dtype, b.numel))
        elif (name.endswith(ROW_EXTENDABLE) and len(o.shape) == 2 and len(b.shape) == 2
              and o.shape[1] == b.shape[1] and o.shape[0] > b.shape[0]):
            ops.append(_Op(name, o.shape, dtype, b.numel))
            result.extra_rows[name] = o.shape[0] - b.shape[0]
        else:
            problems.append(f"tensor {name}: {what} shape {list(o.shape)} does not match base shape "
                            f"{list(b.shape)}")
    for name in base.tensors:
        if name in other.tensors:
            continue
        if name.endswith(BASE_ONLY_IGNORED):
            result.dropped.append(name)
        else:
            problems.append(f"tensor {name} is in the base but missing from the {what}")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        hint = ("check that --base is the model the delta was made against (LLaMA-7B for LLaVA-Med v1) "
                "and that both downloads are complete")
        if any("dtype" in p for p in problems) and cast is None:
            hint = "pass --dtype float16 to cast both first (the original tool loaded both in float16)"
        raise ModelError(f"{problems[0]}{more}", hint)
    return ops


def _bits(t: Any) -> Any:
    import torch

    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _nudge(a: Any, t: Any, dtype: Any) -> tuple[Any, Any]:
    """``t - a`` rounded to ``dtype``, then moved ulp by ulp until ``a + d`` rounds to ``t``.

    Returns:
        ``(d, idx)``: the difference and the indices of the elements where no nearby ``d`` works.
    """
    import torch

    wide = _wide(dtype)
    aw = a.to(wide)
    d = (t.to(wide) - aw).to(dtype)
    r = (aw + d.to(wide)).to(dtype)
    idx = (_bits(r) != _bits(t)).nonzero().squeeze(1)
    if idx.numel() == 0 or dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return d, idx
    # Work on the (few) mismatching elements only.
    a_s, t_s, d_s, r_s = aw[idx], t[idx], d[idx], r[idx]
    left = torch.arange(idx.numel())
    for _ in range(8):
        rb, tb, db = r_s[left], t_s[left], d_s[left]
        inf = torch.full_like(db, float("inf"))
        db = torch.nextafter(db, torch.where(rb < tb, inf, torch.where(rb > tb, -inf, db)))
        rb = (a_s[left] + db.to(wide)).to(dtype)
        d_s[left], r_s[left] = db, rb
        left = left[_bits(rb) != _bits(tb)]
        if left.numel() == 0:
            break
    d[idx] = d_s
    return d, idx[left]


def _exact_difference(a: Any, t: Any, dtype: Any) -> tuple[Any, int]:
    """The delta ``d`` (in ``dtype``) with ``a + d`` rounding to ``t`` wherever one exists.

    Where none exists (the target lies between two sums the dtype can form), ``d`` is the
    canonical delta of the nearest reachable target ``t' = a + d``, so that
    ``make(apply(make(t))) == make(t)`` holds for every element.

    Returns:
        ``(d, n)`` with ``n`` the elements whose target cannot be reached exactly.
    """
    d, idx = _nudge(a, t, dtype)
    if idx.numel():
        wide = _wide(dtype)
        reached = (a[idx].to(wide) + d[idx].to(wide)).to(dtype)
        d[idx], _ = _nudge(a[idx], reached, dtype)
    return d, int(idx.numel())


class DeltaSource:
    """The combined tensors (base ± other) as a readable source, computed piece by piece.

    It offers what :class:`~llavamed_core.model.shards.CheckpointReader` offers (``tensors``,
    ``chunks``, ``release``), so the writer and the converter read it like a checkpoint.

    Args:
        base: reader of the base model.
        other: reader of the delta (apply) or the target (make).
        ops: the checked plan.
        mode: ``"apply"`` or ``"make"``.
        result: where make-delta counts inexact elements.
    """

    def __init__(self, base: CheckpointReader, other: CheckpointReader, ops: list[_Op], mode: str,
                 result: DeltaResult):
        self.base, self.other, self.mode, self.result = base, other, mode, result
        self._ops = {op.name: op for op in ops}
        self.tensors = {op.name: TensorSpec(op.name, op.shape, op.dtype) for op in ops}

    def chunks(self, name: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES, start: int = 0,
               stop: int | None = None) -> Iterator[Any]:
        """Yield the combined tensor's elements ``[start, stop)`` in flat pieces."""
        op = self._ops[name]
        numel = self.tensors[name].numel
        stop = numel if stop is None else stop
        esize = max(element_size(op.dtype), element_size(self.other.tensors[name].dtype))
        step = max(1, chunk_bytes // esize)
        s = start
        while s < stop:
            e = min(stop, s + step)
            if s < op.overlap:
                e = min(e, op.overlap)
                yield self._combine(name, op, s, e)
            else:
                yield self.other.read(name, s, e).to(op.dtype)
            s = e

    def _combine(self, name: str, op: _Op, s: int, e: int) -> Any:
        a = self.base.read(name, s, e).to(op.dtype)
        o = self.other.read(name, s, e).to(op.dtype)
        if self.mode == "apply":
            # The original's in-place addition in the stored dtype. On the CPU a float16/bfloat16
            # sum is formed in float32 and rounded once, which is the correctly rounded result.
            return o.add_(a)
        d, inexact = _exact_difference(a, o, op.dtype)
        if inexact:
            self.result.inexact_elements += inexact
            if name not in self.result.inexact_tensors:
                self.result.inexact_tensors.append(name)
        return d

    def release(self, name: str) -> None:
        """Let the inputs drop what ``name`` needed."""
        self.base.release(name)
        self.other.release(name)


def _run(base_dir: Path, other_dir: Path, out: Path, mode: str, dtype: str | None, max_shard_bytes: int,
         chunk_bytes: int, overwrite: bool, progress: ProgressCallback | None, to_hf: bool = False,
         vision: Path | None = None) -> DeltaResult:
    start = time.monotonic()
    cast = _resolve_dtype(dtype)
    result = DeltaResult(out=str(out), mode=mode)
    what = "--delta" if mode == "apply" else "--target"
    from .hub import resolve_model

    base_dir = resolve_model(base_dir, "--base", "directory")
    other_dir = resolve_model(other_dir, what, "directory")
    if Path(out).resolve() in (Path(base_dir).resolve(), Path(other_dir).resolve()):
        raise ConfigError(f"--out {out} is one of the inputs", "write to a new directory")
    with CheckpointReader(base_dir, "--base") as base, CheckpointReader(other_dir, what) as other:
        result.notes += base.notes + other.notes
        ops = _plan(base, other, mode, cast, result)
        source = DeltaSource(base, other, ops, mode, result)
        result.combined = sum(1 for op in ops if op.overlap)
        if to_hf:
            from .convert import ConvertConfig, convert_source, read_source_config

            conv = convert_source(read_source_config(other_dir), other_dir, source,
                                  ConvertConfig(src=other_dir, out=out, vision=vision, overwrite=overwrite,
                                                max_shard_bytes=max_shard_bytes, chunk_bytes=chunk_bytes),
                                  progress=progress, task=f"{mode}-delta")
            result.convert = conv
            result.tensors, result.bytes, result.shards = conv.tensors, conv.bytes, conv.shards
        else:
            plan = [OutTensor(op.name, op.shape, op.dtype,
                              (lambda n=op.name: source.chunks(n, chunk_bytes)),
                              (lambda n=op.name: source.release(n))) for op in ops]
            with atomic_dir(out, overwrite=overwrite) as tmp:
                written = write_tensors(tmp, plan, max_shard_bytes, progress, task=f"{mode}-delta")
                result.copied_files = copy_aux_files(other_dir, tmp)
                finalize_checkpoint_files(tmp)  # side files of an older llavamed made loadable everywhere
            result.record(written)
    result.seconds = time.monotonic() - start
    return result


def apply_delta(cfg: ApplyDeltaConfig, progress: ProgressCallback | None = None) -> DeltaResult:
    """Add a delta to its base model, streaming, and write the result.

    Args:
        cfg: the options.
        progress: a callback receiving progress by bytes (``tensor``/``tensors`` in ``info``).

    Returns:
        A :class:`DeltaResult`.

    Raises:
        ModelError: unreadable inputs, or names/shapes/dtypes that do not match (before writing).
        ConfigError: bad options.
    """
    if cfg.vision is not None and not cfg.to_hf:
        raise ConfigError("--vision is only used with --to-hf",
                          "add --to-hf to write a standard Hugging Face Llava checkpoint")
    return _run(Path(cfg.base), Path(cfg.delta), Path(cfg.out), "apply", cfg.dtype, cfg.max_shard_bytes,
                cfg.chunk_bytes, cfg.overwrite, progress, cfg.to_hf, cfg.vision)


def make_delta(cfg: MakeDeltaConfig, progress: ProgressCallback | None = None) -> DeltaResult:
    """Write ``target - base`` (the inverse of :func:`apply_delta`), streaming.

    Args:
        cfg: the options.
        progress: a callback receiving progress by bytes.

    Returns:
        A :class:`DeltaResult` (``inexact_elements`` > 0 where the dtype cannot represent an
        exact round trip).

    Raises:
        ModelError: unreadable inputs, or names/shapes/dtypes that do not match (before writing).
    """
    return _run(Path(cfg.base), Path(cfg.target), Path(cfg.out), "make", cfg.dtype, cfg.max_shard_bytes,
                cfg.chunk_bytes, cfg.overwrite, progress)
