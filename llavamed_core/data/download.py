"""``data download``: fetch the released LLaVA-Med files in parallel, resumably, and verified.

Each file is streamed to ``DEST/<path>.part`` and renamed into place when complete
(:meth:`llavamed_core.http.HttpClient.download`); a killed run resumes with HTTP ``Range``. A
completed file's sha256 goes into ``DEST/MANIFEST.json``; later runs skip files whose size matches
the record, and ``verify=True`` re-hashes them against it (a mismatch is downloaded again).

Usage from Python::

    from llavamed_core.data.download import DownloadConfig, download_released
    report = download_released(DownloadConfig(dest=Path("data"), files=["instruct", "eval"]))
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError, LlavamedError, NetworkError
from ..http import HttpClient, HttpConfig, sha256_file
from ..progress import ProgressCallback
from ._folder import locked_folder, remove_stale_temporaries
from ..pool import map_unordered
from .manifest import DEFAULT_BASE_URL, LocalManifest, ReleasedFile, select_files

__all__ = ["DownloadConfig", "FileOutcome", "DownloadReport", "download_released", "file_url"]


@dataclass
class DownloadConfig:
    """What ``data download`` fetches and how.

    Attributes:
        dest: the folder the files go to (their paths under the base URL are kept).
        files: group names (``alignment``, ``instruct``, ``eval``, ``image-urls``), ``all``, or
            file names; empty means all.
        base_url: where the files are served (the authors' site, or a mirror).
        workers: files downloaded at the same time.
        verify: re-hash files already complete and compare with ``MANIFEST.json``.
        http: timeouts and retries.
    """

    dest: Path
    files: list[str] = field(default_factory=lambda: ["all"])
    base_url: str = DEFAULT_BASE_URL
    workers: int = 4
    verify: bool = False
    http: HttpConfig = field(default_factory=HttpConfig)


@dataclass
class FileOutcome:
    """What happened to one file.

    Attributes:
        path: its path under ``dest``.
        url: where it came from.
        status: ``downloaded``, ``resumed`` (continued from a ``.part``), ``present`` (already
            complete), ``verified`` (re-hashed and matched), ``re-downloaded`` (the local copy
            did not match its record), ``recorded`` (an existing file of the server's size, now
            hashed and recorded) or ``failed``.
        size: bytes on disk (``None`` when failed).
        sha256: its sha256 (``None`` when failed).
        seconds: wall time spent on it.
        transferred: bytes that came over the network for it.
        error: why it failed (``None`` otherwise).
    """

    path: str
    url: str
    status: str
    size: int | None = None
    sha256: str | None = None
    seconds: float = 0.0
    transferred: int = 0
    error: str | None = None


@dataclass
class DownloadReport:
    """The outcome of :func:`download_released`."""

    dest: Path
    files: list[FileOutcome]
    seconds: float

    @property
    def failed(self) -> list[FileOutcome]:
        """The files that could not be had."""
        return [f for f in self.files if f.status == "failed"]

    def to_dict(self) -> dict:
        """JSON-ready form (``--json``)."""
        return {"dest": str(self.dest), "seconds": round(self.seconds, 3),
                "failed": len(self.failed), "files": [asdict(f) for f in self.files]}


def file_url(base_url: str, path: str) -> str:
    """The URL of ``path`` under ``base_url`` (with or without a trailing slash)."""
    return base_url.rstrip("/") + "/" + path.lstrip("/")


def _check_disk(dest: Path, todo: list[ReleasedFile]) -> None:
    """Refuse to start when the published sizes of what is missing exceed the free space."""
    need = 0
    for f in todo:
        target = dest / f.path
        part = target.with_name(target.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        need += max(0, f.approx_size - have)
    free = shutil.disk_usage(dest).free
    if need > free:
        raise ConfigError(f"{dest}: not enough disk space: the files need about {need / 2**20:,.0f} MiB, "
                          f"{free / 2**20:,.0f} MiB are free",
                          "free some space, choose another --dest, or download fewer groups")


def download_released(config: DownloadConfig, progress: ProgressCallback | None = None) -> DownloadReport:
    """Download the selected released files into ``config.dest``.

    Files already complete are skipped (or re-hashed with ``verify``); partial files resume.
    A file that cannot be had (404, network failure after retries) is reported as ``failed``
    in the result rather than raised, so the others still finish.

    Args:
        config: what to fetch and how.
        progress: callback receiving per-file byte counts (task = the file's path).

    Returns:
        The :class:`DownloadReport` (files in table order).

    Raises:
        ConfigError: unknown file/group name, bad ``workers``, not enough disk space, or another
            run downloading into the same folder.
        DataError: an unreadable ``MANIFEST.json``.
    """
    if config.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {config.workers}")
    if not config.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"--base-url must be an http(s) URL, got '{config.base_url}'",
                          f"e.g. {DEFAULT_BASE_URL}")
    files = select_files(config.files)
    dest = Path(config.dest)
    dest.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with locked_folder(dest, "llavamed data download", "--dest"):
        # Temporary files of a killed run (manifest and .part state rewrites) are not resumable.
        for folder in {dest} | {(dest / f.path).parent for f in files}:
            if folder.is_dir():
                remove_stale_temporaries(folder)
        manifest = LocalManifest(dest)
        todo = [f for f in files if not _looks_complete(dest, f, manifest)]
        _check_disk(dest, todo)
        with HttpClient(config.http) as client:
            def one(f: ReleasedFile) -> FileOutcome:
                return _fetch_one(client, config, manifest, f, progress)

            outcomes = {o.path: o for _, o in map_unordered(one, files, config.workers, stop=client.stop)}
    return DownloadReport(dest, [outcomes[f.path] for f in files], time.monotonic() - started)


def _looks_complete(dest: Path, f: ReleasedFile, manifest: LocalManifest) -> bool:
    target = dest / f.path
    rec = manifest.get(f.path)
    return target.exists() and rec is not None and rec.get("size") == target.stat().st_size


def _fetch_one(client: HttpClient, config: DownloadConfig, manifest: LocalManifest,
               f: ReleasedFile, progress: ProgressCallback | None) -> FileOutcome:
    """Bring one file up to date; failures become a ``failed`` outcome."""
    url = file_url(config.base_url, f.path)
    target = Path(config.dest) / f.path
    t0 = time.monotonic()
    rec = manifest.get(f.path)
    status = "downloaded"
    try:
        if target.exists():
            size = target.stat().st_size
            if rec is not None and rec.get("size") == size:
                if not config.verify:
                    return FileOutcome(f.path, url, "present", size, rec.get("sha256"),
                                       time.monotonic() - t0)
                digest = sha256_file(target)
                expected = f.sha256 or rec.get("sha256")
                if digest == expected:
                    return FileOutcome(f.path, url, "verified", size, digest, time.monotonic() - t0)
                status = "re-downloaded"
            elif rec is not None:
                status = "re-downloaded"
            else:
                # A file that we did not record (copied in by hand, or an older tool's): adopt it
                # when it has the server's size (and the known checksum, if any).
                server_size = _server_size(client, url)
                if server_size == size:
                    digest = sha256_file(target)
                    if f.sha256 is None or digest == f.sha256:
                        manifest.record(f.path, url, size, digest)
                        return FileOutcome(f.path, url, "recorded", size, digest, time.monotonic() - t0)
                status = "re-downloaded"
        part = target.with_name(target.name + ".part")
        if status == "downloaded" and part.exists() and part.stat().st_size > 0:
            status = "resumed"
        res = client.download(url, target, sha256=f.sha256, progress=progress, task=f.path)
        if status == "resumed" and res.resumed_from == 0:
            status = "downloaded"  # the server could not resume; it was fetched whole
        manifest.record(f.path, url, res.size, res.sha256)
        return FileOutcome(f.path, url, status, res.size, res.sha256, time.monotonic() - t0,
                           res.downloaded)
    except LlavamedError as exc:
        if client.stop.is_set():
            raise
        return FileOutcome(f.path, url, "failed", seconds=time.monotonic() - t0, error=exc.message)


def _server_size(client: HttpClient, url: str) -> int | None:
    """The size the server announces for ``url`` (HEAD), or ``None``."""
    try:
        resp = client.request(url, method="HEAD")
    except NetworkError:
        return None
    with resp:
        length = resp.headers.get("Content-Length", "")
        return int(length) if length.isdigit() and resp.status_code == 200 else None

