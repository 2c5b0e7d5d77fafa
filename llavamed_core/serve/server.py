"""Run the app under uvicorn: bind first (clear error if the port is taken), then serve until stopped.

The socket is bound before uvicorn starts so that a busy port is one clear error rather than a
uvicorn log line and ``sys.exit``, and so ``port=0`` picks a free port whose URL is known before
serving (:attr:`Server.url`, and the first log line, which tests and benchmarks read). The model loads in the
background after the server starts; if loading fails the server stops and the error is raised.

Slow clients are cut off: a connection that has not sent a whole request head (request line and
headers) ``header_timeout_s`` after it opened, or after its previous response, is closed
(uvicorn itself only times out idle keep-alive connections); the body has its own timeout in the
app (408).

With ``api_processes`` above 1 (native engine) this process also starts that many minus one
API processes (``spawn``), each running the same app on the same listening socket (the kernel
hands each new connection to one of them) and sharing this process's engine process
(:class:`~.engine_proc.SharedEngine`). They stop with this process (Ctrl-C, SIGTERM, or its death);
if one of them dies, this process logs it and stops the server, rather than serving on with
fewer processes.

Use::

    run_server(ServeConfig(model=Path("ckpt/tiny"), port=8000))   # blocks until Ctrl-C
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LlavamedError, ModelError, NetworkError
from ..model.hub import resolve_served_model
from .app import create_app
from .config import ServeConfig

__all__ = ["Server", "run_server", "bind_socket", "header_timeout_protocol", "setup_logging"]

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
        sock: a listening socket to serve on instead of binding one (an API process started by
            another, with ``link``).
        link: an API process's :class:`~.engine_proc.EngineLink` to the engine process it shares.

    Raises:
        ConfigError: bad settings.
        ModelError: no checkpoint at ``config.model``.
        NetworkError: the address cannot be bound.
    """

    def __init__(self, config: ServeConfig, engine_loader: Callable[[], Any] | None = None,
                 log_level: str = "warning", sock: socket.socket | None = None, link: Any = None):
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
        self.log_level = log_level
        self._shared: Any = None
        self._workers: list[Any] = []
        self._stopping = False
        self.failure: LlavamedError | None = None
        """Why the server stopped on its own (an API process died)."""
        if config.api_processes > 1 and link is None:
            if engine_loader is not None:
                raise ConfigError("--api-processes above 1 runs the model in an engine process of its own",
                                  "leave engine_loader unset")
            from .engine_proc import SharedEngine

            self._shared = SharedEngine(config.api_processes)
            link = self._shared.link(0)
            # The other API processes load this checkpoint, not the name it was fetched by.
            self._worker_config = dataclasses.replace(config, model=model)
        self.index = link.index if link is not None else 0
        self.app = create_app(config, engine_loader=engine_loader, engine_link=link)
        self.state = self.app.state.llavamed
        self.state.quiet = self.index > 0
        if self._shared is not None:
            self.state.before_close.append(self._stop_workers)
        self._sock = sock if sock is not None else bind_socket(config.host, config.port)
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
        self._stopping = True
        self._uv.should_exit = True

    def run(self) -> None:
        """Serve until stopped (Ctrl-C, SIGTERM, :meth:`stop`, a failed model load, or the death
        of one of its API processes).

        Raises:
            ModelError: loading the model failed.
            ConfigError: another API process died.
        """
        if self.index == 0:
            more = f", {self.config.api_processes} API processes" if self.config.api_processes > 1 else ""
            log.info("serving %s (%s engine%s) on %s; web chat at %s/ ; loading the model...",
                     self.config.model_name, self.config.engine, more, self.url, self.url)
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler
        # it found: with the default one the process would die by the signal, skipping the
        # interpreter's exit (multiprocessing's clean-up, hence "leaked semaphore" warnings).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
        try:
            if self._shared is not None:
                self._start_workers()
            if self.index > 0:
                # Another API process: the first answers /health ("loading") while the engine
                # loads. This one takes connections from the shared socket only once it can answer
                # them, or a client reached it first would get a 503 from a server that is ready.
                self.state.load_on_start = False
                self.state.load()
                if self.state.load_seconds is None:  # failed (the first process reports it), or
                    if self.state.error is not None:  # the server stopped while the model loaded
                        raise self.state.error
                    return
            self._uv.run(sockets=[self._sock])
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
            self._sock.close()
            self._stop_workers()  # when uvicorn did not get to its shutdown (a failed start)
        if self.state.error is not None:
            raise self.state.error
        if self.failure is not None:
            raise self.failure
        if not self._uv.started:
            raise ConfigError("the server could not start (see the log above)")

    # ------------------------------------------------------------------ several API processes
    def _start_workers(self) -> None:
        ctx = mp.get_context("spawn")
        for i in range(1, self.config.api_processes):
            proc = ctx.Process(target=_api_process_main, name=f"llavamed-api-{i}",
                               args=(self._worker_config, self._sock, self._shared.link(i), self.log_level),
                               daemon=True)
            proc.start()
            self._workers.append(proc)
        threading.Thread(target=self._watch_workers, name="llavamed-api-watch", daemon=True).start()

    def _watch_workers(self) -> None:
        """Stop the server if an API process dies while it serves (a death during loading is the
        load's failure, which this process reports; one found after it is still reported)."""
        while not self._stopping:
            time.sleep(0.25)
            dead = [p for p in self._workers if not p.is_alive()]
            if self._uv.should_exit:  # shutting down: the others stop taking connections now too
                for proc in self._workers:
                    if proc.is_alive():
                        proc.terminate()
                return
            if not dead or self._stopping or self.state.error is not None or not self.state.backend.ready:
                continue
            proc = dead[0]
            self.failure = ConfigError(f"API process {proc.name} exited with code {proc.exitcode}; "
                                       f"the server stopped", "see the log above; restart the server")
            log.error("%s exited with code %s; stopping the server", proc.name, proc.exitcode)
            self.stop()
            return

    def _stop_workers(self) -> None:
        """Stop the other API processes (before the engine process closes): SIGTERM lets each
        finish its requests, as this one does."""
        self._stopping = True
        for proc in self._workers:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + 15
        for proc in self._workers:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _api_process_main(config: ServeConfig, sock: socket.socket, link: Any, log_level: str) -> None:
    """An API process other than the first: serve the app on ``sock`` until told to stop, or
    until the first API process is gone."""
    # Ctrl-C reaches the whole process group: the first API process stops this one (SIGTERM),
    # after which uvicorn would raise the SIGINT again here as a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging()
    from ..quick_exit import freeze_objects_at_exit

    freeze_objects_at_exit()
    try:
        server = Server(config, log_level=log_level, sock=sock, link=link)
    except LlavamedError as exc:
        log.error("API process %d: %s", link.index, exc.message)
        sys.exit(1)
    parent = mp.parent_process()

    def watch_parent() -> None:
        while parent is None or parent.is_alive():
            time.sleep(0.5)
        server.stop()  # the first API process was killed: stop too
        if not server.state.backend.ready:  # still loading (before serving): end the load now
            server.state.backend.close()
        time.sleep(10)
        os._exit(1)

    threading.Thread(target=watch_parent, name="llavamed-parent-watch", daemon=True).start()
    try:
        server.run()
    except LlavamedError:
        sys.exit(1)  # the first API process reports a failed load


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record is emitted (a handler bound
    to the stream of the moment keeps writing to it after it is replaced or closed)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    """Plain timestamped lines on stderr for our request log and uvicorn's own messages
    (``LLAVAMED_DEBUG=1``: our debug lines too)."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    debug = os.environ.get("LLAVAMED_DEBUG", "") not in ("", "0", "false")
    for name in ("llavamed", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if debug and name == "llavamed" else logging.INFO)
        logger.propagate = False


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
