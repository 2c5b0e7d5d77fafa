"""``llavamed data extract``: PMC article tarballs → ``<pair_id>.jpg`` (parallel, streamed, resumable).

Run: ``llavamed data extract --urls data/llava_med_image_urls.jsonl --out data/images``
(``--only data/instruct/llava_med_instruct_60k.json`` for the figures one set needs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from .._options import JsonOpt
from . import app


@app.command("extract")
def extract(
    urls: Annotated[Path, typer.Option("--urls", help="llava_med_image_urls.jsonl (from `llavamed data download image-urls`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Images folder: <pair_id>.jpg and failures.jsonl.")],
    only: Annotated[Optional[list[Path]], typer.Option("--only", metavar="FILE", help="Conversation file whose figures to fetch (repeatable); default: all figures.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Fetch only the first N figures (a trial run).")] = None,
    mirror: Annotated[Optional[list[str]], typer.Option("--mirror", metavar="OLD=NEW", help="OLD=NEW: rewrite a tarball URL prefix (repeatable).")] = None,
    workers: Annotated[int, typer.Option(help="Tarballs fetched at the same time.")] = 8,
    keep_tarballs: Annotated[bool, typer.Option("--keep-tarballs", help="Keep each tarball (in --tarball-dir) and reuse kept ones.")] = False,
    tarball_dir: Annotated[Optional[Path], typer.Option(help="Where --keep-tarballs puts them (default: OUT/tarballs).")] = None,
    max_member_mb: Annotated[float, typer.Option(help="Members larger than this many MiB are refused (too-large).")] = 64.0,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Also retry figures an earlier run gave up on (404, member missing, ...).")] = False,
    trust_existing: Annotated[bool, typer.Option("--trust-existing", help="Skip existing images without decoding them.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when any figure could not be had.")] = False,
    retries: Annotated[int, typer.Option(help="Retries per request (backoff with jitter; Retry-After honoured).")] = 6,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the server's next bytes.")] = 60.0,
    json_out: JsonOpt = False,
) -> None:
    """Extract the figures named in the URL list from their PMC tarballs, as <pair_id>.jpg."""
    from llavamed_core.data.extract import FAILURE_REASONS, ExtractConfig, extract_figures, parse_mirror
    from llavamed_core.errors import DataError
    from llavamed_core.http import HttpConfig

    config = ExtractConfig(
        urls=urls, out=out, only=list(only or []), limit=limit,
        mirrors=[parse_mirror(m) for m in mirror or []], workers=workers,
        keep_tarballs=keep_tarballs, tarball_dir=tarball_dir,
        max_member_bytes=int(max_member_mb * 2**20), retry_failed=retry_failed,
        check_existing=not trust_existing,
        http=HttpConfig(retries=retries, read_timeout=timeout, pool_size=2))
    with _console.progress() as cb:
        result = extract_figures(config, cb)
    output = _console.Output(json_out)
    output.result(result.to_dict())
    rate = result.extracted / result.seconds if result.seconds > 0 else 0.0
    output.table(f"data extract → {out}", ["", "value"],
                 [["figures", result.figures], ["already there", result.present],
                  ["extracted", result.extracted], ["converted", result.converted],
                  ["failed", result.failed], ["tarballs fetched", result.tarballs_fetched],
                  ["downloaded (MB)", round(result.bytes_downloaded / 1e6, 2)],
                  ["time (s)", round(result.seconds, 2)], ["figures/s", round(rate, 2)]])
    if result.failures_by_reason:
        output.table("failures by reason", ["reason", "figures", "meaning"],
                     [[r, n, FAILURE_REASONS.get(r, "")] for r, n in result.failures_by_reason.items()])
        _console.info(f"Details: {result.failures_path}")
    if strict and result.failed:
        raise DataError(f"{result.failed:,} of {result.figures:,} figures could not be had "
                        f"(--strict); see {result.failures_path}",
                        "rerun to retry network failures (--retry-failed retries all), or try --mirror")
