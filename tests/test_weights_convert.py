"""``llavamed weights convert``: original LLaVA-Med v1 / v1.5 checkpoints → standard HF Llava.

The converted models must compute the logits of the original architectures (reference forward
in ``original_llava_ref.py``), load with plain transformers, generate through our engine, and use
the weight names of the llava-hf checkpoints on the Hub.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from original_llava_ref import (V1_ADDED, reference_logits, sample_image, v15_vision_config, write_clip_dir,
                                write_original_v1, write_original_v15)

# Weight names of llava-hf checkpoints (e.g. llava-hf/llava-1.5-7b-hf model.safetensors.index.json).
HUB_PATTERNS = [
    r"language_model\.model\.embed_tokens\.weight",
    r"language_model\.model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight",
    r"language_model\.model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
    r"language_model\.model\.layers\.\d+\.(input|post_attention)_layernorm\.weight",
    r"language_model\.model\.norm\.weight",
    r"language_model\.lm_head\.weight",
    r"multi_modal_projector\.linear_[12]\.(weight|bias)",
    r"vision_tower\.vision_model\.embeddings\.(class_embedding|patch_embedding\.weight|position_embedding\.weight)",
    r"vision_tower\.vision_model\.(pre_layrnorm|post_layernorm)\.(weight|bias)",
    r"vision_tower\.vision_model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.(weight|bias)",
    r"vision_tower\.vision_model\.encoder\.layers\.\d+\.mlp\.fc[12]\.(weight|bias)",
    r"vision_tower\.vision_model\.encoder\.layers\.\d+\.layer_norm[12]\.(weight|bias)",
]
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    # Folder names that lie about the layout: detection must read the config, not the name.
    return {"clip": write_clip_dir(root / "clip"),
            "v1": write_original_v1(root / "llava-v1.5-mistral-7b", fmt="bin"),
            "v15": write_original_v15(root / "llava-med-7b-v1", fmt="safetensors")}


def all_weights(path):
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def hf_logits(out, image):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    enc = processor(images=image, text=prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model.eval()(**enc).logits[0]
    return logits, enc["input_ids"][0].tolist(), prompt, processor


def test_v1_converts_with_the_original_logits(cli, originals, tmp_path):
    out = tmp_path / "v1-hf"
    res = cli("weights", "convert", originals["v1"], "--out", out, "--vision", originals["clip"])
    assert res.exit_code == 0, res
    assert "llava-med-v1:" in res.stdout and "renamed <im_patch>" in res.stdout and "identity" in res.stdout
    image = sample_image(48, 40)
    logits, ids, prompt, processor = hf_logits(out, image)
    assert prompt.startswith("<s>You are LLaVA-Med")  # the original LLaMA tokenizer added BOS
    assert "###Human: <im_start><image><im_end>\nWhat is shown in this image?###Assistant:" in prompt
    original_prompt = prompt.removeprefix("<s>").replace("<im_start><image><im_end>", "<image>")
    ref, ref_ids = reference_logits(originals["v1"], image, original_prompt, clip_dir=originals["clip"])
    assert ids == ref_ids  # <image> kept <im_patch>'s id: the token sequence is the original's
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() <= 1e-4

    assert processor.tokenizer.convert_tokens_to_ids("<image>") == V1_ADDED["<im_patch>"]
    assert processor.tokenizer.convert_tokens_to_ids("<im_end>") == V1_ADDED["<im_end>"]
    assert processor.tokenizer.pad_token == "[PAD]" and len(processor.tokenizer) == 404
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["projector_hidden_act"] == "linear" and cfg["vision_feature_layer"] == -2
    assert cfg["vision_feature_select_strategy"] == "default" and cfg["image_seq_length"] == 16
    assert cfg["llavamed"]["template"] == "v1"
    assert json.loads((out / "generation_config.json").read_text())["llavamed_stop_strings"] == ["###"]
    state = all_weights(out)
    original = {}
    for f in originals["v1"].glob("*.bin"):
        original.update(torch.load(f, weights_only=True))
    assert torch.equal(state["language_model.lm_head.weight"], original["lm_head.weight"])
    assert torch.equal(state["multi_modal_projector.linear_1.weight"], original["model.mm_projector.weight"])
    assert torch.equal(state["multi_modal_projector.linear_2.weight"], torch.eye(64))
    assert not any("rotary" in k for k in state)


def test_v15_converts_with_the_original_logits(cli, originals, tmp_path):
    out = tmp_path / "v15-hf"
    res = cli("weights", "convert", originals["v15"], "--out", out, "--json")
    assert res.exit_code == 0, res
    report = json.loads(res.stdout)
    assert report["layout"] == "llava-med-v1.5" and report["projector"] == "gelu"
    assert any("inferred from the weights" in a for a in report["actions"])
    image = sample_image(48, 30)  # not square: padded with the mean colour, as image_aspect_ratio "pad"
    logits, ids, prompt, processor = hf_logits(out, image)
    assert prompt == "<s>[INST] <image>\nWhat is shown in this image? [/INST]"
    assert processor.image_processor.do_pad
    ref, ref_ids = reference_logits(originals["v15"], image, prompt, vision_config=v15_vision_config())
    image_id = report["image_token_id"]
    cut = ref_ids.index(-200)
    assert ids == ref_ids[:cut] + [image_id] * 16 + ref_ids[cut + 1:]
    vocab = ref.shape[1]
    assert logits.shape == (ref.shape[0], vocab + 1)  # one added row: <image>
    assert (logits[:, :vocab] - ref).abs().max().item() <= 1e-4
    # <image>'s logit is the mean logit: never the greedy choice.
    assert (logits[:, vocab] < logits[:, :vocab].max(dim=1).values).all()

    # --vision with a CLIP config gives the same model (the weights stay those inside).
    clip_cfg = tmp_path / "clip336"
    clip_cfg.mkdir()
    v15_vision_config().save_pretrained(clip_cfg)
    res = cli("weights", "convert", originals["v15"], "--out", tmp_path / "v15-hf-2", "--vision", clip_cfg)
    assert res.exit_code == 0, res
    assert "config from" in res.stdout
    a, b = all_weights(out), all_weights(tmp_path / "v15-hf-2")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def converted_sharded(originals, tmp_path_factory):
    from llavamed_core.model.convert import ConvertConfig, convert_checkpoint

    out = tmp_path_factory.mktemp("conv") / "v15-sharded"
    convert_checkpoint(ConvertConfig(src=originals["v15"], out=out, max_shard_bytes=200_000))
    return out


def test_converted_checkpoint_uses_hub_names_and_generates(converted_sharded):
    from llavamed_core.infer import ChatRequest, Engine, GenerationParams

    index = json.loads((converted_sharded / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    for f in set(index["weight_map"].values()):
        with safe_open(str(converted_sharded / f), "pt") as fh:
            assert {k for k, v in index["weight_map"].items() if v == f} == set(fh.keys())
    unmatched = [n for n in names if not any(re.fullmatch(p, n) for p in HUB_PATTERNS)]
    assert not unmatched
    assert all(any(re.fullmatch(p, n) for n in names) for p in HUB_PATTERNS)

    engine = Engine.load(converted_sharded, device="cpu", dtype="float32")
    req = ChatRequest([{"role": "user", "content": [{"type": "image", "image": sample_image()},
                                                    {"type": "text", "text": "Is there a lesion?"}]}],
                      GenerationParams(max_new_tokens=6, temperature=0.0))
    first, second = engine.generate([req, req])
    assert first.text == second.text and first.completion_tokens > 0


def test_converts_half_precision_without_changing_weights(cli, originals, tmp_path):
    src = write_original_v15(tmp_path / "v15-bf16", dtype=torch.bfloat16, fmt="bin")
    res = cli("weights", "convert", src, "--out", tmp_path / "out")
    assert res.exit_code == 0, res
    state = all_weights(tmp_path / "out")
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    original = {}
    for f in src.glob("*.bin"):
        original.update(torch.load(f, weights_only=True))
    assert torch.equal(state["multi_modal_projector.linear_2.weight"], original["model.mm_projector.2.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"

    # v1 in float16 with the float32 CLIP tower: the tower is stored in float16, as the original ran it.
    src = write_original_v1(tmp_path / "v1-fp16", dtype=torch.float16, fmt="safetensors")
    res = cli("weights", "convert", src, "--out", tmp_path / "out16", "--vision", originals["clip"])
    assert res.exit_code == 0, res
    state = all_weights(tmp_path / "out16")
    assert {v.dtype for v in state.values()} == {torch.float16}
    clip = load_file(originals["clip"] / "model.safetensors")
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(state["vision_tower." + key], clip[key].half())


def test_unknown_layouts_are_refused_with_the_keys(cli, originals, tmp_path):
    src = tmp_path / "odd"
    shutil.copytree(originals["v15"], src)
    save_file({"model.mm_resampler.latents": torch.zeros(2, 2)}, str(src / "extra.safetensors"))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.mm_resampler.latents"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    res = cli("weights", "convert", src, "--out", tmp_path / "out")
    assert res.exit_code == 1 and "model.mm_resampler.latents" in res.stderr and "cannot be placed" in res.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, model_type="llava_mpt")))
    res = cli("weights", "convert", src, "--out", tmp_path / "out")
    assert res.exit_code == 1 and "model_type 'llava_mpt'" in res.stderr and "Hint:" in res.stderr


def test_v1_without_vision_and_hf_checkpoints_are_explained(cli, originals, tiny_ckpt, tmp_path):
    res = cli("weights", "convert", originals["v1"], "--out", tmp_path / "out")
    assert res.exit_code == 1 and "no vision tower inside" in res.stderr
    assert "openai/clip-vit-large-patch14" in res.stderr  # the hint names the tower its config records
    res = cli("weights", "convert", tiny_ckpt, "--out", tmp_path / "out")
    assert res.exit_code == 1 and "already a standard Hugging Face Llava checkpoint" in res.stderr
    assert not (tmp_path / "out").exists()
