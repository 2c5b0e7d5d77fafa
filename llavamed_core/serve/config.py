"""Settings of ``llavamed serve``: one dataclass, every field documented where it is defined.

The CLI fills a :class:`ServeConfig` from its flags; :func:`llavamed_core.serve.app.create_app`
and :func:`llavamed_core.serve.server.run_server` take it. The API key is read at run time (flag
or ``LLAVAMED_API_KEY``), never given a default that ``--help`` could print, and never logged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

__all__ = ["ServeLimits", "RemoteImagePolicy", "VllmConfig", "ServeConfig", "INLINE_PREP_PIXELS"]

_ORIGIN = re.compile(r"https?://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?")
"""A web origin as browsers send it in ``Origin``: scheme, host, optional port, no path."""

INLINE_PREP_PIXELS = 512 * 512
"""Default of ``--inline-prep-pixels``: most pixels (all images of a request together) prepared on
the event loop itself."""


@dataclass
class ServeLimits:
    """Safety caps applied to every request before it reaches the engine."""

    max_body_bytes: int = 20 * 1024 * 1024
    """Largest request body accepted (bytes); larger bodies get 413."""
    max_image_pixels: int = 4096 * 4096
    """Largest image accepted (width × height); checked from the header before decoding."""
    max_image_side: int = 8192
    """Largest width or height accepted (pixels); checked from the header before decoding."""
    max_image_aspect: float = 20.0
    """Largest ratio of the long side to the short side; checked from the header (a 2,000,000×8
    image is small in pixels but would be resized to millions of pixels wide)."""
    max_image_bytes: int = 16 * 1024 * 1024
    """Largest encoded image accepted (bytes), for data URLs and remote downloads alike."""
    max_images: int = 4
    """Most images one request may carry (all messages together)."""
    max_tokens: int = 2048
    """Largest ``max_tokens`` a request may ask for; also the default when it asks for none
    (clipped to what the context leaves)."""
    max_queue: int = 256
    """Most requests waiting for a batch slot; one more gets 429."""
    max_n: int = 8
    """Most choices (``n``) one request may ask for; more get 400. Each choice is generated as
    its own request, so ``n`` multiplies the work."""
    header_timeout_s: float = 10.0
    """Longest a client may take to send a request's headers (connection closed after it)."""
    body_timeout_s: float = 60.0
    """Longest a client may take to send a request's body, from its headers (408 after it)."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` on a non-positive limit."""
        for name in ("max_body_bytes", "max_image_pixels", "max_image_bytes", "max_images",
                     "max_tokens", "max_queue", "max_image_side", "max_image_aspect", "max_n"):
            if not getattr(self, name) >= 1:
                raise ConfigError(f"serve limit {name} must be at least 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"serve limit {name} must be positive, got {getattr(self, name)}")


@dataclass
class RemoteImagePolicy:
    """Whether and from where ``http(s)`` image URLs may be fetched by the server."""

    allow: bool = False
    """Fetch remote ``http(s)`` image URLs at all (off: such URLs get 400)."""
    allowed_domains: list[str] = field(default_factory=list)
    """Hosts that may be fetched (a host matches a domain or any of its subdomains); ``*`` = any."""
    timeout_s: float = 10.0
    """Whole-download timeout per image, seconds."""
    max_redirects: int = 3
    """Redirects followed, each one checked against ``allowed_domains`` again."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` when remote images are allowed without an allowlist."""
        if self.allow and not self.allowed_domains:
            raise ConfigError("--allow-remote-images needs --allowed-domains",
                              "name the hosts to fetch from, e.g. --allowed-domains "
                              "ncbi.nlm.nih.gov,example.org (or '*' for any host)")
        if self.timeout_s <= 0:
            raise ConfigError(f"remote image timeout must be positive, got {self.timeout_s}")

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` is on the allowlist (exact host or a subdomain of a listed one)."""
        host = host.lower().rstrip(".")
        for dom in self.allowed_domains:
            dom = dom.lower().strip().rstrip(".")
            if dom == "*" or host == dom or host.endswith("." + dom):
                return True
        return False


@dataclass
class VllmConfig:
    """How to launch vLLM's own OpenAI server behind ours (``--engine vllm``)."""

    bin: Path | None = None
    """The ``vllm`` executable (default: found on ``PATH``)."""
    tensor_parallel_size: int = 1
    """GPUs to split the model over (vLLM ``--tensor-parallel-size``)."""
    gpu_memory_utilization: float = 0.9
    """Share of GPU memory vLLM may take (vLLM ``--gpu-memory-utilization``)."""
    extra_args: list[str] = field(default_factory=list)
    """More arguments appended to ``vllm serve`` unchanged."""
    port: int | None = None
    """Port of the internal vLLM server on 127.0.0.1 (default: a free one)."""
    startup_timeout_s: float = 1800.0
    """How long to wait for vLLM's ``/health`` before giving up (loading a 7B model and
    capturing CUDA graphs takes minutes)."""


@dataclass
class ServeConfig:
    """Everything ``llavamed serve`` needs."""

    model: Path
    """Checkpoint directory (a standard HF Llava checkpoint)."""
    host: str = "127.0.0.1"
    """Interface to bind; the default keeps the server private to this machine."""
    port: int = 8000
    """TCP port to listen on (0 = any free port)."""
    api_key: str | None = field(default=None, repr=False)
    """Bearer token clients must send; ``None`` = no auth. Never printed or logged."""
    served_model_name: str | None = None
    """Name clients send as ``model`` (default: the checkpoint folder's name)."""
    engine: str = "native"
    """``native`` (our batched engine in this process) or ``vllm`` (vLLM behind our API)."""
    device: str | None = None
    """Device for the native engine (default: CUDA if present, else CPU)."""
    dtype: str | None = None
    """Weights dtype for the native engine (default: bf16 on CUDA, fp32 on CPU)."""
    attn_implementation: str | None = None
    """Attention kernel for the native engine (default: the best available)."""
    max_batch: int = 16
    """Most requests generated together in one batch (1 = no batching)."""
    max_wait_ms: float = 10.0
    """How long the first request on an idle engine waits for others to join it, milliseconds."""
    join_wait_ms: float = 25.0
    """While requests run, how long a newcomer waits for others before they are prefilled into the
    running batch together, milliseconds (each prefill stalls every running request)."""
    limits: ServeLimits = field(default_factory=ServeLimits)
    """Safety caps."""
    remote_images: RemoteImagePolicy = field(default_factory=RemoteImagePolicy)
    """Remote image URL policy."""
    log_requests: bool = False
    """Log each request body (image data replaced by its size)."""
    allow_hosts: list[str] = field(default_factory=list)
    """Without an API key, the ``Host`` names (and browser ``Origin`` hosts) accepted besides
    localhost, 127.0.0.1, [::1], IP addresses and ``host``; ``*`` = any (no DNS-rebinding defence)."""
    cors_origins: list[str] = field(default_factory=list)
    """Web origins (``https://app.example.org``) whose pages may call the API from a browser
    (CORS); ``*`` = any. Empty (the default): no CORS headers at all. Without an API key these
    origins also pass the ``Origin`` check."""
    prep_workers: int = 2
    """Threads that decode and preprocess images and tokenise prompts outside the generation
    thread (also the most images being decoded at once, which bounds their memory)."""
    inline_prep_pixels: int = INLINE_PREP_PIXELS
    """A request whose images hold at most this many pixels in all (and no DICOM/NIfTI) is prepared
    on the event loop, which on few cores is cheaper than a hand-off to a preparation thread;
    ``0`` sends every image to the threads (many cores: Pillow decodes in parallel there)."""
    api_processes: int = 1
    """Processes answering HTTP (parsing, image decoding, tokenising, detokenising) in front of
    the one engine process (native engine): more than 1 when one process's interpreter lock
    limits a fast GPU (vLLM's ``--api-server-count``)."""
    vllm: VllmConfig = field(default_factory=VllmConfig)
    """vLLM launch settings (``engine == "vllm"`` only)."""

    @property
    def model_name(self) -> str:
        """The name this server answers to in ``/v1/models`` and the ``model`` field."""
        return self.served_model_name or Path(self.model).resolve().name

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an impossible combination of settings."""
        if self.engine not in ("native", "vllm"):
            raise ConfigError(f"unknown engine {self.engine!r}", "use --engine native or --engine vllm")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must not be negative, got {self.max_wait_ms}")
        if self.join_wait_ms < 0:
            raise ConfigError(f"--join-wait-ms must not be negative, got {self.join_wait_ms}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0-65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty", "give a non-empty --api-key or LLAVAMED_API_KEY, or neither")
        if self.prep_workers < 1:
            raise ConfigError(f"--prep-workers must be at least 1, got {self.prep_workers}")
        if self.inline_prep_pixels < 0:
            raise ConfigError(f"--inline-prep-pixels must not be negative, got {self.inline_prep_pixels}",
                              "give 0 to prepare every image in the --prep-workers threads")
        if self.api_processes < 1:
            raise ConfigError(f"--api-processes must be at least 1, got {self.api_processes}")
        if self.api_processes > 1 and self.engine != "native":
            raise ConfigError("--api-processes above 1 needs --engine native",
                              "vLLM runs its own API servers: pass --vllm-args \"--api-server-count N\"")
        if self.vllm.tensor_parallel_size < 1:
            raise ConfigError("--tensor-parallel-size must be at least 1")
        if not 0 < self.vllm.gpu_memory_utilization <= 1:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
        for origin in self.cors_origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ConfigError(f"--cors-origin {origin!r} is not a web origin",
                                  "give scheme, host and optional port, no path: "
                                  "--cors-origin https://app.example.org (or '*' for any)")
        self.limits.validate()
        self.remote_images.validate()
