"""Packed-sequence attention for ``train --packing``: causal SDPA per sample, no mask tensor.

Why hand-written: transformers' ``sdpa`` attends over a packed row through a dense block-diagonal
mask (built from the position ids), so its cost grows with the row's width squared and a row can
only be as wide as a padded batch's; its varlen path needs flash-attn (CUDA only). This attention
function runs ``scaled_dot_product_attention(is_causal=True)`` on each sample's span of the row
instead (q/k/v split once along the sequence, so the backward pass is one concatenation; grouped
K/V heads go to SDPA as they are, ``enable_gqa``): cost ``sum(len_i²)``, no mask, so all of a
batch's samples fit in ONE row.

It is registered under :data:`PACKED_ATTENTION` through transformers' public interfaces
(``AttentionInterface`` for the kernel, ``AttentionMaskInterface`` for a mask function that builds
no mask for a full unpadded row) and set on the LANGUAGE model only (the vision tower keeps its own
attention). The samples' boundaries come from the position ids, which restart at 0 for each
sample (what ``PackingCollator`` emits): every decoder layer receives the same position-id tensor,
so the spans are read from it (one device sync) once per forward and reused by the later layers
and by gradient checkpointing's recompute. The collator does not emit flash-attention's
``cu_seq_lens_*`` keys, because Llava passes the model's extra keyword arguments to the vision
tower as well, where a flash kernel would take them for the image batch's segments; when a caller
passes them anyway (batch of one row), they are honoured.

Anything else gets transformers' own SDPA mask and kernel, unchanged: a padded batch (a 2D
``attention_mask`` with padding: the eval loss, generation) and a KV-cache continuation (queries
that are not the whole key sequence). A layer asking for what per-sample SDPA does not compute
(logit softcapping, attention sinks, a position bias, a sliding window shorter than a sample) is
refused with a :class:`~llavamed_core.errors.ConfigError`, never run without it. Training switches
the attention back when it ends (:func:`use_language_attention`), and the name is never saved:
transformers does not serialise the attention implementation into ``config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["PACKED_ATTENTION", "PackingPlan", "packing_plan", "register_packed_attention",
           "packed_sdpa_attention_forward", "packed_mask", "segment_bounds", "sample_bounds",
           "language_attention", "use_language_attention", "apply_packing_plan"]

PACKED_ATTENTION = "llavamed_packed_sdpa"
"""The name the packed attention is registered under (a value of ``attn_implementation``)."""


def segment_bounds(position_ids: Any, batch: int, length: int) -> list[list[tuple[int, int]]]:
    """Each row's ``(start, end)`` sample spans: a new sample starts where the position does not
    follow the previous one by 1 (the rule of transformers' ``find_packed_sequence_indices``).

    Args:
        position_ids: ``[rows or 1, length]`` positions, or ``None`` (one span per row).
        batch: rows in the batch.
        length: tokens per row.
    """
    import torch

    if position_ids is None:
        return [[(0, length)] for _ in range(batch)]
    pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    breaks = (torch.diff(pos, dim=-1) != 1).nonzero().tolist()  # a device sync: see sample_bounds
    starts: list[list[int]] = [[0] for _ in range(batch)]
    for r, j in breaks:
        starts[r].append(j + 1)
    return [list(zip(s, s[1:] + [length])) for s in starts]


def _bounds_from_cu_seq_lens(cu_seq_lens: Any, length: int) -> list[list[tuple[int, int]]] | None:
    """flash-attention's cumulative lengths as spans of a one-row batch (``None`` if they do not fit it)."""
    cu = [int(x) for x in cu_seq_lens.tolist()]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != length or any(b <= a for a, b in zip(cu, cu[1:])):
        return None
    return [list(zip(cu, cu[1:]))]


_last_bounds: dict[str, tuple] = {}
"""Per source (``"position_ids"``, ``"cu_seq_lens_q"``): the last tensor's spans, as ``(weak reference,
version, batch, length, spans)``; every decoder layer of one forward gets the same tensor object."""


def _cached_bounds(source: str, tensor: Any, batch: int, length: int, compute: Any) -> Any:
    """``compute()``, or the spans already computed from this very tensor object (unchanged since:
    same ``_version``) for the same batch and length."""
    import weakref

    if tensor.is_inference():  # no version counter to tell an in-place change: compute every time
        return compute()
    key = (tensor._version, batch, length)
    hit = _last_bounds.get(source)
    if hit is not None and hit[0]() is tensor and hit[1:4] == key:
        return hit[4]
    bounds = compute()
    _last_bounds[source] = (weakref.ref(tensor), *key, bounds)
    return bounds


def sample_bounds(batch: int, length: int, position_ids: Any = None, cu_seq_lens_q: Any = None
                  ) -> list[list[tuple[int, int]]]:
    """The spans the packed attention runs on: from ``cu_seq_lens_q`` for a one-row batch when they
    describe it, else from the position ids (:func:`segment_bounds`); computed once per tensor, so
    once per forward rather than once per decoder layer."""
    if cu_seq_lens_q is not None and batch == 1:
        bounds = _cached_bounds("cu_seq_lens_q", cu_seq_lens_q, batch, length,
                                lambda: _bounds_from_cu_seq_lens(cu_seq_lens_q, length))
        if bounds is not None:
            return bounds
    if position_ids is None:
        return segment_bounds(None, batch, length)
    return _cached_bounds("position_ids", position_ids, batch, length,
                          lambda: segment_bounds(position_ids, batch, length))


_UNSUPPORTED = {"softcap": "attention logit softcapping", "s_aux": "attention sinks",
                "position_bias": "a position bias"}


def _refuse(what: str) -> None:
    raise ConfigError(f"--packing: the language model's attention asks for {what}, which {PACKED_ATTENTION} "
                      "(SDPA per packed sample) does not compute",
                      "train this model with --set attn_implementation=eager (narrow packed rows with a "
                      "block-diagonal mask), or drop --packing")


def packed_sdpa_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                                  dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                                  **kwargs: Any) -> tuple[Any, None]:
    """Causal attention within each packed sample; the AttentionInterface signature.

    ``query``: ``[batch, heads, length, head_dim]``; ``key``/``value`` may have fewer (grouped)
    heads. Returns ``([batch, length, heads, head_dim], None)`` as transformers' ``sdpa`` does.
    With an attention mask, a KV cache (key longer than query) or a non-causal module it hands
    over to transformers' ``sdpa_attention_forward``.

    Raises:
        ConfigError: on a packed row, the layer passes ``softcap``, ``s_aux`` or ``position_bias``,
            or a sample is longer than its ``sliding_window``: per-sample SDPA would silently
            compute without them (what is handed over behaves as stock sdpa: it raises on softcap).
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, _, length, _ = query.shape
    if attention_mask is not None or key.shape[2] != length or not causal or length == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)  # stock behaviour
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            _refuse(what)
    bounds = sample_bounds(batch, length, kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"))
    window = kwargs.get("sliding_window")
    if window is not None and any(e - s > window for row in bounds for s, e in row):
        _refuse(f"a sliding window of {window} tokens, shorter than a packed sample")
    gqa = key.shape[1] != query.shape[1]  # grouped K/V heads: SDPA broadcasts them, no repeated copies
    p = dropout if module.training else 0.0

    def attend(q: Any, k: Any, v: Any) -> Any:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scaling, is_causal=True,
                                                                enable_gqa=gqa)

    # split, never per-sample slices: a slice's backward writes a zero tensor as large as its source
    per_row = zip(query.split(1), key.split(1), value.split(1)) if batch > 1 else [(query, key, value)]
    rows = []
    for spans, (q, k, v) in zip(bounds, per_row):
        if len(spans) == 1:
            rows.append(attend(q, k, v))
            continue
        sizes = [e - s for s, e in spans]
        rows.append(torch.cat([attend(*qkv) for qkv in zip(q.split(sizes, dim=2), k.split(sizes, dim=2),
                                                           v.split(sizes, dim=2))], dim=2))
    out = rows[0] if batch == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def packed_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
                mask_function: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
    """The AttentionMaskInterface function: no mask for a full unpadded row (queries are the whole
    key sequence, no padding; the samples' boundaries travel as position ids, as with
    flash-attention); otherwise (padding, a KV-cache continuation) transformers' SDPA mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    full_row = q_length == kv_length and bool(q_offset == 0) and bool(kv_offset == 0)
    if full_row and (attention_mask is None or (attention_mask.shape[-1] == kv_length and bool(attention_mask.all()))):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
                     attention_mask=attention_mask, **kwargs)


def register_packed_attention() -> str:
    """Register :data:`PACKED_ATTENTION` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, packed_mask)
    return PACKED_ATTENTION


def language_attention(model: Any) -> str:
    """The attention implementation the Llava model's language model runs (its own config, which its
    attention layers and mask read)."""
    lm = getattr(getattr(model, "model", None), "language_model", None)
    return (lm.config if lm is not None else model.config.text_config)._attn_implementation


def use_language_attention(model: Any, name: str) -> None:
    """Set the Llava model's LANGUAGE-model attention to ``name`` (the vision tower keeps its own),
    through transformers' ``set_attn_implementation``; registers :data:`PACKED_ATTENTION` first."""
    if name == PACKED_ATTENTION:
        register_packed_attention()
    model.set_attn_implementation({"text_config": name})


def apply_packing_plan(model: Any, plan: "PackingPlan") -> "PackingPlan":
    """Set ``plan``'s attention on the language model and check that it took: transformers only logs
    when it cannot switch a model, and a whole batch in one row under a dense mask would cost the
    row's width squared. Returns the plan the run follows: ``plan``, or the narrow rows (with the
    block-diagonal mask) of the attention the model kept.

    Raises:
        ConfigError: the model kept an attention not known to keep packed samples apart.
    """
    if not plan.language_attention:
        return plan
    use_language_attention(model, plan.language_attention)
    kept = language_attention(model)
    if kept == plan.language_attention:
        return plan
    if kept not in ("sdpa", "eager"):
        raise ConfigError(f"--packing: the language model kept attention '{kept}' ({plan.language_attention} "
                          "could not be set), which is not known to keep packed samples apart",
                          "train with --set attn_implementation=sdpa or eager, or drop --packing")
    return PackingPlan(None, 0, f"rows of the longest sample, {kept} with a block-diagonal mask "
                                f"({plan.language_attention} could not be set on this model)")


@dataclass(frozen=True)
class PackingPlan:
    """How ``--packing`` lays out a batch for the attention the run uses.

    Attributes:
        language_attention: the attention to set on the language model for training (``None``:
            keep the loaded one).
        row_tokens: :class:`~llavamed_core.train.dataset.PackingCollator`'s ``row_tokens``
            (``None``: the whole batch in one row; ``0``: rows no wider than the longest sample).
        how: one line for the run's mechanism report.
    """

    language_attention: str | None
    row_tokens: int | None
    how: str


def packing_plan(attn: str, text_config: Any, max_length: int) -> PackingPlan:
    """The packed layout and kernel for the attention ``attn`` the model was loaded with.

    - ``sdpa``: :data:`PACKED_ATTENTION` on the language model, the whole batch in one row.
    - ``flash_attention_2``/``_3``: kept; the whole batch in one row (a batch of one row is what
      transformers' flash path checks for before it runs the varlen kernel from the position ids).
    - ``eager`` (or ``sdpa`` with a sliding window shorter than ``max_length``, which per-sample
      SDPA would not apply): kept, with the dense block-diagonal mask transformers builds from the
      position ids, so rows no wider than the batch's longest sample.

    Raises:
        ConfigError: any other attention (it is not known to keep packed samples apart), or ``sdpa``
            for a language model with attention logit softcapping (no SDPA path applies it).
    """
    if attn in ("flash_attention_2", "flash_attention_3"):
        return PackingPlan(None, None, f"one row per batch, {attn} varlen kernel")
    softcap = getattr(text_config, "attn_logit_softcapping", None)
    if attn == "sdpa" and softcap is not None:
        raise ConfigError(f"--packing with attention 'sdpa': the language model caps its attention logits "
                          f"(attn_logit_softcapping={softcap}), which SDPA does not apply",
                          "train this model with --set attn_implementation=eager (or flash_attention_2), "
                          "or drop --packing")
    window = getattr(text_config, "sliding_window", None)
    if attn == "sdpa" and (window is None or window >= max_length):
        return PackingPlan(PACKED_ATTENTION, None, "one row per batch, SDPA per sample")
    if attn in ("sdpa", "eager"):
        return PackingPlan(None, 0, f"rows of the longest sample, {attn} with a block-diagonal mask")
    raise ConfigError(f"--packing with attention '{attn}': it is not known to keep packed samples apart",
                      "use sdpa (the default on CPU), eager or flash_attention_2, or drop --packing")
