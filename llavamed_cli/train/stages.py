"""``llavamed train align|instruct|finetune``: one command per stage, all with the same options.

Each command reads its flags (plus ``--config FILE`` and ``--set key=value``) into a
:class:`~llavamed_core.train.TrainConfig` and calls :func:`llavamed_core.train.train`.
``--gpus N`` / ``--nproc N`` re-run the same command line under torchrun with N processes
(CPU processes use gloo); only rank 0 prints.

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
import time
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


def _command_line(ctx: typer.Context) -> list[str]:
    """Rebuild the typed options as arguments, for the torchrun children."""
    args: list[str] = []
    typed = _typed_params(ctx)
    for param in ctx.command.params:
        # The launch options stay with the launcher: torchrun's parser would claim --nnodes and
        # --master-*, and refuse --nproc as an ambiguous prefix of --nproc-per-node.
        if param.name not in typed or not param.opts or param.name in _LAUNCH:
            continue
        value = typed[param.name]
        if getattr(param, "is_flag", False):
            if param.secondary_opts and not value:
                args.append(param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
        elif getattr(param, "multiple", False):
            for v in value:
                args += [param.opts[0], str(v)]
        elif value is not None:
            args += [param.opts[0], str(value)]
    return args


def _build_config(stage: str, typed: dict[str, Any]) -> Any:
    """Defaults → ``--config`` file → typed flags → ``--set``; then the required paths."""
    from llavamed_core.errors import ConfigError
    from llavamed_core.train.config import TrainConfig, load_config_file, merge_settings, parse_set_items
    from llavamed_core.train.parallel import LAUNCHED_ENV

    ta_names = None  # TrainingArguments' names, looked up (importing transformers) only when needed
    settings: dict[str, Any] = {}
    if typed.get("config") is not None:
        settings = merge_settings(settings, load_config_file(typed["config"]), f"--config {typed['config']}", ta_names)
    flags = {_FIELD.get(k, k): v for k, v in typed.items() if k not in _CLI_ONLY}
    settings = merge_settings(settings, flags, "options", ta_names)
    settings = merge_settings(settings, parse_set_items(list(typed.get("set_items") or [])), "--set", ta_names)
    if typed.get("nproc") or os.environ.get(LAUNCHED_ENV) == "cpu":
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
    """Train in this process (returns the result on rank 0, else ``None``) or launch torchrun."""
    from llavamed_core.errors import ConfigError, LlavamedError
    from llavamed_core.train.config import plan_batch
    from llavamed_core.train.parallel import LAUNCHED_ENV, LaunchSpec, launch

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
    if params.get("nproc") or os.environ.get(LAUNCHED_ENV) == "cpu" or not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it found no GPU
    if params.get("gpus") and not os.environ.get(LAUNCHED_ENV):
        from llavamed_core.train.parallel import check_gpu_count

        check_gpu_count(params["gpus"])  # before torchrun: else "invalid device ordinal" in a child
    if (nproc > 1 or params.get("nnodes", 1) > 1) and not os.environ.get(LAUNCHED_ENV):
        plan_batch(cfg.resolved_global_batch(), nproc * params["nnodes"], cfg.per_device_batch,
                   cfg.preset.per_device_batch)  # fails here, once, rather than in every process
        spec = LaunchSpec(nproc, params["nnodes"], params["node_rank"], params["master_addr"], params["master_port"])
        _console.info(f"launching {nproc} process(es) per node × {params['nnodes']} node(s) under torchrun")
        # The paths found in the settings go on as flags: every process uses the same (one timestamp).
        found = [a for k in ("model", "data", "images", "out") if k not in typed for a in (f"--{k}", str(getattr(cfg, k)))]
        code = launch(spec, ["train", stage, *_command_line(ctx), *found], device="cuda" if params.get("gpus") else "cpu")
        raise typer.Exit(code)

    from transformers.utils import logging as hf_logging

    from llavamed_core.train import train

    hf_logging.disable_progress_bar()  # our progress is the one that counts
    try:
        with _console.progress() as progress:
            result = train(cfg, progress=progress)
    except LlavamedError as exc:
        if not _console.is_rank_zero():
            # Rank 0 reports (every rank meets the same data errors); give it time to, then exit.
            time.sleep(3)
            raise typer.Exit(exc.exit_code) from None
        raise
    return result if _console.is_rank_zero() else None


def _render(result: Any, stage: str, json_out: bool) -> None:
    """The summary table (or ``--json``) on stdout."""
    if json_out:
        _console.print_json(result.to_dict())
        return
    rows = [["stage", result.stage], ["checkpoint", str(result.out)], ["steps", result.steps],
            ["epochs", round(result.epochs, 3)], ["final loss", result.final_loss],
            ["samples", result.samples], ["truncated", result.truncated], ["dropped", result.dropped],
            ["processes", result.world_size],
            ["global batch", f"{result.global_batch} = {result.per_device_batch} × {result.grad_accum} accum × {result.world_size}"],
            ["learning rate", result.learning_rate],
            ["trained parameters", f"{result.trainable_params:,} of {result.total_params:,}"],
            ["tokens/s", result.tokens_per_s], ["padding", f"{(result.padding_share or 0) * 100:.1f}%"],
            ["runtime (s)", result.train_runtime_s], ["config", str(result.config_path)]]
    if result.resumed_from:
        rows.insert(2, ["resumed from", str(result.resumed_from)])
    if result.projector_path:
        rows.insert(2, ["projector", str(result.projector_path)])
    if result.merged is not None:
        rows.insert(2, ["LoRA", "merged into the checkpoint" if result.merged else "adapter only (--no-merge)"])
    if result.mechanism:
        from llavamed_core.train.parallel import describe_mechanism

        rows += [[label, text] for label, text in describe_mechanism(result.mechanism)]
    _console.print_table(f"train {stage}", ["", "value"], rows)


def _make_command(stage: str) -> Any:
    def command(
        ctx: typer.Context,
        model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Input checkpoint directory (default: [train.<stage>] in llavamed.toml; see `llavamed config show`).", rich_help_panel="Data")] = None,
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
        qlora: Annotated[Optional[bool], typer.Option("--qlora", help="LoRA on a 4-bit (NF4) language model; needs bitsandbytes (pip install 'llavamed[qlora]').", rich_help_panel="LoRA")] = None,
        merge: Annotated[Optional[bool], typer.Option("--merge/--no-merge", help="After LoRA, write a merged standalone checkpoint (default) or the adapter alone.", rich_help_panel="LoRA")] = None,
        lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank (default 128).", rich_help_panel="LoRA")] = None,
        lora_alpha: Annotated[Optional[int], typer.Option(help="LoRA alpha (default 256).", rich_help_panel="LoRA")] = None,
        deepspeed: Annotated[Optional[str], typer.Option(help="DeepSpeed: zero2, zero3 or a JSON config path (also in one process).", autocompletion=_complete.DEEPSPEED, rich_help_panel="Parallelism")] = None,
        fsdp: Annotated[Optional[bool], typer.Option("--fsdp", help="Shard with PyTorch FSDP2 (vision encoder and decoder layers; also in one process).", rich_help_panel="Parallelism")] = None,
        gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing", help="Recompute activations to save memory.", rich_help_panel="Schedule")] = None,
        report_to: Annotated[Optional[str], typer.Option(help="Log to: none, tensorboard, wandb, … (comma-separated).", rich_help_panel="Logging")] = None,
        resume: Annotated[Optional[str], typer.Option(help="auto (newest checkpoint in the run dir, if any) or a checkpoint directory.", rich_help_panel="Checkpoints")] = None,
        run_dir: Annotated[Optional[Path], typer.Option(help="Folder of intermediate checkpoints (default: <out>.run).", rich_help_panel="Checkpoints")] = None,
        keep_checkpoints: Annotated[Optional[bool], typer.Option("--keep-checkpoints", help="Keep the run folder's resumable checkpoints after a successful run (default: removed once the output is written).", rich_help_panel="Checkpoints")] = None,
        save_steps: Annotated[Optional[int], typer.Option(help="Write a resumable checkpoint every N steps (default 500).", rich_help_panel="Checkpoints")] = None,
        on_long: Annotated[Optional[str], typer.Option(help="Samples over --max-length: truncate (at turn boundaries) or drop.", rich_help_panel="Data")] = None,
        group_by_length: Annotated[Optional[bool], typer.Option("--group-by-length/--random-batches", help="Batch samples of similar length (less padding) or at random.", rich_help_panel="Data")] = None,
        packing: Annotated[Optional[bool], typer.Option("--packing", help="Put each batch's samples end to end in rows (less padding; attention stays within each sample).", rich_help_panel="Data")] = None,
        workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes (default: 0 on CPU, 4 on CUDA).", rich_help_panel="Data")] = None,
        set_items: Annotated[Optional[list[str]], typer.Option("--set", help="key=value for any option or HF TrainingArguments field (repeatable).")] = None,
        config: Annotated[Optional[Path], typer.Option("--config", help="YAML/JSON file of options and TrainingArguments fields (e.g. a run's train_config.json).")] = None,
        gpus: Annotated[Optional[int], typer.Option(help="Run N processes, one per GPU, under torchrun.", rich_help_panel="Parallelism")] = None,
        nproc: Annotated[Optional[int], typer.Option(help="Run N CPU processes under torchrun (gloo).", rich_help_panel="Parallelism")] = None,
        nnodes: Annotated[int, typer.Option(help="Machines in the run (torchrun).", rich_help_panel="Parallelism")] = 1,
        node_rank: Annotated[int, typer.Option(help="This machine's rank (torchrun).", rich_help_panel="Parallelism")] = 0,
        master_addr: Annotated[str, typer.Option(help="Address of the rank-0 machine (torchrun).", rich_help_panel="Parallelism")] = "127.0.0.1",
        master_port: Annotated[int, typer.Option(help="Port on the rank-0 machine (torchrun).", rich_help_panel="Parallelism")] = 29500,
        overwrite: OverwriteOpt = False,
        json_out: JsonOpt = False,
    ) -> None:
        _run(ctx, stage)

    command.__doc__ = STAGES[stage].description
    command.__name__ = f"train_{stage}"
    return command


for _stage in STAGES:
    app.command(_stage)(_make_command(_stage))
