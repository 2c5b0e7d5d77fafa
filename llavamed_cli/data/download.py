"""``llavamed data download``: fetch the released LLaVA-Med files (parallel, resumable, verified).

Run: ``llavamed data download instruct eval --dest data`` (``all`` by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from .._options import JsonOpt
from . import app


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


@app.command("download")
def download(
    what: Annotated[Optional[list[str]], typer.Argument(
        help="alignment, instruct, eval, image-urls, all, or file names such as "
             "llava_med_instruct_60k.json.", show_default="all")] = None,
    dest: Annotated[Path, typer.Option("--dest", "-d", help="Folder the files go to (their sub-folders kept).")] = Path("data"),
    base_url: Annotated[Optional[str], typer.Option(
        "--base-url", envvar="LLAVAMED_DATA_URL",
        help="Where the files are served (a mirror). Default: the authors' site.")] = None,
    workers: Annotated[int, typer.Option(help="Files downloaded at the same time.")] = 4,
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash complete files against MANIFEST.json; re-fetch mismatches.")] = False,
    retries: Annotated[int, typer.Option(help="Retries per request (backoff with jitter; Retry-After honoured).")] = 6,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server's next bytes.")] = 60.0,
    json_out: JsonOpt = False,
) -> None:
    """Download the released data files into --dest; rerun to resume or check them."""
    from llavamed_core.data.download import DownloadConfig, download_released
    from llavamed_core.data.manifest import DEFAULT_BASE_URL
    from llavamed_core.errors import NetworkError
    from llavamed_core.http import HttpConfig

    config = DownloadConfig(dest=dest, files=list(what or ["all"]), base_url=base_url or DEFAULT_BASE_URL,
                            workers=workers, verify=verify,
                            http=HttpConfig(retries=retries, read_timeout=timeout, pool_size=workers))
    with _console.progress() as cb:
        report = download_released(config, cb)
    output = _console.Output(json_out)
    output.result(report.to_dict())
    output.table(f"data download → {dest}", ["file", "size", "status", "time (s)"],
                 [[f.path.rsplit("/", 1)[-1], _size(f.size), f.status, round(f.seconds, 2)] for f in report.files])
    for f in report.failed:
        _console.warn(f"{f.path}: {f.error}")
    if report.failed:
        raise NetworkError(f"{len(report.failed)} of {len(report.files)} files could not be downloaded "
                           f"(first: {report.failed[0].error})",
                           "rerun the same command to retry (finished files are skipped, partial ones "
                           "resume); check --base-url / LLAVAMED_DATA_URL")
