"""Repetition, frequency and presence penalties on next-token logits, as vLLM applies them.

The same request must get the same answer from ``--engine native`` and ``--engine vllm``, so
the semantics are vLLM's (``vllm/model_executor/layers/utils.py: apply_penalties``), applied to
the raw logits before temperature, top-p and the greedy argmax:

- ``repetition_penalty`` (CTRL, Keskar et al. 2019) over the tokens of the prompt *and* of the
  answer so far: a positive logit is divided by it, a negative one multiplied (1 = off);
- ``frequency_penalty`` over the answer so far: minus the penalty times the token's count;
- ``presence_penalty`` over the answer so far: minus the penalty once for every token that
  occurs at all (0 = off).

Use::

    pen = RowPenalties(vocab_size, prompt_ids, repetition=1.2, frequency=0.5, presence=0.5)
    logits = pen.apply(logits)       # one row's [vocab] logits
    pen.add(token)                   # after the token is chosen
"""

from __future__ import annotations

from typing import Any

__all__ = ["RowPenalties", "penalties_active"]


def penalties_active(repetition: float, frequency: float, presence: float) -> bool:
    """Whether any penalty changes the logits."""
    return repetition != 1.0 or frequency != 0.0 or presence != 0.0


class RowPenalties:
    """The penalty state of one answer: which tokens the prompt holds, how often each was generated.

    Args:
        vocab_size: width of the logits.
        prompt_ids: the prompt's token ids (image tokens included, as vLLM counts them).
        repetition: repetition penalty (> 0; 1 = off).
        frequency: frequency penalty (0 = off).
        presence: presence penalty (0 = off).
        device: where the logits live.
    """

    def __init__(self, vocab_size: int, prompt_ids: list[int], repetition: float = 1.0,
                 frequency: float = 0.0, presence: float = 0.0, device: Any = "cpu"):
        import torch

        self.repetition = float(repetition)
        self.frequency = float(frequency)
        self.presence = float(presence)
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.in_prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ids = [i for i in prompt_ids if 0 <= i < vocab_size]
        if ids:
            self.in_prompt[torch.tensor(ids, dtype=torch.long, device=device)] = True

    def add(self, token: int) -> None:
        """Count a generated token."""
        import torch

        if 0 <= token < self.counts.shape[0]:
            with torch.inference_mode():  # the counts are made inside the decode's inference mode
                self.counts[token] += 1

    def apply(self, logits: Any) -> Any:
        """The penalised copy of one row's float logits (shape ``[vocab]``)."""
        import torch

        out = logits
        if self.repetition != 1.0:
            seen = self.in_prompt | (self.counts > 0)
            scaled = torch.where(out > 0, out / self.repetition, out * self.repetition)
            out = torch.where(seen, scaled, out)
        if self.frequency != 0.0:
            out = out - self.frequency * self.counts
        if self.presence != 0.0:
            out = out - self.presence * (self.counts > 0).to(out.dtype)
        return out
