"""Compose an untrained LLaVA from a local causal LM and a local CLIP vision model.

This is the paper's "from Vicuna" start: the language model and the vision tower keep their
pretrained weights, ``<image>`` is added to the tokenizer (embeddings resized, the new rows set to
the mean embedding), and the projector is freshly initialised (``linear`` = the v1 single linear
layer, ``mlp2x_gelu`` = the v1.5 two-layer MLP).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError
from .presets import ModelPreset
from .templates import TEMPLATES

__all__ = ["compose_llava"]

PROJECTORS = {"linear": "linear", "mlp2x_gelu": "gelu"}


def compose_llava(llm: str | os.PathLike, vision: str | os.PathLike, projector: str = "mlp2x_gelu",
                  template: str = "v1.5", vision_feature_layer: int = -2,
                  pad_to_square: bool | None = None, seed: int = 0) -> tuple[Any, Any]:
    """Build ``(model, processor)`` from a causal LM directory and a CLIP directory.

    Args:
        llm: a transformers causal-LM checkpoint (Llama, Vicuna, Mistral, ...): a directory or a
            Hub id ``org/name[@revision]``.
        vision: a CLIP (or CLIP vision) checkpoint: a directory or a Hub id.
        projector: ``linear`` or ``mlp2x_gelu``.
        template: conversation template name (``v1``, ``v1.5``, ``tiny``).
        vision_feature_layer: hidden-state index fed to the projector.
        pad_to_square: pad images to a square (default: true for the v1.5 template).
        seed: seed of the projector's initialisation.

    Raises:
        ConfigError: unknown projector or template.
        ModelError: a directory that does not hold the expected model.
    """
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel,
                              LlavaConfig, LlavaForConditionalGeneration)

    from .checkpoint import identity_projector_second_layer, make_processor

    if projector not in PROJECTORS:
        raise ConfigError(f"--projector {projector}: unknown", f"choose one of: {', '.join(PROJECTORS)}")
    if template not in TEMPLATES:
        raise ConfigError(f"--template {template}: unknown", f"choose one of: {', '.join(TEMPLATES)}")
    from .hub import resolve_model

    llm, vision = resolve_model(llm, "--llm", "model directory"), resolve_model(vision, "--vision", "model directory")
    for p, what in ((llm, "--llm"), (vision, "--vision")):
        if not (Path(p) / "config.json").exists():
            raise ModelError(f"{p}: no config.json ({what} must be a local Hugging Face model directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm)
        lm = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32)
        vis = CLIPVisionModel.from_pretrained(vision, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load a model ({str(exc).splitlines()[0]})") from None

    added = {}
    if "<image>" not in tokenizer.get_vocab():
        added["additional_special_tokens"] = ["<image>"]
    if tokenizer.pad_token is None:
        added["pad_token"] = "<pad>"
    if added:
        tokenizer.add_special_tokens(added)
    image_id = tokenizer.convert_tokens_to_ids("<image>")

    vcfg: CLIPVisionConfig = vis.config
    preset = ModelPreset(
        name="composed", description="composed from local models",
        text_model_type=lm.config.model_type, text_config={}, vision_config=vcfg.to_dict(),
        vision_feature_layer=vision_feature_layer, projector_hidden_act=PROJECTORS[projector],
        template=template, pad_to_square=(template == "v1.5") if pad_to_square is None else pad_to_square,
    )
    text_config = lm.config
    text_config.pad_token_id = tokenizer.pad_token_id
    config = LlavaConfig(vision_config=vcfg, text_config=text_config, image_token_index=image_id,
                         vision_feature_layer=vision_feature_layer,
                         vision_feature_select_strategy="default",
                         projector_hidden_act=PROJECTORS[projector],
                         image_seq_length=preset.num_image_tokens, tie_word_embeddings=False)
    config.llavamed = {"preset": "composed", "template": template}
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.get_decoder().state_dict())
    _load_vision(model, vis)
    old_rows = lm.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        emb_in = model.get_input_embeddings().weight
        emb_out = model.lm_head.weight
        emb_out[:old_rows].copy_(lm.get_output_embeddings().weight)
        if len(tokenizer) > old_rows:
            emb_in[old_rows:] = emb_in[:old_rows].mean(0, keepdim=True)
            emb_out[old_rows:] = emb_out[:old_rows].mean(0, keepdim=True)
    if PROJECTORS[projector] == "linear":
        identity_projector_second_layer(model)
    return model, make_processor(preset, tokenizer)


def _load_vision(model: Any, vis: Any) -> None:
    """Copy CLIP vision weights into the Llava vision tower (whatever its wrapping)."""
    tower = model.model.vision_tower
    src = vis.state_dict()
    dst_keys = set(tower.state_dict())
    mapped = {}
    for k, v in src.items():
        for cand in (k, k.removeprefix("vision_model."), "vision_model." + k.removeprefix("vision_model.")):
            if cand in dst_keys:
                mapped[cand] = v
                break
    missing = dst_keys - set(mapped)
    if missing:
        raise ModelError(f"the CLIP checkpoint lacks {len(missing)} vision-tower tensors, e.g. {sorted(missing)[0]}")
    tower.load_state_dict(mapped)
