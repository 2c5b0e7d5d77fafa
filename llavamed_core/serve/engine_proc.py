"""The engine in a process of its own: the model and the decode loop apart from the HTTP server.

The split vLLM V1 makes between its API server and its EngineCore: the API process parses
requests, decodes images, renders prompts and tokenises (with a :class:`~llavamed_core.infer.
engine.Preparer` built from the engine's own processor); the engine process (``spawn``) runs the
continuous-batching :class:`~.scheduler.BatchScheduler` over the model and nothing else, so the
HTTP event loop never competes with the decode loop for one interpreter lock.

They talk through two ``multiprocessing`` queues: ``submit``/``cancel``/``close`` go down;
``ready``/``failed`` (once, after loading), then ``delta``/``done``/``error`` per job come up,
each ``done``/``error`` with the scheduler's counters (with several API processes, a ``stats``
event brings the others the counters too), and ``closed`` last. The events of one round of the decode
loop (a prefill and a step) travel as one message, and prepared tensors as numpy arrays pickled
inline: per-event messages and torch's shared-memory tensors (a file descriptor handed over
through a fresh authenticated socket each) cost more than the work of a small model's request.
The engine process produces token ids only; the API process detokenises them, as vLLM V1's
output processor does: a reader thread turns each job's ids into text with a
:class:`~llavamed_core.infer.detok.TextAssembler` (the class the engine itself uses in-process),
checks the stop strings there (a stop string cancels the engine's row, which is freed at its
next step) and hands text deltas and results to the job's sink, the same ``sink(kind, payload)``
the in-process scheduler calls. The engine streams ids for a streamed request or one with stop
strings; any other request's ids come once, with its result, and are decoded once.

If the engine process dies, every request in flight gets :class:`EngineDied` (503), the reason
is logged once, and :attr:`EngineProcess.failure` says so (``/health`` 503, new requests 503):
never a hang.

Several API processes (``--api-processes N``, as vLLM's ``--api-server-count``) may share one
engine process: :class:`SharedEngine` holds its inbox (one queue every API process puts on) and
one outbox per API process; API process ``i`` numbers its jobs ``i (mod N)``, so the engine
process sends each job's events to the outbox of the process that submitted it. API process 0
owns the engine process (starts and closes it); the others are attached through an
:class:`EngineLink` and learn of the engine's death from a pipe only the engine process holds
open (end of file once it is gone), since only a parent may wait for its child.

Use (what :class:`~.native.NativeBackend` does when no engine is handed to it)::

    proc = EngineProcess(config)
    preparer = proc.start()              # blocks until the model is loaded in the child
    job = proc.submit(prepared_request, sink, stream=True)
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LlavamedError, ModelError
from .config import ServeConfig
from .scheduler import Job, QueueFull, SchedulerClosed, SchedulerStats

__all__ = ["EngineProcess", "EngineDied", "RemoteJob", "SharedEngine", "EngineLink"]

log = logging.getLogger("llavamed.serve")

_POLL_S = 0.5
"""How often the API side checks that the engine process still runs while it waits."""


class EngineDied(Exception):
    """The engine process stopped; the request cannot be answered."""


@dataclass
class RemoteJob(Job):
    """A job whose request runs in the engine process; :meth:`cancel` tells that process."""

    job_id: int = 0
    on_cancel: Any = field(default=None, repr=False)
    asm: Any = field(default=None, repr=False)
    """The :class:`~llavamed_core.infer.detok.TextAssembler` turning the engine's ids into text."""

    def cancel(self) -> None:
        """Give up on this job: dropped if queued, stopped at the next token if running."""
        if not self.cancelled and self.on_cancel is not None:
            self.on_cancel(self.job_id)
        self.cancelled = True


@dataclass
class EngineLink:
    """How API process ``index`` of ``count`` reaches the engine process they share."""

    down: Any
    """The engine process's inbox (every API process puts on it)."""
    up: Any
    """This API process's outbox from the engine process."""
    index: int
    """This API process (0 starts and closes the engine process)."""
    count: int
    """How many API processes share the engine process."""
    ups: list | None = None
    """Every API process's outbox (index 0 only: it hands them to the engine process)."""
    death: Any = None
    """Index 0: the write end of the death pipe, for the engine process to hold; the others: its
    read end, at end of file once the engine process is gone."""


class SharedEngine:
    """The queues and the death pipe of one engine process shared by ``count`` API processes
    (made by the first API process before it starts the others).

    Args:
        count: how many API processes.
    """

    def __init__(self, count: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.count = count
        self.down: Any = ctx.Queue()
        self.ups: list = [ctx.Queue() for _ in range(count)]
        self._death_r, self._death_w = ctx.Pipe(duplex=False)

    def link(self, index: int) -> EngineLink:
        """API process ``index``'s link (0: the owner's, with every outbox and the pipe's write end)."""
        if index == 0:
            return EngineLink(self.down, self.ups[0], 0, self.count, ups=self.ups, death=self._death_w)
        return EngineLink(self.down, self.ups[index], index, self.count, death=self._death_r)


class EngineProcess:
    """The API side of an engine process; submit jobs as to a :class:`~.scheduler.BatchScheduler`.

    Args:
        config: the server settings (model, device, batching, queue).
        link: with several API processes, this one's :class:`EngineLink` (index 0 starts the
            engine process; the others attach to it). ``None``: one API process, which starts it.
    """

    def __init__(self, config: ServeConfig, link: EngineLink | None = None):
        import multiprocessing as mp

        self.config = config
        self.max_queue = config.limits.max_queue
        self.stats = SchedulerStats()
        self.failure: str | None = None
        """Why the engine process stopped, once it did."""
        self.queued = 0
        """Requests waiting in the engine process for a row (as of its last report)."""
        self._ctx = mp.get_context("spawn")
        self._link = link
        self._owner = link is None or link.index == 0
        """Whether this API process starts (and closes) the engine process."""
        self._down: Any = self._ctx.Queue() if link is None else link.down
        self._up: Any = self._ctx.Queue() if link is None else link.up
        self._proc: Any = None
        self._pid: int | None = None
        self._jobs: dict[int, RemoteJob] = {}
        self._lock = threading.Lock()
        index, count = (0, 1) if link is None else (link.index, link.count)
        self._ids = itertools.count(index + count, count)  # i (mod count): the engine routes by it
        self._closing = False
        self._alive, self._alive_at = False, float("-inf")
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The engine process's id."""
        return self._proc.pid if self._proc is not None else self._pid

    def _engine_alive(self) -> bool:
        """Whether the engine process runs (asked of the OS by its parent, of the death pipe by
        the attached API processes)."""
        if self._owner:
            return self._proc is not None and self._proc.is_alive()
        return not self._link.death.poll()

    @property
    def alive(self) -> bool:
        """Whether the engine process runs and takes requests (asked of the OS at most every
        50 ms: every request asks, and the reader thread notices a death within ``_POLL_S``)."""
        if self.failure is not None or self._closing or self._reader is None:
            return False
        now = time.monotonic()
        if now - self._alive_at > 0.05:
            self._alive, self._alive_at = self._engine_alive(), now
        return self._alive

    def start(self) -> Any:
        """Start the engine process and wait until its model is loaded (blocking).

        Returns:
            A :class:`~llavamed_core.infer.engine.Preparer` on the engine's processor.

        Raises:
            ModelError: the model did not load (the child's error), or the process died.
        """
        from ..infer.engine import Preparer

        if self._owner:
            link = self._link
            ups, death = ([self._up], None) if link is None else (link.ups, link.death)
            self._proc = self._ctx.Process(target=_engine_main, args=(self.config, self._down, ups, death),
                                           name="llavamed-engine", daemon=True)
            self._proc.start()
            if death is not None:
                death.close()  # the engine process holds the only write end: EOF when it ends
            # Once loaded it leaves SIGTERM to this process; if this process exits without
            # closing it (an error), kill it before multiprocessing's exit waits for it.
            from multiprocessing.util import Finalize

            Finalize(self, _kill_if_alive, args=(self._proc,), exitpriority=10)
        # The "ready" message carries the engine's processor: unpickling it imports torch and
        # transformers (~5 s on a small CPU). Import them now, on another core, while the engine
        # process loads, instead of after it (this halves the start-up of a small model). The
        # message is read only once this is done: two threads importing the same package can
        # deadlock on its module locks.
        importer = threading.Thread(target=_import_for_processor, name="llavamed-import", daemon=True)
        importer.start()
        while True:
            if self._closing:  # the server stops while the model loads (close() ended the process)
                if self._proc is not None and self._proc.is_alive():  # (or came before it started)
                    self._proc.terminate()  # still loading: the default SIGTERM ends it
                    self._proc.join(5)
                _kill_if_alive(self._proc)
                raise SchedulerClosed()
            if importer.is_alive() and self._engine_alive():
                importer.join(_POLL_S)
                continue
            try:
                msg = self._up.get(timeout=_POLL_S)
            except queue.Empty:
                if self._closing:
                    continue  # ended at the top of the loop
                if not self._engine_alive():
                    import signal

                    if self._proc is not None and self._proc.exitcode == -signal.SIGTERM:
                        raise SchedulerClosed() from None  # a SIGTERM to the process group: stopping
                    code = f" with code {self._proc.exitcode}" if self._proc is not None else ""
                    raise ModelError(f"the engine process exited{code} while loading {self.config.model}",
                                     "rerun with LLAVAMED_DEBUG=1 for its traceback") from None
                continue
            if msg[0] == "failed":
                if self._proc is not None:
                    self._proc.join(10)
                raise _rebuild(msg[1])
            if msg[0] == "ready":
                info = msg[1]
                break
        self._pid = info["pid"]
        import copy

        # The reader thread detokenises with a tokenizer of its own (the preparation threads
        # encode with theirs).
        self._tokenizer = copy.deepcopy(info["processor"].tokenizer)
        self._stop_strings = list(info["stop_strings"])
        self._reader = threading.Thread(target=self._read, name="llavamed-engine-reader", daemon=True)
        self._reader.start()
        return Preparer(info["processor"], info["context_length"])

    def submit(self, request: Any, sink: Any, stream: bool = False) -> RemoteJob:
        """Send a prepared request to the engine process.

        Raises:
            QueueFull: ``max_queue`` requests wait beyond the rows of a full batch.
            SchedulerClosed: the server is shutting down.
            EngineDied: the engine process stopped.
        """
        if self._closing:
            raise SchedulerClosed()
        if self.failure is not None:
            raise EngineDied(self.failure)
        from ..infer.detok import TextAssembler
        from ..infer.engine import request_stops

        stops = request_stops(request.params, self._stop_strings)
        with self._lock:
            if len(self._jobs) >= self.max_queue + self.config.max_batch:
                raise QueueFull()
            job = RemoteJob(request=request, sink=sink, stream=stream, job_id=next(self._ids),
                            on_cancel=self._cancel, asm=TextAssembler(self._tokenizer, stops))
            self._jobs[job.job_id] = job
        # The engine streams ids for a client stream, and for stop strings (checked here).
        self._down.put(("submit", job.job_id, _to_wire(request), stream or bool(stops)))
        return job

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine process: queued requests get 503, running ones finish (up to ``timeout``).
        While the model still loads there is nothing to finish: the process is ended at once (a
        7B model can take minutes to load; Ctrl-C must not wait for it), and :meth:`start` raises
        :class:`~.scheduler.SchedulerClosed`."""
        if not self._owner:  # an attached API process: the engine process is not its to stop
            self._closing = True
            if self._reader is not None:
                self._reader.join(timeout)  # it stops at its next poll
            self._fail_all(SchedulerClosed())
            return
        if self._proc is None or self._closing:
            self._closing = True
            return
        self._closing = True
        if self._proc.is_alive() and self._reader is None:  # still loading
            self._proc.terminate()
            self._proc.join(5)
        elif self._proc.is_alive():
            self._down.put(("close",))
            self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)
        if self._reader is not None:
            self._reader.join(timeout)
        self._fail_all(SchedulerClosed())
        for q in (self._down, self._up):
            q.close()
            q.cancel_join_thread()

    # ------------------------------------------------------------------ internals
    def _cancel(self, job_id: int, stopped: bool = False) -> None:
        if self._engine_alive():
            self._down.put(("cancel", job_id, stopped))

    def _read(self) -> None:
        """Hand the engine process's events to their jobs until it closes or dies."""
        while True:
            if not self._owner and self._closing:  # (other processes' answers keep its outbox busy)
                return
            try:
                msg = self._up.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._engine_alive():
                    self._died()
                    return
                continue
            except (EOFError, OSError):
                self._died()
                return
            if msg[0] == "closed":
                return
            for event in msg[1] if msg[0] == "events" else (msg,):
                self._handle(event)

    def _handle(self, msg: tuple) -> None:
        """Deliver one ``delta``/``done``/``error`` event to its job, detokenising its ids (a
        ``stats`` event, sent to every API process when another's job finished, only brings the
        engine's counters up to date)."""
        kind = msg[0]
        job = self._jobs.get(msg[1])
        if kind == "delta":
            if job is not None and len(msg) > 3:  # the first: when its row started, and with how many
                job.started_at, job.batch_size = msg[3]
            if job is not None and self._take(job, msg[2]):
                self._finish(job, None)  # a stop string: answered here, the engine row cancelled
            return
        self.stats = SchedulerStats(**msg[3]["stats"])
        self.queued = msg[3]["queued"]
        if job is None:
            return
        job.started_at, job.finished_at, job.batch_size = msg[3]["timing"]
        if kind == "done":
            self._finish(job, msg[2])
        else:
            with self._lock:
                self._jobs.pop(job.job_id, None)
            _call(job, kind, _rebuild(msg[2]))

    def _take(self, job: RemoteJob, ids: list[int]) -> bool:
        """Add the engine's new token ids to a job's text, streaming what is safe; ``True`` when a
        stop string ended it."""
        asm = job.asm
        for token in ids:
            if asm.add(token):
                return True
        if job.stream:
            delta = asm.take_delta()
            if delta:
                _call(job, "delta", delta)
        return False

    def _finish(self, job: RemoteJob, result: Any) -> None:
        """Answer a job: from the engine's ``result`` (its ids), or at a stop string (``None``)."""
        from ..infer.engine import GenerationResult

        with self._lock:
            self._jobs.pop(job.job_id, None)
        if result is not None and result.token_ids is None:  # already text (not from this engine)
            _call(job, "done", result)
            return
        asm = job.asm
        if result is None:
            job.finished_at = time.monotonic()
            self._cancel(job.job_id, stopped=True)  # frees the row at the engine's next step
        else:
            seen = len(asm.ids)
            new = (result.token_ids or [])[seen:]
            if asm.stops and new:
                for token in new:
                    if asm.add(token):
                        break
            else:
                asm.ids.extend(new)  # nothing reads the text before the end: decode it once below
        text, rest = asm.finish()
        if job.stream and rest:
            _call(job, "delta", rest)
        # Ended here at a stop string: the engine's prompt is the prepared one, its length known.
        prompt = result.prompt_tokens if result is not None else len(job.request.prepared.input_ids)
        _call(job, "done", GenerationResult(text=text, finish_reason="stop" if asm.stopped else result.finish_reason,
                                            prompt_tokens=prompt, completion_tokens=len(asm.ids)))

    def _died(self) -> None:
        if self._closing:
            return
        code = f" (exit code {self._proc.exitcode})" if self._proc is not None else ""
        self.failure = f"the engine process stopped{code}; restart the server"
        log.error("%s; %d request(s) in flight get 503", self.failure, len(self._jobs))
        self._fail_all(EngineDied(self.failure))

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            _call(job, "error", exc)


def _import_for_processor() -> None:
    """Import the modules a pickled processor needs (a head start only: unpickling imports
    whatever is still missing, and reports any real failure)."""
    try:
        import transformers.image_processing_utils  # noqa: F401
        import transformers.models.llava.processing_llava  # noqa: F401
        import transformers.processing_utils  # noqa: F401
        import transformers.tokenization_utils_base  # noqa: F401
    except Exception:  # noqa: BLE001
        log.debug("early import failed", exc_info=True)


def _kill_if_alive(proc: Any) -> None:
    if proc is not None and proc.is_alive():
        proc.kill()
        proc.join(5)


def _call(job: Job, kind: str, payload: Any) -> None:
    try:
        job.sink(kind, payload)
    except Exception:  # a broken sink (closed event loop) must not stop the reader
        log.debug("could not deliver %s to a job", kind, exc_info=True)
        job.cancelled = True


def _to_wire(request: Any) -> Any:
    """``request`` with its prepared tensors as numpy arrays, pickled inline into the queue.

    A torch tensor put on a ``multiprocessing`` queue travels as a shared-memory file handed over
    through a fresh authenticated socket per tensor: per request, that costs more than the tensor.
    """
    import copy

    prepared = getattr(request, "prepared", None)
    if prepared is None or not prepared.tensors:
        return request
    wired = copy.copy(request)
    wired.prepared = copy.copy(prepared)
    wired.prepared.tensors = {k: v.numpy() if hasattr(v, "numpy") else v for k, v in prepared.tensors.items()}
    return wired


def _from_wire(request: Any) -> Any:
    """The request :func:`_to_wire` sent, its arrays back as torch tensors."""
    import numpy as np
    import torch

    prepared = getattr(request, "prepared", None)
    if prepared is not None and prepared.tensors:
        prepared.tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                            for k, v in prepared.tensors.items()}
    return request


def _describe(exc: BaseException) -> dict:
    """An exception as plain data (custom exceptions need not pickle)."""
    if isinstance(exc, LlavamedError):
        return {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint, "ours": True}
    if isinstance(exc, (SchedulerClosed, QueueFull)):  # QueueFull: the engine's queue, several API processes
        return {"type": type(exc).__name__, "message": "", "hint": None, "ours": False}
    return {"type": type(exc).__name__, "message": str(exc), "hint": None, "ours": False}


def _rebuild(info: dict) -> Exception:
    """The exception :func:`_describe` described (an unknown type becomes a ``RuntimeError``)."""
    from .. import errors

    if info["ours"]:
        cls = getattr(errors, info["type"], None)
        if isinstance(cls, type) and issubclass(cls, LlavamedError):
            return cls(info["message"], info["hint"])
        return ModelError(info["message"], info["hint"])
    if info["type"] == "SchedulerClosed":
        return SchedulerClosed()
    if info["type"] == "QueueFull":
        return QueueFull()
    return RuntimeError(f"{info['type']}: {info['message']}")


# ---------------------------------------------------------------------- the engine process
def _engine_main(config: ServeConfig, down: Any, ups: list, death: Any = None) -> None:
    """The engine process: load the model, then run jobs from ``down`` until told to close.

    ``ups`` holds one outbox per API process (job ``j``'s events go to ``ups[j % len(ups)]``);
    ``death`` is the write end of the pipe the other API processes watch (held, never written).
    """
    import contextlib
    import multiprocessing as mp
    import os
    import signal
    import sys

    from ..infer.engine import Engine
    from .scheduler import BatchScheduler

    # Ctrl-C reaches the whole process group: the API process handles it and closes this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = mp.parent_process()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.DEBUG if os.environ.get("LLAVAMED_DEBUG") else logging.INFO)
    try:
        engine = Engine.load(config.model, device=config.device, dtype=config.dtype,
                             attn_implementation=config.attn_implementation)
    except Exception as exc:  # reported to the API process, which stops the server with one line
        if not isinstance(exc, LlavamedError):
            logging.getLogger("llavamed.serve").debug("loading failed", exc_info=True)
            exc = ModelError(f"{config.model}: loading failed ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})",
                             "rerun with LLAVAMED_DEBUG=1 for the traceback")
        for up in ups:
            up.put(("failed", _describe(exc)))
        return
    outbox: list[tuple] = []  # events of this round, sent together by flush()
    outbox_lock = threading.Lock()
    n_up = len(ups)

    def flush() -> None:
        with outbox_lock:  # put under the lock: two flushing threads keep the events in order
            if not outbox:
                return
            if n_up == 1:
                ups[0].put(("events", outbox[:]))
            else:  # each API process gets its own jobs' events
                mine: dict[int, list] = {}
                last = None  # the counters after this round's last finished job
                for event in outbox:
                    mine.setdefault(event[1] % n_up, []).append(event)
                    if event[0] != "delta":
                        last = event[3]
                if last is not None:  # ... reach every process, so each one's /health is current
                    for i in range(n_up):
                        events = mine.setdefault(i, [])
                        if not (events and events[-1][0] != "delta" and events[-1][3] is last):
                            events.append(("stats", None, None, last))  # (no job: counters only)
                for i, events in mine.items():
                    ups[i].put(("events", events))
            outbox.clear()

    # The decode loop runs on this process's main thread, the thread that loaded the model (see
    # BatchScheduler's ``start``); a thread of its own receives the API process's messages.
    sched = BatchScheduler(engine, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                           join_wait_ms=config.join_wait_ms,
                           max_queue=config.limits.max_queue + config.max_batch, after_round=flush,
                           detokenize=False, start=False)  # the API process detokenises
    jobs: dict[int, Job] = {}

    def sink_for(job_id: int) -> Any:
        first = [True]

        def sink(kind: str, payload: Any) -> None:
            if kind == "delta":
                event: tuple = ("delta", job_id, payload)
                job = jobs.get(job_id)
                if first[0] and job is not None:  # when it started, for an answer a stop string may end
                    event += ((job.started_at, job.batch_size),)
                    first[0] = False
            else:
                job = jobs.pop(job_id, None)
                info = {"stats": asdict(sched.stats), "queued": sched.queued,
                        "timing": (job.started_at, job.finished_at, job.batch_size) if job else (None, None, 0)}
                event = (kind, job_id, payload if kind == "done" else _describe(payload), info)
            with outbox_lock:
                outbox.append(event)
        return sink

    def receive() -> None:
        """Hand the API process's messages to the scheduler until it says ``close``."""
        while True:
            try:
                msg = down.get(timeout=_POLL_S)
            except queue.Empty:
                if parent is not None and not parent.is_alive():  # the API process was killed
                    os._exit(0)  # nobody is left to answer: stop, running rows and all
                flush()  # events from outside the decode loop's rounds (a closing scheduler)
                continue
            except (EOFError, OSError):  # the API process's end of the queue is gone
                os._exit(0)
            if msg[0] == "submit":
                _, job_id, request, stream = msg
                request = _from_wire(request)
                try:
                    jobs[job_id] = sched.submit(request, sink_for(job_id), stream=stream)
                except (QueueFull, SchedulerClosed) as exc:
                    sink_for(job_id)("error", exc)
                    flush()
            elif msg[0] == "cancel":
                job = jobs.get(msg[1])
                if job is not None:
                    job.stopped_by_caller = bool(msg[2])
                    job.cancel()
            elif msg[0] == "close":
                sched.close()  # queued jobs get their error now; run() returns once rows finish
                flush()
                return

    def receive_or_die() -> None:
        """:func:`receive`; if it fails (a bug), the process exits: the API process then answers
        503 ``engine_died`` instead of waiting for answers that would never come."""
        try:
            receive()
        except BaseException:  # noqa: BLE001 - anything: a silent inbox would hang every request
            logging.getLogger("llavamed.serve").exception("the engine process could not read a message")
            os._exit(1)

    def on_sigterm(signum: int, frame: Any) -> None:
        # A SIGTERM to the whole process group (systemd's default, `timeout`) reaches this process
        # too: the API process, which holds the requests in flight, closes it once they finish.
        if parent is not None and parent.is_alive():
            return
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)  # (while loading, the default: nothing to finish)
    ready = {"processor": engine.processor, "context_length": engine.context_length,
             "stop_strings": list(engine.stop_strings), "pid": os.getpid()}
    for up in ups:
        up.put(("ready", ready))
    inbox = threading.Thread(target=receive_or_die, name="llavamed-engine-inbox", daemon=True)
    inbox.start()
    sched.run()  # returns once told to close and the running rows are done
    inbox.join(30)  # it hands the queued jobs their errors and sends them before it returns
    flush()
    for up in ups:
        up.put(("closed",))
    # Done: once the queues' feeder threads have sent everything, leave without the interpreter's
    # teardown of torch and transformers (~1.4 s on a small CPU), which the server's stop waits for.
    # (Bounded: the outbox of an API process that died can fill, and its feeder then waits forever.)
    def send_all() -> None:
        for up in ups:
            up.close()
            up.join_thread()

    sender = threading.Thread(target=send_all, name="llavamed-engine-send", daemon=True)
    sender.start()
    sender.join(5)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)
