"""``llavamed data prepare``: raw VQA-RAD / SLAKE / PathVQA release → train/val/test JSON + images.

Run: ``llavamed data prepare slake --src Slake1.0 --out data/slake``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _console
from .._options import JsonOpt, OverwriteOpt
from . import app


class Dataset(str, Enum):
    """The datasets ``prepare`` converts."""

    vqa_rad = "vqa-rad"
    slake = "slake"
    pathvqa = "pathvqa"


@app.command("prepare")
def prepare(
    dataset: Annotated[Dataset, typer.Argument(help="Which release: vqa-rad, slake or pathvqa.")],
    src: Annotated[Path, typer.Option("--src", help="Folder of the raw release (VQA-RAD: also its JSON file).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder: train.json, test.json, val.json, images/ (default: DATA/<dataset>, DATA the configured data_dir).")] = None,
    lang: Annotated[str, typer.Option(help="SLAKE question language: en, zh or all.")] = "en",
    strict: Annotated[bool, typer.Option("--strict", help="Fail when split counts differ from the published sizes.")] = False,
    max_bad: Annotated[int, typer.Option("--max-bad", help="Bad records to skip (and report) before failing.")] = 0,
    link: Annotated[bool, typer.Option("--link", help="Hard-link images instead of copying them.")] = False,
    follow_symlinks: Annotated[bool, typer.Option("--follow-symlinks", help="Copy images that are symbolic links out of the release's image folder (refused by default).")] = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Convert a raw VQA-RAD, SLAKE or PathVQA release to our conversation files and images/."""
    from llavamed_core.data.prepare import PrepareConfig, prepare_vqa

    if out is None:
        from .._config import folder

        out = folder("data_dir") / dataset.value
        _console.info(f"output: {out} (the data folder; `llavamed config show` says where it is set)")
    cfg = PrepareConfig(dataset=dataset.value, src=src, out=out, lang=lang, strict=strict,
                        max_bad=max_bad, overwrite=overwrite, link=link,
                        follow_symlinks=follow_symlinks)
    with _console.progress() as cb:
        result = prepare_vqa(cfg, progress=cb)
    expected = {(c.split, c.figure): c.expected for c in result.checks}
    for split in result.splits:
        bad = [c for c in result.mismatches if c.split == split]
        if bad:
            _console.warn(f"{split} differs from the published {result.dataset} release: "
                          + ", ".join(f"{c.figure} {c.got:,} (published {c.expected:,})" for c in bad))
    if result.skipped:
        _console.warn(f"skipped {result.skipped} bad record(s); first: {result.problems[0]}")
    output = _console.Output(json_out)
    output.result(result.to_dict())
    rows = []
    for split, s in result.splits.items():
        pub = expected.get((split, "questions"))
        ok = all(c.ok for c in result.checks if c.split == split)
        rows.append([split, s.questions, s.open, s.closed, s.images, s.skipped,
                     pub if pub is not None else "-",
                     "-" if pub is None else ("ok" if ok else "MISMATCH")])
    output.table(f"data prepare {result.dataset} ({result.source_kind}) → {result.out}",
                 ["split", "questions", "open", "closed", "images", "skipped", "published", "check"], rows)
