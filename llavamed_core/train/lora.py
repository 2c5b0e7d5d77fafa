"""LoRA and QLoRA with PEFT: which modules get adapters, and merging them back into a checkpoint.

Adapters go on the language model's attention and MLP projections (``--lora-target`` picks others,
``--dora``/``--rslora`` PEFT's variants); the projector is trained fully (``modules_to_save``), as
LLaVA's LoRA recipe does. The vision tower stays frozen unless ``--train-vision`` trains it in full. At the end the
adapters are merged into a standalone checkpoint, unless the user asks for the adapter alone.
QLoRA loads the language model's linear layers in 4-bit NF4 (bitsandbytes: CUDA, or its CPU
backend); the vision tower, the projector and the output head stay unquantised. Its merge re-loads
the base weights unquantised so the merged checkpoint is a normal one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DependencyError, TrainingError

__all__ = ["LORA_TARGETS", "QLORA_SKIP_MODULES", "lora_config", "lora_targets", "wrap_lora", "quantization_config",
           "check_quantized_parts", "merge_lora", "adapter_state"]

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
"""Regular expression (PEFT matches it against full module names) for the LM's projections."""

QLORA_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head",
                      "vision_tower", "multi_modal_projector"]
"""Modules QLoRA leaves unquantised. transformers 5 names them ``model.vision_tower.…`` and matches
a pattern from the start of the name; the bare names keep older substring matching right."""


def lora_config(r: int, alpha: int, dropout: float, target_modules: str = LORA_TARGETS, dora: bool = False,
                rslora: bool = False, modules_to_save: tuple[str, ...] = ("multi_modal_projector",)) -> Any:
    """The PEFT ``LoraConfig`` for a Llava model.

    Args:
        r: rank.
        alpha: scaling numerator (``alpha / r``, or ``alpha / sqrt(r)`` with ``rslora``).
        dropout: dropout on the adapter path.
        target_modules: a regular expression over full module names (:func:`lora_targets`).
        dora: weight-decomposed LoRA (a trained magnitude vector per adapted layer).
        rslora: rank-stabilised scaling.
        modules_to_save: parts trained in full beside the adapters (the projector; the vision
            tower when it trains).
    """
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      modules_to_save=list(modules_to_save) or None, bias="none", task_type="CAUSAL_LM",
                      use_dora=dora, use_rslora=rslora)


def lora_targets(model: Any, spec: str | None) -> str:
    """The ``target_modules`` expression for ``--lora-target``: adapters on the language model only.

    Args:
        model: the Llava model (its module names are checked).
        spec: ``None`` (the attention and MLP projections, :data:`LORA_TARGETS`), ``all-linear``
            (every linear layer of the language model; the output head is not in it), or
            comma-separated module names (``q_proj,v_proj``).

    Raises:
        ConfigError: a name that is no linear layer of the language model (the known ones listed).
    """
    import re

    import torch

    if spec is None:
        return LORA_TARGETS
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if ".language_model." in f".{name}." and isinstance(module, torch.nn.Linear)})
    if spec.strip() == "all-linear":
        names = linear
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in linear]
        if unknown:
            raise ConfigError(f"--lora-target {spec}: '{unknown[0]}' is not a linear layer of the language model",
                              f"use all-linear or some of: {','.join(linear)}")
    return r".*language_model.*\.(" + "|".join(re.escape(n) for n in names) + ")"


def wrap_lora(model: Any, config: Any, linear_projector: bool) -> Any:
    """Wrap ``model`` with LoRA adapters; the projector's trained copy keeps an identity ``linear_2``.

    Args:
        model: a ``LlavaForConditionalGeneration`` (frozen or not; PEFT freezes the base).
        config: from :func:`lora_config`.
        linear_projector: the projector is the v1 single linear layer (``linear_2`` frozen).

    Returns:
        The ``PeftModel``.
    """
    import torch
    from peft import get_peft_model

    # A model held in 16 bit (DeepSpeed keeps the fp32 master copy itself) gets 16-bit adapters:
    # PEFT would make them fp32 beside a 16-bit projector copy, and ZeRO-3 needs one dtype for
    # everything that trains (it stops on an assertion in its partitioning otherwise).
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    half = len(floats) == 1 and floats <= {torch.bfloat16, torch.float16}
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=not half)
    if linear_projector:
        for name, param in peft_model.named_parameters():
            if "multi_modal_projector" in name and ".linear_2." in name:
                param.requires_grad_(False)
    return peft_model


def quantization_config(device: str) -> Any:
    """The 4-bit NF4 ``BitsAndBytesConfig`` of QLoRA (the language model's linear layers only).

    Computes in bf16 on CUDA and in float32 on the CPU (bitsandbytes' CPU backend).

    Raises:
        DependencyError: bitsandbytes is not installed, or has no 4-bit support on this device.
    """
    import torch

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DependencyError("--qlora needs the bitsandbytes package", "pip install 'llavamed[qlora]'") from None
    except Exception as exc:  # a broken native library raises RuntimeError/OSError on import
        raise DependencyError(f"--qlora: bitsandbytes does not load here ({str(exc).splitlines()[0]})",
                              "reinstall it: pip install --force-reinstall bitsandbytes") from None
    cuda = device.startswith("cuda")
    if not cuda and "multi_backend" not in getattr(bitsandbytes, "features", set()):
        raise DependencyError(f"--qlora on the CPU needs bitsandbytes ≥ 0.45 (installed: "
                              f"{getattr(bitsandbytes, '__version__', '?')}, 4-bit kernels for CUDA only)",
                              "pip install -U bitsandbytes, or train on a CUDA GPU")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
                              llm_int8_skip_modules=list(QLORA_SKIP_MODULES))


def check_quantized_parts(model: Any) -> int:
    """Check that the 4-bit layers are the language model's linear layers, and only those.

    Returns:
        The number of 4-bit linear layers.

    Raises:
        TrainingError: a layer outside the language model was quantised, or none inside it.
    """
    from bitsandbytes.nn import Linear4bit

    quantised = [name for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    outside = [n for n in quantised if ".language_model." not in f".{n}"]
    if outside or not quantised:
        raise TrainingError(f"--qlora: the 4-bit layers are not the language model's linear layers "
                            f"({outside[0] if outside else 'none quantised'} …)",
                            "this is a bug (transformers changed its module names?); use --lora meanwhile")
    return len(quantised)


def adapter_state(peft_model: Any, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The trained part of a PEFT model (LoRA weights and the projector), on CPU."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(peft_model, state_dict=state)
    return {k: v.detach().cpu() for k, v in sd.items()}


def merge_lora(base_dir: str | os.PathLike, config: Any, adapter: dict[str, Any], dtype: Any,
               linear_projector: bool) -> Any:
    """A plain ``LlavaForConditionalGeneration`` with the adapters merged in, on CPU.

    The base weights are loaded again from ``base_dir`` (unquantised, in ``dtype``), the adapter
    state is applied, and PEFT merges it. This one path serves LoRA, QLoRA and sharded runs
    (ZeRO-3/FSDP), where the live model is not a plain module on one process.

    Args:
        base_dir: the input checkpoint of the run.
        config: the run's ``LoraConfig``.
        adapter: from :func:`adapter_state`.
        dtype: torch dtype of the merged weights.
        linear_projector: keep ``linear_2`` frozen (irrelevant to merging; kept for symmetry).
    """
    from peft import set_peft_model_state_dict
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(Path(base_dir), dtype=dtype)
    peft_model = wrap_lora(base, config, linear_projector)
    result = set_peft_model_state_dict(peft_model, adapter)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise TrainingError(f"the trained adapter does not fit the base model ({unexpected[0]} …)",
                              "this is a bug; rerun with LLAVAMED_DEBUG=1 and report it")
    return peft_model.merge_and_unload()
