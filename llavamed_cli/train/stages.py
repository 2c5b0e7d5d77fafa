"""``llavamed train align|instruct|finetune``: one command per stage, all with the same options.

Each command reads its flags (plus ``--config FILE`` and ``--set key=value``) into a
:class:`~llavamed_core.train.TrainConfig` and calls :func:`llavamed_core.train.train`.
``--gpus N`` / ``--nproc N`` (and ``--nnodes`` …, or Slurm's variables under ``srun``) hand the
resolved config to the launcher (:mod:`llavamed_core.launch`), which runs ``python -m
llavamed_core.train CONFIG`` under torchrun; rank 0's result is shown here.

Examples::

    llavamed train align    --model ckpt/tiny --data align.json --images images --out ckpt/align
    llavamed train instruct --model ckpt/align --data instruct.json --images images --out ckpt/instruct --nproc 2
    llavamed train finetune --model ckpt/instruct --data vqa-rad/train.json --images vqa-rad/images \\
        --out ckpt/vqa-rad --gpus 8 --deepspeed zero3
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llavamed_core.train.stages import STAGES

from .. import _complete, _console
from .._options import JsonOpt, OverwriteOpt
from . import app

# CLI parameter name → TrainConfig field, where they differ.
_FIELD = {"lr": "learning_rate", "workers": "num_workers"}
# Parameters that steer the command itself rather than the run.
_LAUNCH = {"gpus", "nproc", "nnodes", "node_rank", "master_addr", "master_port"}
_CLI_ONLY = {"config", "set_items", "json_out", *_LAUNCH}


def _typed_params(ctx: typer.Context) -> dict[str, Any]:
    """The parameters the user gave (command line or environment), not the defaults."""
    typed = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        # Compared by name: Typer vendors its own Click, whose enum is not click's.
        if getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT"):
            typed[name] = value
    return typed


def _build_config(stage: str, typed: dict[str, Any]) -> Any:
    """Defaults → ``--config`` file → typed flags → ``--set``; then the required paths."""
    from llavamed_core.errors import ConfigError
    from llavamed_core.train.config import TrainConfig, load_config_file, merge_settings, parse_set_items

    ta_names = None  # TrainingArguments' names, looked up (importing transformers) only when needed
    settings: dict[str, Any] = {}
    if typed.get("config") is not None:
        settings = merge_settings(settings, load_config_file(typed["config"]), f"--config {typed['config']}", ta_names)
    flags = {_FIELD.get(k, k): v for k, v in typed.items() if k not in _CLI_ONLY}
    settings = merge_settings(settings, flags, "options", ta_names)
    settings = merge_settings(settings, parse_set_items(list(typed.get("set_items") or [])), "--set", ta_names)
    if typed.get("nproc"):
        settings["device"] = "cpu"
    settings.pop("stage", None)
    from .._config import train_paths

    settings.update(train_paths(stage, settings))  # [train.STAGE] of llavamed.toml, env, RUNS/train/…
    missing = [f"--{k}" for k in ("model", "data", "images", "out") if settings.get(k) is None]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}",
                          f"give them as options, in the --config file, or in the train.{stage} table of llavamed.toml "
                          f"(`llavamed config set train.{stage}.{missing[0][2:]} VALUE`)")
    return TrainConfig(stage=stage, **settings)


def _check_paths(cfg: Any) -> None:
    """The input paths, checked before the heavy imports (the same checks training makes)."""
    from llavamed_core.errors import DataError
    from llavamed_core.model.checkpoint import check_checkpoint_dir
    from llavamed_core.train.preflight import check_before_training

    from llavamed_core.model.hub import resolve_model

    cfg.model = resolve_model(cfg.model)  # a Hub id org/name[@rev]: its snapshot, downloaded once here
    check_checkpoint_dir(cfg.model)
    if not Path(cfg.data).exists():
        raise DataError(f"--data {cfg.data}: file not found", "check the path")
    if cfg.images is not None and not Path(cfg.images).is_dir():
        raise DataError(f"--images {cfg.images}: folder not found", "check the path")
    check_before_training(cfg)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(ctx: typer.Context, stage: str) -> None:
    # stdout carries the result alone: whatever libraries print while we import and train
    # (DeepSpeed logs to the stdout it found when first imported) goes to stderr with the logs.
    with contextlib.redirect_stdout(sys.stderr):
        result = _launch_or_train(ctx, stage)
    if result is not None:
        _render(result, stage, bool(ctx.params.get("json_out")))


def _launch_or_train(ctx: typer.Context, stage: str) -> Any:
    """Train in this process, or in the processes of a torchrun launch; returns the result to show
    (``None`` on a node other than rank 0's)."""
    from llavamed_core.errors import ConfigError
    from llavamed_core.train.config import plan_batch

    typed = _typed_params(ctx)
    params = ctx.params
    if params.get("gpus") and params.get("nproc"):
        raise ConfigError("--gpus and --nproc both given", "--gpus N for GPUs, --nproc N for CPU processes")
    nproc = params.get("gpus") or params.get("nproc") or 1
    if os.environ.get("LLAVAMED_DEBUG", "") in ("", "0", "false"):
        # Library chatter (deprecations inside torch/DeepSpeed, Trainer notes) is not the user's.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning")
        warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    cfg = _build_config(stage, typed)  # check the options before launching anything
    cfg.check()
    _check_paths(cfg)  # before torch is imported: a wrong path fails at once
    from llavamed_core.train.run import find_resume_checkpoint

    # So does a run that would mix with an earlier one, or a bad --resume (its files' contents are
    # read through once, by the training itself).
    find_resume_checkpoint(cfg, verify_data=False)
    from llavamed_core.launch import launch_training, resolve_spec

    # Flags first, then Slurm's variables (under srun), else one node.
    spec = resolve_spec(nproc, params.get("nnodes"), params.get("node_rank"), params.get("master_addr"),
                        params.get("master_port"))
    if params.get("nproc") or not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it found no GPU
    if params.get("gpus"):
        from llavamed_core.train.parallel import check_gpu_count

        check_gpu_count(params["gpus"])  # before torchrun: else "invalid device ordinal" in a child
    if spec.world_size > 1:
        plan_batch(cfg.resolved_global_batch(), spec.world_size, cfg.per_device_batch,
                   cfg.preset.per_device_batch)  # fails here, once, rather than in every process
        where = (f" × {spec.nnodes} nodes (this is node {spec.node_rank}; rank 0 at "
                 f"{spec.master_addr}:{spec.master_port}{', from Slurm' if spec.source == 'slurm' else ''})"
                 if spec.nnodes > 1 else "")
        _console.info(f"launching {spec.nproc_per_node} process(es){where} under torchrun")
        code, result = launch_training(cfg, spec, device="cuda" if params.get("gpus") else "cpu")
        if code != 0:
            raise typer.Exit(code)  # rank 0 (or the launcher) has said why
        if result is None:
            _console.info(f"node {spec.node_rank} of {spec.nnodes}: done; rank 0 on node 0 wrote {cfg.out}")
        return result

    from transformers.utils import logging as hf_logging

    from llavamed_core.train import train

    hf_logging.disable_progress_bar()  # our progress is the one that counts
    with _console.progress() as progress:
        return train(cfg, progress=progress)


def _render(result: Any, stage: str, json_out: bool) -> None:
    """The summary table (or ``--json``) on stdout."""
    for line in result.warnings:
        _console.warn(line)
    out = _console.Output(json_out)
    out.result(result.to_dict())
    if out.json_mode:
        return
    by_part = result.trainable_by_part or {}
    rows = [["stage", result.stage], ["checkpoint", str(result.out)], ["steps", result.steps],
            ["epochs", round(result.epochs, 3)], ["final loss", result.final_loss],
            ["loss", result.loss_sparkline or "–"],
            ["samples", result.samples], ["truncated", result.truncated], ["dropped", result.dropped],
            ["processes", result.world_size],
            ["global batch", f"{result.global_batch} = {result.per_device_batch} × {result.grad_accum} accum × {result.world_size}"],
            ["learning rate", result.learning_rate],
            ["trained parameters", f"{result.trainable_params:,} of {result.total_params:,}"],
            ["trained by part", ", ".join(f"{label} {by_part.get(key, 0):,}" for key, label in (
                ("vision_tower", "vision"), ("projector", "projector"), ("language_model", "LM"))) if by_part else "–"],
            ["tokens/s", result.tokens_per_s], ["padding", f"{(result.padding_share or 0) * 100:.1f}%"],
            ["runtime (s)", result.train_runtime_s], ["config", str(result.config_path)]]
    if result.resumed_from:
        rows.insert(2, ["resumed from", str(result.resumed_from)])
    if result.projector_path:
        rows.insert(2, ["projector", str(result.projector_path)])
    if result.merged is not None:
        rows.insert(2, ["LoRA", "merged into the checkpoint" if result.merged else "adapter only (--no-merge)"])
    if result.eval_samples:
        at = next(i for i, row in enumerate(rows) if row[0] == "loss") + 1
        rows.insert(at, ["eval loss", f"{result.eval_loss:.4f} ({result.eval_samples} records)"])
    for label, path in (("history", result.history_path), ("loss plot", result.plot_path)):
        if path:
            rows.append([label, str(path)])
    if result.mechanism:
        from llavamed_core.train.parallel import describe_mechanism

        rows += [[label, text] for label, text in describe_mechanism(result.mechanism)]
    _console.print_table(f"train {stage}", ["", "value"], rows)


def _make_command(stage: str) -> Any:
    def command(
        ctx: typer.Context,
        model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Input checkpoint directory or Hub id org/name[@revision] (default: [train.<stage>] in llavamed.toml; see `llavamed config show`).", rich_help_panel="Data")] = None,
        data: Annotated[Optional[Path], typer.Option("--data", help="Conversation file, JSON array or JSONL (default: [train.<stage>] in llavamed.toml; see `llavamed config show`).", rich_help_panel="Data")] = None,
        images: Annotated[Optional[Path], typer.Option("--images", help="Folder the records' image paths are relative to (default: [train.<stage>] in llavamed.toml; see `llavamed config show`).", rich_help_panel="Data")] = None,
        out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output checkpoint directory (default: train.<stage>.out in llavamed.toml, else RUNS/train/<stage>-<timestamp>/).", rich_help_panel="Data")] = None,
        epochs: Annotated[Optional[float], typer.Option(help="Passes over the data (default: the stage's).", rich_help_panel="Schedule")] = None,
        lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: the stage's; 2e-4 with --lora).", rich_help_panel="Schedule")] = None,
        global_batch: Annotated[Optional[int], typer.Option(help="Samples per optimizer step over all processes (default 128, the paper's).", rich_help_panel="Schedule")] = None,
        per_device_batch: Annotated[Optional[int], typer.Option(help="Samples per process per forward pass (default: derived; accumulation makes up the rest).", rich_help_panel="Schedule")] = None,
        max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps (smoke runs).", rich_help_panel="Schedule")] = None,
        max_length: Annotated[Optional[int], typer.Option(help="Longest sample in tokens, image included (default: the model's, at most 2048).", rich_help_panel="Data")] = None,
        seed: Annotated[Optional[int], typer.Option(help="Random seed (default 42).", rich_help_panel="Schedule")] = None,
        lora: Annotated[Optional[bool], typer.Option("--lora", help="Train LoRA adapters on the LM's projections (projector fully).", rich_help_panel="LoRA")] = None,
        qlora: Annotated[Optional[bool], typer.Option("--qlora", help="LoRA on a 4-bit (NF4) language model; needs bitsandbytes (pip install 'llavamed\\[qlora]').", rich_help_panel="LoRA")] = None,
        merge: Annotated[Optional[bool], typer.Option("--merge/--no-merge", help="After LoRA, write a merged standalone checkpoint (default) or the adapter alone.", rich_help_panel="LoRA")] = None,
        lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank (default 128).", rich_help_panel="LoRA")] = None,
        lora_alpha: Annotated[Optional[int], typer.Option(help="LoRA alpha (default 256).", rich_help_panel="LoRA")] = None,
        lora_target: Annotated[Optional[str], typer.Option(help="LM modules that get adapters: q_proj,v_proj,… or all-linear (default: attention and MLP projections).", rich_help_panel="LoRA")] = None,
        dora: Annotated[Optional[bool], typer.Option("--dora", help="Weight-decomposed LoRA (PEFT use_dora): a trained magnitude vector per layer.", rich_help_panel="LoRA")] = None,
        rslora: Annotated[Optional[bool], typer.Option("--rslora", help="Rank-stabilised LoRA scaling, alpha/sqrt(r) (PEFT use_rslora).", rich_help_panel="LoRA")] = None,
        train_vision: Annotated[Optional[bool], typer.Option("--train-vision/--freeze-vision", help="Train or freeze the vision tower (default: the stage's; frozen).", rich_help_panel="What trains")] = None,
        train_projector: Annotated[Optional[bool], typer.Option("--train-projector/--freeze-projector", help="Train or freeze the projector (default: the stage's; trains).", rich_help_panel="What trains")] = None,
        train_llm: Annotated[Optional[bool], typer.Option("--train-llm/--freeze-llm", help="Train or freeze the language model (default: the stage's; trains in instruct and finetune).", rich_help_panel="What trains")] = None,
        deepspeed: Annotated[Optional[str], typer.Option(help="DeepSpeed: zero2, zero3 or a JSON config path (also in one process).", autocompletion=_complete.DEEPSPEED, rich_help_panel="Parallelism")] = None,
        fsdp: Annotated[Optional[bool], typer.Option("--fsdp", help="Shard with PyTorch FSDP2 (vision encoder and decoder layers; also in one process).", rich_help_panel="Parallelism")] = None,
        gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing", help="Recompute activations to save memory.", rich_help_panel="Schedule")] = None,
        report_to: Annotated[Optional[str], typer.Option(help="Log to: none, tensorboard, wandb, … (comma-separated; pip install 'llavamed\\[tensorboard]' or 'llavamed\\[wandb]').", rich_help_panel="Logging")] = None,
        eval_data: Annotated[Optional[Path], typer.Option(help="Conversation file whose eval loss is measured at every save and at the end (images from --images).", rich_help_panel="Logging")] = None,
        eval_split: Annotated[Optional[float], typer.Option(help="Hold out this share of --data (seeded) for the eval loss instead, e.g. 0.05.", rich_help_panel="Logging")] = None,
        resume: Annotated[Optional[str], typer.Option(help="auto (newest checkpoint in the run dir, if any) or a checkpoint directory.", rich_help_panel="Checkpoints")] = None,
        run_dir: Annotated[Optional[Path], typer.Option(help="Folder of intermediate checkpoints (default: <out>.run).", rich_help_panel="Checkpoints")] = None,
        keep_checkpoints: Annotated[Optional[bool], typer.Option("--keep-checkpoints", help="Keep the run folder's resumable checkpoints after a successful run (default: removed once the output is written).", rich_help_panel="Checkpoints")] = None,
        save_steps: Annotated[Optional[int], typer.Option(help="Write a resumable checkpoint every N steps (default 500).", rich_help_panel="Checkpoints")] = None,
        on_long: Annotated[Optional[str], typer.Option(help="Samples over --max-length: truncate (at turn boundaries) or drop.", rich_help_panel="Data")] = None,
        group_by_length: Annotated[Optional[bool], typer.Option("--group-by-length/--random-batches", help="Batch samples of similar length (less padding) or at random (default: grouped; random with --packing, which packs them).", rich_help_panel="Data")] = None,
        packing: Annotated[Optional[bool], typer.Option("--packing", help="Put each batch's samples end to end in one row, no padding; attention stays within each sample (sdpa or flash-attention varlen).", rich_help_panel="Data")] = None,
        workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes (default: 0 on CPU, 4 on CUDA).", rich_help_panel="Data")] = None,
        set_items: Annotated[Optional[list[str]], typer.Option("--set", help="key=value for any option or HF TrainingArguments field (repeatable).")] = None,
        config: Annotated[Optional[Path], typer.Option("--config", help="YAML/JSON file of options and TrainingArguments fields (e.g. a run's train_config.json).")] = None,
        gpus: Annotated[Optional[int], typer.Option(help="Run N processes, one per GPU, under torchrun.", rich_help_panel="Parallelism")] = None,
        nproc: Annotated[Optional[int], typer.Option(help="Run N CPU processes under torchrun (gloo).", rich_help_panel="Parallelism")] = None,
        nnodes: Annotated[Optional[int], typer.Option(help="Machines in the run; start the same command on each (default 1, or Slurm's node count under srun).", rich_help_panel="Parallelism")] = None,
        node_rank: Annotated[Optional[int], typer.Option(help="This machine's rank, 0 on the --master-addr machine (default 0, or SLURM_NODEID).", rich_help_panel="Parallelism")] = None,
        master_addr: Annotated[Optional[str], typer.Option(help="Address of the node-rank-0 machine (default 127.0.0.1, or the first host of SLURM_JOB_NODELIST).", rich_help_panel="Parallelism")] = None,
        master_port: Annotated[Optional[int], typer.Option(help="Port on the node-rank-0 machine (default: a free port on one node, 29500 on several, derived from SLURM_JOB_ID under Slurm).", rich_help_panel="Parallelism")] = None,
        overwrite: OverwriteOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        _run(ctx, stage)

    command.__doc__ = STAGES[stage].description
    command.__name__ = f"train_{stage}"
    return command


for _stage in STAGES:
    app.command(_stage)(_make_command(_stage))
