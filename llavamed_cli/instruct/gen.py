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

from .. import _console
from .._llm_options import (ApiVersionOpt, AzureEndpointOpt, BackoffOpt, BaseUrlOpt, CacheDirOpt,
                            ConcurrencyOpt, MaxRetriesOpt, MaxTokensOpt, NoCacheOpt, PriceInOpt,
                            PriceOutOpt, ProviderOpt, RpmOpt, TemperatureOpt, TimeoutOpt, TpmOpt,
                            usage_rows)
from .._options import JsonOpt
from . import app


@app.command("gen")
def gen(
    input_path: Annotated[Path, typer.Option("--input", "-i", help="Figure captions (llava_med_instruct_fig_captions.json, a JSON array, or JSONL).")],
    output_path: Annotated[Path, typer.Option("--output", "-o", help="Generations JSONL; appended, and a rerun resumes.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name (Azure: deployment name).")] = "gpt-4o",
    max_size: Annotated[Optional[int], typer.Option("--max-size", help="Figures to take, round-robin across the domain lists (default: all).")] = None,
    inline_mentions: Annotated[bool, typer.Option("--inline-mentions", help="Also show the model the article sentences that mention the figure.")] = False,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="Replace the packaged prompt (same layout as llavamed_core/instruct/prompt.md).")] = None,
    max_failures: Annotated[Optional[int], typer.Option("--max-failures", help="Stop and exit 1 once more than N requests have failed for good (default: no limit; all failing always exits 1).")] = None,
    temperature: TemperatureOpt = 0.7,
    max_tokens: MaxTokensOpt = 1024,
    base_url: BaseUrlOpt = None,
    azure_endpoint: AzureEndpointOpt = None,
    api_version: ApiVersionOpt = None,
    provider: ProviderOpt = "auto",
    concurrency: ConcurrencyOpt = 8,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_retries: MaxRetriesOpt = 5,
    backoff: BackoffOpt = 1.0,
    timeout: TimeoutOpt = 120.0,
    price_in: PriceInOpt = None,
    price_out: PriceOutOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Generate a multi-turn conversation about each figure from its caption (resumable)."""
    from llavamed_core.instruct import GenConfig, generate_instructions
    from llavamed_core.llm import LLMConfig

    llm = LLMConfig(model=model, provider=provider, base_url=base_url, azure_endpoint=azure_endpoint,
                    api_version=api_version, temperature=temperature, max_tokens=max_tokens,
                    concurrency=concurrency, rpm=rpm, tpm=tpm, max_retries=max_retries, backoff=backoff,
                    timeout=timeout, price_in=price_in, price_out=price_out, cache_dir=cache_dir,
                    use_cache=not no_cache)
    cfg = GenConfig(input=input_path, output=output_path, llm=llm, max_size=max_size,
                    inline_mentions=inline_mentions, prompt_file=prompt_file, max_failures=max_failures)
    with _console.progress() as cb:
        res = generate_instructions(cfg, progress=cb)
    if res.failed:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(res.failure_reasons.items()))
        _console.warn(f"{res.failed} figure(s) failed ({reasons}); listed in {res.failures_path}. "
                      "Rerun the same command to ask for them again.")
    if json_out:
        _console.print_json(res.to_dict())
        return
    rows = [["output", str(res.output)], ["endpoint", f"{res.endpoint['url']} ({res.endpoint['provider']})"],
            ["model", model], ["figures selected", res.selected], ["already in output", res.already_done],
            ["asked now", res.requested], ["answered", res.succeeded], ["failed", res.failed]]
    _console.print_table("instruct gen", ["", "value"], rows + usage_rows(res.usage, res.elapsed_s))
