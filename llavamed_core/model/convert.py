"""Convert the original LLaVA-Med checkpoints into standard Hugging Face Llava checkpoints.

The original checkpoints load only through the original code. This module recognises them from
their own ``config.json`` (never from a folder or model name) and writes a
``LlavaForConditionalGeneration`` directory in the key layout of the llava-hf checkpoints on the
Hub, streaming tensor by tensor (:mod:`.shards`).

Layouts understood:

- **LLaVA-Med v1** (``model_type`` ``llava`` with a flat LLaMA config, ``LlavaLlamaForCausalLM``):
  LLaMA keys ``model.*`` + ``lm_head.weight``, one linear projector ``model.mm_projector.weight/bias``,
  config keys ``mm_hidden_size``, ``mm_vision_tower``, ``mm_vision_select_layer``,
  ``mm_use_im_start_end``; the tokenizer has ``<im_patch>`` (and ``<im_start>``/``<im_end>``). The
  CLIP tower is not inside: it comes from ``--vision``. The original forward takes CLIP hidden
  state ``mm_vision_select_layer`` without its CLS token, projects it, and writes the result over
  the embeddings of the 256 ``<im_patch>`` tokens that sit between ``<im_start>`` and
  ``<im_end>`` (those two keep their learned embeddings).
- **LLaVA-Med v1.5** (``model_type`` ``llava_mistral``, ``LlavaMistralForCausalLM``): Mistral keys,
  a two-layer GELU projector ``model.mm_projector.0/.2``, the CLIP-336 tower inside under
  ``model.vision_tower.vision_tower.vision_model.*``, ``image_aspect_ratio: pad``. The original
  forward cuts the prompt at each ``<image>`` (a placeholder id, not a vocabulary token) and
  splices the 576 projected patch features in between.

What the conversion does, exactly:

- keys: ``model.{embed_tokens,layers,norm}`` → ``language_model.model.*``, ``lm_head`` →
  ``language_model.lm_head``, projector → ``multi_modal_projector.linear_1/linear_2``, tower →
  ``vision_tower.vision_model.*``; rotary ``inv_freq`` and CLIP ``position_ids`` buffers are
  dropped (transformers recomputes them); any other key stops the conversion, listed.
- v1's single linear projector becomes ``projector_hidden_act="linear"`` with ``linear_2`` the
  identity (exact: ``linear_2(linear_1(x)) = linear_1(x)``).
- v1's ``<im_patch>`` token is renamed ``<image>`` in place (same id, same embedding rows), so the
  vocabulary, the weights and the logits are unchanged; the chat template writes
  ``<im_start><image><im_end>`` and the processor expands ``<image>`` to the 256 patch tokens.
- v1.5 had no image token in its vocabulary: ``<image>`` is added, with one new embedding and
  output row set to the mean of the others (its input embedding is always replaced by image
  features; its logit is the mean logit, never the greedy choice). Logits over the original
  vocabulary are unchanged.
- config: vision layer from ``mm_vision_select_layer``, CLS dropped (``"default"`` strategy),
  ``image_seq_length`` = patches per image; processor with the CLIP preprocessing, padded to a
  square with the mean colour when the config says ``image_aspect_ratio: pad``; chat template
  ``v1`` or ``v1.5`` (:mod:`.templates`); stop strings in ``generation_config.json``
  (``llavamed_stop_strings``, their tokens in ``eos_token_id``: :mod:`.compat`).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..io import atomic_dir
from ..progress import ProgressCallback
from .shards import CheckpointReader, OutTensor, TensorSpec, WriteOptions, WriteResult, write_tensors

__all__ = ["ConvertConfig", "ConvertResult", "OriginalLayout", "detect_layout", "convert_checkpoint",
           "convert_source", "read_source_config", "LAYOUTS"]

LAYOUTS = {
    "llava-med-v1": "LLaVA-Med v1: LLaMA + one linear projector, <im_start>/<im_patch>/<im_end> tokens, "
                    "CLIP tower outside the checkpoint",
    "llava-med-v1.5": "LLaVA-Med v1.5: llava_mistral, two-layer GELU projector, CLIP-336 tower inside",
}

# Buffers that old checkpoints saved and transformers recomputes.
_DROPPED_SUFFIXES = (".rotary_emb.inv_freq", "embeddings.position_ids")

# Config keys of the original text model that carry over to the HF text config.
_TEXT_KEYS = ("attention_bias", "attention_dropout", "head_dim", "hidden_act", "hidden_size",
              "initializer_range", "intermediate_size", "max_position_embeddings", "mlp_bias",
              "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pretraining_tp",
              "rms_norm_eps", "rope_theta", "rope_scaling", "sliding_window", "bos_token_id",
              "eos_token_id")

_VISION_PREFIXES = ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_model.",
                    "model.vision_tower.vision_tower.")
# What a CLIP vision transformer holds (transformers 5 saves these without the vision_model. prefix).
_CLIP_VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


@dataclass
class ConvertConfig(WriteOptions):
    """Options of ``weights convert`` (and the output options of :class:`~.shards.WriteOptions`).

    Attributes:
        src: the original checkpoint directory (or a Hub id ``org/name[@revision]``).
        vision: a CLIP checkpoint directory (or a Hub id): the tower of v1 (required), or the CLIP config and
            preprocessing of v1.5 (optional; the tower's weights stay those inside).
    """

    src: Path
    vision: Path | None = None


@dataclass
class ConvertResult(WriteResult):
    """What ``convert`` found and did (and the output counts of :class:`~.shards.WriteResult`).

    Attributes:
        layout: ``llava-med-v1`` or ``llava-med-v1.5``.
        description: one line about the layout.
        text_model_type: ``llama`` or ``mistral``.
        projector: ``linear`` (identity ``linear_2``) or ``gelu``.
        image_tokens: image tokens per image.
        image_token_id: id of ``<image>``.
        vision_from: where the tower's weights came from.
        actions: what was done, one line each.
        dropped: keys left out (recomputed buffers).
    """

    layout: str
    description: str
    text_model_type: str
    projector: str
    image_tokens: int
    image_token_id: int
    vision_from: str
    actions: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OriginalLayout:
    """An original LLaVA-Med layout, as read from a checkpoint's config.

    Attributes:
        name: ``llava-med-v1`` or ``llava-med-v1.5``.
        text_model_type: transformers model type of the language model.
        projector: ``linear`` or ``mlp2x_gelu``.
        im_start_end: v1 wraps the patch tokens in ``<im_start>``/``<im_end>``.
        select_layer: CLIP hidden-state index fed to the projector.
        select_strategy: ``default`` (CLS dropped) or ``full``.
        pad_to_square: pad images to a square with the mean colour (``image_aspect_ratio: pad``).
        template: chat template name (:data:`llavamed_core.model.templates.TEMPLATES`).
    """

    name: str
    text_model_type: str
    projector: str
    im_start_end: bool
    select_layer: int
    select_strategy: str
    pad_to_square: bool
    template: str


def read_source_config(src: Path) -> dict[str, Any]:
    """The ``config.json`` of an original checkpoint.

    Raises:
        ModelError: missing or invalid.
    """
    from .checkpoint import read_dir_json

    return read_dir_json(Path(src), "config.json", "no config.json", "point SRC at the checkpoint directory itself")


def detect_layout(config: dict[str, Any], where: str = "config.json") -> OriginalLayout:
    """Recognise an original LLaVA-Med layout from its config alone.

    Raises:
        ModelError: a standard HF checkpoint (nothing to do) or an unknown layout.
    """
    mt = config.get("model_type")
    arch = (config.get("architectures") or ["?"])[0]
    if mt == "llava" and "text_config" in config:
        raise ModelError(f"{where}: already a standard Hugging Face Llava checkpoint",
                         "load it directly; nothing to convert")
    if "mm_hidden_size" not in config and "mm_vision_tower" not in config:
        raise ModelError(f"{where}: model_type '{mt}' ({arch}) is not an original LLaVA-Med checkpoint "
                         "(no mm_hidden_size / mm_vision_tower)",
                         "convert reads LLaVA-Med v1 (model_type llava) and v1.5 (model_type llava_mistral)")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ModelError(f"{where}: mm_vision_select_feature '{feature}' is not supported",
                         "supported: patch (CLS dropped) and cls_patch")
    layer = int(config.get("mm_vision_select_layer", -1))
    proj = config.get("mm_projector_type", "linear")
    if mt == "llava":
        if proj != "linear":
            raise ModelError(f"{where}: a v1 (model_type llava) checkpoint with mm_projector_type '{proj}'",
                             "LLaVA-Med v1 has one linear projector; this layout is unknown")
        # The v1 code always drops CLS: select_hidden_state[:, 1:].
        return OriginalLayout("llava-med-v1", "llama", "linear", bool(config.get("mm_use_im_start_end", False)),
                              layer, "default", False, "v1")
    if mt == "llava_mistral":
        if proj not in ("linear", "mlp2x_gelu"):
            raise ModelError(f"{where}: mm_projector_type '{proj}' is not supported",
                             "supported: linear, mlp2x_gelu")
        if config.get("mm_use_im_start_end"):
            raise ModelError(f"{where}: a llava_mistral checkpoint with mm_use_im_start_end true is an unknown "
                             "layout", "LLaVA-Med v1.5 has mm_use_im_start_end false")
        aspect = config.get("image_aspect_ratio", "square") or "square"
        if aspect not in ("pad", "square"):
            raise ModelError(f"{where}: image_aspect_ratio '{aspect}' is not supported",
                             "supported: pad (LLaVA-Med v1.5) and square")
        return OriginalLayout("llava-med-v1.5", "mistral", proj, False, layer,
                              "default" if feature == "patch" else "full", aspect == "pad", "v1.5")
    raise ModelError(f"{where}: model_type '{mt}' ({arch}) is not a LLaVA-Med layout this tool knows",
                     "convert reads LLaVA-Med v1 (model_type llava) and v1.5 (model_type llava_mistral)")


# ---------------------------------------------------------------------------------------- vision
def _vision_config_from_dir(vision: Path) -> Any:
    from transformers import AutoConfig, CLIPVisionConfig

    if not (vision / "config.json").exists():
        raise ModelError(f"--vision {vision}: no config.json", "pass a local CLIP checkpoint directory")
    try:
        cfg = AutoConfig.from_pretrained(vision)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"--vision {vision}: unreadable config ({str(exc).splitlines()[0]})") from None
    if cfg.model_type == "clip":
        return CLIPVisionConfig(**cfg.vision_config.to_dict())
    if cfg.model_type == "clip_vision_model":
        return cfg
    raise ModelError(f"--vision {vision}: model_type '{cfg.model_type}' is not CLIP",
                     "LLaVA-Med uses openai/clip-vit-large-patch14 (v1) and -336 (v1.5)")


def _vision_config_from_weights(specs: dict[str, Any], prefix: str, where: str) -> Any:
    """A CLIPVisionConfig from the tower's weight shapes (OpenAI CLIP conventions)."""
    from transformers import CLIPVisionConfig

    try:
        hidden, _, patch, _ = specs[prefix + "embeddings.patch_embedding.weight"].shape
        positions = specs[prefix + "embeddings.position_embedding.weight"].shape[0]
        inter = specs[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise ModelError(f"{where}: the vision tower lacks {prefix}{exc.args[0][len(prefix):]}",
                         "pass --vision CLIP_DIR") from None
    layers = {int(m.group(1)) for k in specs if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1 or hidden % 64:
        raise ModelError(f"{where}: cannot infer the CLIP config from the tower's weights "
                         f"(hidden {hidden}, {positions} positions)", "pass --vision CLIP_DIR")
    # OpenAI CLIP ViTs use 64-dimensional heads, quick_gelu and layer-norm eps 1e-5.
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=len(layers),
                            num_attention_heads=hidden // 64, patch_size=patch, image_size=grid * patch,
                            num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _preprocessing_from_dir(vision: Path | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if vision is None or not (vision / "preprocessor_config.json").exists():
        return None
    try:
        pp = json.loads((vision / "preprocessor_config.json").read_text())
        return tuple(float(x) for x in pp["image_mean"]), tuple(float(x) for x in pp["image_std"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ModelError(f"{vision / 'preprocessor_config.json'}: no usable image_mean/image_std") from None


# ---------------------------------------------------------------------------------------- tokenizer
def _rename_in_json(obj: Any, old: str, new: str) -> Any:
    if isinstance(obj, dict):
        return {(new if k == old else k): _rename_in_json(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rename_in_json(v, old, new) for v in obj]
    return new if obj == old else obj


def _convert_tokenizer(tokenizer_dir: Path, layout: OriginalLayout, rows: int) -> tuple[Any, int, list[str]]:
    """The tokenizer with ``<image>``; returns ``(tokenizer, image_id, actions)``."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{tokenizer_dir}: cannot load the tokenizer ({str(exc).splitlines()[0]})",
                         "the checkpoint's tokenizer files are missing or broken") from None
    actions: list[str] = []
    vocab = tok.get_vocab()
    if layout.name == "llava-med-v1":
        needed = ["<im_patch>"] + (["<im_start>", "<im_end>"] if layout.im_start_end else [])
        missing = [t for t in needed if t not in vocab]
        if missing:
            # The original eval code adds them in this order when the saved tokenizer lacks them.
            tok.add_tokens(missing, special_tokens=True)
            actions.append(f"added {', '.join(missing)} to the tokenizer as the original code does")
        if "<image>" in tok.get_vocab():
            raise ModelError(f"{tokenizer_dir}: the v1 tokenizer already has an <image> token",
                             "this is not the original LLaVA-Med v1 tokenizer")
        patch_id = tok.convert_tokens_to_ids("<im_patch>")
        with tempfile.TemporaryDirectory() as td:
            tok.save_pretrained(td)
            for f in Path(td).glob("*.json"):
                data = json.loads(f.read_text())
                renamed = _rename_in_json(data, "<im_patch>", "<image>")
                if renamed != data:
                    f.write_text(json.dumps(renamed, ensure_ascii=False))
            new = AutoTokenizer.from_pretrained(td)
        if new.convert_tokens_to_ids("<image>") != patch_id or len(new) != len(tok):
            raise ModelError(f"{tokenizer_dir}: could not rename <im_patch> to <image> in this tokenizer",
                             "the tokenizer format is not one this tool can edit")
        tok, image_id = new, patch_id
        actions.append(f"renamed <im_patch> (id {patch_id}) to <image>: same id, same weights")
        ids = [tok.convert_tokens_to_ids(t) for t in ("<image>", "<im_start>", "<im_end>")[: 1 + 2 * layout.im_start_end]]
        if max(ids) >= rows:
            raise ModelError(f"{tokenizer_dir}: image token ids {ids} lie beyond the {rows} embedding rows",
                             "the tokenizer does not belong to these weights")
    else:
        if "<image>" in vocab:
            raise ModelError(f"{tokenizer_dir}: the v1.5 tokenizer already has an <image> token",
                             "this is not the original LLaVA-Med v1.5 tokenizer")
        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        image_id = tok.convert_tokens_to_ids("<image>")
        actions.append(f"added <image> to the tokenizer (id {image_id})")
    if tok.pad_token is None:
        # The original code pads with <unk> for these models.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
        actions.append(f"pad token set to {tok.pad_token}")
    return tok, image_id, actions


# ---------------------------------------------------------------------------------------- planning
def _rows(pieces: Iterable[Any], cols: int) -> Iterator[Any]:
    """Regroup flat pieces into ``[n, cols]`` blocks of whole rows."""
    import torch

    carry = None
    for p in pieces:
        buf = p if carry is None else torch.cat([carry, p])
        n = buf.numel() // cols
        if n:
            yield buf[: n * cols].reshape(n, cols)
        carry = buf[n * cols:]
    if carry is not None and carry.numel():
        raise ModelError("a tensor's size is not a whole number of rows")


def _extended(source: Any, name: str, spec: TensorSpec, extra: int, chunk: int) -> Iterator[Any]:
    """A matrix followed by ``extra`` rows equal to the mean of its rows (two passes)."""
    import torch

    cols = spec.shape[1]
    total = torch.zeros(cols, dtype=torch.float64)
    for block in _rows(source.chunks(name, chunk), cols):
        total += block.to(torch.float64).sum(0)
    mean = (total / spec.shape[0]).to(spec.dtype)
    yield from source.chunks(name, chunk)
    yield mean.repeat(extra)


def _identity(n: int, dtype: Any) -> Iterator[Any]:
    import torch

    yield torch.eye(n, dtype=dtype).reshape(-1)


def _zeros(n: int, dtype: Any) -> Iterator[Any]:
    import torch

    yield torch.zeros(n, dtype=dtype)


@dataclass
class _Mapped:
    out: str
    src: Any  # a source with .chunks/.release, or None for generated
    src_name: str | None
    spec: TensorSpec
    make: Any = None  # generator factory for generated tensors


def _text_name(name: str) -> str | None:
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    for part in ("model.embed_tokens.", "model.layers.", "model.norm."):
        if name.startswith(part):
            return "language_model." + name
    return None


def _projector_name(name: str, projector: str) -> str | None:
    if projector == "linear":
        m = re.fullmatch(r"model\.mm_projector\.(weight|bias)", name)
        return f"multi_modal_projector.linear_1.{m.group(1)}" if m else None
    m = re.fullmatch(r"model\.mm_projector\.([02])\.(weight|bias)", name)
    return f"multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}" if m else None


def _build_config(orig: dict[str, Any], layout: OriginalLayout, vcfg: Any, tok: Any, image_id: int,
                  vocab_rows: int, dtype: Any) -> Any:
    from transformers import AutoConfig, LlavaConfig

    text = {k: orig[k] for k in _TEXT_KEYS if k in orig}
    if "max_position_embeddings" not in text and "max_sequence_length" in orig:
        text["max_position_embeddings"] = orig["max_sequence_length"]
    text.update(vocab_size=vocab_rows, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    if tok.bos_token_id is not None:
        text["bos_token_id"] = tok.bos_token_id
    if tok.eos_token_id is not None:
        text["eos_token_id"] = tok.eos_token_id
    text_config = AutoConfig.for_model(layout.text_model_type, **text)
    n_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vcfg, text_config=text_config, image_token_index=image_id,
        vision_feature_layer=layout.select_layer, vision_feature_select_strategy=layout.select_strategy,
        projector_hidden_act="linear" if layout.projector == "linear" else "gelu",
        image_seq_length=n_patches if layout.select_strategy == "default" else n_patches + 1,
        tie_word_embeddings=False,
    )
    dtype_name = str(dtype).removeprefix("torch.")
    config.dtype = dtype_name
    config.text_config.dtype = dtype_name
    config.llavamed = {"preset": layout.name, "template": layout.template,
                       "converted_from": layout.name}
    return config


def _expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Key → shape of a ``LlavaForConditionalGeneration`` with this config, in the Hub layout."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from .checkpoint import hub_key

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {hub_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


def _chat_template(layout: OriginalLayout, tok: Any) -> str:
    """The layout's template; with ``{{ bos_token }}`` first when the original tokenizer added BOS
    (the LLaMA tokenizer of v1 did: ``tokenizer([prompt])``), since prompts are tokenised without
    special tokens."""
    from .templates import TEMPLATES

    src = TEMPLATES[layout.template]
    ids = tok("a")["input_ids"]
    if "bos_token" not in src and tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]:
        src = "{{ bos_token }}" + src
    if layout.im_start_end:
        image_part = "{{ '<image>\n' }}"
        if image_part not in src:
            raise ModelError(f"the {layout.template} template has no image part to wrap in <im_start>/<im_end>")
        src = src.replace(image_part, "{{ '<im_start><image><im_end>\n' }}")
    return src


def _write_side_files(tmp: Path, config: Any, tok: Any, processor: Any, template: str) -> None:
    """config, generation config, processor, tokenizer and legacy preprocessor config."""
    from transformers import GenerationConfig

    from .checkpoint import save_processor
    from .compat import finalize_checkpoint_files
    from .templates import STOP_STRINGS

    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(tmp)
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    gen.save_pretrained(tmp)
    save_processor(processor, tmp)
    finalize_checkpoint_files(tmp, STOP_STRINGS.get(template, []))


def convert_source(orig: dict[str, Any], tokenizer_dir: Path, source: Any, cfg: ConvertConfig,
                   progress: ProgressCallback | None = None, task: str = "convert") -> ConvertResult:
    """Convert tensors from any source (a checkpoint, or apply-delta's sums) to a HF Llava directory.

    Args:
        orig: the original ``config.json``.
        tokenizer_dir: the directory holding the original tokenizer.
        source: an object with ``tensors`` (name → spec), ``chunks(name, chunk_bytes)`` and
            ``release(name)``, e.g. a :class:`~llavamed_core.model.shards.CheckpointReader`.
        cfg: the options (``out``, ``vision``, ...).
        progress: progress callback (bytes, with ``tensor``/``tensors``).
        task: the progress task name.

    Returns:
        A :class:`ConvertResult`.

    Raises:
        ModelError: an unknown layout or keys that cannot be placed (listed), before writing.
    """
    from .checkpoint import make_processor
    from .presets import ModelPreset

    start = time.monotonic()
    where = str(Path(tokenizer_dir) / "config.json")
    layout = detect_layout(orig, where)
    from .hub import resolve_model

    vision = resolve_model(cfg.vision, "--vision", "directory") if cfg.vision is not None else None
    specs = source.tensors
    actions: list[str] = []
    dropped: list[str] = []
    unplaced: list[str] = []
    mapped: list[_Mapped] = []

    inside = next((p for p in _VISION_PREFIXES
                   if any(k.startswith(p) and k[len(p):].startswith(_CLIP_VISION_PARTS) for k in specs)), None)
    for name, spec in specs.items():
        if name.endswith(_DROPPED_SUFFIXES):
            dropped.append(name)
            continue
        out = _text_name(name) or _projector_name(name, layout.projector)
        if (out is None and inside is not None and name.startswith(inside)
                and name[len(inside):].startswith(_CLIP_VISION_PARTS)):
            out = "vision_tower.vision_model." + name[len(inside):]
        if out is None:
            unplaced.append(name)
            continue
        mapped.append(_Mapped(out, source, name, spec))
    if unplaced:
        shown = ", ".join(unplaced[:8]) + (f" … ({len(unplaced)} in all)" if len(unplaced) > 8 else "")
        raise ModelError(f"{where}: {layout.name} layout, but these keys cannot be placed: {shown}",
                         "this checkpoint is not one of the layouts convert knows; nothing was written")

    embed_spec = specs.get("model.embed_tokens.weight")
    if embed_spec is None:
        raise ModelError(f"{where}: no model.embed_tokens.weight in the checkpoint", "the checkpoint is incomplete")
    vision_reader = None
    if inside is not None:
        vcfg = _vision_config_from_dir(vision) if vision else _vision_config_from_weights(specs, inside, where)
        vision_from = "the checkpoint (" + inside.rstrip(".") + ")"
        actions.append("vision tower: weights from the checkpoint, config "
                       + (f"from {vision}" if vision else "inferred from the weights (OpenAI CLIP: 64-dim heads, quick_gelu)"))
    else:
        if vision is None:
            tower = orig.get("mm_vision_tower", "a CLIP ViT-L/14")
            raise ModelError(f"{where}: the {layout.name} checkpoint has no vision tower inside",
                             f"pass --vision CLIP_DIR, a local copy of {tower}")
        vcfg = _vision_config_from_dir(vision)
        vision_reader = CheckpointReader(vision, "--vision")
        for name, spec in vision_reader.tensors.items():
            # CLIPModel and transformers-4 CLIPVisionModel: vision_model.*; transformers 5: no prefix.
            part = name.removeprefix("vision_model.")
            if part.startswith(_CLIP_VISION_PARTS) and not name.endswith(_DROPPED_SUFFIXES):
                # The original ran the tower in the language model's dtype (vision_tower.to(float16)).
                cast = embed_spec.dtype if spec.dtype.is_floating_point else spec.dtype
                mapped.append(_Mapped("vision_tower.vision_model." + part, vision_reader, name,
                                      TensorSpec(name, spec.shape, cast)))
        vision_from = str(vision)
        actions.append(f"vision tower: weights and config from {vision}, in "
                       f"{str(embed_spec.dtype).removeprefix('torch.')} like the language model")
    if vcfg.hidden_size != int(orig.get("mm_hidden_size", vcfg.hidden_size)):
        raise ModelError(f"{where}: mm_hidden_size {orig['mm_hidden_size']} but the CLIP tower has hidden size "
                         f"{vcfg.hidden_size}", "pass the CLIP model this checkpoint was trained with")

    by_out = {m.out: m for m in mapped}
    embed = by_out["language_model.model.embed_tokens.weight"]
    rows = embed.spec.shape[0]
    tok, image_id, tok_actions = _convert_tokenizer(Path(tokenizer_dir), layout, rows)
    actions += tok_actions
    vocab_rows = max(rows, image_id + 1)
    if vocab_rows > rows:
        extra = vocab_rows - rows
        for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            m = by_out.get(key)
            if m is None:
                continue
            spec = m.spec
            m.spec = TensorSpec(key, (vocab_rows, spec.shape[1]), spec.dtype)
            m.make = (lambda m=m, spec=spec, extra=extra:
                      _extended(m.src, m.src_name, spec, extra, cfg.chunk_bytes))
        actions.append(f"embedding and output matrices: {extra} row(s) added for <image> (mean of the rows)")

    if layout.projector == "linear":
        w1 = by_out.get("multi_modal_projector.linear_1.weight")
        if w1 is None:
            raise ModelError(f"{where}: no model.mm_projector.weight in the checkpoint", "the checkpoint is incomplete")
        h, dt = w1.spec.shape[0], w1.spec.dtype
        mapped.append(_Mapped("multi_modal_projector.linear_2.weight", None, None,
                              TensorSpec("multi_modal_projector.linear_2.weight", (h, h), dt),
                              lambda h=h, dt=dt: _identity(h, dt)))
        mapped.append(_Mapped("multi_modal_projector.linear_2.bias", None, None,
                              TensorSpec("multi_modal_projector.linear_2.bias", (h,), dt),
                              lambda h=h, dt=dt: _zeros(h, dt)))
        actions.append("projector: model.mm_projector → linear_1; linear_2 = identity (projector_hidden_act linear)")
    else:
        actions.append("projector: model.mm_projector.0/.2 → linear_1/linear_2 (GELU)")

    config = _build_config(orig, layout, vcfg, tok, image_id, vocab_rows, embed.spec.dtype)
    expected = _expected_shapes(config)
    planned = {m.out: m.spec.shape for m in mapped}
    missing = sorted(set(expected) - set(planned))
    if missing:
        raise ModelError(f"{where}: the checkpoint lacks {missing[0]}"
                         + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else ""),
                         "the checkpoint (or the --vision tower) is incomplete")
    extra_keys = sorted(set(planned) - set(expected))
    if extra_keys:
        raise ModelError(f"{where}: keys that cannot be placed: {', '.join(extra_keys[:8])}",
                         "this checkpoint is not one of the layouts convert knows; nothing was written")
    for key, shape in planned.items():
        if tuple(shape) != expected[key]:
            src = by_out[key].src_name if key in by_out else key
            raise ModelError(f"{where}: tensor {src} has shape {list(shape)}, the converted model needs "
                             f"{list(expected[key])}", "the config and the weights disagree")

    mean_std = _preprocessing_from_dir(vision)
    preset = ModelPreset(
        name=f"{layout.name} (converted)", description=LAYOUTS[layout.name],
        text_model_type=layout.text_model_type, text_config={}, vision_config=vcfg.to_dict(),
        vision_feature_layer=layout.select_layer, vision_feature_select_strategy=layout.select_strategy,
        projector_hidden_act=config.projector_hidden_act, template=layout.template,
        pad_to_square=layout.pad_to_square,
        **({"image_mean": mean_std[0], "image_std": mean_std[1]} if mean_std else {}),
    )
    processor = make_processor(preset, tok, _chat_template(layout, tok))
    if layout.pad_to_square:
        actions.append("images padded to a square with the mean colour (image_aspect_ratio pad)")
    if dropped:
        actions.append(f"dropped {len(dropped)} recomputed buffers (rotary inv_freq / position_ids)")

    plan = []
    for m in mapped:
        if m.make is not None:
            produce = m.make
        elif m.src.tensors[m.src_name].dtype != m.spec.dtype:
            produce = (lambda m=m: (p.to(m.spec.dtype) for p in m.src.chunks(m.src_name, cfg.chunk_bytes)))
        else:
            produce = (lambda m=m: m.src.chunks(m.src_name, cfg.chunk_bytes))
        done = (lambda m=m: m.src.release(m.src_name)) if m.src is not None else None
        plan.append(OutTensor(m.out, tuple(m.spec.shape), m.spec.dtype, produce, done))
    try:
        with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
            written = write_tensors(tmp, plan, cfg.max_shard_bytes, progress, task=task)
            _write_side_files(tmp, config, tok, processor, layout.template)
    finally:
        if vision_reader is not None:
            vision_reader.close()
    return ConvertResult(
        out=str(cfg.out), layout=layout.name, description=LAYOUTS[layout.name],
        text_model_type=layout.text_model_type, projector=config.projector_hidden_act,
        image_tokens=config.image_seq_length, image_token_id=image_id, vision_from=vision_from,
        actions=actions, dropped=dropped, tensors=len(plan), bytes=written["total_size"],
        shards=len(written["files"]), seconds=time.monotonic() - start)


def convert_checkpoint(cfg: ConvertConfig, progress: ProgressCallback | None = None) -> ConvertResult:
    """Convert an original LLaVA-Med checkpoint directory to a standard HF Llava directory.

    Args:
        cfg: the options.
        progress: progress callback.

    Returns:
        A :class:`ConvertResult`.

    Raises:
        ModelError: unknown layout, unplaceable keys, missing vision tower, unreadable files.
    """
    from .hub import resolve_model

    src = resolve_model(cfg.src, "SRC", "directory")
    orig = read_source_config(src)
    detect_layout(orig, str(src / "config.json"))
    with CheckpointReader(src, "SRC") as reader:
        return convert_source(orig, src, reader, cfg, progress)
