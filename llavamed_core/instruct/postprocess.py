"""``instruct post``: turn raw generations into training conversations, with audited filtering.

For each generation record (JSONL from ``instruct gen``, or a JSON array; the text is in
``response``, or ``result`` as older tools wrote it):

1. **Split** the text into turns at ``User:``/``Assistant:`` labels (also ``Human:``/``GPT:``/``AI:``,
   any case, with Markdown decoration such as ``**User:**`` or ``- User:``, at a line start or after
   a sentence end). Text before the first label is dropped, consecutive turns of one speaker are
   merged, a leading answer and a trailing unanswered question are dropped.
2. **Filter** each question/answer round: an answer that refuses ("As an AI language model…",
   "I cannot see the image") drops the round (``refusal``); leak phrases that point at the text
   sources ("According to the caption, …", ", as described in the text,") are **stripped** when
   the rest stands on its own; a round that still refers to the sources (a caption, "the provided
   text", …) in its question or answer is dropped (``leak``). A sample with no round left is dropped.
3. **Place** ``<image>`` before or after the first question, at random but seeded per ``pair_id``
   (so the choice does not depend on file order or on other samples).

Every rule is counted (:class:`PostStats`), so the filtering can be audited.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, data_error
from ..io import iter_records, write_records_json
from ..records import DOMAINS, IMAGE_TOKEN, parse_conversation

__all__ = ["PostConfig", "PostStats", "split_turns", "strip_leaks", "is_refusal", "has_leak",
           "postprocess_sample", "postprocess_generations"]

_LABEL = re.compile(
    r"(?:^|(?<=\n)|(?<=[.!?\"')])[ \t]+)"      # a line start, or after a sentence end
    r"[ \t>*#_\-]*"                              # Markdown decoration: **, -, >, ###
    r"(?P<role>user|human|assistant|gpt|ai)"
    r"[ \t]*[*_]*[ \t]*[:：][*_]*[ \t]*",
    re.I)
_ROLE = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt", "ai": "gpt"}

_REFUSAL = re.compile(
    r"\bas an ai(?: language model| model| assistant)?\b"
    r"|\bI(?:'m| am) (?:sorry|afraid)\b[^.!?\n]*\b(?:can't|cannot|can not|unable|not able)\b"
    r"|\b(?:cannot|can't|can not|unable to|not able to|do not have the ability to|don't have the ability to)"
    r" (?:see|view|access|look at) (?:the |this |these |any |an )?(?:images?|figures?|pictures?|photos?)\b",
    re.I)
"""Refusals: "as an AI …", "I'm sorry, but I can't …", "I cannot see the image". Saying that one
detail cannot be determined from the image is an answer, not a refusal, and is kept."""

_SOURCE = (r"(?:(?:figure |image )?captions?|figure legend|(?:provided |given |accompanying )?(?:text|context|"
           r"description|information|passage|article|paper|mentions?|sentences?)(?: provided| given| above)?)")
# A clause that only names the source, at the start of a sentence: "According to the caption, ".
_LEAD_CLAUSE = re.compile(
    r"(?P<pre>^|(?<=[.!?])[ \t]+)(?:according to|based on|as (?:described|stated|mentioned|noted|indicated|"
    r"reported|shown|seen) (?:in|by)|as per|per|from) (?:the |this )?" + _SOURCE + r"\s*,\s*(?P<next>\w)",
    re.I)
# The same clause inside or at the end of a sentence: ", as described in the text," / " (see caption)".
_INNER_CLAUSE = re.compile(
    r"\s*,\s*(?:according to|as (?:described|stated|mentioned|noted|indicated|reported|shown|seen) "
    r"(?:in|by)|based on) (?:the |this )?" + _SOURCE + r"\s*(?=[,.;!?])"
    r"|\s*\((?:see |as (?:described|stated|mentioned|noted) in )(?:the )?" + _SOURCE + r"\)",
    re.I)
_LEAK = re.compile(
    r"\bcaptions?\b|\bfigure legend\b"
    r"|\b(?:provided|given|accompanying|above|following) (?:text|context|information|description|passage|"
    r"sentences?|mentions?)\b"
    r"|\b(?:text|context|description|information|mentions?) (?:provided|given)\b"
    r"|\b(?:the|this) (?:text|passage|article|paper) (?:says|states|mentions|describes|notes|indicates|reports)\b"
    r"|\bin-text mentions?\b|\binline mentions?\b"
    r"|\bas (?:described|stated|mentioned|noted|reported) (?:in|by) the (?:text|article|paper|passage|context|"
    r"description)\b"
    r"|\b(?:based on|according to) the (?:text|context|description|information|article|paper|authors)\b",
    re.I)


@dataclass
class PostConfig:
    """Settings of one ``instruct post`` run."""

    input: Path
    """Generations (JSONL or JSON array) with ``pair_id`` and ``response``."""
    output: Path
    """Conversation file (JSON array) to write."""
    seed: int = 0
    """Seed of the ``<image>`` placement (combined with each ``pair_id``)."""


@dataclass
class PostStats:
    """Counts per rule, for auditing the filtering."""

    samples_in: int = 0
    kept: int = 0
    kept_with_strips: int = 0
    phrases_stripped: int = 0
    rounds_kept: int = 0
    rounds_dropped: dict[str, int] = field(default_factory=dict)
    samples_dropped: dict[str, int] = field(default_factory=dict)
    image_before: int = 0
    image_after: int = 0
    output: str = ""

    def drop_sample(self, reason: str) -> None:
        """Count one dropped sample."""
        self.samples_dropped[reason] = self.samples_dropped.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dict(self.__dict__)


def split_turns(text: str) -> list[tuple[str, str]]:
    """Split generated text into alternating ``(role, text)`` turns, human first, gpt last.

    Returns:
        The turns (``[]`` when the text has no labelled turns or no complete round).
    """
    matches = list(_LABEL.finditer(text))
    segs: list[list[str]] = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[m.end():end].replace(IMAGE_TOKEN, "").strip()
        role = _ROLE[m.group("role").lower()]
        if not body:
            continue
        if segs and segs[-1][0] == role:
            segs[-1][1] += "\n" + body
        else:
            segs.append([role, body])
    while segs and segs[0][0] != "human":
        segs.pop(0)
    if segs and segs[-1][0] != "gpt":
        segs.pop()
    return [(r, t) for r, t in segs]


def is_refusal(text: str) -> bool:
    """True when the text refuses or disclaims seeing the image."""
    return bool(_REFUSAL.search(text))


def has_leak(text: str) -> bool:
    """True when the text refers to the text sources (caption, article, provided text, …)."""
    return bool(_LEAK.search(text))


def strip_leaks(text: str) -> tuple[str, int]:
    """Remove clauses that only name the source ("According to the caption, the …").

    Returns:
        The text and the number of phrases removed.
    """
    n = 0

    def lead(m: re.Match) -> str:
        return m.group("pre") + m.group("next").upper()

    text, k = _LEAD_CLAUSE.subn(lead, text)
    n += k
    text, k = _INNER_CLAUSE.subn("", text)
    n += k
    return text.strip(), n


def postprocess_sample(text: str) -> tuple[list[tuple[str, str]], dict[str, int], int, str | None]:
    """Split and filter one generation.

    Returns:
        ``(turns, rounds_dropped, phrases_stripped, drop_reason)`` where ``drop_reason`` is ``None``
        when at least one round is left.
    """
    if not text or not text.strip():
        return [], {}, 0, "no response"
    turns = split_turns(text)
    if not turns:
        return [], {}, 0, "refusal" if is_refusal(text) else "no User/Assistant turns"
    kept: list[tuple[str, str]] = []
    dropped: dict[str, int] = {}
    stripped = 0
    for i in range(0, len(turns) - 1, 2):
        q, a = turns[i][1], turns[i + 1][1]
        if is_refusal(a):
            dropped["refusal"] = dropped.get("refusal", 0) + 1
            continue
        a2, n = strip_leaks(a)
        if has_leak(q) or has_leak(a2) or len(a2.split()) < 2:
            dropped["leak"] = dropped.get("leak", 0) + 1
            continue
        stripped += n
        kept += [("human", q), ("gpt", a2)]
    if not kept:
        return [], dropped, 0, " and ".join(sorted(dropped)) or "no User/Assistant turns"
    return kept, dropped, stripped, None


def _domain(rec: dict) -> dict[str, bool] | None:
    dom = rec.get("domain")
    if isinstance(dom, dict):
        return {d: bool(dom.get(d)) for d in DOMAINS}
    return None


def postprocess_generations(cfg: PostConfig) -> PostStats:
    """Convert a generation file into a conversation file (JSON array, written atomically).

    Raises:
        DataError: a record without ``pair_id`` or without a ``response``/``result`` field
            (naming the file and line), or an input with no records at all.
    """
    path = Path(cfg.input)
    stats = PostStats(output=str(cfg.output))
    out: list[dict] = []
    seen: set[str] = set()
    for i, rec in enumerate(iter_records(path), 1):
        stats.samples_in += 1
        pid = rec.get("pair_id", rec.get("id"))
        if not isinstance(pid, (str, int)) or isinstance(pid, bool) or str(pid) == "":
            raise data_error(path, f"line {i}", "pair_id", "missing", "is this an `instruct gen` output?")
        pid = str(pid)
        if "response" in rec:
            text = rec["response"]
        elif "result" in rec:
            text = rec["result"]
        else:
            raise data_error(path, pid, "response", "missing (no 'response' or 'result' field)",
                             "is this an `instruct gen` output?")
        if pid in seen:
            stats.drop_sample("duplicate pair_id")
            continue
        seen.add(pid)
        turns, dropped, n_strip, reason = postprocess_sample(text if isinstance(text, str) else "")
        for k, v in dropped.items():
            stats.rounds_dropped[k] = stats.rounds_dropped.get(k, 0) + v
        if reason is not None:
            stats.drop_sample(reason)
            continue
        before = random.Random(f"{cfg.seed}:{pid}").random() < 0.5
        q0 = turns[0][1]
        turns[0] = ("human", f"{IMAGE_TOKEN}\n{q0}" if before else f"{q0}\n{IMAGE_TOKEN}")
        if before:
            stats.image_before += 1
        else:
            stats.image_after += 1
        stats.kept += 1
        stats.rounds_kept += len(turns) // 2
        stats.phrases_stripped += n_strip
        stats.kept_with_strips += int(n_strip > 0)
        image = rec.get("image") if isinstance(rec.get("image"), str) else f"{pid}.jpg"
        conv: dict[str, Any] = {"id": pid, "image": image}
        dom = _domain(rec)
        if dom is not None:
            conv["domain"] = dom
        conv["conversations"] = [{"from": r, "value": t} for r, t in turns]
        parse_conversation(conv, cfg.output, len(out))  # our own output must be valid
        out.append(conv)
    if stats.samples_in == 0:
        raise DataError(f"{path}: no records", "run `llavamed instruct gen` first")
    write_records_json(cfg.output, out)
    return stats
