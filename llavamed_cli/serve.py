"""``llavamed serve``: the OpenAI-compatible API and web chat page for a checkpoint.

Run: ``llavamed serve --model ckpt/tiny`` then open http://127.0.0.1:8000/ or point any OpenAI
client at ``http://127.0.0.1:8000/v1``. Logs (one line per request) go to stderr.
"""

from __future__ import annotations

import os
import shlex
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import _console
from ._errors import _debug
from ._options import DeviceOpt, DtypeOpt

_API = "API"
_LIMITS = "Limits"
_BATCH = "Batching"
_VLLM = "vLLM engine"


class EngineName(str, Enum):
    """The engines ``serve`` runs (a real choice: help lists them, Tab completes them)."""

    native = "native"
    vllm = "vllm"


def serve_command(
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Checkpoint directory (default: the configured model, see `llavamed config show`).")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 = every interface; mind --api-key).", rich_help_panel=_API)] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 = any free port).", rich_help_panel=_API)] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' (default: $LLAVAMED_API_KEY; none = no auth).", show_default=False, rich_help_panel=_API)] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="Model name clients send (default: the checkpoint folder's name).", rich_help_panel=_API)] = None,
    engine: Annotated[EngineName, typer.Option(help="native (our engine, batched) or vllm (vLLM's server behind ours).", rich_help_panel=_API)] = "native",
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    max_batch: Annotated[int, typer.Option(help="Most requests generated together (1 = no batching).", rich_help_panel=_BATCH)] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="How long the first request on an idle engine waits for others to join it, ms.", rich_help_panel=_BATCH)] = 10.0,
    join_wait_ms: Annotated[float, typer.Option(help="While requests run, how long newcomers wait for others before joining the batch together, ms.", rich_help_panel=_BATCH)] = 25.0,
    max_queue: Annotated[int, typer.Option(help="Most requests waiting; more get 429.", rich_help_panel=_BATCH)] = 256,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, MiB (more: 413).", rich_help_panel=_LIMITS)] = 20.0,
    max_image_pixels: Annotated[int, typer.Option(help="Largest image, width x height (checked from the header, before decoding).", rich_help_panel=_LIMITS)] = 4096 * 4096,
    max_image_side: Annotated[int, typer.Option(help="Largest image width or height, pixels.", rich_help_panel=_LIMITS)] = 8192,
    max_image_aspect: Annotated[float, typer.Option(help="Largest image aspect ratio (long side / short side).", rich_help_panel=_LIMITS)] = 20.0,
    max_image_mb: Annotated[float, typer.Option(help="Largest encoded image, MiB.", rich_help_panel=_LIMITS)] = 16.0,
    max_images: Annotated[int, typer.Option(help="Most images per request.", rich_help_panel=_LIMITS)] = 4,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask (also the default).", rich_help_panel=_LIMITS)] = 2048,
    max_n: Annotated[int, typer.Option(help="Most choices (n) a request may ask; each is generated as its own request.", rich_help_panel=_LIMITS)] = 8,
    allow_remote_images: Annotated[bool, typer.Option(help="Fetch http(s) image URLs (needs --allowed-domains).", rich_help_panel=_LIMITS)] = False,
    allowed_domains: Annotated[str, typer.Option(help="Comma-separated hosts remote images may come from (subdomains included; '*' = any).", rich_help_panel=_LIMITS)] = "",
    remote_image_timeout: Annotated[float, typer.Option(help="Seconds to download one remote image.", rich_help_panel=_LIMITS)] = 10.0,
    header_timeout: Annotated[float, typer.Option(help="Seconds a client may take to send its request headers.", rich_help_panel=_LIMITS)] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds a client may take to send its request body (then 408).", rich_help_panel=_LIMITS)] = 60.0,
    allow_host: Annotated[Optional[list[str]], typer.Option("--allow-host", help="Without --api-key, another Host name (and browser Origin) to accept besides localhost, IP addresses and --host; repeat or comma-separate; '*' = any.", show_default=False, rich_help_panel=_API)] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", help="A web origin whose pages may call the API from a browser (CORS), e.g. https://app.example.org; repeat or comma-separate; '*' = any. Default: no CORS.", show_default=False, rich_help_panel=_API)] = None,
    prep_workers: Annotated[int, typer.Option(help="Threads decoding images and tokenising prompts outside the generation thread.", rich_help_panel=_BATCH)] = 2,
    inline_prep_pixels: Annotated[int, typer.Option(help="Requests with at most this many image pixels in all are prepared on the event loop (cheaper than a thread hand-off on few cores); 0 sends every image to the --prep-workers threads (many cores).", rich_help_panel=_BATCH)] = 512 * 512,
    api_processes: Annotated[int, typer.Option(help="Processes answering HTTP (parsing, image decoding, tokenising) in front of the one engine process; more than 1 when one cannot keep a fast GPU busy.", rich_help_panel=_BATCH)] = 1,
    log_requests: Annotated[bool, typer.Option(help="Log request bodies (image data replaced by its size).")] = False,
    vllm_bin: Annotated[Optional[Path], typer.Option(help="The vllm executable (default: `vllm` on PATH).", rich_help_panel=_VLLM)] = None,
    tensor_parallel_size: Annotated[int, typer.Option(help="GPUs to split the model over (vLLM).", rich_help_panel=_VLLM)] = 1,
    gpu_memory_utilization: Annotated[float, typer.Option(help="Share of GPU memory vLLM may take.", rich_help_panel=_VLLM)] = 0.9,
    vllm_args: Annotated[str, typer.Option(help="More arguments for `vllm serve`, e.g. \"--max-model-len 4096\".", rich_help_panel=_VLLM)] = "",
) -> None:
    """Serve a checkpoint: OpenAI-compatible API (/v1/chat/completions, /v1/models, /health) and a web chat page at /."""
    engine = EngineName(engine).value  # the plain string from here on
    from llavamed_core.errors import ConfigError
    from llavamed_core.serve.config import RemoteImagePolicy, ServeConfig, ServeLimits, VllmConfig
    from llavamed_core.serve.server import run_server, setup_logging

    from ._config import model as configured_model

    model = configured_model(model, "serve")  # --model, LLAVAMED_MODEL, llavamed.toml, user file
    key = api_key if api_key is not None else os.environ.get("LLAVAMED_API_KEY") or None
    try:
        extra = shlex.split(vllm_args)
    except ValueError as exc:
        raise ConfigError(f"--vllm-args: {exc}", "quote it as one string, e.g. --vllm-args \"--max-model-len 4096\"") from None
    config = ServeConfig(
        model=model, host=host, port=port, api_key=key, served_model_name=served_model_name,
        engine=engine, device=device, dtype=dtype, max_batch=max_batch, max_wait_ms=max_wait_ms,
        join_wait_ms=join_wait_ms,
        limits=ServeLimits(max_body_bytes=int(max_body_mb * 1024 * 1024), max_image_pixels=max_image_pixels,
                           max_image_bytes=int(max_image_mb * 1024 * 1024), max_images=max_images,
                           max_tokens=max_tokens, max_n=max_n, max_queue=max_queue, max_image_side=max_image_side,
                           max_image_aspect=max_image_aspect, header_timeout_s=header_timeout,
                           body_timeout_s=body_timeout),
        allow_hosts=[h.strip() for v in (allow_host or []) for h in v.split(",") if h.strip()],
        cors_origins=[o.strip() for v in (cors_origin or []) for o in v.split(",") if o.strip()],
        prep_workers=prep_workers, inline_prep_pixels=inline_prep_pixels, api_processes=api_processes,
        remote_images=RemoteImagePolicy(allow=allow_remote_images, timeout_s=remote_image_timeout,
                                        allowed_domains=[d.strip() for d in allowed_domains.split(",") if d.strip()]),
        log_requests=log_requests,
        vllm=VllmConfig(bin=vllm_bin, tensor_parallel_size=tensor_parallel_size,
                        gpu_memory_utilization=gpu_memory_utilization, extra_args=extra),
    )
    if engine == "vllm":
        from llavamed_core.serve.vllm import check_vllm_checkpoint, find_vllm

        config.validate()
        check_vllm_checkpoint(config.model)  # a v1 linear projector: refuse before binding
        find_vllm(vllm_bin)  # fail now, before binding, with the install hint
    setup_logging()
    if key is None and host not in ("127.0.0.1", "localhost", "::1"):
        _console.warn(f"listening on {host} without --api-key: anyone who can reach it may use it")
    try:
        run_server(config)
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: say so, not "Error: interrupted"
        if _debug():
            raise
        import logging

        logging.getLogger("llavamed.serve").info("stopped (Ctrl-C)")
        raise typer.Exit(130) from None
