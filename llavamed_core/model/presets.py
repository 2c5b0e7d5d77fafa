"""Model presets as data (DESIGN.md contract 2).

A preset names an architecture: the text model family and its config, the CLIP vision tower, the
vision layer, the projector, the image preprocessing and the conversation template. Building a
model from a preset writes every one of those choices into the checkpoint, so loading never
needs the preset again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["ModelPreset", "PRESETS", "get_preset", "shrink_preset"]


@dataclass(frozen=True)
class ModelPreset:
    """One model architecture.

    Attributes:
        name: preset name used on the command line.
        description: one line for tables and ``--help``.
        text_model_type: transformers ``model_type`` of the language model ("llama", "mistral").
        text_config: keyword arguments of the text config (sizes, rope, vocab, ...).
        vision_config: keyword arguments of ``CLIPVisionConfig``.
        vision_feature_layer: hidden-state index of the vision tower fed to the projector.
        vision_feature_select_strategy: "default" drops the CLS token; "full" keeps it.
        projector_hidden_act: "linear" is the paper's v1 single linear layer (``linear_2`` held
            at the identity); "gelu" is the v1.5 two-layer MLP.
        template: conversation template name (llavamed_core.model.templates).
        pad_to_square: pad images to a square with the mean colour before resizing (v1.5).
        image_mean: per-channel mean of the preprocessing.
        image_std: per-channel std of the preprocessing.
    """

    name: str
    description: str
    text_model_type: str
    text_config: dict[str, Any]
    vision_config: dict[str, Any]
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    template: str = "v1.5"
    pad_to_square: bool = False
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        """Input resolution of the vision tower."""
        return int(self.vision_config["image_size"])

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image after the select strategy."""
        n = (self.image_size // int(self.vision_config["patch_size"])) ** 2
        return n if self.vision_feature_select_strategy == "default" else n + 1


_CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, patch_size=14, projection_dim=768, hidden_act="quick_gelu")

PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        name="tiny",
        description="~0.2M-parameter Llama + CLIP made offline in seconds (tests, demo, benchmarks); "
                    "to train it on a CPU use lr 1e-3 (align) / 2e-3 (instruct), global batch 32",
        text_model_type="llama",
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=False),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        template="tiny",
    ),
    "llava-med-v1": ModelPreset(
        name="llava-med-v1",
        description="LLaMA-7B/Vicuna + CLIP ViT-L/14-224, layer -2, 256 image tokens, linear projector, v1 template",
        text_model_type="llama",
        text_config=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                         rms_norm_eps=1e-6, vocab_size=32000, tie_word_embeddings=False),
        vision_config=dict(_CLIP_L14, image_size=224),
        vision_feature_layer=-2,
        projector_hidden_act="linear",
        template="v1",
    ),
    "llava-med-v1.5": ModelPreset(
        name="llava-med-v1.5",
        description="Mistral-7B-Instruct + CLIP ViT-L/14-336, layer -2, 576 image tokens, 2-layer GELU MLP, pad-to-square, [INST] template",
        text_model_type="mistral",
        text_config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, vocab_size=32000, rope_theta=1000000.0,
                         sliding_window=None, tie_word_embeddings=False),
        vision_config=dict(_CLIP_L14, image_size=336),
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        template="v1.5",
        pad_to_square=True,
    ),
}


def get_preset(name: str) -> ModelPreset:
    """Look a preset up by name.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    try:
        return PRESETS[name]
    except KeyError:
        from ..errors import did_you_mean

        raise ConfigError(f"unknown model preset '{name}'", did_you_mean(name, PRESETS)) from None


# Sizes of a shrunk preset: a model that runs on a CPU in seconds.
_SHRUNK_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
_SHRUNK_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      projection_dim=32)


def shrink_preset(preset: str | ModelPreset) -> ModelPreset:
    """The preset's exact layout with tiny sizes (``weights init --preset NAME --shrink``).

    Kept: the text model family, rope, context length and norm, the grouped-query ratio (scaled),
    the vision tower's image size and patch (so the image-token count: 256 for v1, 576 for
    v1.5), the vision layer and select strategy, the projector, the template and the
    preprocessing (pad-to-square, mean/std). Shrunk: hidden 64, 2 text layers, 4 heads, a
    32-wide 2-layer vision tower, and (when built) the tiny in-process tokenizer's vocabulary.

    Raises:
        ConfigError: unknown preset name.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    text = dict(preset.text_config, **_SHRUNK_TEXT)
    heads, kv = preset.text_config.get("num_attention_heads"), preset.text_config.get("num_key_value_heads")
    ratio = max(1, int(heads) // int(kv)) if heads and kv else 1
    text["num_key_value_heads"] = max(1, _SHRUNK_TEXT["num_attention_heads"] // ratio)
    text.pop("vocab_size", None)  # the tokenizer decides
    vision = dict(preset.vision_config, **_SHRUNK_VISION)
    return ModelPreset(**{**preset.__dict__, "text_config": text, "vision_config": vision,
                          "description": f"{preset.description} (shrunk: tiny sizes, same layout)",
                          "extra": {**preset.extra, "shrunk": True}})
