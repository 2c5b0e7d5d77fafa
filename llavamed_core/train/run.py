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
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, LlavamedError, TrainingError
from ..io import atomic_dir, atomic_write_bytes, atomic_write_json
from ..model.checkpoint import check_checkpoint_dir, hub_key, resolve_attn_implementation
from ..progress import ProgressCallback, emit
from .config import BatchPlan, TrainConfig, config_to_dict, plan_batch
from .dataset import PackingCollator, PaddingCollator, build_dataset, load_training_conversations
from .parallel import (deepspeed_config, engage_fsdp_on_cpu, fsdp_config, fsdp_wrap_classes, mechanism_report,
                       single_process_world, world_info)

__all__ = ["TrainResult", "train", "apply_stage_freezing", "find_resume_checkpoint", "complete_checkpoints"]

_PAPER_MAX_LENGTH = 2048
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
            sharded parameters, LoRA adapters, 4-bit layers); also ``<run dir>/mechanism.json``.
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def apply_stage_freezing(model: Any, trainable: tuple[str, ...]) -> None:
    """Freeze everything, then unfreeze what the stage trains.

    Args:
        model: a ``LlavaForConditionalGeneration``.
        trainable: parts that train: ``"projector"``, ``"language_model"``. The vision tower never
            trains (the paper keeps CLIP frozen in every stage). A ``"linear"`` projector keeps
            ``linear_2`` frozen at the identity, so it stays the paper's single linear layer.
    """
    model.requires_grad_(False)
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


def find_resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from (see :attr:`TrainConfig.resume`).

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
                                fsdp=cfg.fsdp, verify_data=world_info().is_main)
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
        # The vision tower is frozen in every stage, so every trained parameter gets a gradient.
        ddp_find_unused_parameters=False,
        optim="adamw_torch_fused" if cuda and cfg.deepspeed is None else "adamw_torch",
        save_only_model=False,
    )
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:  # transformers ≥ 5.2x; earlier: group_by_length
        kw["train_sampling_strategy"] = "group_by_length" if cfg.group_by_length else "random"
    else:
        kw["group_by_length"] = cfg.group_by_length
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


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _make_trainer_classes() -> tuple[type, type, type]:
    """The Trainer subclass and its callbacks (built here so transformers loads lazily)."""
    from transformers import Trainer, TrainerCallback

    from .resume import check_fsdp_keys, load_adapter_weights, load_full_weights, make_length_grouped_sampler

    class LlavaTrainer(Trainer):
        """Trainer with length-grouped batches from precomputed lengths and token accounting."""

        def __init__(self, *args: Any, lengths: list[int] | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.lengths = lengths
            self.length_sampler: Any = None
            self.add_callback(SamplerEpoch(self))
            self.real_tokens: Any = 0
            self.padded_tokens = 0

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            # The stock sampler would read every item (loading every image) to learn the lengths.
            grouped = (getattr(self.args, "train_sampling_strategy", None) == "group_by_length"
                       or getattr(self.args, "group_by_length", False))
            if grouped and self.lengths is not None:
                # The order depends on the seed and the epoch alone, so a resumed run sees the same batches.
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                self.length_sampler = make_length_grouped_sampler(
                    self.args.train_batch_size * self.args.gradient_accumulation_steps, self.lengths, seed)
                return self.length_sampler
            return super()._get_train_sampler(train_dataset)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            # The stock loader compares the saved (Hub layout) names with the live ones, loads what
            # matches (nothing) and logs a warning; this one maps the names and loads strictly.
            # DeepSpeed resumes through its engine instead (strict for full weights); FSDP through
            # accelerate's sharded loader.
            from peft import PeftModel

            target = self.accelerator.unwrap_model(model if model is not None else self.model)
            if self.is_fsdp_enabled:
                # accelerate's FSDP2 loader ignores missing keys (and, for LoRA, unexpected ones).
                check_fsdp_keys(model if model is not None else self.model, Path(resume_from_checkpoint),
                                adapter_only=isinstance(target, PeftModel))
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            if isinstance(target, PeftModel):
                load_adapter_weights(target, Path(resume_from_checkpoint))
            else:
                load_full_weights(target, Path(resume_from_checkpoint))

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            packed = inputs.pop("num_real_tokens", None)  # PackingCollator: a packed row, no mask
            mask = inputs.get("attention_mask")
            if packed is not None and model.training:
                self.real_tokens = packed.sum() + self.real_tokens
                self.padded_tokens += inputs["input_ids"].numel()
            elif mask is not None and model.training:
                self.real_tokens = mask.sum() + self.real_tokens  # a tensor: no device sync per step
                self.padded_tokens += mask.numel()
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def token_counts(self) -> tuple[int, int]:
            """``(non-padding, all)`` token positions trained this session, over all processes."""
            import torch

            dev = self.args.device
            t = torch.tensor([float(self.real_tokens), float(self.padded_tokens)], device=dev)
            if self.args.world_size > 1:
                t = self.accelerator.reduce(t, reduction="sum")
            return int(t[0].item()), int(t[1].item())

    class SamplerEpoch(TrainerCallback):
        """Tell the length-grouped sampler which epoch starts. The Trainer's own ``set_epoch`` does
        not reach it in a resumed distributed run (accelerate's batch skipper wraps the batch
        sharder, which wraps the sampler); a resumed run's state holds the epoch it stopped in."""

        def __init__(self, trainer: Any):
            self.trainer = trainer

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.trainer.length_sampler is not None:
                self.trainer.length_sampler.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))

    class ProgressReporter(TrainerCallback):
        """Turns the Trainer's logs into ``train`` progress events (rank 0 only)."""

        def __init__(self, progress: ProgressCallback | None, global_batch: int):
            self.progress = progress
            self.global_batch = global_batch
            self.t0 = time.monotonic()
            self.step0 = 0
            self.last: dict[str, Any] = {}
            self.began = False  # set once a resumed run's checkpoint has loaded (weights, optimizer)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.began = True
            self.t0 = time.monotonic()
            self.step0 = state.global_step
            if state.is_world_process_zero:
                emit(self.progress, "train", state.global_step, state.max_steps, unit="step")

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            elapsed = max(1e-9, time.monotonic() - self.t0)
            done = max(1, state.global_step - self.step0)
            info = {"loss": round(float(logs["loss"]), 4), "lr": logs.get("learning_rate"),
                    "samples/s": round(done * self.global_batch / elapsed, 2),
                    "eta": _format_duration((state.max_steps - state.global_step) * elapsed / done)}
            self.last = {k: v for k, v in info.items() if k != "eta"}
            emit(self.progress, "train", state.global_step, state.max_steps, unit="step", **info)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                emit(self.progress, "train", state.global_step, state.max_steps, unit="step", finished=True,
                     **self.last)

    class NoExtraFinalSave(TrainerCallback):
        """Skip the Trainer's own save at the last step unless it falls on ``save_steps``: the
        output checkpoint is written by llavamed right after, and for a 7B model the Trainer's
        copy (weights and optimizer state) would cost minutes and ~100 GB."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            every = state.save_steps
            if (str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps"
                    and state.global_step >= state.max_steps and every and state.global_step % every):
                control.should_save = False

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
        for p in [*run_dir.glob("checkpoint-*"), run_dir / "train_config.json", run_dir / "mechanism.json"]:
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
    from .preflight import check_before_training
    check_before_training(cfg)  # --report-to installed; --out/--run-dir clear of the inputs
    world = world_info()
    check_checkpoint_dir(cfg.model)
    if cfg.out.exists() and any(cfg.out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"--out {cfg.out}: exists and is not empty", "choose another --out, or pass --overwrite")
    resume_from = find_resume_checkpoint(cfg)
    device = _device(cfg)

    import torch
    from transformers import AutoConfig, AutoProcessor, PrinterCallback

    processor = AutoProcessor.from_pretrained(cfg.model)
    model_config = AutoConfig.from_pretrained(cfg.model)
    max_length = cfg.max_length or _default_max_length(model_config)
    convs = load_training_conversations(cfg.data, cfg.images, check_images=cfg.check_images, progress=progress)
    dataset, stats = build_dataset(convs, processor, cfg.images, max_length, cfg.on_long, cfg.data, progress)
    del convs
    plan = plan_batch(cfg.resolved_global_batch(), world.world_size, cfg.per_device_batch,
                      cfg.preset.per_device_batch)
    args = _training_arguments(cfg, plan, device, world.world_size)  # before the model: ZeRO-3 init
    model = _load_model(cfg, device, args)
    save_dtype = _checkpoint_dtype(cfg.model)
    linear_projector = getattr(model.config, "projector_hidden_act", None) == "linear"
    apply_stage_freezing(model, cfg.preset.trainable)
    lora_cfg = None
    if cfg.lora or cfg.qlora:
        from .lora import lora_config, wrap_lora

        if cfg.qlora:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        lora_cfg = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        model = wrap_lora(model, lora_cfg, linear_projector)
    trainable, total = _count_params(model)

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
    if cfg.packing:  # samples end to end in rows, attention kept within each sample
        collator = PackingCollator(processor.tokenizer.pad_token_id, None, 8 if device.startswith("cuda") else None)
    else:
        collator = PaddingCollator(processor.tokenizer.pad_token_id, 8 if device.startswith("cuda") else None)
    trainer = LlavaTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                           processing_class=processor, lengths=dataset.lengths,
                           callbacks=[ProgressReporter(progress, plan.global_batch), NoExtraFinalSave()])
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

    real, padded = trainer.token_counts()
    mechanism = mechanism_report(trainer)
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
        merged=(cfg.merge if lora_cfg is not None else None), mechanism=mechanism)
    _write_outputs(cfg, trainer, processor, lora_cfg, linear_projector, save_dtype, config_dict, args, result)
    return result


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
            with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
                unwrapped.save_pretrained(tmp, state_dict=state)  # PEFT keeps the adapter's part
                processor.save_pretrained(tmp)
                for name, obj in extra.items():
                    atomic_write_json(tmp / name, obj)
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
            if not cfg.preset.trains_language_model:
                result.projector_path = _save_projector(
                    {hub_key(k): v.detach().cpu() for k, v in host.state_dict().items()}, cfg.out)
    elif not cfg.preset.trains_language_model:
        result.projector_path = cfg.out / "mm_projector.safetensors"
    acc.wait_for_everyone()
