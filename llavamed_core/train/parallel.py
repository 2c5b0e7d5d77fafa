"""Distributed training plumbing: world size, DeepSpeed/FSDP settings, what ran (mechanism report).

``llavamed train … --gpus N`` (or ``--nproc N`` on CPU, gloo backend; ``--nnodes`` for several
machines) starts ``python -m llavamed_core.train CONFIG`` under torchrun through the one launcher,
:mod:`llavamed_core.launch`. Each process is one rank of the Hugging Face Trainer (DDP, DeepSpeed
ZeRO or FSDP2).

``--deepspeed`` and ``--fsdp`` in a single process (one GPU, or a CPU smoke run) go through the
same distributed code path as many: :func:`single_process_world` sets ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT`` for a world of one (else DeepSpeed looks for MPI and accelerate
skips FSDP), and undoes it afterwards.

FSDP2 wraps the model's repeated blocks — the vision encoder's layers and the language model's
decoder layers, found in the model itself (:func:`fsdp_wrap_classes`). accelerate shards with FSDP
only on accelerators; on CPU (gloo) it would silently fall back to DDP, so
:func:`engage_fsdp_on_cpu` switches the run to FSDP2 there.

After training, :func:`mechanism_report` records what actually ran (wrapper class, FSDP units and
DTensor parameters, DeepSpeed ZeRO stage, LoRA adapters, 4-bit layers); the result and
``<run dir>/mechanism.json`` carry it.

DeepSpeed configs ship with the package (``ds_configs/zero2.json``, ``zero3.json``): every batch,
precision and clipping value is ``"auto"`` so the Trainer fills it in from one source of truth, and
there is no ``optimizer`` section, so the Trainer's torch AdamW is used (DeepSpeed's CPU Adam
JIT-compiles a C++ extension for about a minute on first use).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError, DependencyError, TrainingError

__all__ = ["WorldInfo", "world_info", "deepspeed_config", "fsdp_config", "fsdp_wrap_classes",
           "layer_classes", "single_process_world", "engage_fsdp_on_cpu", "mechanism_report",
           "describe_mechanism", "check_gpu_count"]

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


def fsdp_config(wrap_classes: list[str]) -> dict[str, Any]:
    """FSDP2 settings: one sharded unit per layer of the classes named (see :func:`fsdp_wrap_classes`).

    Naming the classes matters: left out, accelerate takes the model's ``_no_split_modules``, which
    for Llava lists classes the model does not contain (``CLIPTextEmbeddings``) and stops. FSDP2
    shards per parameter, so frozen (vision tower) and trained parameters may share a unit.
    """
    return {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": list(wrap_classes)}


def layer_classes(model: Any) -> list[str]:
    """Class names of the model's repeated blocks: the items of its ``ModuleList``s that the model
    also lists as not to be split (for Llava: the vision encoder's and the decoder's layers)."""
    import torch

    no_split = set(getattr(model, "_no_split_modules", None) or [])
    names: list[str] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for child in module:
                name = type(child).__name__
                if (not no_split or name in no_split) and name not in names:
                    names.append(name)
    return names


def fsdp_wrap_classes(model_dir: str | os.PathLike) -> list[str]:
    """:func:`layer_classes` of the checkpoint in ``model_dir``, from a weightless (meta) copy.

    Raises:
        ConfigError: the model has no layers to shard.
    """
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    names = layer_classes(model)
    if not names:
        raise ConfigError(f"--fsdp: found no layers to shard in {model_dir}", "use --deepspeed zero3 instead")
    return names


_WORLD_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_LIBRARY_ENV = ("ACCELERATE_", "FSDP_")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def single_process_world(needed: bool) -> Iterator[bool]:
    """A distributed world of one process for the duration of the block, where none is set up.

    DeepSpeed and FSDP run through ``torch.distributed`` even alone: without ``RANK``/
    ``WORLD_SIZE`` DeepSpeed goes looking for MPI (``No module named 'mpi4py'``) and accelerate
    does not engage FSDP. This sets the variables torchrun would set for one process, and on
    leaving tears the process group down and restores the environment (so that several runs can
    follow one another in one Python process). Yields whether it set anything up.
    """
    if not needed or os.environ.get("WORLD_SIZE") or os.environ.get("LOCAL_RANK"):
        yield False
        return
    saved = {k: os.environ.get(k) for k in _WORLD_KEYS}
    # accelerate leaves ACCELERATE_USE_DEEPSPEED/ACCELERATE_USE_FSDP (and transformers FSDP_*) set.
    saved.update({k: v for k, v in os.environ.items() if k.startswith(_LIBRARY_ENV)})
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        yield True
    finally:
        _end_process_group()
        for k in [k for k in os.environ if k.startswith(_LIBRARY_ENV) and k not in saved]:
            del os.environ[k]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with contextlib.suppress(ImportError):
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        with contextlib.suppress(ImportError):
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()


def _end_process_group() -> None:
    """Destroy the default process group and DeepSpeed's references to it (its communicator and
    cached groups), so that a later run in this process starts from scratch."""
    import sys

    import torch.distributed as dist

    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if dist.is_available() and dist.is_initialized():
        if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        release = getattr(groups, "_release_process_group_references", None)
        if release is not None:
            release(None)
        else:  # older DeepSpeed: drop the cached groups by hand
            for name, value in list(vars(groups).items()):
                if name.startswith("_") and name.endswith("_GROUP"):
                    setattr(groups, name, {} if isinstance(value, dict) else None)
    if ds_comm is not None:
        ds_comm.cdb = None


def engage_fsdp_on_cpu(trainer: Any) -> None:
    """Make accelerate shard with FSDP2 on CPU processes (gloo), as it does on GPUs.

    accelerate enables FSDP only for accelerator devices; for ``use_cpu`` runs it keeps the plugin
    out of its state and wraps the model in ``DistributedDataParallel`` instead, without a word.
    FSDP2 itself runs on gloo, so this puts the Trainer's plugin back and marks the run as FSDP
    before anything is prepared.

    Raises:
        TrainingError: accelerate set up something else than a CPU or FSDP run.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = trainer.accelerator
    state = acc.state
    if state.distributed_type == DistributedType.FSDP:
        return
    if state.distributed_type != DistributedType.MULTI_CPU or trainer.args.fsdp_plugin_args is None:
        raise TrainingError(f"--fsdp: accelerate set up {state.distributed_type}, not FSDP",
                            "rerun with LLAVAMED_DEBUG=1 and report it")
    from accelerate.state import PartialState

    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    # Every later AcceleratorState() copies PartialState's fields over its own: set it there too.
    PartialState().distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def _part(name: str) -> str:
    for part in ("vision_tower", "multi_modal_projector", "language_model", "lm_head"):
        if part in name:
            return part
    return "other"


def mechanism_report(trainer: Any) -> dict[str, Any]:
    """What the training loop actually ran with, read from the prepared model after training.

    Keys: ``distributed`` (accelerate's type: ``FSDP``, ``DEEPSPEED``, ``MULTI_CPU`` = DDP on CPU,
    ``MULTI_GPU`` = DDP, ``NO``), ``world_size``, ``wrapper`` (class of the prepared model),
    ``fsdp_version`` and ``fsdp_units`` (sharded units by layer class), ``zero_stage``,
    ``params`` (parameter tensors), ``sharded_params`` (FSDP DTensors or ZeRO-3 partitions),
    ``trainable_params`` (trainable tensors), ``lora_layers`` (layers carrying LoRA adapters),
    ``trainable_outside_adapters`` (trainable tensors of a LoRA run that are neither adapters
    nor the projector's trained copy), ``linear_4bit`` (4-bit linear layers by model part).
    """
    from collections import Counter

    model = trainer.model_wrapped
    acc = trainer.accelerator
    report: dict[str, Any] = {"distributed": str(getattr(acc.distributed_type, "value", acc.distributed_type)),
                              "world_size": int(acc.num_processes), "wrapper": type(model).__name__,
                              "fsdp_version": None, "fsdp_units": {}, "zero_stage": None}
    if report["wrapper"] == "DeepSpeedEngine":
        report["zero_stage"] = int(model.zero_optimization_stage())
    module = getattr(model, "module", model)
    units: Counter = Counter()
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FSDPModule

        for m in module.modules():
            if isinstance(m, FSDPModule):
                name = type(m).__name__
                units[name[4:] if name.startswith("FSDP") else name] += 1
    if units:
        report["fsdp_version"] = 2
        report["fsdp_units"] = dict(sorted(units.items()))
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.5
        DTensor = ()  # noqa: N806
    params = sharded = trainable = 0
    outside: list[str] = []
    lora = any("lora_" in n for n, _ in module.named_parameters())
    for name, p in module.named_parameters():
        params += 1
        if isinstance(p, DTensor) or (report["zero_stage"] == 3 and getattr(p, "ds_id", None) is not None
                                      and not getattr(p, "ds_persist", False)):
            sharded += 1
        if p.requires_grad:
            trainable += 1
            if lora and "lora_" not in name and "modules_to_save" not in name:
                outside.append(name)
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        Linear4bit = ()  # noqa: N806
    linear4: Counter = Counter()
    lora_layers = 0
    for name, m in module.named_modules():
        if Linear4bit and isinstance(m, Linear4bit):
            linear4[_part(name)] += 1
        if hasattr(m, "base_layer") and len(getattr(m, "lora_A", None) or {}):
            lora_layers += 1
    report.update(params=params, sharded_params=sharded, trainable_params=trainable, lora_layers=lora_layers,
                  trainable_outside_adapters=outside[:20] if lora else None, linear_4bit=dict(sorted(linear4.items())))
    return report


def describe_mechanism(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The report as ``(label, text)`` rows for the run's summary."""
    rows = []
    dist = report.get("distributed")
    n = report.get("world_size", 1)
    if report.get("fsdp_version"):
        units = ", ".join(f"{k}×{v}" for k, v in report["fsdp_units"].items())
        text = (f"FSDP{report['fsdp_version']}, {n} process(es): units {units}; "
                f"{report['sharded_params']} of {report['params']} parameter tensors sharded (DTensor)")
    elif report.get("zero_stage") is not None:
        text = f"DeepSpeed ZeRO-{report['zero_stage']}, {n} process(es)"
        if report["zero_stage"] == 3:
            text += f"; {report['sharded_params']} of {report['params']} parameter tensors partitioned"
    elif dist in ("MULTI_CPU", "MULTI_GPU"):
        text = f"DDP ({'gloo' if dist == 'MULTI_CPU' else 'nccl'}), {n} processes"
    else:
        text = "one process, no sharding"
    rows.append(("parallelism", text))
    if report.get("lora_layers"):
        extra = report.get("trainable_outside_adapters") or []
        where = f"{len(extra)} outside the adapters" if extra else "all adapters or the projector"
        rows.append(("adapters", f"LoRA on {report['lora_layers']} layers; "
                                 f"{report['trainable_params']} trainable tensors, {where}"))
    if report.get("linear_4bit"):
        parts = ", ".join(f"{k} {v}" for k, v in report["linear_4bit"].items())
        rows.append(("4-bit layers", f"NF4 linear layers: {parts}"))
    return rows


def check_gpu_count(requested: int) -> None:
    """Refuse ``--gpus N`` where this machine has fewer CUDA GPUs (visible to this process).

    Raises:
        ConfigError: fewer GPUs than asked for.
    """
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        raise ConfigError(f"--gpus {requested}: no CUDA GPU on this machine",
                          f"use --nproc {requested} to run that many CPU processes")
    if requested > have:
        raise ConfigError(f"--gpus {requested}: this machine has {have} CUDA GPU(s)"
                          + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
                             if os.environ.get("CUDA_VISIBLE_DEVICES") is not None else ""),
                          f"use --gpus {have} (the global batch stays the same through gradient accumulation)")
