"""Read ``llava_med_image_urls.jsonl`` and plan the extraction: one job per article tarball.

Each line names an article package, a member inside it and the figure's ``pair_id``
(docs/formats.md, "Image URL list")::

    {"pmc_tar_url": "https://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/3f/46/PMC7236913.tar.gz",
     "image_file_path": "PMC7236913/nihms-1587931-f0001.jpg", "pair_id": "32432162_F1"}

Many lines share a tarball; :func:`plan_tarballs` groups them so each tarball is fetched once,
keeps only the figures that ``--only`` files reference, applies ``--limit`` and rewrites URL
prefixes (``--mirror``). A ``pair_id`` becomes a file name, so it must be a plain name (no ``/``,
no leading dot); a record that breaks the format is reported, not trusted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import ConfigError, data_error
from ..io import iter_records, read_jsonl

__all__ = [
    "FigureRecord",
    "TarballJob",
    "PlanProblem",
    "Plan",
    "parse_mirror",
    "apply_mirrors",
    "member_key",
    "referenced_pair_ids",
    "plan_tarballs",
]

_PAIR_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


@dataclass(frozen=True, slots=True)
class FigureRecord:
    """One figure to extract.

    Attributes:
        pair_id: the figure id; the output file is ``<pair_id>.jpg``.
        url: the tarball URL (after ``--mirror`` rewriting).
        member: the member path inside the tarball, as listed.
        line: the line of the URL list it came from (1-based).
    """

    pair_id: str
    url: str
    member: str
    line: int


@dataclass
class TarballJob:
    """All the figures wanted from one tarball."""

    url: str
    figures: list[FigureRecord] = field(default_factory=list)


@dataclass(frozen=True)
class PlanProblem:
    """A figure that cannot even be attempted (reported in ``failures.jsonl``).

    Attributes:
        reason: ``bad-record`` (the line breaks the format) or ``not-listed`` (an ``--only``
            file references a figure that the URL list does not have).
        detail: what is wrong, naming the field.
        pair_id: the figure id when there is one.
        line: the URL-list line, or ``None``.
    """

    reason: str
    detail: str
    pair_id: str | None = None
    line: int | None = None


@dataclass
class Plan:
    """The extraction plan: jobs in first-appearance order, and the problems found."""

    jobs: list[TarballJob]
    problems: list[PlanProblem]

    @property
    def figures(self) -> int:
        """Number of figures to attempt."""
        return sum(len(j.figures) for j in self.jobs)


def parse_mirror(spec: str) -> tuple[str, str]:
    """Parse ``OLD=NEW`` (a URL prefix and its replacement).

    Raises:
        ConfigError: no ``=`` or an empty ``OLD``.
    """
    old, sep, new = spec.partition("=")
    if not sep or not old:
        raise ConfigError(f"--mirror '{spec}': expected OLD=NEW (two URL prefixes)",
                          "e.g. --mirror https://ftp.ncbi.nlm.nih.gov/pub/pmc/=https://my.mirror/pmc/")
    return old, new


def apply_mirrors(url: str, mirrors: list[tuple[str, str]]) -> str:
    """Rewrite ``url`` with the first mirror whose ``OLD`` prefix it starts with."""
    for old, new in mirrors:
        if url.startswith(old):
            return new + url[len(old):]
    return url


def member_key(name: str) -> str:
    """The form of a member name used for matching: no leading ``./`` or ``/``.

    The name is compared as a string and never used as a path to write to.
    """
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def referenced_pair_ids(paths: list[Path]) -> set[str]:
    """The figure ids that conversation files (or qa50-style JSONL) reference.

    A record's ``pair_id`` is used when it has one, else the stem of its ``image``
    (``32432162_F1.jpg`` → ``32432162_F1``). Records without an image (text-only) reference none.

    Raises:
        DataError: a file that is missing or unreadable, or an ``image`` that is not a string.
    """
    ids: set[str] = set()
    for path in paths:
        for i, rec in enumerate(iter_records(path)):
            pid = rec.get("pair_id")
            if isinstance(pid, str) and pid:
                ids.add(pid)
                continue
            image = rec.get("image")
            if image is None:
                continue
            if not isinstance(image, str) or not image:
                raise data_error(path, rec.get("id", f"#{i}"), "image",
                                 f"expected a file name, found {type(image).__name__}",
                                 "--only takes conversation files (JSON arrays with an image per record)")
            ids.add(PurePosixPath(image.replace("\\", "/")).stem)
    return ids


def plan_tarballs(urls_path: str | os.PathLike, only: set[str] | None = None,
                  limit: int | None = None, mirrors: list[tuple[str, str]] | None = None) -> Plan:
    """Group the URL list's figures by tarball.

    Args:
        urls_path: ``llava_med_image_urls.jsonl``.
        only: keep only these pair ids (``None``: all); ids the list lacks become ``not-listed``.
        limit: keep only the first ``limit`` figures (after ``only``).
        mirrors: URL prefix rewrites.

    Returns:
        The :class:`Plan`. Duplicate lines for the same figure and source are merged; the same
        ``pair_id`` with a different source is a ``bad-record`` (the first one wins).

    Raises:
        DataError: a missing file or a line that is not a JSON object.
    """
    urls_path = Path(urls_path)
    if not urls_path.exists():
        raise data_error(urls_path, None, None, "file not found",
                         "get it with `llavamed data download image-urls`")
    mirrors = mirrors or []
    jobs: dict[str, TarballJob] = {}
    seen: dict[str, FigureRecord] = {}
    problems: list[PlanProblem] = []
    count = 0
    complete = True
    for line, rec in enumerate(read_jsonl(urls_path), 1):
        if limit is not None and count >= limit:
            complete = False
            break
        pid = rec.get("pair_id")
        if only is not None and pid not in only:
            continue
        bad = _record_problem(rec)
        if bad is not None:
            problems.append(PlanProblem("bad-record", f"{urls_path.name} line {line}: {bad}",
                                        pid if isinstance(pid, str) else None, line))
            continue
        url = apply_mirrors(rec["pmc_tar_url"], mirrors)
        if not url.startswith(("http://", "https://")):
            problems.append(PlanProblem(
                "bad-record", f"{urls_path.name} line {line}: field 'pmc_tar_url' is not an http(s) "
                f"URL: {url!r} (rewrite its prefix with --mirror OLD=NEW)", pid, line))
            continue
        job = jobs.get(url)
        # One URL string per tarball, shared by its figures (the full list has ~721k lines).
        fig = FigureRecord(pid, job.url if job is not None else url, rec["image_file_path"], line)
        prev = seen.get(pid)
        if prev is not None:
            if (prev.url, member_key(prev.member)) != (url, member_key(fig.member)):
                problems.append(PlanProblem(
                    "bad-record", f"{urls_path.name} line {line}: pair_id '{pid}' already listed on "
                    f"line {prev.line} with another source; the first is used", pid, line))
            continue
        seen[pid] = fig
        if job is None:
            job = jobs[url] = TarballJob(url)
        job.figures.append(fig)
        count += 1
    if only is not None and complete:
        for pid in sorted(only - set(seen) - {p.pair_id for p in problems if p.pair_id}):
            problems.append(PlanProblem("not-listed", f"{urls_path.name} has no line for this figure", pid))
    return Plan(list(jobs.values()), problems)


def _record_problem(rec: dict) -> str | None:
    """What is wrong with a URL-list record, or ``None``."""
    for key in ("pmc_tar_url", "image_file_path", "pair_id"):
        value = rec.get(key)
        if not isinstance(value, str) or not value:
            return f"field '{key}' missing or not a string"
    if not _PAIR_ID.match(rec["pair_id"]) or ".." in rec["pair_id"]:
        return (f"field 'pair_id' {rec['pair_id']!r} cannot be a file name "
                "(letters, digits, '_', '-', '.'; no leading dot; at most 200 characters)")
    return None
