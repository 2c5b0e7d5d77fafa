"""Build, save and load standard Hugging Face Llava checkpoints (DESIGN.md contract 1).

A checkpoint directory holds ``config.json`` (everything that decides behaviour: projector,
vision layer, select strategy, image token id and count), safetensors weights under the key
layout of the llava-hf checkpoints on the Hub (``language_model.model.*``,
``language_model.lm_head.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``),
the tokenizer, the processor (``processor_config.json`` and ``preprocessor_config.json``), the
chat template and ``generation_config.json`` (the template's stop strings in
``llavamed_stop_strings``, their tokens in ``eos_token_id``). transformers 4.4x–5.x, vLLM and
SGLang load it unchanged (:mod:`.compat` writes the fields each of them needs).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DependencyError, ModelError
from ..io import atomic_dir, atomic_write_json
from .compat import finalize_checkpoint_files
from .presets import ModelPreset, get_preset
from .templates import STOP_STRINGS, TEMPLATES

log = logging.getLogger("llavamed.model")

__all__ = [
    "build_from_preset",
    "make_processor",
    "save_checkpoint",
    "save_processor",
    "load_checkpoint",
    "check_checkpoint_dir",
    "hub_key",
    "resolve_device",
    "resolve_dtype",
    "resolve_attn_implementation",
    "use_shape_free_sdpa",
]

_SHARD_BYTES = 2 * 1024**3  # = shards.DEFAULT_SHARD_BYTES


def hub_key(name: str) -> str:
    """Map a transformers-5 ``LlavaForConditionalGeneration`` parameter name to the Hub layout.

    >>> hub_key("model.vision_tower.embeddings.patch_embedding.weight")
    'vision_tower.vision_model.embeddings.patch_embedding.weight'
    """
    if name.startswith("model.vision_tower.vision_model."):
        return name[len("model."):]
    if name.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + name[len("model.vision_tower."):]
    if name.startswith("model.multi_modal_projector."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name.startswith("lm_head."):
        return "language_model." + name
    return name


def make_processor(preset: ModelPreset, tokenizer: Any, chat_template: str | None = None) -> Any:
    """The ``LlavaProcessor`` for a preset: image preprocessing, image-token expansion, template.

    Args:
        preset: the architecture.
        tokenizer: a tokenizer that has ``<image>``.
        chat_template: Jinja source (default: the preset's template).
    """
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, LlavaProcessor

    size = preset.image_size
    common = dict(image_mean=list(preset.image_mean), image_std=list(preset.image_std))
    if preset.pad_to_square:
        # v1.5: pad to a square with the mean colour, then resize (no crop loses nothing).
        ip = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": size},
                                    crop_size={"height": size, "width": size}, **common)
    else:
        ip = CLIPImageProcessorPil(size={"shortest_edge": size},
                                   crop_size={"height": size, "width": size}, **common)
    template = chat_template if chat_template is not None else TEMPLATES[preset.template]
    return LlavaProcessor(
        image_processor=ip, tokenizer=tokenizer, chat_template=template,
        patch_size=int(preset.vision_config["patch_size"]),
        num_additional_image_tokens=1,
        vision_feature_select_strategy=preset.vision_feature_select_strategy,
    )


def build_from_preset(preset: str | ModelPreset, seed: int = 0, tokenizer: Any = None,
                      text_overrides: dict | None = None, vision_overrides: dict | None = None,
                      dtype: Any = None) -> tuple[Any, Any]:
    """A randomly initialised Llava model and its processor, from a preset.

    Args:
        preset: preset name or object.
        seed: torch seed for the initial weights.
        tokenizer: tokenizer to use (default: the tiny in-process tokenizer, for any preset; a
            real run brings the base model's tokenizer through ``weights init --llm``).
        text_overrides: changes to the text config (e.g. fewer layers for a ~0.5B GPU check).
        vision_overrides: changes to the vision config.
        dtype: torch dtype of the weights (default float32).

    Returns:
        ``(model, processor)``.
    """
    import torch
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from .tokenizer import build_tiny_tokenizer

    preset = get_preset(preset) if isinstance(preset, str) else preset
    own_tokenizer = tokenizer is None
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ConfigError("the tokenizer has no <image> token", "add it as a special token first")
    text_kwargs = dict(preset.text_config, **(text_overrides or {}))
    text_kwargs["vocab_size"] = len(tokenizer)
    text_kwargs.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    text_config = AutoConfig.for_model(preset.text_model_type, **text_kwargs)
    vision_config = CLIPVisionConfig(**dict(preset.vision_config, **(vision_overrides or {})))
    vision_preset = ModelPreset(**{**preset.__dict__, "vision_config": vision_config.to_dict()})
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_id,
        vision_feature_layer=preset.vision_feature_layer,
        vision_feature_select_strategy=preset.vision_feature_select_strategy,
        projector_hidden_act=preset.projector_hidden_act,
        image_seq_length=vision_preset.num_image_tokens,
        tie_word_embeddings=False,
    )
    config.llavamed = {"preset": preset.name, "template": preset.template}
    if preset.extra.get("shrunk"):
        config.llavamed["shrunk"] = True
    if own_tokenizer or preset.extra.get("shrunk"):  # the tokenizer's limit is the model's context
        tokenizer.model_max_length = int(text_kwargs.get("max_position_embeddings") or tokenizer.model_max_length)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if preset.projector_hidden_act == "linear":
        identity_projector_second_layer(model)
    if dtype is not None:
        model = model.to(dtype)
    return model, make_processor(vision_preset, tokenizer)


def identity_projector_second_layer(model: Any) -> None:
    """Set ``linear_2`` of the projector to the identity: the v1 single linear projector exactly.

    With ``projector_hidden_act="linear"`` the projector computes ``linear_2(linear_1(x))``; an
    identity ``linear_2`` makes that the paper's one linear layer. Training keeps it frozen.
    """
    import torch

    lin = model.model.multi_modal_projector.linear_2
    with torch.no_grad():
        lin.weight.copy_(torch.eye(lin.weight.shape[0], lin.weight.shape[1], dtype=lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.zero_()


def save_checkpoint(model: Any, processor: Any, out: str | os.PathLike, overwrite: bool = False,
                    max_shard_bytes: int = _SHARD_BYTES, extra_json: dict[str, Any] | None = None) -> Path:
    """Write a standard HF Llava checkpoint directory, atomically (temp dir, then rename).

    The weights go through the one checkpoint writer (:func:`~llavamed_core.model.shards.write_tensors`:
    huggingface_hub's shard split, the standard ``model.safetensors.index.json``); a failure midway
    leaves nothing at ``out`` (:func:`~llavamed_core.io.atomic_dir`), and the files get the umask's modes.

    Args:
        model: a ``LlavaForConditionalGeneration``.
        processor: its ``LlavaProcessor`` (tokenizer, image processor, chat template).
        out: destination directory.
        overwrite: replace an existing non-empty ``out``.
        max_shard_bytes: safetensors shard size.
        extra_json: more files to write beside the weights, ``{"name.json": obj}``.

    Returns:
        ``out`` as a Path.
    """
    from .shards import OutTensor, write_tensors

    out = Path(out)
    plan = []
    for name, tensor in model.state_dict().items():
        key = hub_key(name)
        if key == "language_model.lm_head.weight" and model.config.tie_word_embeddings:
            continue
        t = tensor.detach().contiguous().cpu()
        plan.append(OutTensor(key, tuple(t.shape), t.dtype, (lambda t=t: [t.reshape(-1)])))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_tensors(tmp, plan, max_shard_bytes)
        model.config.architectures = ["LlavaForConditionalGeneration"]
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_processor(processor, tmp)
        for fname, obj in (extra_json or {}).items():
            atomic_write_json(tmp / fname, obj)
        # The template's stop strings (a custom template keeps those already in the config).
        template = (getattr(model.config, "llavamed", None) or {}).get("template")
        finalize_checkpoint_files(tmp, STOP_STRINGS.get(template) if template in STOP_STRINGS else None)
    return out


def save_processor(processor: Any, out: Path) -> None:
    """Write the processor (tokenizer, chat template, ``processor_config.json``) and, for
    transformers 4.x, the image processor alone in ``preprocessor_config.json``."""
    processor.save_pretrained(out)
    ip = processor.image_processor.to_dict()
    ip["image_processor_type"] = ip.get("image_processor_type", "CLIPImageProcessor").replace("Pil", "")
    ip["processor_class"] = "LlavaProcessor"
    atomic_write_json(out / "preprocessor_config.json", ip)


def _add_legacy_config_fields(path: Path) -> None:
    """Add ``rope_theta`` beside ``rope_parameters`` and ``text_config.architectures`` so
    transformers 4.x and vLLM read the config too (see :mod:`.compat`)."""
    from .compat import _fix_config

    _fix_config(path)


def read_dir_json(directory: Path, name: str, missing: str, hint: str) -> dict[str, Any]:
    """``directory/name`` as a JSON object (a model's ``config.json``, an ``adapter_config.json``).

    Raises:
        ModelError: ``{directory}: {missing}`` with ``hint`` when the file is absent; invalid JSON;
            not an object.
    """
    path = Path(directory) / name
    if not path.exists():
        raise ModelError(f"{directory}: {missing}", hint)
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: not a JSON object")
    return obj


def check_checkpoint_dir(path: str | os.PathLike, what: str = "--model") -> Path:
    """Check that ``path`` is a Llava checkpoint directory; return it as a local Path.

    ``path`` may also be a Hugging Face repo id ``org/name[@revision]`` (a local path wins); it is
    fetched into the Hub cache and the snapshot's directory is returned
    (:func:`~llavamed_core.model.hub.resolve_model`).

    Raises:
        ModelError: missing directory, missing config, another model type, or no weights.
    """
    from .hub import resolve_model

    path = resolve_model(path, what)
    cfg_path = path / "config.json"
    cfg = read_dir_json(path, "config.json", "no config.json, not a Hugging Face checkpoint",
                        "original LLaVA-Med checkpoints convert with `llavamed weights convert`")
    if cfg.get("model_type") != "llava":
        raise ModelError(
            f"{cfg_path}: model_type is '{cfg.get('model_type')}', expected 'llava'",
            "original LLaVA-Med checkpoints (llava, llava_mistral) convert with `llavamed weights convert`")
    if not (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        raise ModelError(f"{path}: no weight files (*.safetensors)", "the checkpoint is incomplete")
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem is not None:
            raise ModelError(f"{weights}: could not load the checkpoint ({problem})",
                             "the file is incomplete or corrupt; write or download it again")
    return path


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's header, or ``None``: the header must be JSON and
    every tensor's data must lie within the file.

    Cheap (the header only), and catches before any work starts what a load would otherwise fail
    on deep inside transformers: a truncated or overwritten file.
    """
    from .shards import _read_safetensors_header

    try:
        header, data_start = _read_safetensors_header(path)
    except ModelError as exc:
        return exc.message.removeprefix(f"{path}: ")
    size = path.stat().st_size
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            end = int(meta["data_offsets"][1])
        except (KeyError, TypeError, ValueError, IndexError):
            return f"tensor {name}: unreadable entry in the header"
        if data_start + end > size:
            return f"truncated: tensor {name} ends at byte {data_start + end:,}, the file has {size:,}"
    return None


def resolve_device(device: str | None = None) -> str:
    """``device`` as given, else ``cuda`` when available, else ``cpu``."""
    import torch

    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine",
                              "use --device cpu")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | None, device: str) -> Any:
    """``dtype`` by name, else bfloat16 on CUDA (float16 where bf16 is missing), float32 on CPU."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype:
        if dtype not in names:
            raise ConfigError(f"--dtype {dtype}: unknown dtype", "use float32, bfloat16 or float16")
        return names[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_attn_implementation(device: str, requested: str | None = None) -> str:
    """``flash_attention_2`` when flash-attn imports and the device is CUDA, else ``sdpa``."""
    if requested:
        if requested == "flash_attention_2":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                raise DependencyError("flash-attn is not installed",
                                      "pip install 'llavamed[gpu]', or drop the option") from None
        return requested
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


CUDNN_SDPA_ENV = "LLAVAMED_CUDNN_SDPA"
"""Set to ``1`` to keep PyTorch's cuDNN attention backend on (see :func:`use_shape_free_sdpa`)."""


def use_shape_free_sdpa(device: str) -> bool:
    """On CUDA, turn off the cuDNN backend of ``scaled_dot_product_attention`` for this process
    (the flash, memory-efficient and math backends stay), unless ``LLAVAMED_CUDNN_SDPA=1``.

    Why: PyTorch 2.11 picks cuDNN attention first on Hopper GPUs, and cuDNN builds an execution
    graph for every new shape, in every thread (its graph cache is per thread). Measured on an
    H200 with the ~0.5B v1.5-shaped model in bf16, a graph costs ~40 ms, and our shapes are rarely
    seen twice: a decode step's key length grows by one each step, a padded batch's width follows
    its prompts, packed samples have their own lengths. Decode steps took ~42 ms instead of
    ~2.5 ms (a serving thread, or prompts of new lengths), a padded batch of 32 answers 1.86 s
    instead of 0.26 s, and a packed training step ~1.7 s instead of ~85 ms. The flash and
    memory-efficient kernels need no per-shape build.

    Returns:
        Whether the cuDNN backend is off now (``False`` on CPU, and when the variable keeps it).
    """
    if not device.startswith("cuda") or os.environ.get(CUDNN_SDPA_ENV) == "1":
        return False
    import torch

    if torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        log.info("cuDNN attention off (it builds a graph per new shape; %s=1 keeps it)", CUDNN_SDPA_ENV)
    return True


def load_checkpoint(path: str | os.PathLike, device: str | None = None, dtype: str | None = None,
                    attn_implementation: str | None = None) -> tuple[Any, Any]:
    """Load a checkpoint for inference: ``(model in eval mode on device, processor)``.

    Args:
        path: checkpoint directory, or a Hub id ``org/name[@revision]``.
        device: see :func:`resolve_device`.
        dtype: see :func:`resolve_dtype`.
        attn_implementation: see :func:`resolve_attn_implementation`.

    Raises:
        ModelError: not a Llava checkpoint, or it fails to load.
    """
    from safetensors import SafetensorError
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = check_checkpoint_dir(path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    attn = resolve_attn_implementation(dev, attn_implementation)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype,
                                                              attn_implementation=attn)
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise ModelError(f"{path}: could not load the checkpoint ({str(exc).splitlines()[0]})",
                         "check that the directory is complete") from None
    return model.to(dev).eval(), processor
