"""Distributed training plumbing: world size, DeepSpeed/FSDP settings, the torchrun re-launch.

``llavamed train … --gpus N`` (or ``--nproc N`` on CPU, gloo backend) re-runs the same command
line under torchrun (``torch.distributed.run``) with N processes per node; the child processes see
:data:`LAUNCHED_ENV` and train instead of launching again. Each child is one rank of the Hugging
Face Trainer (DDP, DeepSpeed ZeRO or FSDP).

DeepSpeed configs ship with the package (``ds_configs/zero2.json``, ``zero3.json``): every batch,
precision and clipping value is ``"auto"`` so the Trainer fills it in from one source of truth, and
there is no ``optimizer`` section, so the Trainer's torch AdamW is used (DeepSpeed's CPU Adam
JIT-compiles a C++ extension for about a minute on first use).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DependencyError

__all__ = ["LAUNCHED_ENV", "WorldInfo", "world_info", "deepspeed_config", "fsdp_config",
           "LaunchSpec", "torchrun_command", "launch"]

LAUNCHED_ENV = "LLAVAMED_LAUNCHED"
"""Set (to ``cpu`` or ``cuda``) in the processes torchrun starts: they train instead of launching again."""

_DS_DIR = Path(__file__).with_name("ds_configs")


@dataclass(frozen=True)
class WorldInfo:
    """This process's place in a distributed run (all zeros/ones when run alone)."""

    world_size: int
    rank: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """True on the process that writes outputs and prints."""
        return self.rank == 0


def world_info() -> WorldInfo:
    """Read ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` as torchrun sets them."""
    return WorldInfo(int(os.environ.get("WORLD_SIZE", "1") or 1), int(os.environ.get("RANK", "0") or 0),
                     int(os.environ.get("LOCAL_RANK", "0") or 0))


def deepspeed_config(name_or_path: str) -> dict[str, Any]:
    """The DeepSpeed config for ``zero2``, ``zero3`` or a JSON file, as a dict.

    Raises:
        DependencyError: deepspeed is not installed.
        ConfigError: the file is missing or not JSON.
    """
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise DependencyError("--deepspeed needs the deepspeed package",
                              "pip install 'llavamed[deepspeed]' (DS_BUILD_OPS=0 keeps it quick)") from None
    path = _DS_DIR / f"{name_or_path}.json" if name_or_path in ("zero2", "zero3") else Path(name_or_path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed {name_or_path}: {path} not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--deepspeed {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def fsdp_config() -> dict[str, Any]:
    """FSDP2 settings: shard every decoder and vision-encoder layer (the model's ``_no_split_modules``).

    FSDP2 shards per parameter, so frozen (vision tower) and trained (language model) parameters
    may share a wrapped unit.
    """
    return {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}


@dataclass(frozen=True)
class LaunchSpec:
    """How to start the distributed run (torchrun's flags)."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def torchrun_command(spec: LaunchSpec, module_args: list[str], module: str = "llavamed_cli.main") -> list[str]:
    """The torchrun command line: ``python -m llavamed_core.train._torchrun … -m MODULE ARGS``
    (``torch.distributed.run`` with a quiet failure report, see :mod:`._torchrun`)."""
    if spec.nproc_per_node < 1 or spec.nnodes < 1:
        raise ConfigError("--gpus/--nproc and --nnodes must be at least 1")
    if not 0 <= spec.node_rank < spec.nnodes:
        raise ConfigError(f"--node-rank {spec.node_rank}: must be between 0 and {spec.nnodes - 1}")
    cmd = [sys.executable, "-m", "llavamed_core.train._torchrun", f"--nproc_per_node={spec.nproc_per_node}",
           f"--nnodes={spec.nnodes}", f"--node_rank={spec.node_rank}",
           f"--master_addr={spec.master_addr}", f"--master_port={spec.master_port}"]
    return [*cmd, "-m", module, *module_args]


def launch(spec: LaunchSpec, module_args: list[str], device: str = "cpu", env: dict[str, str] | None = None) -> int:
    """Run the command under torchrun and wait; returns its exit status.

    Args:
        spec: torchrun's settings.
        module_args: the command line for ``python -m llavamed_cli.main``.
        device: ``"cpu"`` (gloo) or ``"cuda"``; the children read it from :data:`LAUNCHED_ENV`.
        env: more environment variables for the children.

    The children inherit this environment plus :data:`LAUNCHED_ENV`; their stdout and stderr are
    this process's (only rank 0 prints).
    """
    child_env = dict(os.environ, **(env or {}))
    child_env[LAUNCHED_ENV] = device
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, spec.nproc_per_node))))
    proc = subprocess.Popen(torchrun_command(spec, module_args), env=child_env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
