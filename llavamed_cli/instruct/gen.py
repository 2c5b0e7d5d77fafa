"""``llavamed instruct gen``: ask an LLM for a conversation about each figure, from its caption.

Example::

    export OPENAI_API_KEY=...
    llavamed instruct gen --input llava_med_instruct_fig_captions.json --output gen.jsonl \
        --max-size 1000 --inline-mentions --concurrency 16 --price-in 2.5 --price-out 10
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from llavamed_core.instruct.generate import GEN_REQUEST
from llavamed_core.llm import LLMConfig

from .. import _console
from .._llm_options import MaxFailuresOpt, llm_options, usage_rows
from .._options import JsonOpt
from . import app


@app.command("gen")
@llm_options(GEN_REQUEST, ("--model", "-m"), "Model name (Azure: deployment name).")
def gen(
    input_path: Annotated[Path, typer.Option("--input", "-i", help="Figure captions (llava_med_instruct_fig_captions.json, a JSON array, or JSONL).")],
    output_path: Annotated[Path, typer.Option("--output", "-o", help="Generations JSONL; appended, and a rerun resumes.")],
    llm: LLMConfig,
    max_size: Annotated[Optional[int], typer.Option("--max-size", help="Figures to take, round-robin across the domain lists (default: all).")] = None,
    inline_mentions: Annotated[bool, typer.Option("--inline-mentions", help="Also show the model the article sentences that mention the figure.")] = False,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="Replace the packaged prompt (same layout as llavamed_core/instruct/prompt.md).")] = None,
    max_failures: MaxFailuresOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Generate a multi-turn conversation about each figure from its caption (resumable)."""
    from llavamed_core.instruct import GenConfig, generate_instructions

    cfg = GenConfig(input=input_path, output=output_path, llm=llm, max_size=max_size,
                    inline_mentions=inline_mentions, prompt_file=prompt_file, max_failures=max_failures)
    with _console.progress() as cb:
        res = generate_instructions(cfg, progress=cb)
    if res.failed:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(res.failure_reasons.items()))
        _console.warn(f"{res.failed} figure(s) failed ({reasons}); listed in {res.failures_path}. "
                      "Rerun the same command to ask for them again.")
    out = _console.Output(json_out)
    out.result(res.to_dict())
    rows = [["output", str(res.output)], ["endpoint", f"{res.endpoint['url']} ({res.endpoint['provider']})"],
            ["model", llm.model], ["figures selected", res.selected], ["already in output", res.already_done],
            ["asked now", res.requested], ["answered", res.succeeded], ["failed", res.failed]]
    out.table("instruct gen", ["", "value"], rows + usage_rows(res.usage, res.elapsed_s))
