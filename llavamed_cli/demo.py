"""``llavamed demo``: synthetic data → tiny model → eval → train align → train instruct → eval → chat, on a CPU."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import _console
from ._options import JsonOpt, OverwriteOpt


def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (data, checkpoints, results).")] = Path("llavamed-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A smaller, faster run that shows the pipeline but does not train long enough to learn.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data, the weights and the training order.")] = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Run the whole pipeline on synthetic data with a tiny model, on the CPU, in a few minutes."""
    from llavamed_core.demo import DEMO_METRICS, DemoConfig, run_demo

    cfg = DemoConfig(out=out, quick=quick, seed=seed, overwrite=overwrite)
    # Banner lines under 80 columns (a terminal would wrap them mid-word).
    _console.info(f"llavamed demo → {out}\n"
                  "synthetic data, a tiny model, train align + instruct on the CPU\n"
                  "note: the demo's settings (lr 1e-3 then 2e-3, batch 32, 12 instruct epochs,\n"
                  "large synthetic lesions) suit a tiny model; the paper's recipes are the\n"
                  f"`llavamed train` defaults. Library warnings go to {out / 'demo.log'}.")
    # Libraries the training step loads (DeepSpeed's accelerator probe) log to stdout; stdout
    # carries only the result here.
    with _console.progress() as cb, contextlib.redirect_stdout(sys.stderr):
        res = run_demo(cfg, progress=cb)
    from ._config import write_demo_project

    project = write_demo_project(out, res.paths)  # `cd OUT && llavamed chat IMAGE` uses its model
    output = _console.Output(json_out)
    output.result(res.to_dict())
    if output.json_mode:
        return  # the "try next" notes below are for a person

    def pct(v):
        return None if v is None else round(100 * v, 1)

    _console.print_table("llavamed demo: synthetic test set, before and after training (%)",
                         ["metric", "before", "after"],
                         [[label, pct(res.before[k]), pct(res.after[k])] for k, label in DEMO_METRICS.items()])
    s = res.sample
    _console.print_table("sample chat answer", ["image", "question", "answer", "truth"],
                         [[Path(s["image"]).name, s["question"], s["answer"], s["truth"]]])
    _console.print_table("time", ["step", "seconds"], [[k.replace("_", " "), v] for k, v in res.seconds.items()])
    p = res.paths
    _console.info("try next:\n"
                  f"  llavamed chat {s['image']} --model {p['instruct']}\n"
                  f"  llavamed eval vqa --model {p['instruct']} --dataset {p['test']} --out {out}/eval/again\n"
                  f"  llavamed serve --model {p['instruct']}")
    img = Path(s["image"])
    img = img.relative_to(out) if img.is_relative_to(out) else img
    _console.info(f"{project} points at these; in {out}, commands need no --model:\n"
                  f"  cd {out} && llavamed chat {img} --prompt \"…\"\n"
                  f"{out / 'README.txt'} says what each file is.")
