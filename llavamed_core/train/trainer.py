"""llavamed's Hugging Face ``Trainer`` subclass, its callbacks and the eval-loss computation.

Imports transformers at the top: :mod:`llavamed_core.train.run` imports this module inside
``train()`` only, so ``llavamed --help`` and ``import llavamed_core.train`` stay light.

- :class:`LlavaTrainer`: length-grouped batches from precomputed lengths (seeded per epoch, so a
  resumed run sees the same batches), strict loading of a resumed checkpoint's weights, token
  accounting (``tokens_per_s`` in every step's log) and an eval loss that is the mean token loss
  over the eval records.
- Callbacks: :class:`SamplerEpoch`, :class:`ProgressReporter`, :class:`HistoryWriter`,
  :class:`NoExtraFinalSave`.

The eval loss is computed here (:func:`mean_token_loss`) because the Trainer's ``eval_loss`` is a
mean of per-batch means, not the mean over every answer token.

Public Trainer hooks are used where they exist (``get_train_dataloader``, ``compute_loss``,
``log``, ``evaluate``, callbacks). One private method is overridden, ``_load_from_checkpoint``,
because the Trainer has no public hook for loading a resumed checkpoint's weights (see there).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..progress import ProgressCallback, emit
from .history import HISTORY_FILE, append_history, history_row, history_rows, write_history
from .resume import check_fsdp_keys, load_adapter_weights, load_full_weights

__all__ = ["LlavaTrainer", "EpochSeededLengthGroupedSampler", "SamplerEpoch", "ProgressReporter",
           "HistoryWriter", "NoExtraFinalSave", "mean_token_loss", "format_duration"]

IGNORE_INDEX = -100


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """A length-grouped sampler whose order depends only on ``seed`` and the epoch.

    The stock ``LengthGroupedSampler`` draws its permutation from the global torch generator when
    an epoch starts: a run resumed in the middle of epoch ``e`` would draw it from another state
    than the uninterrupted run did, and see other batches. :class:`SamplerEpoch` calls
    :meth:`set_epoch` at every epoch start, before the Trainer skips the batches already trained.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Any:
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


@torch.no_grad()
def mean_token_loss(model: Any, dataset: Any, collator: Any, batch_size: int, device: Any,
                    rank: int = 0, world_size: int = 1, autocast: Any = None) -> tuple[float, int]:
    """The mean next-token cross-entropy over every answer token of ``dataset`` (pooled over
    records, not a mean of per-batch means), and the number of tokens.

    In a distributed run each process takes every ``world_size``-th record and all processes run
    the same number of forward passes (ZeRO-3 and FSDP gather weights in every forward; a short
    share repeats its first record with weight 0); the sums are added up over processes.
    """
    was_training = model.training
    model.eval()
    try:
        mine = list(range(rank, len(dataset), world_size))
        per_rank = math.ceil(len(dataset) / world_size)
        order = [(i, True) for i in mine] + [(mine[0] if mine else 0, False)] * (per_rank - len(mine))
        total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
        with contextlib.nullcontext() if autocast is None else autocast:
            _add_token_losses(model, dataset, collator, order, batch_size, device, total)
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
    finally:
        model.train(was_training)
    tokens = int(total[1].item())
    return (float(total[0].item()) / tokens if tokens else float("nan")), tokens


def _add_token_losses(model: Any, dataset: Any, collator: Any, order: list[tuple[int, bool]], batch_size: int,
                  device: Any, total: Any) -> None:
    """Add each batch's summed answer-token loss and token count (records weighted 1 or 0) to ``total``."""
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collator([dataset[i] for i, _ in chunk])
        batch.pop("num_real_tokens", None)
        labels = batch.pop("labels")
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        logits = model(**batch).logits
        labels = labels.to(logits.device)[:, 1:]
        weight = torch.tensor([1.0 if real else 0.0 for _, real in chunk], device=logits.device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        counted = (labels != IGNORE_INDEX).float() * weight[:, None]
        total += torch.stack([(losses * counted).sum(), counted.sum()]).to(total)


class LlavaTrainer(Trainer):
    """Trainer with length-grouped batches from precomputed lengths, token accounting, strict
    resume loading and a pooled eval loss.

    Args:
        lengths: each training sample's length in tokens (the stock sampler would read every item,
            loading every image, to learn them).
        eval_collator: batches the eval records (always padding; training may pack).
        *args, **kwargs: as for ``Trainer``.
    """

    def __init__(self, *args: Any, lengths: list[int] | None = None, eval_collator: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lengths = lengths
        self.eval_collator = eval_collator
        self.length_sampler: EpochSeededLengthGroupedSampler | None = None
        self.add_callback(SamplerEpoch(self))
        self.real_tokens: Any = 0  # a tensor once counting starts: no device sync per step
        self.padded_tokens = 0
        self._tokens_mark: tuple[float, float] | None = None  # (time, all processes' tokens) at the last log

    def get_train_dataloader(self) -> Any:
        """The Trainer's dataloader, with :class:`EpochSeededLengthGroupedSampler` when batches are
        grouped by length (its lengths precomputed, its order a function of seed and epoch)."""
        grouped = (getattr(self.args, "train_sampling_strategy", None) == "group_by_length"
                   or getattr(self.args, "group_by_length", False))
        if not grouped or self.lengths is None:
            return super().get_train_dataloader()
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self.length_sampler = EpochSeededLengthGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps, self.lengths, seed)
        return self._get_dataloader(dataset=self.train_dataset, description="Training",
                                    batch_size=self._train_batch_size,
                                    sampler_fn=lambda _dataset: self.length_sampler, is_training=True)

    # No public hook loads a resumed checkpoint's weights: Trainer.train calls this method itself.
    # The stock loader compares the saved (Hub layout) names with the live ones, loads what matches
    # (nothing) and logs a warning; this one maps the names and loads strictly. DeepSpeed resumes
    # through its engine instead (strict for full weights); FSDP through accelerate's sharded loader.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
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
        if self._tokens_mark is None:
            self._tokens_mark = (time.monotonic(), 0.0)
        if packed is not None and model.training:
            self.real_tokens = packed.sum() + self.real_tokens
            self.padded_tokens += inputs["input_ids"].numel()
        elif mask is not None and model.training:
            self.real_tokens = mask.sum() + self.real_tokens
            self.padded_tokens += mask.numel()
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def token_counts(self) -> tuple[int, int]:
        """``(non-padding, all)`` token positions trained this session, over all processes."""
        t = torch.tensor([float(self.real_tokens), float(self.padded_tokens)], device=self.args.device)
        if self.args.world_size > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return int(t[0].item()), int(t[1].item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, plus ``tokens_per_s`` (non-padding tokens per second over all
        processes since the previous step log) on every training-step entry."""
        if "loss" in logs and self._tokens_mark is not None:
            now, (then, before) = time.monotonic(), self._tokens_mark
            real = float(self.token_counts()[0])  # every process logs a step: the reduce is collective
            logs = {**logs, "tokens_per_s": round((real - before) / max(1e-9, now - then), 2)}
            self._tokens_mark = (now, real)
        super().log(logs, start_time)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """``{prefix}_loss``: the mean token loss over the eval records (:func:`mean_token_loss`),
        logged (so it lands in the history) and passed to the callbacks' ``on_evaluate``."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        loss, tokens = mean_token_loss(
            self.model, dataset, self.eval_collator or self.data_collator, self.args.eval_batch_size,
            self.args.device, self.args.process_index, self.args.world_size, self.accelerator.autocast())
        metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_tokens": tokens}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class SamplerEpoch(TrainerCallback):
    """Tell the length-grouped sampler which epoch starts. The Trainer's own ``set_epoch`` does not
    reach it in a resumed distributed run (accelerate's batch skipper wraps the batch sharder, which
    wraps the sampler); a resumed run's state holds the epoch it stopped in."""

    def __init__(self, trainer: LlavaTrainer):
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
        if not state.is_world_process_zero or not logs:
            return
        if "eval_loss" in logs:
            self.last["eval_loss"] = round(float(logs["eval_loss"]), 4)
            emit(self.progress, "train", state.global_step, state.max_steps, unit="step", **self.last)
            return
        if "loss" not in logs:
            return
        elapsed = max(1e-9, time.monotonic() - self.t0)
        done = max(1, state.global_step - self.step0)
        info = {"loss": round(float(logs["loss"]), 4), "lr": logs.get("learning_rate"),
                "samples/s": round(done * self.global_batch / elapsed, 2),
                "eta": format_duration((state.max_steps - state.global_step) * elapsed / done)}
        if "eval_loss" in self.last:
            info["eval_loss"] = self.last["eval_loss"]
        self.last = {k: v for k, v in info.items() if k != "eta"}
        emit(self.progress, "train", state.global_step, state.max_steps, unit="step", **info)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            emit(self.progress, "train", state.global_step, state.max_steps, unit="step", finished=True,
                 **self.last)


class HistoryWriter(TrainerCallback):
    """Keep ``<run dir>/history.jsonl`` (rank 0): rewritten from the Trainer's ``log_history`` when
    training begins (empty on a fresh start; a resumed checkpoint's rows, up to its step), then one
    line appended per step log and per evaluation as it happens."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / HISTORY_FILE

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            write_history(self.path, history_rows(state.log_history))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        # Trainer.log appends {**logs, "step": …} to log_history before calling on_log.
        if state.is_world_process_zero and state.log_history:
            row = history_row(state.log_history[-1])
            if row is not None:
                append_history(self.path, row)


class NoExtraFinalSave(TrainerCallback):
    """Skip the Trainer's own save at the last step unless it falls on ``save_steps``: the output
    checkpoint is written by llavamed right after, and for a 7B model the Trainer's copy (weights
    and optimizer state) would cost minutes and ~100 GB."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        every = state.save_steps
        if (str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps"
                and state.global_step >= state.max_steps and every and state.global_step % every):
            control.should_save = False
