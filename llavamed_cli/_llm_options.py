"""Options of the LLM client shared by ``instruct gen`` and ``eval gpt-score``, defined once.

:func:`llm_options` gives a command every endpoint option (``Annotated`` aliases below) and hands
it the resulting :class:`~llavamed_core.llm.LLMConfig` as ``llm``. Each option's default is read
from the core: the ``LLMConfig`` field it sets, or the task's own request defaults
(``GEN_REQUEST`` / ``JUDGE_REQUEST``: model, temperature, max tokens), so no default is written
twice. Typer has no option groups shared between commands (click's decorator stacks), hence this
small signature-extending decorator.

Secrets have no option: ``OPENAI_API_KEY`` / ``AZURE_OPENAI_API_KEY`` are read from the environment
when the command runs, so ``--help`` can never show them. The endpoint options fall back to
``OPENAI_BASE_URL``, ``AZURE_OPENAI_ENDPOINT`` and ``OPENAI_API_VERSION`` at run time, too.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

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


MaxFailuresOpt = Annotated[Optional[int], typer.Option(
    "--max-failures", help="Stop and exit 1 once more than N requests have failed for good (default: no limit; "
                           "all failing always exits 1).")]

# (parameter, option alias, LLMConfig field) of every shared option, in --help order.
_SHARED: list[tuple[str, Any, str]] = [
    ("temperature", TemperatureOpt, "temperature"), ("max_tokens", MaxTokensOpt, "max_tokens"),
    ("base_url", BaseUrlOpt, "base_url"), ("azure_endpoint", AzureEndpointOpt, "azure_endpoint"),
    ("api_version", ApiVersionOpt, "api_version"), ("provider", ProviderOpt, "provider"),
    ("concurrency", ConcurrencyOpt, "concurrency"), ("rpm", RpmOpt, "rpm"), ("tpm", TpmOpt, "tpm"),
    ("max_retries", MaxRetriesOpt, "max_retries"), ("backoff", BackoffOpt, "backoff"),
    ("timeout", TimeoutOpt, "timeout"), ("price_in", PriceInOpt, "price_in"),
    ("price_out", PriceOutOpt, "price_out"), ("cache_dir", CacheDirOpt, "cache_dir"),
]


def llm_options(request: Mapping[str, Any], model_flags: tuple[str, ...], model_help: str) -> Callable:
    """Give a command the LLM endpoint options; it receives them as one ``llm: LLMConfig``.

    Args:
        request: the task's request defaults from the core (``model``, ``temperature``,
            ``max_tokens``); every other default is the ``LLMConfig`` field's.
        model_flags: the model option's names (``("--model", "-m")``, ``("--judge",)``).
        model_help: the model option's help.

    Returns:
        A decorator for a command function with an ``llm`` parameter (not an option). The options
        stand after the command's own, before ``--json``.
    """
    from llavamed_core.llm import LLMConfig

    defaults = {f.name: f.default for f in dataclasses.fields(LLMConfig) if f.default is not dataclasses.MISSING}
    defaults.update(request)
    kw = inspect.Parameter.KEYWORD_ONLY
    shared = [inspect.Parameter("model", kw, default=defaults["model"],
                                annotation=Annotated[str, typer.Option(*model_flags, help=model_help)])]
    shared += [inspect.Parameter(name, kw, annotation=alias, default=defaults[field]) for name, alias, field in _SHARED]
    shared.append(inspect.Parameter("no_cache", kw, annotation=NoCacheOpt, default=not defaults["use_cache"]))

    def decorate(fn: Callable) -> Callable:
        own = [p.replace(kind=kw) for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "llm"]
        cut = next((i for i, p in enumerate(own) if p.name == "json_out"), len(own))
        params = own[:cut] + shared + own[cut:]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {field: kwargs.pop(name) for name, _alias, field in _SHARED}
            llm = LLMConfig(model=kwargs.pop("model"), use_cache=not kwargs.pop("no_cache"), **values)
            return fn(llm=llm, **kwargs)

        command.__signature__ = inspect.Signature(params)  # what Typer reads the options from
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def usage_rows(usage: dict, elapsed_s: float) -> list[list]:
    """Summary-table rows for the client's usage counters."""
    rows = [["requests sent", usage["requests"]], ["retries", usage["retries"]],
            ["cache hits", usage["cache_hits"]], ["prompt tokens", usage["prompt_tokens"]],
            ["completion tokens", usage["completion_tokens"]]]
    if usage.get("cost") is not None:
        rows.append(["est. cost", f"{usage['cost']:.4f}"])
    rows.append(["time (s)", round(elapsed_s, 1)])
    return rows
