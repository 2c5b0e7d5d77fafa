"""Run the app under uvicorn: bind first (clear error if the port is taken), then serve until stopped.

The socket is bound before uvicorn starts so that a busy port is one clear error rather than a
uvicorn log line and ``sys.exit``, and so ``port=0`` picks a free port whose URL is known before
serving (:attr:`Server.url`, and the first log line, which tests and benchmarks read). The model loads in the
background after the server starts; if loading fails the server stops and the error is raised.

Slow clients are cut off: a connection that has not sent a whole request head (request line and
headers) ``header_timeout_s`` after it opened, or after its previous response, is closed
(uvicorn itself only times out idle keep-alive connections); the body has its own timeout in the
app (408).

Use::

    run_server(ServeConfig(model=Path("ckpt/tiny"), port=8000))   # blocks until Ctrl-C
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError, NetworkError
from ..model.hub import resolve_served_model
from .app import create_app
from .config import ServeConfig

__all__ = ["Server", "run_server", "bind_socket", "header_timeout_protocol"]

log = logging.getLogger("llavamed.serve")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6).

    Raises:
        NetworkError: the address is taken, not allowed or not on this machine.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise NetworkError(f"--host {host}: cannot resolve it ({exc.strerror})",
                           "use an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    family, _type, proto, _name, addr = infos[0]
    # The protocol must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on such sockets, and
    # without it Nagle's algorithm and delayed ACKs add ~40 ms to every response.
    sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise NetworkError(f"{host}:{port} is already in use",
                               "stop the other server or choose another --port") from None
        if exc.errno == errno.EACCES:
            raise NetworkError(f"{host}:{port}: permission denied",
                               "ports below 1024 need privileges; choose --port 8000 or higher") from None
        raise NetworkError(f"cannot listen on {host}:{port} ({exc.strerror})",
                           "check --host and --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request head is not complete
    ``timeout_s`` after the connection opened or its last response ended."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer: Any = None

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout_s, self._head_timeout)

        def _head_timeout(self) -> None:
            self._head_timer = None
            # IDLE: the peer has not finished a request line and headers since the timer started.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection from %s: no complete request head within %g s",
                         self.client[0] if self.client else "?", timeout_s)
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


class Server:
    """A bound, ready-to-run server: the socket is open (``url`` known) before :meth:`run`.

    Args:
        config: the server settings.
        engine_loader: builds the native engine (default: ``Engine.load``); tests pass one that
            returns an already loaded engine so several servers share it.
        log_level: uvicorn's own log level (our request log is the ``llavamed.serve`` logger).

    Raises:
        ConfigError: bad settings.
        ModelError: no checkpoint at ``config.model``.
        NetworkError: the address cannot be bound.
    """

    def __init__(self, config: ServeConfig, engine_loader: Callable[[], Any] | None = None,
                 log_level: str = "warning"):
        import uvicorn

        config.validate()
        model = resolve_served_model(config)  # a directory, or a Hub id org/name[@rev] fetched
        if not model.is_dir():
            raise ModelError(f"--model {model}: no such checkpoint directory",
                             "make one with `llavamed weights init --preset tiny --out ckpt/tiny`")
        if not (model / "config.json").is_file():
            raise ModelError(f"--model {model}: not a checkpoint (no config.json)",
                             "point --model at a checkpoint directory written by llavamed or transformers")
        self.config = config
        self.app = create_app(config, engine_loader=engine_loader)
        self.state = self.app.state.llavamed
        self._sock = bind_socket(config.host, config.port)
        host, port = self._sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        """The base URL, e.g. ``http://127.0.0.1:8000``."""
        self._uv = uvicorn.Server(uvicorn.Config(self.app, log_level=log_level, access_log=False,
                                                 log_config=None, timeout_graceful_shutdown=10,
                                                 lifespan="on",
                                                 http=header_timeout_protocol(config.limits.header_timeout_s)))
        self.state.on_fatal = self.stop

    def stop(self) -> None:
        """Ask the server to shut down (any thread); :meth:`run` then returns."""
        self._uv.should_exit = True

    def run(self) -> None:
        """Serve until stopped (Ctrl-C, SIGTERM, :meth:`stop`, or a failed model load).

        Raises:
            ModelError: loading the model failed.
        """
        log.info("serving %s (%s engine) on %s; web chat at %s/ ; loading the model...",
                 self.config.model_name, self.config.engine, self.url, self.url)
        try:
            self._uv.run(sockets=[self._sock])
        finally:
            self._sock.close()
        if self.state.error is not None:
            raise self.state.error
        if not self._uv.started:
            raise ConfigError("the server could not start (see the log above)")


def run_server(config: ServeConfig, engine_loader: Callable[[], Any] | None = None,
               log_level: str = "warning") -> None:
    """Serve ``config`` until interrupted (Ctrl-C / SIGTERM stop it gracefully).

    Args:
        config: the server settings.
        engine_loader: builds the native engine (default: ``Engine.load``).
        log_level: uvicorn's own log level.

    Raises:
        ConfigError: bad settings.
        ModelError: no checkpoint at ``config.model``, or loading it failed.
        NetworkError: the address cannot be bound.
    """
    Server(config, engine_loader=engine_loader, log_level=log_level).run()
