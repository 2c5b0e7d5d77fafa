"""The three training stages of LLaVA-Med as data: what trains and with which hyperparameters.

The paper (arXiv 2306.00890, §4 and Appendix) trains in two stages, then fine-tunes per dataset:

- ``align`` (stage 1, biomedical concept alignment): vision tower and language model frozen, only
  the projector trains; lr 2e-3, 1 epoch, warmup ratio 0.03, cosine decay, weight decay 0, global
  batch 128.
- ``instruct`` (stage 2, end-to-end instruction tuning): vision tower frozen, projector and
  language model train; lr 2e-5, 3 epochs, the same schedule and batch.
- ``finetune`` (downstream VQA): instruct's recipe on a dataset's train split.

Nothing here imports torch, so the CLI can list the stages while ``--help`` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["StagePreset", "STAGES", "get_stage"]


@dataclass(frozen=True)
class StagePreset:
    """One stage's recipe.

    Attributes:
        name: the stage name on the command line.
        description: one line for ``--help``.
        trainable: which parts of the model train: ``"projector"``, ``"language_model"``
            (the vision tower never does, as in the paper).
        learning_rate: peak learning rate.
        lora_learning_rate: peak learning rate with ``--lora`` (LLaVA's LoRA recipe uses 2e-4).
        epochs: passes over the data.
        warmup_ratio: share of the steps spent warming the learning rate up linearly.
        lr_scheduler: the HF scheduler name after warm-up.
        weight_decay: AdamW weight decay.
        global_batch: samples per optimizer step over all processes.
        per_device_batch: the largest per-process batch chosen automatically (a 7B model with
            image tokens fits 16 in stage 1 and 4 in stage 2 on an 80 GB GPU with ZeRO); the
            rest of the global batch comes from gradient accumulation.
    """

    name: str
    description: str
    trainable: tuple[str, ...]
    learning_rate: float
    lora_learning_rate: float
    epochs: float
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    global_batch: int = 128
    per_device_batch: int = 4

    @property
    def trains_language_model(self) -> bool:
        """Whether the language model's weights change in this stage."""
        return "language_model" in self.trainable


STAGES: dict[str, StagePreset] = {
    "align": StagePreset(
        name="align",
        description="Stage 1, concept alignment: only the projector trains (lr 2e-3, 1 epoch).",
        trainable=("projector",),
        learning_rate=2e-3,
        lora_learning_rate=2e-3,
        epochs=1.0,
        per_device_batch=16,
    ),
    "instruct": StagePreset(
        name="instruct",
        description="Stage 2, instruction tuning: projector and language model train (lr 2e-5, 3 epochs).",
        trainable=("projector", "language_model"),
        learning_rate=2e-5,
        lora_learning_rate=2e-4,
        epochs=3.0,
        per_device_batch=4,
    ),
    "finetune": StagePreset(
        name="finetune",
        description="Downstream fine-tuning: instruct's recipe on a VQA train set (lr 2e-5, 3 epochs).",
        trainable=("projector", "language_model"),
        learning_rate=2e-5,
        lora_learning_rate=2e-4,
        epochs=3.0,
        per_device_batch=4,
    ),
}


def get_stage(name: str) -> StagePreset:
    """Look a stage up by name.

    Raises:
        ConfigError: unknown stage (the message lists the known ones).
    """
    try:
        return STAGES[name]
    except KeyError:
        from ..errors import did_you_mean

        raise ConfigError(f"unknown training stage '{name}'", did_you_mean(name, STAGES)) from None
