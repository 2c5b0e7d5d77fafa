"""Model presets, the tiny offline factory, chat templates, and checkpoint build/save/load."""

from .checkpoint import (build_from_preset, check_checkpoint_dir, hub_key, load_checkpoint,
                         make_processor, save_checkpoint)
from .presets import PRESETS, ModelPreset, get_preset
from .templates import STOP_STRINGS, TEMPLATES

__all__ = ["PRESETS", "ModelPreset", "get_preset", "TEMPLATES", "STOP_STRINGS", "build_from_preset",
           "make_processor", "save_checkpoint", "load_checkpoint", "check_checkpoint_dir", "hub_key"]
