"""The one launcher: ``torchrun`` for training and for split evaluation, on one node or many, under Slurm.

Hand-written around ``torch.distributed.run`` because torchrun reports a failed process with a
traceback per rank, and knows nothing of Slurm's variables.

- :func:`resolve_spec` decides the world: ``--nproc/--gpus`` processes per node, and
  ``--nnodes/--node-rank/--master-addr/--master-port`` from the flags, else (under ``srun``) from
  Slurm's environment (:func:`slurm_settings`), else one node on this machine.
- :func:`torchrun_command` / :func:`launch` run ``python -m llavamed_core.launch TORCHRUN_ARGS -m
  MODULE ARGS``: every process runs ``MODULE`` (``llavamed_core.train`` with a config file,
  ``llavamed_core.eval.answers`` with a spec file) and reads its place from ``RANK``,
  ``WORLD_SIZE`` and ``LOCAL_RANK``.
- ``python -m llavamed_core.launch ARGS`` (:func:`main`) is torchrun, quiet: when a process fails it
  exits with that process's status and prints one line naming the rank and its log, instead of
  torchrun's traceback (``LLAVAMED_DEBUG=1`` keeps torchrun's report).
- :func:`redirect_rank_output` (called first thing in each process) sends a process's stdout and
  stderr to its own log file (``RANK_LOGS`` template) where the launcher asked for it.
- :func:`launch_training` is the training side: it writes the resolved :class:`TrainConfig` to
  ``<run dir>/launch_config.json`` (``launch_config.node<K>.json`` on node K > 0), runs ``-m
  llavamed_core.train`` on it and returns rank 0's result.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["LAUNCHED_ENV", "RANK_LOGS_ENV", "LaunchSpec", "resolve_spec", "slurm_settings", "expand_hostlist",
           "slurm_hostnames", "free_port", "torchrun_command", "launch", "redirect_rank_output", "rank_log",
           "launch_training", "LAUNCH_CONFIG", "launch_config_name", "main"]

LAUNCHED_ENV = "LLAVAMED_LAUNCHED"
"""Set (to ``cpu`` or ``cuda``) in the processes the launcher starts."""

RANK_LOGS_ENV = "LLAVAMED_RANK_LOGS"
"""``FIRST:TEMPLATE``: ranks ``>= FIRST`` write their output to ``TEMPLATE.format(rank=RANK)``."""

LAUNCH_CONFIG = "launch_config.json"
"""The resolved training configuration that every process of a launched run reads (in the run dir);
node K > 0 of a many-node run writes its own, ``launch_config.node<K>.json`` (:func:`launch_config_name`)."""

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchSpec:
    """How to start the distributed run (torchrun's flags).

    Attributes:
        nproc_per_node: processes on this machine.
        nnodes: machines in the run.
        node_rank: this machine's place (0 = the one whose first process is rank 0).
        master_addr: address of node 0 (its rendezvous store).
        master_port: port of node 0's rendezvous store.
        source: where the node settings came from: ``"flags"``, ``"slurm"`` or ``"default"``.
    """

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: str = "default"

    @property
    def world_size(self) -> int:
        """Processes over all nodes."""
        return self.nproc_per_node * self.nnodes


def free_port() -> int:
    """A TCP port free on this machine now (for a one-node run's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------ Slurm
def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("']' without '['")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError("'[' without ']'")
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _expand_one(name: str) -> list[str]:
    """``rack[1-2]-n[01,03]`` → rack1-n01, rack1-n03, rack2-n01, rack2-n03."""
    m = re.search(r"\[([^\[\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    values: list[str] = []
    for item in m.group(1).split(","):
        item = item.strip()
        lo, dash, hi = item.partition("-")
        if not re.fullmatch(r"\d+", lo) or (dash and not re.fullmatch(r"\d+", hi)):
            raise ValueError(f"'{item}' is not a number or a range of numbers")
        if not dash:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"range '{item}' runs backwards")
        width = len(lo)  # node[01-10]: zero-padded to the first bound's width
        values += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return [h for v in values for h in _expand_one(head + v + tail)]


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: ``node[01-03,07],gpu5`` → node01, node02, node03, node07, gpu5.

    Raises:
        ConfigError: the list does not follow Slurm's syntax.
    """
    try:
        hosts = [h for part in _split_top(nodelist) for h in _expand_one(part)]
    except ValueError as exc:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read it as a host list ({exc})",
                          "give --master-addr HOST (the first node's address)") from None
    if not hosts:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: no host in it", "give --master-addr HOST")
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """The hosts of a Slurm node list: ``scontrol show hostnames`` when it is on PATH, else :func:`expand_hostlist`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass  # fall back to our own reading of the list
    return expand_hostlist(nodelist)


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(str(env[name]).strip())
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r}: not a whole number", "is this a Slurm job step?") from None


def slurm_settings(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Node settings from Slurm's environment (empty outside a Slurm job step).

    ``nnodes`` from ``SLURM_STEP_NUM_NODES`` (srun), ``SLURM_JOB_NUM_NODES`` or ``SLURM_NNODES``;
    ``node_rank`` from ``SLURM_NODEID``; ``master_addr`` = the first host of ``SLURM_STEP_NODELIST``,
    ``SLURM_JOB_NODELIST`` or ``SLURM_NODELIST``; ``master_port`` = 20000 + ``SLURM_JOB_ID`` mod
    40000 (the same on every node of the job).

    Raises:
        ConfigError: a malformed value, or several tasks per node (one launcher per node starts
            all of that node's processes).
    """
    env = os.environ if env is None else env
    count_key = next((k for k in ("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") if env.get(k)), None)
    if count_key is None or not env.get("SLURM_NODEID"):
        return {}
    per_node = str(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") or "1")
    first = re.match(r"\s*(\d+)", per_node)
    if first and int(first.group(1)) > 1:
        raise ConfigError(f"Slurm starts {first.group(1)} tasks per node (tasks per node {per_node!r}); llavamed "
                          "starts the processes of a node itself",
                          "run one llavamed per node: srun --ntasks-per-node=1 llavamed …")
    out: dict[str, Any] = {"nnodes": _int_env(env, count_key), "node_rank": _int_env(env, "SLURM_NODEID")}
    nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)), None)
    if nodelist:
        out["master_addr"] = slurm_hostnames(nodelist)[0]
    if env.get("SLURM_JOB_ID"):
        out["master_port"] = 20000 + _int_env(env, "SLURM_JOB_ID") % 40000
    return out


def resolve_spec(nproc: int, nnodes: int | None = None, node_rank: int | None = None,
                 master_addr: str | None = None, master_port: int | None = None,
                 env: Mapping[str, str] | None = None) -> LaunchSpec:
    """The launch settings: the flags given, else Slurm's (under ``srun``), else one node here.

    A one-node run without ``--master-port`` takes a free port (several runs on one machine do
    not collide); a many-node run defaults to port 29500.

    Raises:
        ConfigError: counts below 1, or a node rank outside ``0 … nnodes-1``.
    """
    given = {k: v for k, v in (("nnodes", nnodes), ("node_rank", node_rank), ("master_addr", master_addr),
                               ("master_port", master_port)) if v is not None}
    slurm = slurm_settings(env)
    source = "slurm" if slurm else ("flags" if given else "default")
    settings = {**slurm, **given}  # the flags override Slurm's values
    n = int(settings.get("nnodes", 1))
    if nproc < 1:
        raise ConfigError(f"--gpus/--nproc {nproc}: must be at least 1")
    if n < 1:
        raise ConfigError(f"--nnodes {n}: must be at least 1")
    rank = int(settings.get("node_rank", 0))
    if not 0 <= rank < n:
        raise ConfigError(f"--node-rank {rank}: must be between 0 and {n - 1} (--nnodes {n})"
                          + (" (from Slurm's SLURM_NODEID)" if "node_rank" in slurm and node_rank is None else ""),
                          "give each machine its own rank, 0 on the machine at --master-addr")
    port = settings.get("master_port")
    if port is None:
        port = free_port() if n == 1 else DEFAULT_PORT
    if not 0 < int(port) < 65536:
        raise ConfigError(f"--master-port {port}: not a TCP port (1–65535)")
    return LaunchSpec(nproc, n, rank, str(settings.get("master_addr", "127.0.0.1")), int(port), source)


# --------------------------------------------------------------------------------------- launching
def torchrun_command(spec: LaunchSpec, module: str, module_args: list[str]) -> list[str]:
    """``python -m llavamed_core.launch --nproc_per_node … -m MODULE ARGS`` (torchrun, quiet on failure)."""
    return [sys.executable, "-m", "llavamed_core.launch", f"--nproc_per_node={spec.nproc_per_node}",
            f"--nnodes={spec.nnodes}", f"--node_rank={spec.node_rank}", f"--master_addr={spec.master_addr}",
            f"--master_port={spec.master_port}", "-m", module, *module_args]


def launch(spec: LaunchSpec, module: str, module_args: list[str], device: str = "cpu",
           env: dict[str, str] | None = None, rank_logs: str | None = None, first_logged_rank: int = 1,
           stderr: Any = None, wait: bool = True) -> Any:
    """Run ``MODULE ARGS`` in every process of ``spec`` under torchrun.

    Args:
        spec: the world (see :func:`resolve_spec`).
        module: the module each process runs (``python -m MODULE``).
        module_args: its arguments.
        device: ``"cpu"`` (gloo; the processes see no GPU) or ``"cuda"``; in :data:`LAUNCHED_ENV`.
        env: more environment variables for the processes.
        rank_logs: a path template with ``{rank}``: ranks ``>= first_logged_rank`` write their
            output there (:func:`redirect_rank_output`) and a failure names that file.
        stderr: where torchrun's own messages go (default: this process's stderr).
        wait: wait and return the exit status (else return the ``Popen``).
    """
    child_env = dict(os.environ, **(env or {}))
    child_env[LAUNCHED_ENV] = device
    if device == "cpu":
        child_env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes must not each put a model on cuda:0
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, spec.nproc_per_node))))
    if rank_logs:
        child_env[RANK_LOGS_ENV] = f"{first_logged_rank}:{rank_logs}"
    else:
        child_env.pop(RANK_LOGS_ENV, None)
    proc = subprocess.Popen(torchrun_command(spec, module, module_args), env=child_env, stderr=stderr)
    if not wait:
        return proc
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise


def rank_log(rank: int, env: Mapping[str, str] | None = None) -> Path | None:
    """The log file of ``rank`` where the launcher asked for one (:data:`RANK_LOGS_ENV`), else ``None``."""
    value = (os.environ if env is None else env).get(RANK_LOGS_ENV, "")
    first, _, template = value.partition(":")
    if not template or not first.isdigit() or rank < int(first):
        return None
    return Path(template.format(rank=rank))


def redirect_rank_output() -> Path | None:
    """Point this process's stdout and stderr (file descriptors 1 and 2) at its rank's log file,
    where the launcher asked for one; returns the file. Call it first thing in a launched process."""
    log = rank_log(int(os.environ.get("RANK", "0") or 0))
    if log is None:
        return None
    for attempt in range(3):  # the folder is shared: another node may remove it while empty
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return log


def main(argv: list[str]) -> int:
    """``python -m llavamed_core.launch ARGS``: torchrun with ``ARGS``; returns the run's exit status.

    When a process fails (rank 0 has already printed ``Error: …``), exits with its status; when
    another rank failed first, prints one line naming it and its log.
    """
    debug = os.environ.get("LLAVAMED_DEBUG", "") not in ("", "0", "false")
    if not debug:
        os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torch.distributed.elastic's own log lines
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not debug:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        if debug:
            raise
        rank, failure = exc.get_first_failure()
        first = exc.failures.get(0)
        if first is not None and first.exitcode > 0:
            rank, failure = 0, first  # rank 0 failed of itself (not stopped by the launcher): it has said why
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        if rank != 0:  # another rank failed first: name it and its log
            log = rank_log(rank)
            how = f"exit status {failure.exitcode}" if failure.exitcode >= 0 else f"signal {-failure.exitcode}"
            sys.stderr.write(f"Error: process of rank {rank} failed ({how})"
                             + (f"; its log: {log}" if log is not None else "") + "\n"
                             "Hint: read its log, or rerun with LLAVAMED_DEBUG=1 to see every process's traceback\n")
        return code
    except (KeyboardInterrupt, SignalException) as exc:  # Ctrl-C, or the parent stopping the run
        if debug:
            raise
        return 128 + int(getattr(exc, "sigval", 2))
    return 0


# ---------------------------------------------------------------------------------------- training
def launch_config_name(node_rank: int) -> str:
    """The launch configuration's file name on node ``node_rank``: :data:`LAUNCH_CONFIG` on node 0
    (and on one node), ``launch_config.node<K>.json`` on node K, so that nodes sharing a run dir
    (one file system) each keep and remove their own."""
    return LAUNCH_CONFIG if node_rank == 0 else f"launch_config.node{node_rank}.json"


def _node_ranks(spec: LaunchSpec) -> range:
    """The global ranks of this node's processes (torchrun's static rendezvous: node by node)."""
    return range(spec.node_rank * spec.nproc_per_node, (spec.node_rank + 1) * spec.nproc_per_node)


def launch_training(cfg: Any, spec: LaunchSpec, device: str) -> tuple[int, Any]:
    """Train ``cfg`` in the processes of ``spec``; returns ``(exit status, result)``.

    Writes the configuration to ``<run dir>/launch_config.json`` (``launch_config.node<K>.json`` on
    node K > 0; this node's processes read it), runs ``python -m llavamed_core.train`` under
    torchrun, and reads rank 0's :class:`~llavamed_core.train.TrainResult` back (``None`` on the
    other nodes, or after a failure, which rank 0 has already reported). Ranks other than 0 write
    their output to ``<run dir>/logs/rank<N>.log``. A successful run removes this node's config file
    and its ranks' logs; a failed one keeps them (beside its checkpoints, to resume).

    Nodes may share the run dir (an NFS ``--out``, several nodes on one machine): each creates what
    it needs and touches only its own files there, so they finish and tidy up in any order.
    """
    from .io import atomic_write_json
    from .train.config import config_to_dict

    run_dir = Path(cfg.resolved_run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / launch_config_name(spec.node_rank)
    atomic_write_json(config_file, config_to_dict(cfg))
    # Node-local (another node's launcher may share the run dir): rank 0 runs on this machine.
    scratch = tempfile.TemporaryDirectory(prefix="llavamed-result-")
    result_file = Path(scratch.name) / "result.json"
    logs = run_dir / "logs"
    code = 1
    try:
        code = launch(spec, "llavamed_core.train", [str(config_file), "--result", str(result_file)],
                      device=device, rank_logs=str(logs / "rank{rank}.log"), first_logged_rank=1)
        result = None
        if code == 0 and result_file.exists():
            from .train.run import TrainResult

            data = json.loads(result_file.read_text(encoding="utf-8"))
            for key in ("out", "config_path", "resumed_from", "projector_path"):
                if data.get(key) is not None:
                    data[key] = Path(data[key])
            result = TrainResult(**data)
    finally:
        scratch.cleanup()
        if code == 0:
            _tidy_run_dir(run_dir, config_file, [logs / f"rank{r}.log" for r in _node_ranks(spec) if r >= 1])
    return code, result


def _tidy_run_dir(run_dir: Path, config_file: Path, rank_logs: list[Path]) -> None:
    """After a successful run, remove this node's launcher files (its config file and its ranks'
    logs), then the logs folder and the run dir when nothing else is left in them.

    Never lists the run dir or the logs folder, and never fails: other nodes sharing the run dir
    remove their own files and the same empty folders at the same time (a run that trained must not
    fail on a file another node already removed). A failed run keeps the files beside its checkpoints:
    the config it ran and the ranks' logs.
    """
    for p in (config_file, *rank_logs):
        with contextlib.suppress(OSError):
            p.unlink(missing_ok=True)
    for d in (run_dir / "logs", run_dir):
        with contextlib.suppress(OSError):  # not empty (another node's files), or already gone
            d.rmdir()


if __name__ == "__main__":
    from .quick_exit import freeze_objects_at_exit

    freeze_objects_at_exit()
    sys.exit(main(sys.argv[1:]))
