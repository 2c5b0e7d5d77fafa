"""``data extract``: PMC article tarballs → ``<pair_id>.jpg``, parallel, streamed, resumable.

The original ``download_images.py`` downloaded every article tarball once per figure, one at a
time, extracted whole packages, kept them all (terabytes), and stopped at the first timeout.
Here:

- figures are grouped by tarball (:mod:`.figure_list`), so each tarball is fetched once;
- ``workers`` tarballs are streamed at the same time; each ``tar.gz`` is read straight off the
  HTTP body (``tarfile`` ``r|gz`` over :class:`~llavamed_core.http.ResumableStream`, which
  reconnects with ``Range`` after a dropped connection), so no tarball touches the disk unless
  ``keep_tarballs``; a stream is closed as soon as its wanted members are read;
- only the members the records name are read, matched by name as strings: a member name is never
  a path we write to, so ``../`` names cannot escape; the output is always ``OUT/<pair_id>.jpg``;
- each image is decoded once and written atomically (temporary file + rename), non-JPEGs are
  converted (:mod:`.figure_image`); a kill leaves no partial image, and the temporary files of
  a killed run are removed by the next one;
- images already present are checked (decoded) and skipped, so a rerun finishes the job;
- every figure that could not be had goes to ``OUT/failures.jsonl`` with its reason
  (:data:`FAILURE_REASONS`). Final failures of an earlier run (404, member missing, ...) are kept
  and not retried unless ``retry_failed``; passing network failures are retried.

Usage from Python::

    from llavamed_core.data.extract import ExtractConfig, extract_figures
    result = extract_figures(ExtractConfig(urls=Path("llava_med_image_urls.jsonl"), out=Path("images")))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit

from ..errors import ConfigError, NetworkError
from ..http import HttpClient, HttpConfig, HttpStatusError
from ..io import JsonlAppender, atomic_write, atomic_write_bytes, read_jsonl
from ..progress import ProgressCallback, emit
from ._folder import locked_folder, remove_stale_temporaries
from ..pool import map_unordered
from .figure_image import ImageRejected, is_valid_jpeg, to_jpeg
from .figure_list import (FigureRecord, Plan, TarballJob, member_key, parse_mirror,
                          plan_tarballs, referenced_pair_ids)

__all__ = [
    "ExtractConfig",
    "ExtractResult",
    "extract_figures",
    "FAILURE_REASONS",
    "FINAL_REASONS",
    "FAILURES_FILE",
    "parse_mirror",
]

FAILURES_FILE = "failures.jsonl"

FAILURE_REASONS = {
    "not-found": "the tarball is gone from the server (HTTP 404/410)",
    "http-error": "the server kept refusing or failing (other HTTP errors, after retries)",
    "network-error": "connection failures or timeouts, after retries",
    "corrupt-archive": "the tarball is not a readable tar.gz (e.g. truncated gzip)",
    "member-missing": "the tarball has no such member (or it is a link/folder, not a file)",
    "not-an-image": "the member does not decode as an image",
    "too-large": "the member exceeds the size limit, or the image the decompression-bomb limit",
    "bad-record": "the URL-list line breaks the format",
    "not-listed": "an --only file references a figure the URL list does not have",
}
"""Every reason a figure can be recorded in ``failures.jsonl`` with, and what it means."""

FINAL_REASONS = frozenset({"not-found", "member-missing", "corrupt-archive", "not-an-image", "too-large"})
"""Reasons that a rerun does not retry by itself (the server answered; asking again won't help)."""


@dataclass
class ExtractConfig:
    """What ``data extract`` does.

    Attributes:
        urls: ``llava_med_image_urls.jsonl``.
        out: the images folder (``<pair_id>.jpg``, plus ``failures.jsonl``).
        only: conversation files; extract only the figures they reference.
        limit: extract only the first N figures of the list (after ``only``), for trials.
        mirrors: ``(OLD, NEW)`` URL prefix rewrites, first match wins.
        workers: tarballs fetched at the same time.
        keep_tarballs: keep each downloaded tarball in ``tarball_dir`` (and reuse kept ones).
        tarball_dir: where kept tarballs go (default ``OUT/tarballs``).
        max_member_bytes: a member larger than this is not read (``too-large``).
        retry_failed: also retry figures an earlier run recorded with a final reason.
        check_existing: decode images already in ``out`` before skipping them.
        figure_bytes_estimate: bytes per figure assumed by the disk-space check (the released
            ~721k figures take ~69 GB, ~96 kB each).
        tarball_bytes_estimate: bytes per kept tarball assumed by the disk-space check.
        jpeg_quality: quality of JPEGs converted from other formats.
        http: timeouts and retries.
    """

    urls: Path
    out: Path
    only: list[Path] = field(default_factory=list)
    limit: int | None = None
    mirrors: list[tuple[str, str]] = field(default_factory=list)
    workers: int = 8
    keep_tarballs: bool = False
    tarball_dir: Path | None = None
    max_member_bytes: int = 64 * 2**20
    retry_failed: bool = False
    check_existing: bool = True
    figure_bytes_estimate: int = 100_000
    tarball_bytes_estimate: int = 16 * 2**20
    jpeg_quality: int = 95
    http: HttpConfig = field(default_factory=HttpConfig)


@dataclass
class ExtractResult:
    """The outcome of :func:`extract_figures`.

    Attributes:
        out: the images folder.
        failures_path: ``OUT/failures.jsonl``.
        figures: figures in the plan (after ``only``/``limit``), plus unplannable ones.
        present: figures already there before this run (checked).
        extracted: figures written by this run.
        converted: of those, how many were converted to JPEG from another format.
        failed: figures that could not be had (this run's and earlier final ones).
        failures_by_reason: ``failed`` split by reason.
        known_failures: failures kept from an earlier run and not retried.
        tarballs: tarballs in the plan.
        tarballs_fetched: tarballs this run opened (streamed or downloaded; a 404 is not opened).
        bytes_downloaded: bytes received over the network.
        seconds: wall time.
    """

    out: Path
    failures_path: Path
    figures: int = 0
    present: int = 0
    extracted: int = 0
    converted: int = 0
    failed: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    known_failures: int = 0
    tarballs: int = 0
    tarballs_fetched: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        d = dict(self.__dict__)
        d["out"], d["failures_path"] = str(self.out), str(self.failures_path)
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass
class _Failure:
    fig: FigureRecord
    reason: str
    detail: str


@dataclass
class _JobOutcome:
    present: int = 0
    extracted: int = 0
    converted: int = 0
    fetched: bool = False
    bytes: int = 0
    failures: list[_Failure] = field(default_factory=list)

    @property
    def figures(self) -> int:
        return self.present + self.extracted + len(self.failures)


def _failure_record(pair_id: str | None, reason: str, detail: str, url: str | None = None,
                    member: str | None = None, line: int | None = None) -> dict[str, Any]:
    """One line of ``failures.jsonl`` (fixed key order, so reruns write identical lines)."""
    rec: dict[str, Any] = {"pair_id": pair_id, "reason": reason, "detail": detail}
    if url is not None:
        rec["url"] = url
    if member is not None:
        rec["member"] = member
    if line is not None:
        rec["line"] = line
    return rec


def _check_disk(out: Path, figures_to_fetch: int, tarballs_to_keep: int, config: ExtractConfig) -> None:
    """Refuse to start when the estimated size of what is missing exceeds the free space."""
    need = figures_to_fetch * config.figure_bytes_estimate + tarballs_to_keep * config.tarball_bytes_estimate
    free = shutil.disk_usage(out).free
    if need > free:
        raise ConfigError(
            f"{out}: not enough disk space: {figures_to_fetch:,} figures"
            + (f" and {tarballs_to_keep:,} kept tarballs" if tarballs_to_keep else "")
            + f" need about {need / 1e9:,.1f} GB, {free / 1e9:,.1f} GB are free",
            "free some space, choose another --out, or fetch fewer figures (--only, --limit)")


def _tarball_path(tarball_dir: Path, url: str) -> Path:
    """Where a kept tarball goes: its URL's file name (a hash when the URL has none)."""
    name = PurePosixPath(urlsplit(url).path).name
    if not name or name in (".", "..") or name.startswith("."):
        name = hashlib.sha1(url.encode()).hexdigest()[:16] + ".tar.gz"
    return tarball_dir / name


def extract_figures(config: ExtractConfig, progress: ProgressCallback | None = None) -> ExtractResult:
    """Fetch the figures of the URL list into ``config.out`` as ``<pair_id>.jpg``.

    Args:
        config: what to extract and how.
        progress: callback receiving ``figures`` events (done/total, with ok, failed, MB
            downloaded and fig/s in the info).

    Returns:
        The :class:`ExtractResult`; per-figure failures are in ``OUT/failures.jsonl``.

    Raises:
        ConfigError: bad options, another run writing to ``out``, or not enough disk space.
        DataError: an unreadable URL list, ``--only`` file or ``failures.jsonl``.
        OSError: the disk filled up or ``out`` is not writable (the run can be resumed).
    """
    started = time.monotonic()
    if config.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {config.workers}")
    if config.limit is not None and config.limit < 0:
        raise ConfigError(f"--limit must be 0 or more, got {config.limit}")
    only = referenced_pair_ids(list(config.only)) if config.only else None
    plan = plan_tarballs(config.urls, only=only, limit=config.limit, mirrors=list(config.mirrors))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    failures_path = out / FAILURES_FILE
    result = ExtractResult(out=out, failures_path=failures_path, tarballs=len(plan.jobs))
    with locked_folder(out, "llavamed data extract", "--out"):
        remove_stale_temporaries(out)
        known = _carry_over_failures(failures_path, plan, out, config.retry_failed)
        jobs = [TarballJob(j.url, [f for f in j.figures if f.pair_id not in known]) for j in plan.jobs]
        jobs = [j for j in jobs if j.figures]
        missing = sum(1 for j in jobs for f in j.figures if not (out / f"{f.pair_id}.jpg").exists())
        _check_disk(out, missing, len(jobs) if config.keep_tarballs else 0, config)
        tarball_dir = Path(config.tarball_dir or out / "tarballs")
        if config.keep_tarballs:
            tarball_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(tarball_dir)  # .part files stay: they resume

        reasons: Counter[str] = Counter(known.values())
        result.known_failures = len(known)
        result.figures = plan.figures + len(plan.problems)
        total = result.figures
        done = len(known)
        with JsonlAppender(failures_path, fsync=False, lazy=True) as failures:  # only if any
            for p in plan.problems:
                failures.write(_failure_record(p.pair_id, p.reason, p.detail, line=p.line))
                reasons[p.reason] += 1
                done += 1
            emit(progress, "figures", done, total, "fig", ok=0, failed=sum(reasons.values()))
            with HttpClient(config.http) as client:
                def one(job: TarballJob) -> _JobOutcome:
                    return _extract_job(client, job, out, tarball_dir, config)

                for _, oc in map_unordered(one, jobs, config.workers, stop=client.stop):
                    result.present += oc.present
                    result.extracted += oc.extracted
                    result.converted += oc.converted
                    result.tarballs_fetched += int(oc.fetched)
                    result.bytes_downloaded += oc.bytes
                    for f in oc.failures:
                        failures.write(_failure_record(f.fig.pair_id, f.reason, f.detail,
                                                       f.fig.url, f.fig.member))
                        reasons[f.reason] += 1
                    done += oc.figures
                    elapsed = max(1e-9, time.monotonic() - started)
                    emit(progress, "figures", done, total, "fig",
                         ok=result.present + result.extracted, failed=sum(reasons.values()),
                         MB=round(result.bytes_downloaded / 1e6, 1),
                         **{"fig/s": round(result.extracted / elapsed, 1)})
        emit(progress, "figures", done, total, "fig", finished=True,
             ok=result.present + result.extracted, failed=sum(reasons.values()))
    result.failures_by_reason = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    result.failed = sum(reasons.values())
    result.seconds = time.monotonic() - started
    return result


def _carry_over_failures(path: Path, plan: Plan, out: Path, retry_failed: bool) -> dict[str, str]:
    """Rewrite ``failures.jsonl`` keeping the final failures of earlier runs that still stand.

    A failure is kept when its reason is final, its figure is still planned from the same URL
    and member, and no image appeared since. Everything else (passing errors, problems of the
    plan, which are recomputed) is dropped so the file never lists a figure twice.

    Returns:
        ``pair_id → reason`` of the kept failures (not retried in this run).
    """
    if not path.exists():
        return {}
    planned = {f.pair_id: f for j in plan.jobs for f in j.figures}
    kept: dict[str, dict] = {}
    if not retry_failed:
        for rec in read_jsonl(path):
            pid = rec.get("pair_id")
            fig = planned.get(pid) if isinstance(pid, str) else None
            if (fig is None or rec.get("reason") not in FINAL_REASONS
                    or rec.get("url") != fig.url or rec.get("member") != fig.member
                    or (out / f"{pid}.jpg").exists()):
                continue
            kept[pid] = rec
    if not kept:  # no empty failures.jsonl: the file exists only while it lists something
        path.unlink()
        return {}
    with atomic_write(path) as fh:
        for rec in kept.values():
            fh.write(_json_line(rec))
    return {pid: rec["reason"] for pid, rec in kept.items()}


def _json_line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


# -- one tarball -------------------------------------------------------------------------------------

def _extract_job(client: HttpClient, job: TarballJob, out: Path, tarball_dir: Path,
                 config: ExtractConfig) -> _JobOutcome:
    """Extract the figures of one tarball; every figure ends present, extracted or failed."""
    oc = _JobOutcome()
    todo: list[FigureRecord] = []
    for fig in job.figures:
        target = out / f"{fig.pair_id}.jpg"
        if target.exists() and (not config.check_existing or is_valid_jpeg(target)):
            oc.present += 1
        else:
            todo.append(fig)
    if not todo:
        return oc
    wanted: dict[str, list[FigureRecord]] = {}
    for fig in todo:
        wanted.setdefault(member_key(fig.member), []).append(fig)
    try:
        with _open_tarball(client, job.url, tarball_dir, config.keep_tarballs, oc) as fileobj:
            with tarfile.open(fileobj=fileobj, mode="r|gz", bufsize=1 << 16) as tf:
                for member in tf:
                    key = member_key(member.name)
                    figs = wanted.get(key)
                    if figs is None:
                        continue
                    # Removed only once read: a member cut short by a corrupt archive stays owed
                    # and is reported with the archive's error below.
                    _extract_member(tf, member, figs, out, config, oc)
                    del wanted[key]
                    if not wanted:
                        break  # everything this tarball owes us is read: stop downloading it
    except HttpStatusError as exc:
        reason = "not-found" if exc.status in (404, 410) else "http-error"
        oc.failures += [_Failure(f, reason, exc.message) for figs in wanted.values() for f in figs]
        return oc
    except NetworkError as exc:
        if client.stop.is_set():
            raise
        oc.failures += [_Failure(f, "network-error", exc.message) for figs in wanted.values() for f in figs]
        return oc
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        detail = f"{job.url}: not a readable tar.gz ({type(exc).__name__}: {exc})"
        oc.failures += [_Failure(f, "corrupt-archive", detail) for figs in wanted.values() for f in figs]
        return oc
    for figs in wanted.values():
        for f in figs:
            oc.failures.append(_Failure(f, "member-missing", f"{job.url} has no member '{f.member}'"))
    return oc


def _extract_member(tf: tarfile.TarFile, member: tarfile.TarInfo, figs: list[FigureRecord],
                    out: Path, config: ExtractConfig, oc: _JobOutcome) -> None:
    """Read one wanted member, make it a JPEG and write it for every figure that names it."""
    where = f"{figs[0].url} member '{member.name}'"
    if not member.isfile():
        kind = "link" if (member.issym() or member.islnk()) else "folder" if member.isdir() else "special file"
        oc.failures += [_Failure(f, "member-missing", f"{where} is a {kind}, not a file") for f in figs]
        return
    if member.size > config.max_member_bytes:
        oc.failures += [_Failure(f, "too-large", f"{where} is {member.size:,} bytes, over the "
                                 f"{config.max_member_bytes:,}-byte limit") for f in figs]
        return
    fh = tf.extractfile(member)
    assert fh is not None  # a regular file always has a reader
    data = fh.read()
    try:
        jpeg, fmt = to_jpeg(data, quality=config.jpeg_quality)
    except ImageRejected as exc:
        oc.failures += [_Failure(f, exc.reason, f"{where}: {exc.detail}") for f in figs]
        return
    for f in figs:
        atomic_write_bytes(out / f"{f.pair_id}.jpg", jpeg)
        oc.extracted += 1
        oc.converted += int(fmt not in ("JPEG", "MPO"))


@contextlib.contextmanager
def _open_tarball(client: HttpClient, url: str, tarball_dir: Path, keep: bool,
                  oc: _JobOutcome) -> Iterator[IO[bytes]]:
    """A readable tar.gz: the HTTP stream itself, or a kept local copy (downloaded if needed)."""
    if keep:
        path = _tarball_path(tarball_dir, url)
        if not path.exists():
            res = client.download(url, path)
            oc.bytes += res.downloaded
        oc.fetched = True
        with open(path, "rb") as fh:
            yield fh
        return

    def count(n: int) -> None:
        oc.bytes += n

    with client.open_stream(url, progress=count) as stream:
        oc.fetched = True
        yield stream  # type: ignore[misc]  # ResumableStream implements read()
