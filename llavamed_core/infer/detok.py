"""Incremental detokenisation: token ids in, text and stop strings out, the same in any process.

The engine uses it for its own rows (``chat``, ``eval``, an in-process server); a server whose model
runs in an engine process uses it in the API process instead, on the token ids the engine sends,
the way vLLM V1's output processor detokenises outside its EngineCore. Either way a request's
text, its stream of deltas and where it stops are decided by this one class:

- the text grows incrementally (the newest tokens decoded with a few tokens of context before
  them, as vLLM's and TGI's detokenizers do), so a token costs the same at 5 and at 500;
- a stop string ends the text where it starts (it may span tokens); the check looks only at the
  new text and the few characters before it;
- a delta never ends inside a half-decoded character, on a possible start of a stop string, or on
  trailing whitespace (the final text is stripped);
- the final text is decoded whole once (:meth:`TextAssembler.finish`), so it equals a plain decode.

Use::

    asm = TextAssembler(tokenizer, stops=["###"])
    for token in tokens:
        if asm.add(token):        # a stop string appeared
            break
        send(asm.take_delta())    # "" when nothing is safe to send yet
    text, rest = asm.finish()     # rest: what was held back, to send last
"""

from __future__ import annotations

from typing import Any

__all__ = ["TextAssembler"]


class TextAssembler:
    """The text of one answer as its tokens arrive.

    Args:
        tokenizer: the checkpoint's tokenizer (``decode`` with ``skip_special_tokens``).
        stops: stop strings; the text ends before the first one found.
        ids: the list the token ids live in (shared with the caller's row; default: a new one).
    """

    def __init__(self, tokenizer: Any, stops: list[str], ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = [] if ids is None else ids
        self.text = ""
        """The text so far (cut at a stop string once one is found)."""
        self.stopped = False
        """Whether a stop string was found."""
        self._committed = ""  # the part of text that ends on a whole character
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted = 0
        self._longest = max((len(s) for s in self.stops), default=0)

    def decode(self, ids: list[int]) -> str:
        """Plain text of ``ids`` (special tokens skipped, spaces as the tokenizer made them)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> bool:
        """Append one token; ``True`` once the text holds a stop string."""
        self.ids.append(token)
        return self.update()

    def update(self) -> bool:
        """Take in the token last appended to :attr:`ids`; ``True`` once the text holds a stop string."""
        before = len(self._committed)  # never changes; the tail after it may be re-decoded
        prefix = self.decode(self.ids[self._prefix_offset:self._read_offset])
        window = self.decode(self.ids[self._prefix_offset:])
        tail = window[len(prefix):] if len(window) > len(prefix) else ""
        self.text = self._committed + tail
        if tail and not tail.endswith("\ufffd"):  # a whole character: the window moves on
            self._committed = self.text
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        if self._longest:
            start = max(0, before - self._longest + 1)
            cuts = [c for c in (self.text.find(s, start) for s in self.stops) if c >= 0]
            if cuts:
                self.text = self.text[:min(cuts)]
                self.stopped = True
        return self.stopped

    def take_delta(self) -> str:
        """The text that became safe to send since the last call ("" if none)."""
        safe = self._safe_end()
        start = max(self._emitted, len(self.text) - len(self.text.lstrip()))
        if safe <= start:
            return ""
        self._emitted = safe
        return self.text[start:safe]

    def finish(self) -> tuple[str, str]:
        """Decode the whole answer once; return its final text (stripped, cut at the first stop
        string) and the part of it not yet sent by :meth:`take_delta`."""
        text = self.decode(self.ids)
        cuts = [c for c in (text.find(s) for s in self.stops) if c >= 0]
        self.text = text[:min(cuts)] if cuts else text
        start = max(self._emitted, len(self.text) - len(self.text.lstrip()))
        end = len(self.text.rstrip())
        rest = self.text[start:end] if start < end else ""
        self._emitted = max(self._emitted, end)
        return self.text.strip(), rest

    def _safe_end(self) -> int:
        """How much of the text can be sent: not a possible stop-string start, not a
        half-decoded character, not trailing whitespace."""
        text = self.text
        end = len(text)
        while end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        for s in self.stops:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end = min(end, len(text[:end]) - k)
                    break
        return len(text[:end].rstrip())
