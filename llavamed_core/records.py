"""Typed records and readers for the file formats of docs/formats.md.

- Conversation files (alignment, instruct, VQA train/test): a JSON array of
  ``{"id", "image", "conversations"|"conversatons", ...}`` records. Both spellings of the key are
  accepted; ids may be strings or integers; ``<image>`` may stand before or after the text of the
  first human turn. Unknown extra keys (``domain``, ``answer_type``, ``question_type``, ...) are kept.
- Chat-benchmark questions (qa50 JSONL) and answer files (JSONL).

Readers raise :class:`DataError` naming the file, the record id and the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, data_error
from .io import iter_records

__all__ = [
    "IMAGE_TOKEN",
    "Turn",
    "Conversation",
    "QA50Question",
    "Answer",
    "parse_conversation",
    "iter_conversations",
    "load_conversations",
    "load_qa50",
    "load_answers",
    "conversation_to_dict",
    "DOMAINS",
    "first_domain",
    "image_path_problem",
    "image_in_folder",
    "no_records_error",
]

IMAGE_TOKEN = "<image>"
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")
"""Domain keys in the order that decides a record's bucket (first true wins), as the paper."""


@dataclass
class Turn:
    """One message: ``role`` is ``"human"`` or ``"gpt"``; ``value`` the text."""

    role: str
    value: str


@dataclass
class Conversation:
    """One conversation record.

    Attributes:
        id: record id as given (string or integer).
        image: image path relative to the images folder, or ``None`` for text-only records.
        turns: alternating human/gpt turns, human first.
        extra: every other key of the record (``domain``, ``answer_type``, ...), kept as is.
        key: which spelling the file used (``conversations`` or ``conversatons``).
    """

    id: Any
    image: str | None
    turns: list[Turn]
    extra: dict[str, Any] = field(default_factory=dict)
    key: str = "conversations"

    @property
    def answer_type(self) -> str | None:
        """``OPEN``/``CLOSED`` for VQA records (upper-cased), else ``None``."""
        at = self.extra.get("answer_type")
        return str(at).upper() if at is not None else None

    def question(self) -> str:
        """The first human turn without ``<image>``, stripped."""
        return self.turns[0].value.replace(IMAGE_TOKEN, "").strip() if self.turns else ""

    def answer(self) -> str:
        """The first gpt turn (the ground truth for VQA records)."""
        return self.turns[1].value if len(self.turns) > 1 else ""

    def to_messages(self, image_first: bool | None = None) -> list[dict]:
        """transformers chat messages; the ``<image>`` marker becomes an image part.

        Args:
            image_first: put the image before the text (default: where the record had it).
        """
        msgs = []
        for i, t in enumerate(self.turns):
            role = "user" if t.role == "human" else "assistant"
            if i == 0 and self.image is not None:
                text = t.value
                first = image_first if image_first is not None else text.lstrip().startswith(IMAGE_TOKEN)
                text = text.replace(IMAGE_TOKEN, "").strip()
                parts = [{"type": "image"}, {"type": "text", "text": text}] if first else \
                        [{"type": "text", "text": text + "\n"}, {"type": "image"}]
                msgs.append({"role": role, "content": parts})
            else:
                msgs.append({"role": role, "content": t.value})
        return msgs


def parse_conversation(obj: Any, path: str | os.PathLike, index: int, require_image: bool = True,
                       strict: bool = True) -> Conversation:
    """Check one record against the conversation format and return it typed.

    Args:
        obj: the parsed JSON record.
        path: file name for messages.
        index: position in the file (named when the record has no id).
        require_image: records must have an ``image`` and exactly one ``<image>``.
        strict: also check alternating roles and non-empty text.

    Raises:
        DataError: naming file, record id and field.
    """
    rid = obj.get("id", f"#{index}") if isinstance(obj, dict) else f"#{index}"
    if not isinstance(obj, dict):
        raise data_error(path, rid, None, f"expected an object, found {type(obj).__name__}")
    if "id" not in obj:
        raise data_error(path, rid, "id", "missing", "every record needs an id")
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise data_error(path, rid, "id", f"expected a string or integer, found {type(obj['id']).__name__}")
    key = "conversations" if "conversations" in obj else "conversatons" if "conversatons" in obj else None
    if key is None:
        raise data_error(path, rid, "conversations", "missing (neither 'conversations' nor 'conversatons')")
    raw = obj[key]
    if not isinstance(raw, list) or not raw:
        raise data_error(path, rid, key, "empty conversation" if isinstance(raw, list) else
                         f"expected a list of turns, found {type(raw).__name__}")
    turns = []
    for j, t in enumerate(raw):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise data_error(path, rid, f"{key}[{j}]", "expected {\"from\": ..., \"value\": ...}")
        role = ROLE_ALIASES.get(str(t["from"]).lower())
        if role is None:
            raise data_error(path, rid, f"{key}[{j}].from",
                             f"role '{t['from']}' is neither human nor gpt")
        if not isinstance(t["value"], str):
            raise data_error(path, rid, f"{key}[{j}].value", f"expected a string, found {type(t['value']).__name__}")
        if strict:
            expected = "human" if j % 2 == 0 else "gpt"
            if role != expected:
                raise data_error(path, rid, f"{key}[{j}].from",
                                 f"turns must alternate human/gpt starting with human; turn {j} is {role}")
            if not t["value"].strip():
                raise data_error(path, rid, f"{key}[{j}].value", "empty text")
        turns.append(Turn(role, t["value"]))
    image = obj.get("image")
    if image is not None and not isinstance(image, str):
        raise data_error(path, rid, "image", f"expected a file name, found {type(image).__name__}")
    if require_image:
        if not image:
            raise data_error(path, rid, "image", "missing")
        counts = [t.value.count(IMAGE_TOKEN) for t in turns]
        if sum(counts) == 0:
            raise data_error(path, rid, f"{key}[0].value", "no <image> in the first human turn",
                             "put <image> before or after the first question")
        if counts[0] != 1 or sum(counts) != 1:
            raise data_error(path, rid, f"{key}[0].value" if counts[0] != 1 else key,
                             f"expected exactly one <image> (in the first human turn), found "
                             f"{sum(counts)}" + ("" if counts[0] else " outside it"))
    extra = {k: v for k, v in obj.items() if k not in ("id", "image", key)}
    return Conversation(obj["id"], image, turns, extra, key)


def image_path_problem(image: str) -> str | None:
    """Why ``image`` is not a path inside the images folder (absolute, or ``..``), or ``None``."""
    p = Path(image)
    if p.is_absolute() or image.startswith("~"):
        return f"'{image}' is an absolute path, outside the images folder"
    if ".." in p.parts:
        return f"'{image}' goes up with '..', outside the images folder"
    return None


def image_in_folder(images: str | os.PathLike, image: str, path: str | os.PathLike, rid: Any,
                    field: str = "image") -> Path:
    """The file of record ``rid``'s ``image`` under ``images``, refusing paths that leave it.

    Raises:
        DataError: an absolute path or one with ``..`` (file, record and field named).
    """
    problem = image_path_problem(image)
    if problem is not None:
        raise data_error(path, rid, field, problem,
                         "image paths are relative to the --images folder; move the file there")
    return Path(images) / image


def no_records_error(path: str | os.PathLike, what: str = "records") -> DataError:
    """The error for an input file with nothing in it (empty, ``[]``, or only blank lines)."""
    return DataError(f"{path}: no {what} (the file is empty or an empty list)",
                     "check that this is the file you meant")


def iter_conversations(path: str | os.PathLike, require_image: bool = True,
                       strict: bool = True) -> Iterator[Conversation]:
    """Stream the records of a conversation file (JSON array, or JSONL), checked one by one.

    Raises:
        DataError: the first bad record (file, record id, field).
    """
    for i, obj in enumerate(iter_records(path)):
        yield parse_conversation(obj, path, i, require_image=require_image, strict=strict)


def load_conversations(path: str | os.PathLike, require_image: bool = True,
                       strict: bool = True) -> list[Conversation]:
    """All records of a conversation file, checked; duplicate ids are an error.

    Raises:
        DataError: a bad record or a duplicate id.
    """
    out: list[Conversation] = []
    seen: set[str] = set()
    for conv in iter_conversations(path, require_image, strict):
        sid = str(conv.id)
        if sid in seen:
            raise data_error(path, conv.id, "id", "duplicate id", "ids must be unique within a file")
        seen.add(sid)
        out.append(conv)
    if not out:
        raise no_records_error(path)
    return out


def conversation_to_dict(conv: Conversation) -> dict:
    """The record as JSON-ready dict in the released format (same key spelling as read)."""
    d: dict[str, Any] = {"id": conv.id}
    if conv.image is not None:
        d["image"] = conv.image
    d[conv.key] = [{"from": t.role, "value": t.value} for t in conv.turns]
    d.update(conv.extra)
    return d


@dataclass
class QA50Question:
    """One chat-benchmark question (``llava_med_eval_qa50_qa.jsonl``)."""

    question_id: int
    image: str
    text: str
    gpt4_answer: str
    fig_caption: str
    in_text_mention: Any
    domain: dict[str, bool]
    type: str
    raw: dict[str, Any]

    @property
    def bucket_domain(self) -> str | None:
        """The first true domain in the order of :data:`DOMAINS` (the paper's bucketing)."""
        return first_domain(self.domain)


def first_domain(domain: dict[str, Any] | None) -> str | None:
    """First key of :data:`DOMAINS` that is true in ``domain``, or ``None``."""
    for d in DOMAINS:
        if domain and domain.get(d):
            return d
    return None


def load_qa50(path: str | os.PathLike) -> list[QA50Question]:
    """Read the chat-benchmark question file (JSONL), checking the keys the tools use.

    Raises:
        DataError: a missing key or duplicate ``question_id`` (file, line, field).
    """
    out = []
    seen: set[int] = set()
    for i, obj in enumerate(iter_records(path), 1):
        for k in ("question_id", "text"):
            if k not in obj:
                raise data_error(path, f"line {i}", k, "missing")
        qid = obj["question_id"]
        if qid in seen:
            raise data_error(path, qid, "question_id", "duplicate id")
        seen.add(qid)
        out.append(QA50Question(qid, obj.get("image", ""), obj["text"], obj.get("gpt4_answer", ""),
                                obj.get("fig_caption", ""), obj.get("in_text_mention"),
                                obj.get("domain") or {}, obj.get("type", ""), obj))
    if not out:
        raise no_records_error(path, "questions")
    return out


@dataclass
class Answer:
    """One line of an answer file (FORMATS.md "Answer files")."""

    question_id: Any
    text: str
    prompt: str = ""
    answer_id: str = ""
    model_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict in the released key order."""
        return {"question_id": self.question_id, "prompt": self.prompt, "text": self.text,
                "answer_id": self.answer_id, "model_id": self.model_id, "metadata": self.metadata}


def load_answers(path: str | os.PathLike) -> list[Answer]:
    """Read an answer file (JSONL); duplicate ``question_id`` is an error.

    Raises:
        DataError: missing ``question_id``/``text`` or a duplicate id.
    """
    out = []
    seen: set[str] = set()
    path = Path(path)
    for i, obj in enumerate(iter_records(path), 1):
        if "question_id" not in obj:
            raise data_error(path, f"line {i}", "question_id", "missing")
        if "text" not in obj:
            raise data_error(path, obj["question_id"], "text", "missing")
        key = str(obj["question_id"])
        if key in seen:
            raise data_error(path, obj["question_id"], "question_id", "duplicate id")
        seen.add(key)
        out.append(Answer(obj["question_id"], obj["text"] if obj["text"] is not None else "",
                          obj.get("prompt", ""), obj.get("answer_id", ""), obj.get("model_id", ""),
                          obj.get("metadata") or {}))
    if not out and not path.exists():
        raise DataError(f"{path}: file not found")
    return out
