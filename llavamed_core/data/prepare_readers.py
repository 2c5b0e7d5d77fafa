"""Readers of the raw VQA-RAD, SLAKE and PathVQA releases (docs/formats.md, "Raw VQA datasets").

Each reader finds its files under ``--src``, says which layout it found, and yields one
:class:`RawQA` per question (or a :class:`~llavamed_core.errors.DataError` for a record that
cannot even be read as a record, so that the caller can count it). Field checks, image checks and
writing happen in :mod:`llavamed_core.data.prepare`, the same for every dataset.

Layouts read:

- VQA-RAD: ``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/`` (``phrase_type`` starting
  with ``test`` → test, else train), or Parquet files ``train-*.parquet`` / ``test-*.parquet``
  with columns ``image`` (bytes, or ``{"bytes", "path"}``), ``question``, ``answer``.
- SLAKE 1.0: ``train.json``, ``validate.json``, ``test.json`` + ``imgs/<dir>/source.jpg``.
- PathVQA: pickled lists of ``{image, question, answer}`` per split, named ``<split>_qa.pkl``
  or ``<split>.pkl`` anywhere under ``--src`` (the release: ``qas/train/train_qa.pkl``; its other
  pickles, answer maps, are ignored) + ``images/<split>/<name>.jpg`` beside ``qas/``, loaded with
  the restricted unpickler; or Parquet as for VQA-RAD (``validation-*.parquet`` → val).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, data_error
from ..io import load_json
from ..records import no_records_error
from .prepare_pickle import load_plain_pickle

__all__ = ["RawQA", "Source", "find_source", "iter_source", "SPLIT_ORDER"]

SPLIT_ORDER = ("train", "val", "test")
VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
SLAKE_FILES = {"train": "train.json", "val": "validate.json", "test": "test.json"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")


@dataclass
class RawQA:
    """One question as read from a raw release, before checks.

    Attributes:
        split: ``train``, ``val`` or ``test``.
        file: the file it came from (for messages).
        record: how messages name the record (its id, or ``#index``).
        id: the id to write (the release's, or ``<split>-<index>`` where it has none).
        question, answer: raw values (checked later).
        answer_type: the release's ``OPEN``/``CLOSED`` value, or ``None`` (then inferred).
        question_type: the release's question type, or ``None`` (then the question's first word).
        lang: the question's language where the release has one (SLAKE), else ``None``.
        extra: other keys to keep in the output record (``modality``, ``image_organ``, ...).
        image_name: output path of the image under ``images/`` (file sources).
        image_path: the source image file (file sources).
        image_bytes: the encoded image (Parquet sources).
        image_root: the release's image folder (file sources); an image whose real path (symbolic
            links followed) leaves it is refused unless ``follow_symlinks``.
    """

    split: str
    file: str
    record: Any
    id: Any
    question: Any
    answer: Any
    answer_type: Any = None
    question_type: Any = None
    lang: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    image_name: str | None = None
    image_path: Path | None = None
    image_bytes: bytes | None = None
    image_root: Path | None = None


@dataclass
class Source:
    """A raw release found under ``--src``.

    Attributes:
        dataset: ``vqa-rad``, ``slake`` or ``pathvqa``.
        kind: ``json``, ``parquet`` or ``pickle``.
        files: split → the files holding its questions.
        standard: the file names are those of the standard release (so sizes are checked).
        root: the source directory.
    """

    dataset: str
    kind: str
    files: dict[str, list[Path]]
    standard: bool
    root: Path


_SPLIT_WORDS = (("train", ("train",)), ("val", ("validation", "validate", "valid", "val")),
                ("test", ("test",)))
PICKLE_STEMS = {f"{w}{suffix}": split for split, words in _SPLIT_WORDS for w in words
                for suffix in ("", "_qa")}
"""PathVQA question-pickle names (stem → split); other pickles of the release (answer maps) are
ignored."""


def _split_of(name: str) -> str | None:
    """The split a Parquet file name starts with (``train-00000-of-00001.parquet`` → train)."""
    n = name.lower()
    for split, words in _SPLIT_WORDS:
        if any(n.startswith(w) and not n[len(w):len(w) + 1].isalpha() for w in words):
            return split
    return None


def _parquet_files(root: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in sorted(root.rglob("*.parquet")):
        split = _split_of(p.name) or _split_of(p.parent.name)
        if split is None:
            raise DataError(f"{p}: cannot tell which split this Parquet file holds",
                            "name Parquet files train-*.parquet, validation-*.parquet, test-*.parquet")
        out.setdefault(split, []).append(p)
    return out


def find_source(dataset: str, src: Path) -> Source:
    """Find the raw files of ``dataset`` under ``src``.

    Raises:
        DataError: ``src`` missing, or none of the known layouts found (the message lists them).
    """
    src = Path(src)
    if not src.exists():
        raise DataError(f"{src}: not found", "pass the folder of the raw release with --src")
    if dataset == "vqa-rad":
        json_file = src if src.is_file() else src / VQA_RAD_JSON
        if json_file.is_file() and json_file.suffix == ".json":
            return Source(dataset, "json", {"all": [json_file]}, json_file.name == VQA_RAD_JSON,
                          json_file.parent)
        if src.is_dir() and (files := _parquet_files(src)):
            std = all(p.name.startswith(("train-", "test-")) for ps in files.values() for p in ps)
            return Source(dataset, "parquet", files, std, src)
        raise DataError(f"{src}: no VQA-RAD release found",
                        f"expected '{VQA_RAD_JSON}' + '{VQA_RAD_IMAGES}/', or train-*/test-*.parquet")
    if dataset == "slake":
        if src.is_dir() and all((src / f).is_file() for f in SLAKE_FILES.values()):
            return Source(dataset, "json", {s: [src / f] for s, f in SLAKE_FILES.items()}, True, src)
        found = {s: [src / f] for s, f in SLAKE_FILES.items() if src.is_dir() and (src / f).is_file()}
        if found:
            return Source(dataset, "json", found, False, src)
        raise DataError(f"{src}: no SLAKE release found",
                        "expected train.json, validate.json, test.json and imgs/ (SLAKE 1.0)")
    if dataset == "pathvqa":
        if src.is_dir():
            pkls: dict[str, list[Path]] = {}
            for p in sorted(src.rglob("*.pkl")):
                split = PICKLE_STEMS.get(p.stem.lower())
                if split is not None:
                    pkls.setdefault(split, []).append(p)
            if pkls:
                std = all(p.name in ("train_qa.pkl", "val_qa.pkl", "test_qa.pkl")
                          for ps in pkls.values() for p in ps)
                return Source(dataset, "pickle", pkls, std, src)
            if files := _parquet_files(src):
                std = all(p.name.startswith(("train-", "validation-", "test-"))
                          for ps in files.values() for p in ps)
                return Source(dataset, "parquet", files, std, src)
        raise DataError(f"{src}: no PathVQA release found",
                        "expected pickles (qas/<split>/<split>_qa.pkl) + images/<split>/, "
                        "or train-*/validation-*/test-*.parquet")
    raise DataError(f"unknown dataset '{dataset}'", "use vqa-rad, slake or pathvqa")


def iter_source(source: Source) -> Iterator[RawQA | DataError]:
    """Yield every question of every split (or an error for a record that is not a record)."""
    if source.kind == "parquet":
        for split in SPLIT_ORDER:
            start = 0  # ids number the rows of a split across its shards
            for path in source.files.get(split, []):
                start = yield from _iter_parquet(path, split, start)
    elif source.dataset == "vqa-rad":
        yield from _iter_vqa_rad_json(source.files["all"][0])
    elif source.dataset == "slake":
        for split in SPLIT_ORDER:
            for path in source.files.get(split, []):
                yield from _iter_slake(path, split, source.root)
    else:
        for split in SPLIT_ORDER:
            for path in source.files.get(split, []):
                yield from _iter_pathvqa_pickle(path, split, source.root)


def _json_list(path: Path) -> list:
    data = load_json(path)
    if not isinstance(data, list):
        raise data_error(path, None, None, f"expected a JSON list of records, found {type(data).__name__}")
    if not data:
        raise no_records_error(path)
    return data


def _safe_relative(name: Any) -> str | None:
    """``name`` as a relative POSIX path inside the images folder, or ``None`` if it escapes it."""
    if not isinstance(name, str) or not name.strip():
        return None
    rel = Path(name.strip().replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        return None
    return rel.as_posix()


def _iter_vqa_rad_json(path: Path) -> Iterator[RawQA | DataError]:
    images = path.parent / VQA_RAD_IMAGES
    for i, rec in enumerate(_json_list(path)):
        if not isinstance(rec, dict):
            yield data_error(path, f"#{i}", None, f"expected an object, found {type(rec).__name__}")
            continue
        rid = rec.get("qid", f"#{i}")
        phrase = rec.get("phrase_type")
        if not isinstance(phrase, str):
            yield data_error(path, rid, "phrase_type", "missing or not a string",
                             "it tells test (test_*) from train questions")
            continue
        name = _safe_relative(rec.get("image_name"))
        qt = rec.get("question_type")
        yield RawQA(
            split="test" if phrase.strip().lower().startswith("test") else "train",
            file=str(path), record=rid, id=rec.get("qid"), question=rec.get("question"),
            answer=rec.get("answer"), answer_type=rec.get("answer_type"),
            question_type=qt.strip().upper() if isinstance(qt, str) and qt.strip() else None,
            extra={k: rec[k] for k in ("image_organ",) if rec.get(k) is not None},
            image_name=name, image_path=images / name if name else None, image_root=images)


def _iter_slake(path: Path, split: str, root: Path) -> Iterator[RawQA | DataError]:
    for i, rec in enumerate(_json_list(path)):
        if not isinstance(rec, dict):
            yield data_error(path, f"#{i}", None, f"expected an object, found {type(rec).__name__}")
            continue
        rid = rec.get("qid", f"#{i}")
        name = _safe_relative(rec.get("img_name"))
        lang = rec.get("q_lang")
        extra = {k: rec[k] for k in ("modality", "location", "q_lang", "base_type")
                 if rec.get(k) is not None}
        yield RawQA(
            split=split, file=str(path), record=rid, id=rec.get("qid"), question=rec.get("question"),
            answer=rec.get("answer"), answer_type=rec.get("answer_type"),
            question_type=rec.get("content_type") or None,
            lang=str(lang).strip().lower() if lang is not None else None, extra=extra,
            image_name=name, image_path=root / "imgs" / name if name else None,
            image_root=root / "imgs")


def _find_image(root: Path, split: str, name: str) -> Path | None:
    """The file of PathVQA image ``name`` (with or without extension) under ``root``."""
    folders = [root / "images" / split, root / split, root / "images"]
    if split == "val":
        folders[:0] = [root / "images" / "valid", root / "images" / "validation"]
    for folder in folders:
        cand = folder / name
        if cand.suffix.lower() in IMAGE_EXTS and cand.is_file():
            return cand
        for ext in IMAGE_EXTS:
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    return None


def _iter_pathvqa_pickle(path: Path, split: str, root: Path) -> Iterator[RawQA | DataError]:
    data = load_plain_pickle(path)
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        raise data_error(path, None, None, "expected a list of records, found a dict of lists",
                         "PathVQA question pickles hold a list of {image, question, answer}")
    if not isinstance(data, (list, tuple)):
        raise data_error(path, None, None, f"expected a list of records, found {type(data).__name__}")
    if not data:
        raise no_records_error(path)
    # The release keeps images/ beside qas/ (split/qas/train/train_qa.pkl, split/images/train/).
    image_root = next((d for d in [path.parent, *path.parents] if (d / "images").is_dir()
                       and (d == root or root in d.parents)), root)
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            yield data_error(path, f"#{i}", None, f"expected a dict, found {type(rec).__name__}")
            continue
        name = _safe_relative(rec.get("image"))
        found = _find_image(image_root, split, name) if name else None
        out_name = f"{split}/{found.name}" if found else (f"{split}/{name}" if name else None)
        yield RawQA(split=split, file=str(path), record=f"#{i}", id=f"{split}-{i:05d}",
                    question=rec.get("question"), answer=rec.get("answer"),
                    image_name=out_name, image_path=found if found else
                    (image_root / "images" / split / name if name else None), image_root=image_root)


def _iter_parquet(path: Path, split: str, start: int) -> Iterator[RawQA | DataError]:
    """Yield the rows of one Parquet shard; returns the next row number of the split."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({exc})",
                        "the file may be truncated; download it again") from None
    names = set(pf.schema_arrow.names)
    missing = [c for c in ("image", "question", "answer") if c not in names]
    if missing:
        raise data_error(path, None, missing[0], f"column missing (columns: {sorted(names)})",
                         "expected the columns image, question, answer")
    optional = [c for c in ("answer_type", "question_type", "qid", "id") if c in names]
    i = start
    for batch in pf.iter_batches(batch_size=64, columns=["image", "question", "answer", *optional]):
        for rec in batch.to_pylist():
            img = rec.get("image")
            data = img.get("bytes") if isinstance(img, dict) else img
            rid = rec.get("qid", rec.get("id"))
            ident = rid if rid is not None else f"{split}-{i:05d}"
            yield RawQA(split=split, file=str(path), record=ident, id=ident,
                        question=rec.get("question"), answer=rec.get("answer"),
                        answer_type=rec.get("answer_type"), question_type=rec.get("question_type"),
                        image_bytes=bytes(data) if isinstance(data, (bytes, bytearray)) else None)
            i += 1
    return i
