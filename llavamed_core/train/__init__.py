"""Training: stage presets, dataset and collator, Trainer setup, DeepSpeed/FSDP, LoRA, torchrun launch.

``train(TrainConfig(...))`` runs one stage (align, instruct, finetune) in this process or as one
rank of a torchrun launch. Importing this package does not import torch.
"""

from .config import BatchPlan, TrainConfig, plan_batch
from .run import TrainResult, apply_stage_freezing, train
from .stages import STAGES, StagePreset, get_stage

__all__ = ["TrainConfig", "TrainResult", "train", "STAGES", "StagePreset", "get_stage", "BatchPlan",
           "plan_batch", "apply_stage_freezing"]
