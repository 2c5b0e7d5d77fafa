"""A decode batch that requests join and leave between steps (iteration-level batching, Orca/vLLM).

Hand-written because transformers 5.24's own continuous batching (``generate_batch`` /
``init_continuous_batching``) takes token ids only: no ``pixel_values`` or image features reach
the model, so it cannot answer Llava requests.

The admission step: new requests are prefilled together in a KV cache of their own (left-padded
among themselves), their first token is picked, and the rows still running are merged into the
running left-padded cache, both sides padded on the left to the wider of the two. Each row keeps
its own next position (positions follow its attention mask, never the batch width), the mask
hides every padding column, finished rows are dropped by index after each step, and columns that
are padding for every row left are trimmed. So a row computes what it would alone: greedy
answers equal one-at-a-time answers whenever a request joins.

Merging needs the plain ``DynamicLayer`` cache (full attention); for any other cache layout
(sliding windows, quantised caches) :attr:`RunningBatch.can_admit` is false while rows run, and
new requests wait for the batch to empty (static batching).

Use::

    batch = engine.running_batch(on_delta, should_stop)
    finished = batch.admit([(key, request), ...])      # [(key, GenerationResult)]
    while batch.rows:
        finished += batch.step()
        finished += batch.admit(newly_arrived)          # joins at the next step
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

__all__ = ["RunningBatch"]


class RunningBatch:
    """Rows decoding together over one KV cache.

    Not thread-safe: one thread admits and steps (each holding the engine's lock). Build it with
    ``Engine.running_batch``.

    Args:
        engine: the :class:`~.engine.Engine`.
        on_delta: called with ``(key, new text)`` as a row's text grows.
        should_stop: called with a row's key each step; ``True`` cancels that row.
        streams: called with a row's key when it joins; ``False`` gives it no ``on_delta`` (its
            text is then decoded once, at the end). Default: every row streams.
        detokenize: ``False``: rows produce token ids only (``on_delta`` gets lists of new ids,
            results carry ``token_ids``; stop strings are the caller's), for a server that
            detokenises in its API process.
    """

    def __init__(self, engine: Any, on_delta: Callable[[Any, str], None] | None = None,
                 should_stop: Callable[[Any], bool] | None = None,
                 streams: Callable[[Any], bool] | None = None, detokenize: bool = True):
        self.engine = engine
        self.on_delta = on_delta
        self.should_stop = should_stop
        self.streams = streams
        self.detokenize = detokenize
        self._mask_4d = _step_mask_4d(engine)
        self.rows: list[Any] = []
        """The running rows (``engine._Row``), in batch order."""
        self._cache: Any = None
        self._mask: Any = None  # [rows, cached columns], 1 where a column is a real token
        self._next_pos: Any = None  # [rows] position of each row's pending token
        self._pending: Any = None  # [rows] the token picked last, not yet fed to the model

    @property
    def can_admit(self) -> bool:
        """Whether requests can join now (always when empty; else when the cache can be merged)."""
        return not self.rows or _mergeable(self._cache)

    def admit(self, items: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """Prefill requests together and add them to the batch (holding the engine's lock, so a
        ``generate`` call elsewhere never runs the model at the same time).

        Atomic: if the prefill fails nothing of the batch changes (the running rows go on).

        Args:
            items: ``(key, ChatRequest)`` pairs; the key is what the callbacks and results carry.

        Returns:
            ``(key, GenerationResult)`` of the new rows that finished on their first token.

        Raises:
            ConfigError: a prompt that leaves no room in the context length, or bad parameters;
                or the batch cannot take requests now (:attr:`can_admit`).
            DataError: messages the template cannot render.
        """
        if not items:
            return []
        if not self.can_admit:
            raise ConfigError("this batch's cache cannot take new rows while rows run")
        with self.engine._lock:
            return self._admit(items)

    def _admit(self, items: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        import torch
        from transformers import DynamicCache

        eng = self.engine
        for i, (_key, req) in enumerate(items):
            eng._check_params(req.params, i)
        enc = eng._batch_inputs([req for _key, req in items])
        mask = enc["attention_mask"].long()
        ids = enc["input_ids"]
        rows = []
        for b, (key, req) in enumerate(items):
            prompt = ids[b][mask[b].bool()].tolist()
            if len(prompt) >= eng.context_length:
                raise ConfigError(f"request {b}: the prompt has {len(prompt)} tokens, the context "
                                  f"length is {eng.context_length}", "shorten the conversation")
            row = eng._new_row(key, req, prompt)
            row.streaming = self.on_delta is not None and (self.streams is None or bool(self.streams(key)))
            row.ids_only = not self.detokenize
            rows.append(row)
        cache = DynamicCache(config=eng.model.config.get_text_config())
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                      logits_to_keep=1)
        kwargs[eng._cache_arg] = cache
        if "pixel_values" in enc:
            kwargs["pixel_values"] = enc["pixel_values"].to(eng.dtype)
        with torch.inference_mode():
            out = eng.model(**kwargs)
            tokens = eng._pick(out.logits[:, -1, :].float(), rows)
        finished, keep = self._advance_all(rows, tokens.tolist())
        if not keep:
            return finished
        with torch.inference_mode():
            sel = torch.tensor(keep, device=mask.device)
            if len(keep) < len(rows):
                cache.batch_select_indices(sel)
            new_mask = mask.index_select(0, sel)
            new_pos = position_ids[:, -1].index_select(0, sel) + 1
            new_tokens = tokens.index_select(0, sel.to(tokens.device))
            self._merge(cache, new_mask, new_pos, new_tokens, [rows[b] for b in keep])
        return finished

    def step(self) -> list[tuple[Any, Any]]:
        """One decode step for every running row; finished rows leave the batch.

        Returns:
            ``(key, GenerationResult)`` of the rows that finished in this step.
        """
        if not self.rows:
            return []
        with self.engine._lock:
            return self._step()

    def _step(self) -> list[tuple[Any, Any]]:
        import torch

        eng = self.engine
        with torch.inference_mode():
            mask = torch.cat([self._mask, self._mask.new_ones((self._mask.shape[0], 1))], dim=1)
            # One query per row sees every real column of its row: the padding mask is the whole
            # attention mask, handed over ready-made instead of rebuilt by transformers each step.
            attn = mask[:, None, None, :].bool() if self._mask_4d else mask
            step = dict(input_ids=self._pending.view(-1, 1).to(eng.device), attention_mask=attn,
                        position_ids=self._next_pos.view(-1, 1), use_cache=True, logits_to_keep=1)
            step[eng._cache_arg] = self._cache
            out = eng.model(**step)
            self._mask, self._next_pos = mask, self._next_pos + 1
            tokens = eng._pick(out.logits[:, -1, :].float(), self.rows)
        finished, keep = self._advance_all(self.rows, tokens.tolist())
        with torch.inference_mode():
            self._pending = tokens
            if len(keep) < len(self.rows):
                self._select(keep)
        return finished

    def clear(self) -> list[Any]:
        """Drop every row (after a failed step); returns their keys."""
        keys = [row.index for row in self.rows]
        self.rows, self._cache, self._mask, self._next_pos, self._pending = [], None, None, None, None
        return keys

    # ------------------------------------------------------------------ internals
    def _advance_all(self, rows: list[Any], picked: list[int]) -> tuple[list, list[int]]:
        eng = self.engine
        finished, keep = [], []
        for b, row in enumerate(rows):
            on_delta = self.on_delta if row.streaming else None
            eng._advance(row, picked[b], on_delta, self.should_stop)
            if row.finish is None:
                keep.append(b)
            else:
                finished.append((row.index, eng._result(row, on_delta)))
        return finished, keep

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep``; trim the columns that are padding for all of them."""
        import torch

        if not keep:
            self.clear()
            return
        sel = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(sel)
        self._mask = self._mask.index_select(0, sel)
        self._next_pos = self._next_pos.index_select(0, sel)
        self._pending = self._pending.index_select(0, sel.to(self._pending.device))
        self.rows = [self.rows[b] for b in keep]
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0 and _mergeable(self._cache):
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first:, :]
                layer.values = layer.values[:, :, first:, :]

    def _merge(self, cache: Any, mask: Any, next_pos: Any, pending: Any, rows: list[Any]) -> None:
        """Append prefilled rows (their own cache) to the batch, left-padding the narrower side."""
        import torch
        import torch.nn.functional as F

        if not self.rows:
            self._cache, self._mask, self._next_pos, self._pending, self.rows = \
                cache, mask, next_pos, pending, list(rows)
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def widen(t: Any, have: int) -> Any:  # left-pad the sequence axis (-2) of [B, H, T, D]
            return t if have == width else F.pad(t, (0, 0, width - have, 0))

        old_w, new_w = self._mask.shape[1], mask.shape[1]
        keys, values = [], []
        for mine, theirs in zip(self._cache.layers, cache.layers):
            keys.append(torch.cat([widen(mine.keys, old_w), widen(theirs.keys, new_w)]))
            values.append(torch.cat([widen(mine.values, old_w), widen(theirs.values, new_w)]))
        merged_mask = torch.cat([F.pad(self._mask, (width - old_w, 0)), F.pad(mask, (width - new_w, 0))])
        # Everything computed: now change the batch (a failure above leaves it as it was).
        for layer, k, v in zip(self._cache.layers, keys, values):
            layer.keys, layer.values = k, v
        self._mask = merged_mask
        self._next_pos = torch.cat([self._next_pos, next_pos])
        self._pending = torch.cat([self._pending, pending.to(self._pending.device)])
        self.rows = self.rows + list(rows)


def _step_mask_4d(engine: Any) -> bool:
    """Whether a decode step may take its mask as a ready 4D boolean one: SDPA (which reads
    ``True`` as "attend") and full attention in every layer (no sliding windows)."""
    cfg = engine.model.config.get_text_config()
    types = getattr(cfg, "layer_types", None) or []
    return getattr(cfg, "_attn_implementation", None) == "sdpa" and not getattr(cfg, "sliding_window", None) \
        and all(t == "full_attention" for t in types)


def _mergeable(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain, filled ``DynamicLayer`` (full attention)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized
                                for layer in layers)
