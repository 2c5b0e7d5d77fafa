"""One training run on the Hugging Face Trainer: ``train(TrainConfig) -> TrainResult``.

Runs in the current process — alone, or as one rank of a torchrun launch (DDP, DeepSpeed ZeRO-2/3,
FSDP2). Steps: check the config, data and images; tokenize with the checkpoint's chat template;
split the global batch over processes and accumulation; load the model, freeze what the stage
keeps frozen (LoRA wraps the language model); train with length-grouped batches; write the result
with :func:`llavamed_core.model.save_checkpoint` (the llava-hf Hub key layout, atomically), not
the Trainer's own layout. The Trainer's intermediate, resumable checkpoints go to ``<out>.run``.

Library use::

    from llavamed_core.train import TrainConfig, train
    result = train(TrainConfig(stage="instruct", model=Path("ckpt"), data=Path("train.json"),
                               images=Path("images"), out=Path("ckpt-instruct"), max_steps=10))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, LlavamedError, TrainingError
from ..io import atomic_dir, atomic_write_bytes, atomic_write_json
from ..model.checkpoint import check_checkpoint_dir, hub_key, resolve_attn_implementation, use_shape_free_sdpa
from ..progress import ProgressCallback, emit
from .config import BatchPlan, TrainConfig, config_to_dict, plan_batch
from .dataset import PackingCollator, PaddingCollator, build_dataset, load_training_conversations
from .packed_attention import apply_packing_plan, language_attention, packing_plan, use_language_attention
from .parallel import (deepspeed_config, engage_fsdp_on_cpu, fsdp_config, fsdp_wrap_classes, mechanism_report,
                       single_process_world, world_info)

__all__ = ["TrainResult", "train", "apply_stage_freezing", "find_resume_checkpoint", "complete_checkpoints",
           "split_eval", "count_trainable_by_part", "EVAL_RECORDS_FILE"]

_PAPER_MAX_LENGTH = 2048
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
EVAL_RECORDS_FILE = "eval_records.json"
"""Written beside the output with ``--eval-split``: the ids of the held-out records."""


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        out: the output checkpoint directory.
        steps: optimizer steps done in all (including those before a resume).
        epochs: passes over the data done.
        final_loss: the last logged training loss.
        samples: training samples (after dropping over-long ones).
        dropped: samples left out because even their first exchange was too long.
        truncated: samples shortened at a turn boundary.
        train_runtime_s: seconds spent in the training loop (this session).
        tokens_per_s: non-padding tokens processed per second (all processes, this session).
        config_path: the resolved configuration written beside the outputs.
        stage: the stage trained.
        resumed_from: the Trainer checkpoint the run continued from, if any.
        world_size: number of processes.
        global_batch: samples per optimizer step.
        per_device_batch: samples per process per forward pass.
        grad_accum: forward passes per optimizer step.
        learning_rate: peak learning rate.
        trainable_params: parameters that trained.
        total_params: all parameters.
        padding_share: share of the batches' token positions that were padding (this session).
        projector_path: ``mm_projector.safetensors`` (align only).
        merged: for LoRA runs, whether the adapters were merged into the output.
        mechanism: what the training loop ran with, read from the prepared model
            (:func:`~llavamed_core.train.parallel.mechanism_report`: DDP/FSDP2/DeepSpeed stage,
            sharded parameters, LoRA adapters, 4-bit layers, trainable parameters per part);
            also ``<run dir>/mechanism.json``.
        trainable_by_part: trainable parameters of the vision tower, the projector and the
            language model (LoRA adapters count with the part they adapt).
        eval_loss: the mean token loss over the eval records at the end (``--eval-data``/``--eval-split``).
        eval_samples: eval records (after dropping over-long ones).
        history_path: ``history.jsonl`` beside the output: one line per logged step and evaluation.
        plot_path: ``loss.png`` beside the output (``None`` without matplotlib).
        loss_sparkline: the loss over the run as one line of ``▁▂▃▄▅▆▇█``.
        warnings: things the user should know that did not stop the run (one line each).
    """

    out: Path
    steps: int
    epochs: float
    final_loss: float | None
    samples: int
    dropped: int
    truncated: int
    train_runtime_s: float
    tokens_per_s: float | None
    config_path: Path
    stage: str = ""
    resumed_from: Path | None = None
    world_size: int = 1
    global_batch: int = 0
    per_device_batch: int = 0
    grad_accum: int = 1
    learning_rate: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    padding_share: float | None = None
    projector_path: Path | None = None
    merged: bool | None = None
    mechanism: dict | None = None
    trainable_by_part: dict | None = None
    eval_loss: float | None = None
    eval_samples: int = 0
    history_path: Path | None = None
    plot_path: Path | None = None
    loss_sparkline: str = ""
    warnings: list = field(default_factory=list)

    def __post_init__(self) -> None:
        # A result read back from JSON (a torchrun launch) has its paths as strings.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and "Path" in str(f.type) and f.name != "stage":
                setattr(self, f.name, Path(value))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def apply_stage_freezing(model: Any, trainable: tuple[str, ...]) -> None:
    """Freeze everything, then unfreeze the parts that train.

    Args:
        model: a ``LlavaForConditionalGeneration``.
        trainable: parts that train: ``"vision_tower"``, ``"projector"``, ``"language_model"``
            (:meth:`TrainConfig.trainable_parts`; the paper keeps the vision tower frozen in every
            stage). A ``"linear"`` projector keeps ``linear_2`` frozen at the identity, so it stays
            the paper's single linear layer.
    """
    model.requires_grad_(False)
    if "vision_tower" in trainable:
        model.model.vision_tower.requires_grad_(True)
    projector = model.model.multi_modal_projector
    if "projector" in trainable:
        projector.requires_grad_(True)
        if getattr(model.config, "projector_hidden_act", None) == "linear":
            projector.linear_2.requires_grad_(False)
    if "language_model" in trainable:
        for p in (*model.model.language_model.parameters(), *model.lm_head.parameters()):
            if p.is_floating_point():  # QLoRA's 4-bit weights are packed integers: they never train
                p.requires_grad_(True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Trainer checkpoints in ``run_dir`` that finished writing (``trainer_state.json`` is written
    last), oldest first. A checkpoint cut short by a kill has no state file and is skipped."""
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(cfg: TrainConfig, verify_data: bool | None = None) -> Path | None:
    """The checkpoint to continue from (see :attr:`TrainConfig.resume`); ``verify_data`` (default:
    on the main process) also reads every file of it through (CRC), which takes long for a large
    optimizer state: the CLI's early check before any launch leaves that to the training itself.

    Raises:
        ConfigError: a fresh start would mix with an earlier run's checkpoints, or ``--resume DIR``
            is not a complete Trainer checkpoint.
        TrainingError: the checkpoint is damaged (a file truncated or unreadable), or was written by
            a run of another kind (LoRA or full weights, DeepSpeed, FSDP).
    """
    run_dir = cfg.resolved_run_dir
    done = complete_checkpoints(run_dir)
    if cfg.resume is None:
        if done and not cfg.overwrite:
            raise ConfigError(f"{run_dir} holds checkpoints of an earlier run (newest: {done[-1].name})",
                              "continue it with --resume auto, or start over with --overwrite")
        return None
    if cfg.resume == "auto":
        path = done[-1] if done else None
    else:
        path = Path(cfg.resume)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"--resume {path}: not a complete Trainer checkpoint (no trainer_state.json)",
                              f"use --resume auto, or one of: {', '.join(p.name for p in done) or 'none yet'}")
    if path is not None:
        from .resume import check_resume_checkpoint

        check_resume_checkpoint(path, lora=cfg.lora or cfg.qlora, deepspeed=cfg.deepspeed is not None,
                                fsdp=cfg.fsdp,
                                verify_data=world_info().is_main if verify_data is None else verify_data)
    return path


def _device(cfg: TrainConfig) -> str:
    import torch

    if cfg.device:
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine",
                              "use --nproc N for CPU processes, or drop --device")
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _precision(device: str) -> tuple[bool, bool, bool | None]:
    """``(bf16, fp16, tf32)`` the hardware supports (mixed precision on CUDA only)."""
    import torch

    if not device.startswith("cuda"):
        return False, False, None
    bf16 = torch.cuda.is_bf16_supported()
    tf32 = torch.cuda.get_device_capability()[0] >= 8
    return bf16, not bf16, tf32 or None


def _default_max_length(model_config: Any) -> int:
    text = getattr(model_config, "text_config", model_config)
    limit = int(getattr(text, "max_position_embeddings", _PAPER_MAX_LENGTH) or _PAPER_MAX_LENGTH)
    return min(limit, _PAPER_MAX_LENGTH)


def _training_arguments(cfg: TrainConfig, plan: BatchPlan, device: str, world_size: int) -> Any:
    """Build the Trainer's arguments; ``cfg.overrides`` are applied last."""
    from transformers import TrainingArguments

    bf16, fp16, tf32 = _precision(device)
    preset = cfg.preset
    cuda = device.startswith("cuda")
    report = [r.strip() for r in cfg.report_to.split(",") if r.strip()] or ["none"]
    kw: dict[str, Any] = dict(
        output_dir=str(cfg.resolved_run_dir),
        per_device_train_batch_size=plan.per_device,
        gradient_accumulation_steps=plan.grad_accum,
        num_train_epochs=cfg.resolved_epochs(),
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        learning_rate=cfg.resolved_learning_rate(),
        weight_decay=preset.weight_decay,
        warmup_steps=preset.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type=preset.lr_scheduler,
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        bf16=bf16,
        fp16=fp16,
        tf32=tf32,
        report_to=report if report != ["none"] else "none",
        dataloader_num_workers=cfg.num_workers if cfg.num_workers is not None else (4 if cuda else 0),
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not cuda,
        # Every trained parameter gets a gradient, except the vision tower's last layer and final
        # norm (the features come from the second-to-last layer) when --train-vision trains it.
        ddp_find_unused_parameters="vision_tower" in cfg.trainable_parts(),
        optim="adamw_torch_fused" if cuda and cfg.deepspeed is None else "adamw_torch",
        save_only_model=False,
    )
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    grouped = cfg.group_by_length if cfg.group_by_length is not None else not cfg.packing
    if "train_sampling_strategy" in names:  # transformers ≥ 5.2x; earlier: group_by_length
        kw["train_sampling_strategy"] = "group_by_length" if grouped else "random"
    else:
        kw["group_by_length"] = grouped
    if cfg.gradient_checkpointing:
        # transformers 5.2x renamed the option; non-reentrant recomputation works with frozen inputs.
        key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        kw[key] = True
        kw[key + "_kwargs"] = {"use_reentrant": False}
    if not cuda and world_size > 1:
        kw["ddp_backend"] = "gloo"
    if cfg.deepspeed is not None:
        kw["deepspeed"] = deepspeed_config(cfg.deepspeed)
    if cfg.fsdp:
        kw["fsdp"] = True
        kw["fsdp_config"] = fsdp_config(fsdp_wrap_classes(cfg.model))
    if cfg.eval_data is not None or cfg.eval_split is not None:
        # The eval loss is measured right before each save (so it is the saved weights'), and at the end.
        kw.update(eval_strategy="steps", eval_steps=cfg.save_steps, per_device_eval_batch_size=plan.per_device)
    if cfg.qlora and (cfg.fsdp or cfg.deepspeed is not None):
        raise ConfigError("--qlora with --fsdp/--deepspeed is not supported (4-bit weights do not shard)",
                          "use --qlora with plain data parallelism (--gpus N), or --lora with --fsdp/--deepspeed")
    kw.update(cfg.overrides)
    try:
        return TrainingArguments(**kw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the Trainer refused these settings: {str(exc).splitlines()[0]}",
                          "check --set/--config values against the TrainingArguments documentation") from None


def _load_model(cfg: TrainConfig, device: str, args: Any) -> Any:
    """Load the input checkpoint for training (float32 master weights unless DeepSpeed/QLoRA)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    if cfg.deepspeed is not None:
        # ZeRO-3 partitions the weights while they load; DeepSpeed's communicator must know the
        # world by then (the Trainer only sets it up later, at its first step). A single process
        # is a world of one (single_process_world), so this never goes looking for MPI.
        import deepspeed

        args.device  # noqa: B018 - sets up torch.distributed first
        deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo",
                                   auto_mpi_discovery=False)
    kwargs: dict[str, Any] = {"dtype": torch.float32,
                              "attn_implementation": resolve_attn_implementation(device, cfg.attn_implementation)}
    if cfg.deepspeed is not None and (args.bf16 or args.fp16):
        # DeepSpeed keeps fp32 master weights in the optimizer; the module itself runs in 16 bit.
        kwargs["dtype"] = torch.bfloat16 if args.bf16 else torch.float16
    if cfg.qlora:
        from .lora import quantization_config

        kwargs["quantization_config"] = quantization_config(device)
        kwargs["dtype"] = kwargs["quantization_config"].bnb_4bit_compute_dtype
        kwargs["device_map"] = {"": world_info().local_rank if device.startswith("cuda") else "cpu"}
    try:
        model = LlavaForConditionalGeneration.from_pretrained(cfg.model, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TrainingError(f"{cfg.model}: could not load the checkpoint ({str(exc).splitlines()[0]})",
                            "check that the directory is a complete checkpoint") from None
    if cfg.qlora:
        from .lora import check_quantized_parts

        check_quantized_parts(model)
    return model


def _count_params(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameters: the logical count, not the storage (ZeRO-3 partitions
    report their full size; a 4-bit weight packs two values per byte and counts as its matrix)."""
    import math

    trainable = total = 0
    for p in model.parameters():
        quant = getattr(p, "quant_state", None)
        n = int(getattr(p, "ds_numel", 0) or (math.prod(quant.shape) if quant is not None else p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def _part_of(name: str) -> str:
    """The part of the model a parameter belongs to, by its name (PEFT's prefixes included)."""
    if "vision_tower" in name:
        return "vision_tower"
    if "multi_modal_projector" in name:
        return "projector"
    return "language_model"


def count_trainable_by_part(model: Any) -> dict[str, int]:
    """Trainable parameters per part: ``{"vision_tower": n, "projector": n, "language_model": n}``
    (the logical count, as :func:`_count_params`; LoRA adapters count with the part they adapt)."""
    counts = {"vision_tower": 0, "projector": 0, "language_model": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[_part_of(name)] += int(getattr(p, "ds_numel", 0) or p.numel())
    return counts


def split_eval(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of the records (at least one, at most all but one) for the eval loss.

    The choice depends on ``seed`` and the number of records alone; both parts keep the file's order.

    Returns:
        ``(train, eval)``.

    Raises:
        ConfigError: fewer than two records.
    """
    if len(convs) < 2:
        raise ConfigError(f"--eval-split {fraction}: {len(convs)} record(s) cannot be split into training and eval",
                          "give more records, or an eval file with --eval-data")
    n_eval = min(len(convs) - 1, max(1, round(fraction * len(convs))))
    held = set(random.Random(seed).sample(range(len(convs)), n_eval))
    return ([c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held])


def _make_trainer_classes() -> tuple[type, type, type]:
    """The Trainer subclass and two of its callbacks, from :mod:`llavamed_core.train.trainer`
    (imported here so that transformers loads only when training starts; benchmarks/gpu_suite.py
    wraps this function to time the steps)."""
    from .trainer import LlavaTrainer, NoExtraFinalSave, ProgressReporter

    return LlavaTrainer, ProgressReporter, NoExtraFinalSave


def _clean_worker_message(message: str) -> str:
    """A DataError re-raised from a DataLoader worker carries the worker's traceback: keep its line."""
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("llavamed_core.errors.DataError:") or ln.startswith("DataError:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else message


def _save_projector(state: dict[str, Any], out: Path) -> Path:
    """Write the projector's weights alone (Hub key names) as ``mm_projector.safetensors``."""
    from safetensors.torch import save

    proj = {k: v.contiguous() for k, v in state.items() if k.startswith("multi_modal_projector.")}
    return atomic_write_bytes(out / "mm_projector.safetensors", save(proj, metadata={"format": "pt"}))


def train(cfg: TrainConfig, progress: ProgressCallback | None = None) -> TrainResult:
    """Train one stage and write the output checkpoint (see :func:`_train`).

    ``--deepspeed``/``--fsdp`` in a single process run in a distributed world of one
    (:func:`~llavamed_core.train.parallel.single_process_world`), torn down afterwards.
    """
    with single_process_world(cfg.fsdp or cfg.deepspeed is not None):
        result = _train(cfg, progress)
    # The output is written: the resumable checkpoints are no longer needed. Only what this run put
    # in the run folder goes (logs asked for with --report-to stay), then the folder if empty.
    run_dir = cfg.resolved_run_dir
    if not cfg.keep_checkpoints and world_info().is_main and (cfg.out / "train_config.json").exists():
        for p in [*run_dir.glob("checkpoint-*"), run_dir / "train_config.json", run_dir / "mechanism.json",
                  run_dir / "history.jsonl"]:  # history.jsonl is copied beside the output
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only when empty
    return result


def _train(cfg: TrainConfig, progress: ProgressCallback | None = None) -> TrainResult:
    """Train one stage and write the output checkpoint.

    Args:
        cfg: the run's configuration.
        progress: receives ``check images``, ``tokenize`` and ``train`` events (rank 0 emits ``train``).

    Returns:
        The result (on every rank; only rank 0 writes files).

    Raises:
        ConfigError: bad options or combinations.
        DataError: a bad record (named by id), a missing or unreadable image.
        ModelError: the input is not a Llava checkpoint.
        TrainingError: the run failed (out of memory, …).
    """
    cfg.check()
    from ..model.hub import resolve_model

    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model))  # a Hub id: its snapshot in the cache
    from .preflight import check_before_training
    check_before_training(cfg)  # --report-to installed; --out/--run-dir clear of the inputs
    world = world_info()
    check_checkpoint_dir(cfg.model)
    if cfg.out.exists() and any(cfg.out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"--out {cfg.out}: exists and is not empty", "choose another --out, or pass --overwrite")
    resume_from = find_resume_checkpoint(cfg)
    device = _device(cfg)
    cudnn_attention_off = use_shape_free_sdpa(device)  # packed samples and padded batches vary in shape

    import torch
    from transformers import AutoConfig, AutoProcessor, PrinterCallback

    processor = AutoProcessor.from_pretrained(cfg.model)
    model_config = AutoConfig.from_pretrained(cfg.model)
    max_length = cfg.max_length or _default_max_length(model_config)
    packing = None
    if cfg.packing:  # the layout and kernel that keep samples apart; refuses others before any loading
        packing = packing_plan(resolve_attn_implementation(device, cfg.attn_implementation),
                               model_config.text_config, max_length)
    convs = load_training_conversations(cfg.data, cfg.images, check_images=cfg.check_images, progress=progress)
    eval_convs = None
    if cfg.eval_split is not None:
        convs, eval_convs = split_eval(convs, cfg.eval_split, cfg.seed)
    elif cfg.eval_data is not None:
        eval_convs = load_training_conversations(cfg.eval_data, cfg.images, check_images=cfg.check_images,
                                                 progress=progress)
    dataset, stats = build_dataset(convs, processor, cfg.images, max_length, cfg.on_long, cfg.data, progress)
    eval_dataset = None
    if eval_convs is not None:
        eval_dataset, _ = build_dataset(eval_convs, processor, cfg.images, max_length, cfg.on_long,
                                        cfg.eval_data or cfg.data, progress)
        if not len(eval_dataset):
            raise DataError(f"{cfg.eval_data or cfg.data}: every eval record is longer than --max-length {max_length}",
                            "raise --max-length, or give other eval records")
    eval_ids = [c.id for c in eval_convs] if cfg.eval_split is not None else None
    del convs, eval_convs
    plan = plan_batch(cfg.resolved_global_batch(), world.world_size, cfg.per_device_batch,
                      cfg.preset.per_device_batch)
    args = _training_arguments(cfg, plan, device, world.world_size)  # before the model: ZeRO-3 init
    model = _load_model(cfg, device, args)
    llava, loaded_attention = model, language_attention(model)
    switched = packing is not None and bool(packing.language_attention)
    if switched:  # the language model only, checked (a plan that did not take falls back); undone below
        packing = apply_packing_plan(model, packing)
    save_dtype = _checkpoint_dtype(cfg.model)
    linear_projector = getattr(model.config, "projector_hidden_act", None) == "linear"
    parts = cfg.trainable_parts()
    apply_stage_freezing(model, parts)
    lora_cfg = None
    if cfg.lora or cfg.qlora:
        from .lora import lora_config, lora_targets, wrap_lora

        if cfg.qlora:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        full = tuple(m for part, m in (("projector", "multi_modal_projector"), ("vision_tower", "vision_tower"))
                     if part in parts)  # trained in full beside the adapters
        lora_cfg = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, lora_targets(model, cfg.lora_target),
                               dora=cfg.dora, rslora=cfg.rslora, modules_to_save=full)
        model = wrap_lora(model, lora_cfg, linear_projector)
    trainable, total = _count_params(model)
    by_part = count_trainable_by_part(model)

    resolved = dataclasses.replace(cfg, epochs=cfg.resolved_epochs(), learning_rate=cfg.resolved_learning_rate(),
                                   global_batch=plan.global_batch, per_device_batch=plan.per_device,
                                   max_length=max_length, run_dir=cfg.resolved_run_dir, resume=None,
                                   overwrite=False)  # a rerun from this file must not replace outputs silently
    config_dict = config_to_dict(resolved)
    if world.is_main:
        run_dir = cfg.resolved_run_dir
        if cfg.resume is None and cfg.overwrite:
            for old in run_dir.glob("checkpoint-*"):  # --overwrite: start over, not mix with them
                shutil.rmtree(old, ignore_errors=True)
        atomic_write_json(run_dir / "train_config.json", config_dict)

    LlavaTrainer, ProgressReporter, NoExtraFinalSave = _make_trainer_classes()
    from .trainer import HistoryWriter

    pad_to = 8 if device.startswith("cuda") else None
    padding = PaddingCollator(processor.tokenizer.pad_token_id, pad_to)
    # samples end to end in rows, attention kept within each sample
    collator = PackingCollator(processor.tokenizer.pad_token_id, packing.row_tokens, pad_to) if packing else padding
    trainer = LlavaTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                           data_collator=collator, eval_collator=padding, processing_class=processor,
                           lengths=dataset.lengths,
                           callbacks=[ProgressReporter(progress, plan.global_batch), NoExtraFinalSave(),
                                      HistoryWriter(cfg.resolved_run_dir)])
    trainer.remove_callback(PrinterCallback)
    if cfg.fsdp:
        engage_fsdp_on_cpu(trainer)  # accelerate engages FSDP by itself on GPUs only
    reporter = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressReporter))
    if resume_from is not None and cfg.deepspeed is not None and lora_cfg is not None:
        from .resume import check_deepspeed_adapter_keys

        check_deepspeed_adapter_keys(model, resume_from)  # the engine loads LoRA states non-strictly
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except DataError as exc:
        raise DataError(_clean_worker_message(exc.message), exc.hint) from None
    except torch.OutOfMemoryError:
        raise TrainingError(f"out of GPU memory at --per-device-batch {plan.per_device}",
                            "lower --per-device-batch (the global batch stays the same through gradient "
                            "accumulation), add --gradient-checkpointing, or use --deepspeed zero3") from None
    except LlavamedError:
        raise
    except Exception as exc:
        if resume_from is not None and not reporter.began:  # failed while loading the checkpoint
            from .resume import resume_error

            raise resume_error(resume_from, exc) from None
        raise

    eval_loss = None
    if eval_dataset is not None:
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        if not evals or evals[-1]["step"] != trainer.state.global_step:  # the last step was not a save
            evals.append(trainer.evaluate())
        eval_loss = float(evals[-1]["eval_loss"])
    real, padded = trainer.token_counts()
    mechanism = mechanism_report(trainer)
    mechanism["trainable_params_by_part"] = by_part
    mechanism["language_attention"] = language_attention(llava)
    mechanism["packing"] = packing.how if packing is not None else None
    mechanism["cudnn_attention_off"] = cudnn_attention_off
    if switched:
        use_language_attention(llava, loaded_attention)  # what inference loads: the saved model never runs ours
    if world.is_main:
        atomic_write_json(cfg.resolved_run_dir / "mechanism.json", mechanism)
    runtime = float(output.metrics.get("train_runtime", 0.0))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = TrainResult(
        out=cfg.out, steps=int(trainer.state.global_step), epochs=float(trainer.state.epoch or 0.0),
        final_loss=float(losses[-1]) if losses else None, samples=stats.samples, dropped=stats.dropped,
        truncated=stats.truncated, train_runtime_s=runtime,
        tokens_per_s=real / runtime if runtime > 0 and real else None,
        config_path=cfg.out / "train_config.json", stage=cfg.stage, resumed_from=resume_from,
        world_size=world.world_size, global_batch=plan.global_batch, per_device_batch=plan.per_device,
        grad_accum=plan.grad_accum, learning_rate=cfg.resolved_learning_rate(), trainable_params=trainable,
        total_params=total, padding_share=(1 - real / padded) if padded else None,
        merged=(cfg.merge if lora_cfg is not None else None), mechanism=mechanism, trainable_by_part=by_part,
        eval_loss=eval_loss, eval_samples=len(eval_dataset) if eval_dataset is not None else 0)
    _write_outputs(cfg, trainer, processor, lora_cfg, linear_projector, save_dtype, config_dict, args, result)
    if world.is_main:
        _write_history(cfg, trainer, result, eval_ids)
    return result


def _write_history(cfg: TrainConfig, trainer: Any, result: TrainResult, eval_ids: list | None) -> None:
    """``history.jsonl`` and ``loss.png`` beside the output (each file written atomically), the
    held-out record ids with ``--eval-split``, and the loss sparkline."""
    from .history import HISTORY_FILE, PLOT_FILE, history_rows, plot_history, sparkline, write_history

    rows = history_rows(trainer.state.log_history)  # what run_dir/history.jsonl holds, row for row
    result.history_path = write_history(cfg.out / HISTORY_FILE, rows)
    result.loss_sparkline = sparkline([r.get("loss") for r in rows if "loss" in r])
    result.plot_path = plot_history(rows, cfg.out / PLOT_FILE, title=f"train {cfg.stage}: {cfg.out.name}")
    if result.plot_path is None:
        result.warnings.append("no loss.png: matplotlib is not installed (pip install 'llavamed[plot]')")
    if eval_ids is not None:
        atomic_write_json(cfg.out / EVAL_RECORDS_FILE, {"eval_split": cfg.eval_split, "seed": cfg.seed,
                                                         "ids": eval_ids})


def _checkpoint_dtype(model_dir: Path) -> Any:
    """The dtype the input checkpoint was saved in (the output keeps it)."""
    import torch

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype") or "float32"
    return getattr(torch, str(name), torch.float32)


def _write_outputs(cfg: TrainConfig, trainer: Any, processor: Any, lora_cfg: Any, linear_projector: bool,
                   save_dtype: Any, config_dict: dict, args: Any, result: TrainResult) -> None:
    """Gather the weights (collective under ZeRO-3/FSDP) and write the checkpoint on rank 0."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from ..model.checkpoint import save_checkpoint

    acc = trainer.accelerator
    wrapped = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    unwrapped = acc.unwrap_model(trainer.model)
    sharded = trainer.is_fsdp_enabled or (
        trainer.is_deepspeed_enabled and acc.deepspeed_config["zero_optimization"]["stage"] == 3)
    state = acc.get_state_dict(wrapped) if sharded else None
    if trainer.is_deepspeed_enabled:
        # Training is over: without this, building a model below (the meta shell, or the base of a
        # LoRA merge) would enter ZeRO-3's partitioning, a collective that only rank 0 reaches.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    extra = {"train_config.json": config_dict, "training_args.json": json.loads(args.to_json_string())}
    if acc.is_main_process:
        if lora_cfg is not None and not cfg.merge:
            from ..model.checkpoint import save_processor
            from ..model.compat import finalize_checkpoint_files
            from ..model.templates import STOP_STRINGS

            with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
                unwrapped.save_pretrained(tmp, state_dict=state)  # PEFT keeps the adapter's part
                save_processor(processor, tmp)
                for name, obj in extra.items():
                    atomic_write_json(tmp / name, obj)
                # Tokenizer side files that transformers 4.x also loads, and the base model's generation
                # config with the template's stop strings, as save_checkpoint writes them.
                unwrapped.get_base_model().generation_config.save_pretrained(tmp)
                template = (getattr(unwrapped.config, "llavamed", None) or {}).get("template")
                finalize_checkpoint_files(tmp, STOP_STRINGS.get(template))
        else:
            if lora_cfg is not None:
                if sharded or cfg.qlora:
                    from .lora import adapter_state, merge_lora

                    host = merge_lora(cfg.model, lora_cfg, adapter_state(unwrapped, state), save_dtype,
                                      linear_projector)
                else:
                    host = unwrapped.merge_and_unload()
            elif sharded:
                with torch.device("meta"):
                    host = LlavaForConditionalGeneration(unwrapped.config)
                missing, unexpected = host.load_state_dict(state, strict=False, assign=True)
                if missing or unexpected:
                    raise TrainingError(f"the gathered weights do not match the model "
                                        f"({(missing or unexpected)[0]} …)",
                                        "this is a bug; rerun with LLAVAMED_DEBUG=1 and report it")
            else:
                host = unwrapped
            host = host.to(save_dtype)
            save_checkpoint(host, processor, cfg.out, overwrite=cfg.overwrite, extra_json=extra)
            if not cfg.trains_language_model:
                result.projector_path = _save_projector(
                    {hub_key(k): v.detach().cpu() for k, v in host.state_dict().items()}, cfg.out)
    elif not cfg.trains_language_model:
        result.projector_path = cfg.out / "mm_projector.safetensors"
    acc.wait_for_everyone()
