"""The configuration of one training run: :class:`TrainConfig`, config files, ``--set``, batch maths.

Precedence, lowest first (STYLE.md "Configuration"): the dataclass defaults → the stage preset
(:mod:`llavamed_core.train.stages`) for fields left ``None`` → a YAML/JSON ``--config`` file → the
flags the user typed → ``--set key=value``. Keys that are not :class:`TrainConfig` fields must be
Hugging Face ``TrainingArguments`` fields; they land in :attr:`TrainConfig.overrides` and are
applied last, on top of everything llavamed derives.

The resolved configuration is written beside the outputs (``train_config.json``) in the same flat
shape that ``--config`` reads, so ``--config OUT/train_config.json`` repeats a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .stages import StagePreset, get_stage

__all__ = ["TrainConfig", "BatchPlan", "plan_batch", "load_config_file", "parse_set_items",
           "merge_settings", "config_to_dict", "training_argument_names"]

_PATH_FIELDS = ("model", "data", "images", "out", "run_dir", "eval_data")
_PARTS = ("vision_tower", "projector", "language_model")


@dataclass
class TrainConfig:
    """Everything that decides a training run.

    Attributes:
        stage: ``"align"``, ``"instruct"`` or ``"finetune"`` (:data:`~llavamed_core.train.stages.STAGES`).
        model: input checkpoint directory (a standard HF Llava checkpoint).
        data: conversation file (JSON array or JSONL, docs/formats.md).
        images: folder the records' ``image`` paths are relative to.
        out: output checkpoint directory (written atomically at the end).
        epochs: passes over the data (``None``: the stage preset's).
        learning_rate: peak learning rate (``None``: the stage preset's; with LoRA its LoRA rate).
        global_batch: samples per optimizer step over all processes (``None``: 128, the paper's),
            kept whatever the number of processes: gradient accumulation makes up the difference.
        per_device_batch: samples per process per forward pass (``None``: derived).
        max_steps: stop after this many optimizer steps (smoke runs); ``None`` runs the epochs.
        max_length: longest sample in tokens, image tokens included (``None``: the language
            model's ``max_position_embeddings``, at most 2048 as in the paper).
        seed: seed of the weights' new parts, the data order and dropout.
        lora: train LoRA adapters on the language model's attention and MLP projections (the
            projector trains fully) instead of the whole language model.
        overrides: Hugging Face ``TrainingArguments`` fields set last (``--set k=v``, ``--config``).
        qlora: LoRA on a 4-bit quantised language model (CUDA and bitsandbytes only).
        merge: after a LoRA run, write a merged standalone checkpoint (else the adapter alone).
        lora_r: LoRA rank (LLaVA's LoRA recipe: 128).
        lora_alpha: LoRA scaling numerator (LLaVA's LoRA recipe: 256).
        lora_dropout: dropout on the LoRA path.
        deepspeed: ``"zero2"``, ``"zero3"`` or the path of a DeepSpeed JSON config.
        fsdp: shard with PyTorch FSDP (version 2) instead of DDP.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        report_to: ``"none"`` or integrations for the Trainer's logs (``tensorboard``, ``wandb``, …),
            comma-separated.
        resume: ``None`` starts fresh; ``"auto"`` resumes from the newest complete checkpoint in
            :attr:`run_dir` if there is one; a path resumes from that Trainer checkpoint.
        run_dir: folder of the Trainer's intermediate checkpoints and logs (``None``: ``<out>.run``).
        keep_checkpoints: keep the run folder after a successful run (by default it is removed once
            the output checkpoint is written; a failed or killed run always keeps it, to resume).
        save_steps: write a resumable Trainer checkpoint every this many steps.
        save_total_limit: keep at most this many intermediate checkpoints.
        device: ``"cpu"`` forces the CPU (``--nproc``); ``None`` uses CUDA when present.
        on_long: samples longer than :attr:`max_length`: ``"truncate"`` drops whole trailing
            turn pairs until it fits (samples whose first exchange does not fit are dropped);
            ``"drop"`` drops them. Both are counted in the result.
        group_by_length: batch samples of similar length together (less padding, same data);
            ``None`` (the default): grouped, except with ``packing``, whose rows already carry
            little padding — there batches are drawn at random (the original's order) and packed.
        packing: put each per-device batch's samples end to end in one row, without padding
            (position ids restart per sample and attention stays within each sample: per-sample
            SDPA, flash-attention's varlen kernel, or with ``eager`` a block-diagonal mask over rows
            no wider than the longest sample). Same batches and steps as without.
        num_workers: DataLoader worker processes (``None``: 0 on CPU, 4 on CUDA).
        overwrite: replace an existing ``out``.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (``None``: flash-attn on
            CUDA when it imports, else sdpa).
        check_images: open every image's header up front so that a missing or unreadable image
            stops the run before training (naming the record), not hours into it.
        eval_data: a conversation file (same format and ``images`` folder as :attr:`data`) whose
            mean token loss is measured at every save and at the end.
        eval_split: hold out this share of :attr:`data` (at least one record, chosen with
            :attr:`seed`) for the eval loss instead; those records do not train.
        train_vision: ``True`` trains the vision tower, ``False`` freezes it, ``None`` keeps the
            stage preset's choice (frozen in every stage).
        train_projector: the same for the projector (``None``: the preset; it trains in every stage).
        train_llm: the same for the language model (``None``: the preset; it trains in instruct
            and finetune). With LoRA, "train" means its adapters.
        lora_target: the language-model modules that get adapters: comma-separated module names
            (``q_proj,v_proj``) or ``all-linear`` (every linear layer of the language model but
            the output head); ``None``: the attention and MLP projections.
        dora: weight-decomposed LoRA (PEFT's ``use_dora``): a trained magnitude vector per adapted layer.
        rslora: rank-stabilised LoRA scaling, ``alpha / sqrt(r)`` (PEFT's ``use_rslora``).
    """

    stage: str
    model: Path
    data: Path
    images: Path
    out: Path
    epochs: float | None = None
    learning_rate: float | None = None
    global_batch: int | None = None
    per_device_batch: int | None = None
    max_steps: int | None = None
    max_length: int | None = None
    seed: int = 42
    lora: bool = False
    overrides: dict = field(default_factory=dict)
    qlora: bool = False
    merge: bool = True
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    deepspeed: str | None = None
    fsdp: bool = False
    gradient_checkpointing: bool = False
    report_to: str = "none"
    resume: str | None = None
    run_dir: Path | None = None
    keep_checkpoints: bool = False
    save_steps: int = 500
    save_total_limit: int = 2
    device: str | None = None
    on_long: str = "truncate"
    group_by_length: bool | None = None
    packing: bool = False
    num_workers: int | None = None
    overwrite: bool = False
    attn_implementation: str | None = None
    check_images: bool = True
    eval_data: Path | None = None
    eval_split: float | None = None
    train_vision: bool | None = None
    train_projector: bool | None = None
    train_llm: bool | None = None
    lora_target: str | None = None
    dora: bool = False
    rslora: bool = False

    def __post_init__(self) -> None:
        for name in _PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))

    @property
    def preset(self) -> StagePreset:
        """The stage preset (raises :class:`ConfigError` for an unknown stage)."""
        return get_stage(self.stage)

    @property
    def resolved_run_dir(self) -> Path:
        """Where the Trainer's intermediate checkpoints go."""
        return self.run_dir if self.run_dir is not None else self.out.with_name(self.out.name + ".run")

    def trainable_parts(self) -> tuple[str, ...]:
        """The parts that train: the stage preset's, changed by :attr:`train_vision`,
        :attr:`train_projector` and :attr:`train_llm` where given (``vision_tower``,
        ``projector``, ``language_model``, in that order)."""
        parts = set(self.preset.trainable)
        for part, flag in zip(_PARTS, (self.train_vision, self.train_projector, self.train_llm)):
            if flag is True:
                parts.add(part)
            elif flag is False:
                parts.discard(part)
        return tuple(p for p in _PARTS if p in parts)

    @property
    def trains_language_model(self) -> bool:
        """Whether the language model (or its LoRA adapters) trains."""
        return "language_model" in self.trainable_parts()

    def resolved_epochs(self) -> float:
        """Epochs to run: the given value, else the stage preset's."""
        return float(self.epochs) if self.epochs is not None else self.preset.epochs

    def resolved_learning_rate(self) -> float:
        """Peak learning rate: the given value, else the stage's (its LoRA rate with LoRA)."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return self.preset.lora_learning_rate if (self.lora or self.qlora) else self.preset.learning_rate

    def resolved_global_batch(self) -> int:
        """Samples per optimizer step: the given value, else the stage's (128)."""
        return int(self.global_batch) if self.global_batch is not None else self.preset.global_batch

    def check(self) -> None:
        """Check values and combinations that do not need the model or the data.

        Raises:
            ConfigError: naming the option and what would work.
        """
        self.preset  # noqa: B018 - raises for an unknown stage
        if self.on_long not in ("truncate", "drop"):
            raise ConfigError(f"--on-long {self.on_long}: expected truncate or drop")
        for name in ("global_batch", "per_device_batch", "max_steps", "max_length", "save_steps",
                     "lora_r", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"--epochs {self.epochs}: must be positive")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ConfigError(f"--lr {self.learning_rate}: must be positive")
        if not self.trainable_parts():
            raise ConfigError("nothing trains: the vision tower, the projector and the language model are all frozen",
                              "drop one of --freeze-vision/--freeze-projector/--freeze-llm, or add --train-…")
        if (self.lora or self.qlora) and not self.trains_language_model:
            if self.train_llm is False:
                raise ConfigError("--lora/--qlora with --freeze-llm: LoRA trains adapters on the language model",
                                  "drop --freeze-llm, or drop --lora")
            raise ConfigError(f"--lora/--qlora do not apply to '{self.stage}': only the projector trains there",
                              "drop --lora, or use it with `train instruct` or `train finetune` (or add --train-llm)")
        if (self.dora or self.rslora or self.lora_target is not None) and not (self.lora or self.qlora):
            given = [n for n, v in (("--dora", self.dora), ("--rslora", self.rslora),
                                    ("--lora-target", self.lora_target is not None)) if v]
            raise ConfigError(f"{', '.join(given)} without --lora/--qlora", "add --lora, or drop " + given[0])
        if self.lora_target is not None:
            names = [n.strip() for n in self.lora_target.split(",")]
            if not all(names) or ("all-linear" in names and len(names) > 1):
                raise ConfigError(f"--lora-target {self.lora_target}: expected module names separated by commas "
                                  "(q_proj,v_proj) or all-linear")
        if self.eval_data is not None and self.eval_split is not None:
            err = ConfigError("--eval-data and --eval-split both given", "choose one source of eval records")
            err.exit_code = 2  # a usage error
            raise err
        if self.eval_split is not None and not 0 < self.eval_split < 1:
            raise ConfigError(f"--eval-split {self.eval_split}: must be between 0 and 1 (a share of --data)",
                              "e.g. --eval-split 0.05")
        if self.deepspeed is not None and self.fsdp:
            raise ConfigError("--deepspeed and --fsdp both given", "choose one way of sharding")
        if self.deepspeed is not None and self.deepspeed not in ("zero2", "zero3") \
                and not Path(self.deepspeed).is_file():
            raise ConfigError(f"--deepspeed {self.deepspeed}: neither zero2, zero3 nor an existing JSON file",
                              "use --deepspeed zero2, --deepspeed zero3 or the path of a DeepSpeed config")
        if self.resume is not None and self.resume != "auto" and not Path(self.resume).is_dir():
            raise ConfigError(f"--resume {self.resume}: no such checkpoint directory",
                              f"use --resume auto to continue from the newest checkpoint in {self.resolved_run_dir}")


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is made: ``per_device × grad_accum × world_size == global_batch``."""

    global_batch: int
    per_device: int
    grad_accum: int
    world_size: int


def plan_batch(global_batch: int, world_size: int, per_device: int | None = None,
               max_per_device: int = 4) -> BatchPlan:
    """Split a global batch over processes and gradient-accumulation steps.

    Args:
        global_batch: samples per optimizer step over all processes (128 in the paper).
        world_size: number of processes.
        per_device: a forced per-process batch, or ``None`` to pick the largest divisor of
            ``global_batch / world_size`` not above ``max_per_device``.
        max_per_device: cap for the automatic choice (the stage preset's).

    Returns:
        The plan.

    Raises:
        ConfigError: the numbers do not divide.
    """
    if global_batch % world_size:
        raise ConfigError(f"global batch {global_batch} does not divide over {world_size} processes",
                          f"pass --global-batch {max(world_size, global_batch // world_size * world_size)} "
                          f"(a multiple of {world_size})")
    per_rank = global_batch // world_size
    if per_device is not None:
        if per_rank % per_device:
            raise ConfigError(
                f"--per-device-batch {per_device} does not divide the {per_rank} samples each of "
                f"{world_size} process(es) takes per step (global batch {global_batch})",
                "choose a divisor of global batch ÷ processes, or change --global-batch")
        return BatchPlan(global_batch, per_device, per_rank // per_device, world_size)
    pd = max(d for d in range(1, min(per_rank, max(1, max_per_device)) + 1) if per_rank % d == 0)
    return BatchPlan(global_batch, pd, per_rank // pd, world_size)


def training_argument_names() -> set[str]:
    """The field names of Hugging Face ``TrainingArguments`` (imports transformers)."""
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def _config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a config-file or ``--set`` value to the type of TrainConfig field ``name``."""
    if value is None:
        return None
    if name in _PATH_FIELDS:
        return Path(str(value))
    kind = _config_fields()[name].type
    try:
        if kind.startswith("bool"):  # "bool" and the tri-state "bool | None"
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if kind.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{name}' = {value!r} is not a valid {kind}") from None
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML (or JSON) mapping of TrainConfig and TrainingArguments fields.

    Raises:
        ConfigError: missing file, bad YAML, or not a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, found {type(obj).__name__}")
    return obj


def parse_set_items(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` items; values are read as YAML (numbers, booleans, lists).

    Raises:
        ConfigError: an item without ``=``.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: expected key=value", "e.g. --set warmup_steps=0.1")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip().replace("-", "_")] = raw
    return out


def merge_settings(base: dict[str, Any], layer: dict[str, Any], source: str,
                   ta_names: set[str] | None = None) -> dict[str, Any]:
    """Lay ``layer`` over ``base``: TrainConfig fields replace, other keys go to ``overrides``.

    Args:
        base: TrainConfig keyword arguments so far (``overrides`` a dict inside).
        layer: the keys of one source (a config file, the typed flags, ``--set``).
        source: named in errors (``"--config run.yaml"``, ``"--set"``).
        ta_names: TrainingArguments field names (``None``: look them up).

    Returns:
        The merged keyword arguments (a new dict).

    Raises:
        ConfigError: a key that is neither a TrainConfig nor a TrainingArguments field.
    """
    fields = _config_fields()
    merged = dict(base)
    merged["overrides"] = dict(base.get("overrides") or {})
    for key, value in layer.items():
        key = str(key).replace("-", "_")
        if key == "overrides":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: 'overrides' must be a mapping")
            for k, v in value.items():
                merged["overrides"].update(_training_argument(k, v, source, ta_names))
        elif key in fields:
            merged[key] = _coerce(key, value, source)
        else:
            merged["overrides"].update(_training_argument(key, value, source, ta_names))
    return merged


def _training_argument(key: str, value: Any, source: str, ta_names: set[str] | None) -> dict[str, Any]:
    names = ta_names if ta_names is not None else training_argument_names()
    if key not in names:
        close = sorted(n for n in set(names) | set(_config_fields()) if key[:4] in n)[:4]
        raise ConfigError(f"{source}: unknown option '{key}' (neither a llavamed training option nor "
                          "a Hugging Face TrainingArguments field)",
                          f"did you mean one of: {', '.join(close)}?" if close else
                          "see `llavamed train instruct --help` and the TrainingArguments documentation")
    return {key: value}


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a flat JSON-ready mapping, in the shape :func:`load_config_file` reads."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out
