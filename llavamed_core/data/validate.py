"""Check a conversation file record by record and report every problem by kind.

Checks: the record schema (both ``conversations`` spellings; string or integer ids), exactly one
``<image>`` in the first human turn, alternating human/gpt turns, non-empty text, unique ids, the
image exists and decodes, and — given a checkpoint's tokenizer — the token length after the image
placeholder is expanded to the model's image tokens, against the model's context length.
Nothing is skipped silently: each problem is counted under its kind with the first examples.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..images import image_problem
from ..io import iter_records
from ..progress import ProgressCallback, emit
from ..records import IMAGE_TOKEN, image_path_problem, no_records_error, parse_conversation

__all__ = ["Problem", "ValidationReport", "validate_conversations"]


@dataclass
class Problem:
    """One problem found in one record."""

    kind: str
    record: Any
    message: str


@dataclass
class ValidationReport:
    """Outcome of :func:`validate_conversations`.

    Attributes:
        path: the file checked.
        records: records read.
        ok: records without problems.
        problems: every problem found (in file order).
        max_tokens: the longest record in tokens (when a tokenizer was given).
        max_length: the length limit used (when a tokenizer was given).
    """

    path: Path
    records: int = 0
    ok: int = 0
    problems: list[Problem] = field(default_factory=list)
    max_tokens: int | None = None
    max_length: int | None = None

    def by_kind(self) -> dict[str, int]:
        """Problem counts per kind, most frequent first."""
        return dict(Counter(p.kind for p in self.problems).most_common())

    def to_dict(self) -> dict:
        """JSON-ready summary (at most 20 examples per kind)."""
        examples: dict[str, list[dict]] = {}
        for p in self.problems:
            lst = examples.setdefault(p.kind, [])
            if len(lst) < 20:
                lst.append({"record": p.record, "message": p.message})
        return {"path": str(self.path), "records": self.records, "ok": self.ok,
                "problems": len(self.problems), "by_kind": self.by_kind(), "examples": examples,
                "max_tokens": self.max_tokens, "max_length": self.max_length}


def _kind_of(message: str) -> str:
    m = message.lower()
    if "<image>" in m:
        return "image-token"
    if "neither human nor gpt" in m or "alternate" in m:
        return "roles"
    if "empty" in m:
        return "empty"
    if "duplicate" in m:
        return "duplicate-id"
    return "schema"


def validate_conversations(path: str | os.PathLike, images: str | os.PathLike | None,
                           processor: Any = None, max_length: int | None = None,
                           require_image: bool = True, workers: int = 4,
                           progress: ProgressCallback | None = None) -> ValidationReport:
    """Check every record of a conversation file.

    Args:
        path: JSON array or JSONL conversation file.
        images: folder the ``image`` fields are relative to (``None`` skips image checks).
        processor: a checkpoint's processor; enables the length check with its chat template.
        max_length: token limit (default: the model's context length, given a processor).
        require_image: records must carry an image.
        workers: threads decoding images.
        progress: progress callback (task ``validate``, unit ``record``).

    Returns:
        The report; the caller decides the exit status.

    Raises:
        DataError: the file itself cannot be read (not JSON, missing, not UTF-8) or holds no
            record (empty, ``[]``).
    """
    path = Path(path)
    report = ValidationReport(path)
    seen: set[str] = set()
    bad: set[int] = set()
    image_jobs: list[tuple[int, Any, Path]] = []
    length_jobs: list[tuple[int, Any]] = []
    i = -1
    for i, obj in enumerate(iter_records(path)):
        rid = obj.get("id", f"#{i}")
        try:
            conv = parse_conversation(obj, path, i, require_image=require_image, strict=True)
        except DataError as exc:
            report.problems.append(Problem(_kind_of(exc.message), rid, exc.message))
            bad.add(i)
            continue
        if str(conv.id) in seen:
            report.problems.append(Problem("duplicate-id", conv.id, f"{path}, record {conv.id}: duplicate id"))
            bad.add(i)
        seen.add(str(conv.id))
        outside = image_path_problem(conv.image) if conv.image else None
        if outside is not None:
            report.problems.append(Problem("image-path", conv.id,
                                           f"{path}, record {conv.id}, field 'image': {outside}"))
            bad.add(i)
        elif images is not None and conv.image:
            image_jobs.append((i, conv.id, Path(images) / conv.image))
        if processor is not None:
            length_jobs.append((i, conv))
        if i % 1000 == 0:
            emit(progress, "validate", i + 1, None, unit="record")
    report.records = i + 1
    if report.records == 0:
        raise no_records_error(path)

    if image_jobs:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for (idx, rid, p), res in zip(image_jobs, pool.map(lambda j: image_problem(j[2]), image_jobs)):
                if res is not None:
                    kind, msg = res
                    report.problems.append(Problem(kind, rid, f"{path}, record {rid}, field 'image': {p}: {msg}"))
                    bad.add(idx)

    if processor is not None:
        limit = max_length or _context_length(processor)
        report.max_length = limit
        longest = 0
        n_img = int(getattr(processor, "num_image_tokens", 0) or 0) or _image_tokens(processor)
        for idx, conv in length_jobs:
            text = processor.apply_chat_template(conv.to_messages(), tokenize=False)
            n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
            n += text.count(IMAGE_TOKEN) * (n_img - 1)
            longest = max(longest, n)
            if limit and n > limit:
                report.problems.append(Problem("too-long", conv.id,
                    f"{path}, record {conv.id}: {n} tokens after image expansion > max length {limit}"))
                bad.add(idx)
        report.max_tokens = longest
    report.ok = report.records - len(bad)
    emit(progress, "validate", report.records, report.records, unit="record", finished=True)
    return report


def _image_tokens(processor: Any) -> int:
    ip = processor.image_processor
    size = (getattr(ip, "crop_size", None) or {}).get("height") or (ip.size or {}).get("shortest_edge")
    patch = processor.patch_size
    n = (int(size) // int(patch)) ** 2
    extra = int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    if processor.vision_feature_select_strategy == "default":
        extra -= 1
    return n + extra


def _context_length(processor: Any) -> int | None:
    limit = getattr(processor.tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**8 else None


def processor_and_context_length(model_dir: str | os.PathLike) -> tuple[Any, int]:
    """A checkpoint's processor and its language model's context length (for the length check).

    Raises:
        ModelError: not a Llava checkpoint.
    """
    import json

    from transformers import AutoProcessor

    from ..model.checkpoint import check_checkpoint_dir

    model_dir = check_checkpoint_dir(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    ctx = int(cfg.get("text_config", {}).get("max_position_embeddings") or 2048)
    return AutoProcessor.from_pretrained(model_dir), ctx


__all__.append("processor_and_context_length")
