"""The instruction-generation prompt: read the prompt file, render chat messages for one figure.

The prompt lives in one readable Markdown file (``prompt.md`` beside this module; ``--prompt-file``
replaces it): a ``## System`` section and ``## Example: …`` sections, each with ``### Caption``,
optional ``### Mentions`` (``- `` bullets) and ``### Conversation``. Each example becomes a
user/assistant pair of messages before the figure to work on, rendered by :func:`render_figure`
exactly like the examples so that the model sees one consistent layout.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

__all__ = ["DEFAULT_PROMPT_FILE", "Prompt", "FewShotExample", "load_prompt", "render_figure",
           "mention_texts", "build_messages"]

DEFAULT_PROMPT_FILE = Path(__file__).with_name("prompt.md")


@dataclass
class FewShotExample:
    """One worked example: the figure's text and the conversation the model should write."""

    name: str
    caption: str
    mentions: list[str]
    conversation: str


@dataclass
class Prompt:
    """A parsed prompt file."""

    path: Path
    system: str
    examples: list[FewShotExample] = field(default_factory=list)


def _sections(text: str, level: str) -> list[tuple[str, str]]:
    """Split ``text`` at headings of ``level`` (``"## "``); returns (title, body) pairs."""
    out: list[tuple[str, str]] = []
    title: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        if line.startswith(level) and not line.startswith(level + "#"):
            if title is not None:
                out.append((title, "\n".join(body).strip()))
            title, body = line[len(level):].strip(), []
        elif title is not None:
            body.append(line)
    if title is not None:
        out.append((title, "\n".join(body).strip()))
    return out


def _unwrap(text: str) -> str:
    """Join hard-wrapped lines of a paragraph; keep blank lines and list items as breaks."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", text.strip()):
        lines = [ln.strip() for ln in para.splitlines() if ln.strip()]
        merged: list[str] = []
        for ln in lines:
            if merged and not ln.startswith("- "):
                merged[-1] += " " + ln
            else:
                merged.append(ln)
        paragraphs.append("\n".join(merged))
    return "\n\n".join(paragraphs)


def load_prompt(path: str | os.PathLike | None = None) -> Prompt:
    """Read and check a prompt file (default: the packaged ``prompt.md``).

    Raises:
        DataError: a missing file, no ``## System`` section, or an example without caption or
            conversation (naming the file and the example).
    """
    path = Path(path) if path is not None else DEFAULT_PROMPT_FILE
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found", "check --prompt-file")
    text = path.read_text(encoding="utf-8")
    system = None
    examples = []
    for title, body in _sections(text, "## "):
        low = title.lower()
        if low == "system":
            system = _unwrap(body)
        elif low.startswith("example"):
            name = title.split(":", 1)[1].strip() if ":" in title else title
            parts = {t.lower(): b for t, b in _sections(body, "### ")}
            for need in ("caption", "conversation"):
                if not parts.get(need):
                    raise DataError(f"{path}: example '{name}' has no '### {need.title()}' section",
                                    "each example needs ### Caption and ### Conversation")
            conv = parts["conversation"].strip()
            if not re.search(r"^User:", conv, re.M) or not re.search(r"^Assistant:", conv, re.M):
                raise DataError(f"{path}: example '{name}': the conversation needs lines starting "
                                "'User:' and 'Assistant:'")
            mentions = [ln.strip()[2:].strip() for ln in parts.get("mentions", "").splitlines()
                        if ln.strip().startswith("- ")]
            examples.append(FewShotExample(name, _unwrap(parts["caption"]), mentions, conv))
    if not system:
        raise DataError(f"{path}: no '## System' section", "the prompt file needs a ## System section")
    return Prompt(path, system, examples)


def _detokenize(text: str) -> str:
    """Undo the tokenised spacing of released mentions ("( Figure 2 ) ." → "(Figure 2).")."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:!?)\]%])", r"\1", text)
    return re.sub(r"([(\[])\s+", r"\1", text)


def mention_texts(value: Any) -> list[str]:
    """The sentences of an ``in_text_mention`` field: ``null``, a list of strings, or a list of
    ``{"tokens": str, ...}`` objects (FORMATS.md). Unknown shapes give ``ValueError``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [_detokenize(value)] if value.strip() else []
    if not isinstance(value, list):
        raise ValueError(f"expected null or a list, found {type(value).__name__}")
    out = []
    for item in value:
        if isinstance(item, str):
            text = item
        elif isinstance(item, dict) and isinstance(item.get("tokens"), str):
            text = item["tokens"]
        else:
            raise ValueError("expected strings or {\"tokens\": ...} objects")
        if text.strip():
            out.append(_detokenize(text))
    return out


def render_figure(caption: str, mentions: list[str], inline_mentions: bool) -> str:
    """The user message describing one figure (the same layout for examples and real figures)."""
    text = f"Figure caption:\n{caption.strip()}"
    if inline_mentions and mentions:
        text += "\n\nSentences in the article that mention this figure:\n" + \
                "\n".join(f"- {m}" for m in mentions)
    return text


def build_messages(prompt: Prompt, caption: str, mentions: list[str],
                   inline_mentions: bool) -> list[dict]:
    """System message, the few-shot pairs, then the figure to work on, as OpenAI chat messages."""
    msgs = [{"role": "system", "content": prompt.system}]
    for ex in prompt.examples:
        msgs.append({"role": "user", "content": render_figure(ex.caption, ex.mentions, inline_mentions)})
        msgs.append({"role": "assistant", "content": ex.conversation})
    msgs.append({"role": "user", "content": render_figure(caption, mentions, inline_mentions)})
    return msgs
