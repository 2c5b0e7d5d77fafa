"""Options of the LLM client shared by ``instruct gen`` and ``eval gpt-score`` (``Annotated`` aliases).

Secrets have no option: ``OPENAI_API_KEY`` / ``AZURE_OPENAI_API_KEY`` are read from the environment
when the command runs, so ``--help`` can never show them. The endpoint options fall back to
``OPENAI_BASE_URL``, ``AZURE_OPENAI_ENDPOINT`` and ``OPENAI_API_VERSION`` at run time, too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

_PANEL = "LLM endpoint"

BaseUrlOpt = Annotated[Optional[str], typer.Option(
    "--base-url", rich_help_panel=_PANEL,
    help="OpenAI-compatible base URL (llavamed serve, vLLM: http://HOST:PORT/v1). Default: $OPENAI_BASE_URL, else api.openai.com.")]
AzureEndpointOpt = Annotated[Optional[str], typer.Option(
    "--azure-endpoint", rich_help_panel=_PANEL,
    help="Azure OpenAI endpoint (https://NAME.openai.azure.com); the model name is the deployment. Default: $AZURE_OPENAI_ENDPOINT.")]
ApiVersionOpt = Annotated[Optional[str], typer.Option(
    "--api-version", rich_help_panel=_PANEL, help="Azure API version. Default: $OPENAI_API_VERSION.")]
ProviderOpt = Annotated[str, typer.Option(
    "--provider", rich_help_panel=_PANEL,
    help="auto (Azure when an Azure endpoint is set and no --base-url), openai or azure. Keys come from $OPENAI_API_KEY / $AZURE_OPENAI_API_KEY.")]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", "-c", rich_help_panel=_PANEL,
                                             help="Requests in flight at once.")]
RpmOpt = Annotated[Optional[int], typer.Option("--rpm", rich_help_panel=_PANEL, help="Requests-per-minute limit.")]
TpmOpt = Annotated[Optional[int], typer.Option("--tpm", rich_help_panel=_PANEL, help="Tokens-per-minute limit.")]
MaxRetriesOpt = Annotated[int, typer.Option(
    "--max-retries", rich_help_panel=_PANEL,
    help="Retries per request on 429, 5xx, timeouts, dropped connections and malformed replies (not on 401/403).")]
BackoffOpt = Annotated[float, typer.Option(
    "--backoff", rich_help_panel=_PANEL,
    help="First retry delay in seconds, doubled each retry; a server's Retry-After wins.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", rich_help_panel=_PANEL, help="Seconds to wait for one response.")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", rich_help_panel=_PANEL,
                                                         help="Sampling temperature.")]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", rich_help_panel=_PANEL,
                                                     help="Completion-token limit per request.")]
PriceInOpt = Annotated[Optional[float], typer.Option("--price-in", rich_help_panel=_PANEL,
                                                     help="Price per 1M prompt tokens, for the cost estimate.")]
PriceOutOpt = Annotated[Optional[float], typer.Option("--price-out", rich_help_panel=_PANEL,
                                                      help="Price per 1M completion tokens, for the cost estimate.")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(
    "--cache-dir", rich_help_panel=_PANEL, help="Response cache folder. Default: $LLAVAMED_HOME/llm-cache (~/.cache/llavamed/llm-cache).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", rich_help_panel=_PANEL,
                                          help="Neither read nor write the response cache.")]


def usage_rows(usage: dict, elapsed_s: float) -> list[list]:
    """Summary-table rows for the client's usage counters."""
    rows = [["requests sent", usage["requests"]], ["retries", usage["retries"]],
            ["cache hits", usage["cache_hits"]], ["prompt tokens", usage["prompt_tokens"]],
            ["completion tokens", usage["completion_tokens"]]]
    if usage.get("cost") is not None:
        rows.append(["est. cost", f"{usage['cost']:.4f}"])
    rows.append(["time (s)", round(elapsed_s, 1)])
    return rows
