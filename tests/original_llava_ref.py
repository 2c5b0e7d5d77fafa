"""Tiny checkpoints in the ORIGINAL LLaVA-Med layouts, and a reference forward of those architectures.

Used by ``tests/test_weights_*.py`` to check that ``llavamed weights convert`` (and
``apply-delta --to-hf``) produce Hugging Face Llava models that compute the same logits as the
original code. Nothing here imports llavamed: the reference is written from how the original code
computes its forward pass:

- **v1** (``LlavaLlamaForCausalLM``, model_type ``llava``): CLIP hidden state
  ``mm_vision_select_layer`` without the CLS token → one ``nn.Linear`` projector → written over the
  embeddings of the ``<im_patch>`` tokens that follow each ``<im_start>`` (``<im_start>`` and
  ``<im_end>`` keep their own embeddings); the LLaMA decoder then runs on those embeddings.
- **v1.5** (``LlavaMistralForCausalLM``, model_type ``llava_mistral``): the prompt is tokenised in
  pieces around ``<image>`` with a placeholder id (-200) in between; CLIP layer -2 without CLS →
  ``Linear, GELU, Linear`` → the features replace the placeholder; images are first padded to a
  square with the mean colour (``image_aspect_ratio: pad``).

The tiny checkpoints use the same key names, config keys and tokenizer additions as the released
ones, at tiny sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_PLACEHOLDER = -200  # the original llava_arch IMAGE_TOKEN_INDEX
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CORPUS = ("What is shown in this image? Is there a lesion? yes no The image shows a chest x-ray "
          "of the lungs with a small nodule in the upper left. [INST] [/INST] ###Human: ###Assistant: "
          "You are LLaVA-Med, a large language and vision assistant. Describe the figure.") * 4


def base_tokenizer():
    """A tiny byte-level BPE tokenizer shaped like LLaMA's (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.split(". "), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=2048)


LLAMA_VOCAB = 400  # the tiny "LLaMA" sentencepiece vocabulary; v1 adds 4 tokens after it


def write_llama_tokenizer(path: Path, added: dict[str, int] | None = None) -> Path:
    """A LLaMA tokenizer as 2023 checkpoints stored it: ``tokenizer.model`` (sentencepiece, byte
    fallback, ``<unk>`` 0 / ``<s>`` 1 / ``</s>`` 2), ``tokenizer_config.json`` (LlamaTokenizer, BOS
    added), ``special_tokens_map.json`` and ``added_tokens.json``."""
    import io

    import sentencepiece as spm

    path.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS.split(". ") * 20), model_writer=model,
                                   vocab_size=LLAMA_VOCAB, model_type="bpe", unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, byte_fallback=True, character_coverage=1.0, minloglevel=2)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if added and "[PAD]" in added:
        special["pad_token"] = "[PAD]"
    (path / "special_tokens_map.json").write_text(json.dumps(special))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
         "model_max_length": 2048, "legacy": True, **{k: v for k, v in special.items() if k != "pad_token"}}))
    if added:
        (path / "added_tokens.json").write_text(json.dumps(added))
    return path


V1_ADDED = {"[PAD]": LLAMA_VOCAB, "<im_patch>": LLAMA_VOCAB + 1, "<im_start>": LLAMA_VOCAB + 2,
            "<im_end>": LLAMA_VOCAB + 3}
"""LLaVA's additions, in its order: [PAD] (train.py), <im_patch>, <im_start>, <im_end>."""


def clip_vision_config(hidden: int, heads: int, layers: int = 3, image_size: int = 32, patch: int = 8):
    """A tiny ``CLIPVisionConfig`` (OpenAI CLIP conventions: quick_gelu, eps 1e-5)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=patch,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16)


def write_clip_dir(path: Path, hidden: int = 48, heads: int = 2, seed: int = 1) -> Path:
    """A tiny full ``CLIPModel`` directory (vision + text, like openai/clip-vit-large-patch14)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig

    torch.manual_seed(seed)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          vocab_size=99, projection_dim=16)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=clip_vision_config(hidden, heads).to_dict(),
                     projection_dim=16)
    model = CLIPModel(cfg)
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(path)
    return path


def _save_weights(state: dict, path: Path, fmt: str, shards: int) -> None:
    from safetensors.torch import save_file

    names = list(state)
    per = -(-len(names) // shards)
    groups = [names[i:i + per] for i in range(0, len(names), per)]
    ext, index = ("safetensors", "model.safetensors.index.json") if fmt == "safetensors" else \
        ("bin", "pytorch_model.bin.index.json")
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}"
        part = {k: state[k].contiguous() for k in group}
        if fmt == "safetensors":
            save_file(part, str(path / fname), metadata={"format": "pt"})
        else:
            torch.save(part, path / fname)
        weight_map.update({k: fname for k in group})
    (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_original_v1(path: Path, seed: int = 0, dtype=torch.float32, fmt: str = "bin",
                      mm_hidden: int = 48) -> Path:
    """A tiny LLaVA-Med v1 checkpoint (after apply-delta): LLaMA + linear projector, no tower inside."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    write_llama_tokenizer(path, V1_ADDED)
    vocab = LLAMA_VOCAB + len(V1_ADDED)
    torch.manual_seed(seed)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=2048,
                       tie_word_embeddings=False)
    lm = LlamaForCausalLM(text)
    state = {k: v.to(dtype) for k, v in lm.state_dict().items()}
    proj = torch.nn.Linear(mm_hidden, 64)
    state["model.mm_projector.weight"] = proj.weight.detach().to(dtype)
    state["model.mm_projector.bias"] = proj.bias.detach().to(dtype)
    for i in range(text.num_hidden_layers):  # 2023 LLaMA conversions saved the rotary buffer
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    _save_weights(state, path, fmt, shards=2)
    config = {
        "_name_or_path": "llava-med-7b", "architectures": ["LlavaLlamaForCausalLM"], "bos_token_id": 0,
        "eos_token_id": 1, "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 128, "max_sequence_length": 2048, "mm_hidden_size": mm_hidden,
        "mm_use_im_start_end": True, "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14",
        "model_type": "llava", "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": -1,
        "rms_norm_eps": 1e-6, "sep_image_conv_front": False, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."), "transformers_version": "4.28.0.dev0",
        "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True, "vocab_size": vocab}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def v15_vision_config():
    """The tiny v1.5 tower's config (64-dim heads, as OpenAI CLIP; not stored in the checkpoint)."""
    return clip_vision_config(hidden=64, heads=1, layers=3)


def write_original_v15(path: Path, seed: int = 0, dtype=torch.float32, fmt: str = "safetensors") -> Path:
    """A tiny LLaVA-Med v1.5 checkpoint: llava_mistral + mlp2x_gelu + CLIP tower inside."""
    from transformers import CLIPVisionModel, MistralConfig, MistralForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = base_tokenizer()
    torch.manual_seed(seed)
    text = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), rms_norm_eps=1e-5, rope_theta=1e6,
                         sliding_window=None, max_position_embeddings=4096, tie_word_embeddings=False)
    lm = MistralForCausalLM(text)
    state = dict(lm.state_dict())
    tower = CLIPVisionModel(v15_vision_config())
    for k, v in tower.state_dict().items():  # transformers 4.x named them vision_model.*
        state["model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model.")] = v
    proj = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    for k, v in proj.state_dict().items():
        state["model.mm_projector." + k] = v
    state = {k: v.detach().to(dtype) for k, v in state.items()}
    _save_weights(state, path, fmt, shards=3)
    config = {
        "_name_or_path": "llava-med-v1.5-mistral-7b", "architectures": ["LlavaMistralForCausalLM"],
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "feature_outs": "encoder+decoder",
        "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": 64, "image_aspect_ratio": "pad",
        "img_size": 640, "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 4096,
        "mm_hidden_size": 64, "mm_patch_merge_type": "flat", "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None, "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava_mistral",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0, "segtok_posembed": "sincos", "sliding_window": None,
        "tie_word_embeddings": False, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        "torch_dtype": str(dtype).removeprefix("torch."), "transformers_version": "4.36.2",
        "tune_mm_mlp_adapter": False, "use_cache": False, "use_mm_proj": True, "vision_backbone": "convnext-large",
        "vocab_size": len(tok)}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------ reference forward
def _load_state(path: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    for f in sorted(path.glob("*.bin")):
        state.update(torch.load(f, weights_only=True))
    return state


def clip_preprocess(image: Image.Image, size: int, pad_to_square: bool) -> torch.Tensor:
    """The original preprocessing: [expand2square with the mean colour], resize the short side to
    ``size`` (bicubic), centre-crop ``size``, scale to [0, 1], normalise with the CLIP mean/std."""
    image = image.convert("RGB")
    if pad_to_square:
        w, h = image.size
        if w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), tuple(int(x * 255) for x in CLIP_MEAN))
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            image = canvas
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = np.asarray(image, dtype=np.float32)[top:top + size, left:left + size] / 255.0
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).unsqueeze(0)


def reference_logits(ckpt: Path, image: Image.Image, prompt: str, clip_dir: Path | None = None,
                     vision_config=None) -> tuple[torch.Tensor, list[int]]:
    """Logits of the original architecture for ``prompt`` (with one ``<image>``) and ``image``.

    Args:
        ckpt: an original v1 or v1.5 checkpoint directory.
        image: the image.
        prompt: the prompt text with ``<image>`` where the image goes (v1: the original
            ``<im_start><im_patch>×N<im_end>`` block is put there, as its preprocessing did, and the
            tokenizer adds BOS, as ``tokenizer([prompt])`` did; v1.5: the text holds ``<s>``).
        clip_dir: the v1 vision tower (``CLIPVisionModel.from_pretrained``, as the original did).
        vision_config: the v1.5 tower's ``CLIPVisionConfig`` (its weights are in the checkpoint).

    Returns:
        ``(logits [seq, vocab], input_ids)``; for v1.5 the ids hold -200 at the image.
    """
    from transformers import (AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)

    cfg = json.loads((ckpt / "config.json").read_text())
    state = _load_state(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
                 "vocab_size", "hidden_act")
    kwargs = {k: cfg[k] for k in text_keys}
    if cfg["model_type"] == "llava":
        lm = LlamaForCausalLM(LlamaConfig(**kwargs, num_key_value_heads=cfg["num_attention_heads"],
                                          max_position_embeddings=cfg["max_sequence_length"],
                                          tie_word_embeddings=False))
        tower = CLIPVisionModel.from_pretrained(clip_dir)
        proj = torch.nn.Linear(cfg["mm_hidden_size"], cfg["hidden_size"])
        proj.load_state_dict({"weight": state["model.mm_projector.weight"], "bias": state["model.mm_projector.bias"]})
    else:
        lm = MistralForCausalLM(MistralConfig(**kwargs, num_key_value_heads=cfg["num_key_value_heads"],
                                              rope_theta=cfg["rope_theta"], sliding_window=cfg["sliding_window"],
                                              max_position_embeddings=cfg["max_position_embeddings"],
                                              tie_word_embeddings=False))
        tower = CLIPVisionModel(vision_config)
        prefix = "model.vision_tower.vision_tower.vision_model."
        tower.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        proj = torch.nn.Sequential(torch.nn.Linear(cfg["mm_hidden_size"], cfg["hidden_size"]), torch.nn.GELU(),
                                   torch.nn.Linear(cfg["hidden_size"], cfg["hidden_size"]))
        proj.load_state_dict({k[len("model.mm_projector."):]: v for k, v in state.items()
                              if k.startswith("model.mm_projector.")})
    lm_state = {k: v for k, v in state.items()
                if not k.startswith(("model.mm_projector", "model.vision_tower")) and "rotary_emb" not in k}
    lm.load_state_dict(lm_state)
    for m in (lm, tower, proj):
        m.float().eval()

    vcfg = tower.config
    n_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    pixels = clip_preprocess(image, vcfg.image_size, cfg.get("image_aspect_ratio") == "pad")
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[cfg.get("mm_vision_select_layer", -1)]
        features = proj(hidden[:, 1:])[0]  # drop CLS
        if cfg["model_type"] == "llava":
            block = "<im_start>" + "<im_patch>" * n_patches + "<im_end>"
            ids = tok(prompt.replace("<image>", block))["input_ids"]  # the LLaMA tokenizer adds BOS
            ids_t = torch.tensor(ids)
            embeds = lm.model.embed_tokens(ids_t)
            start_id, end_id = tok.convert_tokens_to_ids(["<im_start>", "<im_end>"])
            for pos in torch.where(ids_t == start_id)[0].tolist():
                assert ids[pos + n_patches + 1] == end_id, "the image end token must follow the patches"
                embeds = torch.cat([embeds[: pos + 1], features, embeds[pos + n_patches + 1:]])
        else:
            pieces = [tok(p, add_special_tokens=False)["input_ids"] for p in prompt.split("<image>")]
            ids = pieces[0]
            for p in pieces[1:]:
                ids = ids + [IMAGE_PLACEHOLDER] + p
            parts = [lm.model.embed_tokens(torch.tensor(pieces[0], dtype=torch.long))]
            for p in pieces[1:]:
                parts += [features, lm.model.embed_tokens(torch.tensor(p, dtype=torch.long))]
            embeds = torch.cat(parts)
        logits = lm(inputs_embeds=embeds.unsqueeze(0)).logits[0]
    return logits, ids


def sample_image(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    """A deterministic RGB image (non-square by default, to exercise padding and cropping)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr)
