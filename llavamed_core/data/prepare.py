"""``llavamed data prepare``: raw VQA-RAD / SLAKE / PathVQA releases → our conversation files.

Writes, under ``out`` (built under a temporary name and renamed at the end, so a failed or killed
run leaves nothing that looks finished):

- ``train.json``, ``test.json`` and ``val.json`` (where the release has a validation split): JSON
  arrays of ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"},
  {"from": "gpt", "value": "A"}], "answer_type", "question_type", ...}`` (docs/formats.md);
- ``images/``: every image the questions use, copied (or hard-linked with ``link``) from the
  release, or written from the Parquet bytes under a content-hash name;
- ``prepare.json``: what was read, the split counts, the size check and any skipped records.

``answer_type`` is the release's (upper-cased) where it has one, else ``CLOSED`` for a yes/no
answer and ``OPEN`` otherwise (PathVQA's rule). ``question_type`` is the release's (VQA-RAD
``question_type``, SLAKE ``content_type``), else the question's first word, lower-cased (the VQA
v2 convention). SLAKE keeps English questions unless ``lang`` says otherwise.

Split counts are compared with the published sizes in :data:`PUBLISHED_SIZES` when the files are
those of the standard release; a difference is reported (``strict`` makes it an error).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, data_error
from ..io import atomic_dir, atomic_write_json, check_out_not_overlapping, write_records_json
from ..progress import ProgressCallback, emit
from .prepare_readers import SPLIT_ORDER, RawQA, find_source, iter_source

__all__ = ["PrepareConfig", "PrepareResult", "SplitStats", "SizeCheck", "prepare_vqa",
           "DATASETS", "PUBLISHED_SIZES"]

DATASETS = ("vqa-rad", "slake", "pathvqa")
LANGS = ("en", "zh", "all")

PUBLISHED_SIZES: dict[tuple[str, str], dict[str, dict[str, int]]] = {
    # Test figures (images / QA / open / closed): docs/formats.md, the sizes the LLaVA-Med authors
    # used. Train figures: the same paper's dataset table. Validation and Parquet figures: the
    # releases' own documentation.
    ("vqa-rad", "json"): {
        "train": {"questions": 1797, "open": 770, "closed": 1027, "images": 313},
        "test": {"questions": 451, "open": 179, "closed": 272, "images": 203}},
    ("vqa-rad", "parquet"): {"train": {"questions": 1793}, "test": {"questions": 451}},
    ("slake", "json"): {
        "train": {"questions": 4919, "open": 2976, "closed": 1943, "images": 450},
        "val": {"questions": 1053},
        "test": {"questions": 1061, "open": 645, "closed": 416, "images": 96}},
    ("pathvqa", "pickle"): {
        "train": {"questions": 19755, "open": 9949, "closed": 9806, "images": 2599},
        "val": {"questions": 6279},
        "test": {"questions": 6761, "open": 3370, "closed": 3391, "images": 858}},
    ("pathvqa", "parquet"): {"train": {"questions": 19654}, "val": {"questions": 6259},
                             "test": {"questions": 6719}},
}
"""(dataset, source kind) → split → figure → published value (SLAKE: English questions)."""

_YES_NO = ("yes", "no")
_MAX_LISTED = 20


@dataclass
class PrepareConfig:
    """What ``llavamed data prepare`` does."""

    dataset: str
    """``vqa-rad``, ``slake`` or ``pathvqa``."""
    src: Path
    """The raw release: a folder (or, for VQA-RAD, its JSON file)."""
    out: Path
    """Output folder (train.json, test.json, val.json, images/, prepare.json)."""
    lang: str = "en"
    """SLAKE question language: ``en``, ``zh`` or ``all`` (the other datasets are English)."""
    strict: bool = False
    """Fail, writing nothing, when the split counts differ from the published sizes."""
    max_bad: int = 0
    """Records with a problem (missing field, missing or undecodable image) that may be skipped
    and reported before the run fails; 0 fails on the first."""
    overwrite: bool = False
    """Replace an existing, non-empty ``out``."""
    link: bool = False
    """Hard-link images instead of copying them (falls back to copying across file systems)."""
    follow_symlinks: bool = False
    """Copy images that are symbolic links leading out of the release's image folder (refused by
    default: a link in a downloaded release could otherwise copy any readable file)."""


@dataclass
class SplitStats:
    """Counts of one written split."""

    questions: int = 0
    open: int = 0
    closed: int = 0
    images: int = 0
    skipped: int = 0
    other_language: int = 0


@dataclass
class SizeCheck:
    """One figure compared with its published value."""

    split: str
    figure: str
    got: int
    expected: int

    @property
    def ok(self) -> bool:
        """The figure equals the published one."""
        return self.got == self.expected


@dataclass
class PrepareResult:
    """What ``prepare_vqa`` read and wrote."""

    dataset: str
    source_kind: str
    standard: bool
    out: Path
    lang: str
    splits: dict[str, SplitStats]
    checks: list[SizeCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Messages of the skipped records (the first 20)."""
    skipped: int = 0
    """Records skipped in all (``max_bad`` allows some)."""
    files: list[str] = field(default_factory=list)

    @property
    def mismatches(self) -> list[SizeCheck]:
        """The checks whose figure differs from the published one."""
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (also written as ``prepare.json``)."""
        return {"dataset": self.dataset, "source_kind": self.source_kind,
                "standard_release": self.standard, "out": str(self.out), "lang": self.lang,
                "splits": {k: asdict(v) for k, v in self.splits.items()},
                "size_checks": [dict(asdict(c), ok=c.ok) for c in self.checks],
                "skipped_records": self.skipped,
                "problems": list(self.problems), "files": list(self.files)}


def _image_ext(data_or_path: bytes | Path) -> str:
    """The image's format as a file extension; raises ``ValueError`` when it does not decode."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
        with Image.open(src) as im:  # reads and checks the header only: cheap per image
            fmt = (im.format or "").lower()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"image does not decode ({exc})") from None
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt or "bin")


def _place(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links not allowed: a copy gives the same result
            shutil.copyfile(src, dst)
        return
    shutil.copyfile(src, dst)


def _answer_text(raw: RawQA) -> str:
    a = raw.answer
    if isinstance(a, bool) or not isinstance(a, (str, int, float)):
        raise data_error(raw.file, raw.record, "answer",
                         "missing" if a is None else f"expected text or a number, found {type(a).__name__}")
    text = str(a).strip()
    if not text:
        raise data_error(raw.file, raw.record, "answer", "empty")
    return text


def _question_text(raw: RawQA) -> str:
    q = raw.question
    if not isinstance(q, str):
        raise data_error(raw.file, raw.record, "question",
                         "missing" if q is None else f"expected text, found {type(q).__name__}")
    q = q.replace("<image>", "").strip()
    if not q:
        raise data_error(raw.file, raw.record, "question", "empty")
    return q


def _answer_type(raw: RawQA, answer: str) -> str:
    if raw.answer_type is None or (isinstance(raw.answer_type, str) and not raw.answer_type.strip()):
        return "CLOSED" if answer.strip(" .!").lower() in _YES_NO else "OPEN"
    at = str(raw.answer_type).strip().upper()
    if at not in ("OPEN", "CLOSED"):
        raise data_error(raw.file, raw.record, "answer_type",
                         f"expected OPEN or CLOSED, found {raw.answer_type!r}")
    return at


class _Writer:
    """Checks records, places their images and keeps the output records of every split."""

    def __init__(self, cfg: PrepareConfig, tmp: Path, progress: ProgressCallback | None):
        self.cfg, self.tmp, self.progress = cfg, tmp, progress
        self.records: dict[str, list[dict]] = {}
        self.stats: dict[str, SplitStats] = {}
        self.split_images: dict[str, set[str]] = {}
        self.placed: dict[str, str] = {}  # output image name → its source (path or content hash)
        self.by_bytes: dict[str, str] = {}  # content hash → output image name
        self.ids: dict[str, set[str]] = {}
        self.problems: list[str] = []
        self.n_problems = 0
        self.seen = 0

    def add(self, raw: RawQA) -> None:
        stats = self.stats.setdefault(raw.split, SplitStats())
        self.seen += 1
        if self.seen % 200 == 0:
            emit(self.progress, "questions", self.seen, None, "question")
        if self.cfg.lang != "all" and raw.lang is not None and raw.lang != self.cfg.lang:
            stats.other_language += 1
            return
        try:
            rec = self._record(raw)
        except DataError as exc:
            self.problem(exc, stats)
            return
        self.records.setdefault(raw.split, []).append(rec)
        self.split_images.setdefault(raw.split, set()).add(rec["image"])
        stats.questions += 1
        stats.open += rec["answer_type"] == "OPEN"
        stats.closed += rec["answer_type"] == "CLOSED"

    def problem(self, exc: DataError, stats: SplitStats | None = None) -> None:
        """Count a bad record; fail once more than ``max_bad`` have been seen."""
        self.n_problems += 1
        if stats is not None:
            stats.skipped += 1
        if self.n_problems > self.cfg.max_bad:
            hint = exc.hint or ("fix the record, or pass --max-bad N to skip up to N bad records"
                                if self.cfg.max_bad == 0 else
                                f"more than --max-bad {self.cfg.max_bad} bad records; fix the release")
            raise DataError(exc.message, hint)
        if len(self.problems) < _MAX_LISTED:
            self.problems.append(exc.message)

    def _record(self, raw: RawQA) -> dict:
        question, answer = _question_text(raw), _answer_text(raw)
        at = _answer_type(raw, answer)
        if raw.id is None or isinstance(raw.id, bool) or not isinstance(raw.id, (str, int)):
            raise data_error(raw.file, raw.record, "qid", "missing or not a string/integer")
        seen = self.ids.setdefault(raw.split, set())
        if str(raw.id) in seen:
            raise data_error(raw.file, raw.record, "qid", f"duplicate id within the {raw.split} split")
        image = self._image(raw)
        seen.add(str(raw.id))
        qtype = raw.question_type if raw.question_type not in (None, "") else \
            question.split()[0].lower().strip("?,.:;")
        rec: dict[str, Any] = {
            "id": raw.id, "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                              {"from": "gpt", "value": answer}],
            "answer_type": at, "question_type": str(qtype)}
        rec.update({k: v for k, v in raw.extra.items() if k not in rec})
        return rec

    def _image(self, raw: RawQA) -> str:
        if raw.image_bytes is not None:
            digest = hashlib.sha1(raw.image_bytes).hexdigest()
            if digest in self.by_bytes:
                return self.by_bytes[digest]
            try:
                ext = _image_ext(raw.image_bytes)
            except ValueError as exc:
                raise data_error(raw.file, raw.record, "image", str(exc)) from None
            name = f"{digest[:16]}.{ext}"
            dst = self.tmp / "images" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(raw.image_bytes)
            self.by_bytes[digest] = name
            self._placed_one()
            return name
        if raw.image_name is None or raw.image_path is None:
            raise data_error(raw.file, raw.record, "image",
                             "missing, empty, or a path outside the images folder")
        name = raw.image_name
        src = str(raw.image_path)
        if name in self.placed:
            if self.placed[name] != src:
                raise data_error(raw.file, raw.record, "image",
                                 f"two different files would both be written as images/{name}")
            return name
        if not raw.image_path.is_file():
            raise data_error(raw.file, raw.record, "image", f"image file not found: {raw.image_path}",
                             "check that the release's image folder is complete")
        if raw.image_root is not None and not self.cfg.follow_symlinks:
            real, root = raw.image_path.resolve(), raw.image_root.resolve()
            if root not in real.parents:
                raise data_error(raw.file, raw.record, "image",
                                 f"{raw.image_path} is a symbolic link to {real}, outside {raw.image_root}",
                                 "replace the link by the image, or pass --follow-symlinks to copy it anyway")
        try:
            _image_ext(raw.image_path)
        except ValueError as exc:
            raise data_error(raw.file, raw.record, "image", f"{raw.image_path}: {exc}") from None
        _place(raw.image_path, self.tmp / "images" / name, self.cfg.link)
        self.placed[name] = src
        self._placed_one()
        return name

    def _placed_one(self) -> None:
        n = len(self.placed) + len(self.by_bytes)
        if n % 100 == 0:
            emit(self.progress, "images", n, None, "image")


def _check_sizes(dataset: str, kind: str, lang: str, stats: dict[str, SplitStats],
                 images: dict[str, set[str]]) -> list[SizeCheck]:
    published = PUBLISHED_SIZES.get((dataset, kind), {})
    if dataset == "slake" and lang != "en":
        return []  # the published SLAKE sizes count English questions
    checks = []
    for split, figures in published.items():
        s = stats.get(split, SplitStats())
        got = {"questions": s.questions, "open": s.open, "closed": s.closed,
               "images": len(images.get(split, ()))}
        checks += [SizeCheck(split, fig, got[fig], want) for fig, want in figures.items()]
    return checks


def prepare_vqa(cfg: PrepareConfig, progress: ProgressCallback | None = None) -> PrepareResult:
    """Convert a raw VQA release to ``train.json``/``val.json``/``test.json`` + ``images/``.

    Args:
        cfg: what to read and where to write.
        progress: optional progress callback (questions read, images placed).

    Returns:
        The :class:`PrepareResult` (counts, size checks, skipped records).

    Raises:
        ConfigError: unknown dataset or language; ``out`` is, contains or lies inside ``src``.
        DataError: no release under ``src``; a file that cannot be read (including a pickle that
            names anything but plain data); more bad records than ``max_bad`` (the first beyond
            names file, record and field); with ``strict``, split counts that differ from the
            published sizes of a standard release. Nothing is written in any of these cases.
    """
    if cfg.dataset not in DATASETS:
        from ..errors import did_you_mean

        raise ConfigError(f"unknown dataset '{cfg.dataset}'", did_you_mean(cfg.dataset, DATASETS, "use one of"))
    if cfg.lang not in LANGS:
        raise ConfigError(f"unknown --lang '{cfg.lang}'", "use en, zh or all")
    if cfg.lang != "en" and cfg.dataset != "slake":
        raise ConfigError(f"--lang {cfg.lang}: only SLAKE has questions in several languages",
                          "drop --lang for VQA-RAD and PathVQA (English only)")
    if cfg.max_bad < 0:
        raise ConfigError("--max-bad must be 0 or more")
    source = find_source(cfg.dataset, Path(cfg.src))
    check_out_not_overlapping(cfg.out, [("--src", cfg.src)])  # --overwrite would delete the release
    out = Path(cfg.out)
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        writer = _Writer(cfg, tmp, progress)
        for item in iter_source(source):
            if isinstance(item, DataError):  # not even a record: its split is unknown
                writer.problem(item)
            else:
                writer.add(item)
        if not any(writer.records.values()):
            raise DataError(f"{source.root}: no usable question found"
                            + (f" in language '{cfg.lang}'" if cfg.dataset == "slake" else ""),
                            "check --src" + (" and --lang" if cfg.dataset == "slake" else ""))
        splits = {s: writer.stats[s] for s in SPLIT_ORDER if s in writer.stats}
        for s, st in splits.items():
            st.images = len(writer.split_images.get(s, ()))
        checks = _check_sizes(cfg.dataset, source.kind, cfg.lang, splits, writer.split_images) \
            if source.standard else []
        bad = [c for c in checks if not c.ok]
        if bad and cfg.strict:
            raise DataError(
                f"{source.root}: split sizes differ from the published {cfg.dataset} release: "
                + "; ".join(f"{c.split} {c.figure} {c.got} (published {c.expected})" for c in bad),
                "drop --strict to write the files anyway, or check that the release is complete")
        files = []
        for split in SPLIT_ORDER:
            if writer.records.get(split):
                write_records_json(tmp / f"{split}.json", writer.records[split])
                files.append(f"{split}.json")
        result = PrepareResult(cfg.dataset, source.kind, source.standard, out, cfg.lang, splits,
                               checks, writer.problems, writer.n_problems, files)
        atomic_write_json(tmp / "prepare.json", result.to_dict())
        emit(progress, "images", len(writer.placed) + len(writer.by_bytes), None, "image",
             finished=True)
    return result

