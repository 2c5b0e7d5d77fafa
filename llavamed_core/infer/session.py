"""A multi-turn chat about an image, kept within the model's context length (``llavamed chat``).

:class:`ChatSession` holds the conversation and the attached image, sends each question through
an engine (:class:`~llavamed_core.infer.engine.Engine` in this process or
:class:`~llavamed_core.infer.remote.RemoteEngine` on a server) and streams the answer. When the
history would not fit in the context with room for the answer, the oldest exchanges are dropped
(the image moves to the first exchange kept). One image per conversation, as LLaVA-Med was
trained: attaching a new image starts a new conversation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..images import IMAGE_SUFFIXES, ImageOptions, is_image_name, load_image
from ..io import atomic_write_json
from .engine import ChatRequest, GenerationParams, GenerationResult

__all__ = ["ChatSession", "find_image_path", "IMAGE_SUFFIXES"]


def find_image_path(message: str) -> tuple[str | None, str]:
    """Find a path to an existing image file typed in a message.

    Returns:
        ``(path, message without it)``, or ``(None, message)``. Quoted paths may hold spaces.
    """
    for match in re.finditer(r"'([^']+)'|\"([^\"]+)\"|(\S+)", message):
        token = next(g for g in match.groups() if g is not None)
        p = Path(token).expanduser()
        if is_image_name(p) and p.is_file():
            rest = (message[:match.start()] + message[match.end():]).strip()
            return str(p), re.sub(r"\s{2,}", " ", rest)
    return None, message


@dataclass
class ChatSession:
    """A conversation with one model.

    Attributes:
        engine: an ``Engine`` or ``RemoteEngine``.
        params: generation parameters of every answer.
        system: an optional system message.
        image: the attached PIL image (or ``None``).
        image_path: where it came from (saved with the conversation).
        history: the exchanged messages, text only (the image is added when a request is built).
        dropped: exchanges dropped so far to stay within the context length.
        image_options: how DICOM/NIfTI files attached later are rendered (window, frame, slice).
    """

    engine: Any
    params: GenerationParams = field(default_factory=GenerationParams)
    system: str | None = None
    image: Any = None
    image_path: str | None = None
    history: list[dict] = field(default_factory=list)
    dropped: int = 0
    image_options: ImageOptions | None = None

    def attach_image(self, path: str | os.PathLike) -> None:
        """Attach an image; this starts a new conversation about it.

        Raises:
            DataError: the file is missing or does not decode.
        """
        image = load_image(path, self.image_options)  # the project's one loader
        self.reset()
        self.image = image
        self.image_path = str(path)

    def reset(self) -> None:
        """Forget the conversation and the image."""
        self.history = []
        self.image = None
        self.image_path = None
        self.dropped = 0

    def _messages(self, history: list[dict]) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for i, m in enumerate(history):
            if i == 0 and self.image is not None:
                msgs.append({"role": "user", "content": [{"type": "image", "image": self.image},
                                                         {"type": "text", "text": m["content"]}]})
            else:
                msgs.append(dict(m))
        return msgs

    def request_for(self, question: str) -> ChatRequest:
        """The request for the next question, with old exchanges dropped to fit the context.

        Raises:
            ConfigError: the question alone does not fit.
        """
        history = self.history + [{"role": "user", "content": question}]
        limit = getattr(self.engine, "context_length", 0) or 0
        while True:
            req = ChatRequest(self._messages(history), self.params)
            if not limit:
                return req
            needed = self.engine.count_tokens(req) + min(self.params.max_new_tokens, 64)
            if needed <= limit:
                return req
            if len(history) <= 1:
                raise ConfigError(f"the question needs {needed} tokens with the image; the context "
                                  f"length is {limit}", "ask a shorter question")
            history = history[2:]
            self.dropped += 1
            self.history = self.history[2:]

    def ask(self, question: str) -> Iterator[str]:
        """Stream the answer to ``question`` and add the exchange to the history.

        Closing the iterator early (e.g. on Ctrl-C) keeps the partial answer in the history.
        """
        req = self.request_for(question)
        pieces: list[str] = []
        try:
            for delta in self.engine.stream(req):
                pieces.append(delta)
                yield delta
        except (GeneratorExit, KeyboardInterrupt):
            self._remember(question, "".join(pieces))
            raise
        self._remember(question, "".join(pieces))

    def _remember(self, question: str, answer: str) -> None:
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    def answer(self, question: str) -> GenerationResult:
        """Answer ``question`` at once (no streaming) and add the exchange to the history."""
        req = self.request_for(question)
        res = self.engine.generate([req])[0]
        self._remember(question, res.text)
        return res

    def to_record(self, record_id: str = "chat") -> dict:
        """The conversation in the conversation-file format (``<image>`` in the first turn)."""
        turns = []
        for i, m in enumerate(self.history):
            value = m["content"]
            if i == 0 and self.image is not None:
                value = "<image>\n" + value
            turns.append({"from": "human" if m["role"] == "user" else "gpt", "value": value})
        rec: dict[str, Any] = {"id": record_id}
        if self.image_path:
            rec["image"] = self.image_path
        rec["conversations"] = turns
        return rec

    def save(self, path: str | os.PathLike) -> Path:
        """Write the conversation as a one-record conversation file (JSON array), atomically."""
        return atomic_write_json(path, [self.to_record(Path(path).stem)])
