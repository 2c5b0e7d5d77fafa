"""``llavamed weights merge-lora``: PEFT LoRA adapters (ours, and the original LLaVA scripts' key
layout) folded into a standalone checkpoint that loads without PEFT."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from original_llava_ref import sample_image

TARGETS = r".*language_model.*\.(q_proj|v_proj|down_proj)"


def _inputs(processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a lesion?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return processor(images=sample_image(32, 32), text=prompt, return_tensors="pt", add_special_tokens=False)


@pytest.fixture(scope="module")
def adapter(tiny_ckpt, tmp_path_factory):
    """A PEFT LoRA adapter on the tiny model (random B, so the update is not zero) and the logits of
    PEFT's own merge_and_unload."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("lora")
    model = LlavaForConditionalGeneration.from_pretrained(tiny_ckpt)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, modules_to_save=["multi_modal_projector"],
                     init_lora_weights=False, rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3})
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05)
    peft_model.save_pretrained(root / "adapter")
    acfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(tiny_ckpt)
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(acfg))
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    merged = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        logits = merged(**_inputs(processor)).logits
    return root / "adapter", logits


def _logits(path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        return model.eval()(**_inputs(AutoProcessor.from_pretrained(path))).logits


def test_merge_matches_peft_and_needs_no_peft(cli, adapter, tiny_ckpt, tmp_path):
    adapter_dir, peft_logits = adapter
    res = cli("weights", "merge-lora", "--adapter", adapter_dir, "--out", tmp_path / "merged", "--json")
    assert res.exit_code == 0, res
    report = json.loads(res.stdout)
    assert report["base"] == str(tiny_ckpt)  # from adapter_config.json's base_model_name_or_path
    assert report["merged"] == 6 and report["replaced"] == 4 and report["key_format"] == "transformers"
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "merged" / "tokenizer.json").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert (_logits(tmp_path / "merged") - peft_logits).abs().max().item() <= 1e-5
    base = load_file(tiny_ckpt / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert torch.equal(merged["language_model.model.layers.0.self_attn.k_proj.weight"],
                       base["language_model.model.layers.0.self_attn.k_proj.weight"])
    assert not torch.equal(merged["language_model.model.layers.0.self_attn.q_proj.weight"],
                           base["language_model.model.layers.0.self_attn.q_proj.weight"])


def test_original_llava_lora_keys_are_mapped(cli, adapter, tiny_ckpt, tmp_path):
    """Keys as the original LLaVA LoRA scripts save them: model.layers.* for the LLM, and the
    projector in non_lora_trainables.bin as model.mm_projector.0/.2."""
    adapter_dir, peft_logits = adapter
    orig = tmp_path / "llava-lora"
    orig.mkdir()
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = "lmsys/vicuna-7b-v1.5"  # a Hub id: --base is needed
    acfg["target_modules"] = ["q_proj", "v_proj", "down_proj"]
    (orig / "adapter_config.json").write_text(json.dumps(acfg))
    state = load_file(adapter_dir / "adapter_model.safetensors")
    lora, rest = {}, {}
    for k, v in state.items():
        k = k.replace("base_model.model.model.language_model.", "base_model.model.model.")
        k = k.replace("multi_modal_projector.linear_1.", "mm_projector.0.").replace(
            "multi_modal_projector.linear_2.", "mm_projector.2.")
        (lora if "lora_" in k else rest)[k] = v
    torch.save(lora, orig / "adapter_model.bin")
    torch.save(rest, orig / "non_lora_trainables.bin")
    res = cli("weights", "merge-lora", "--adapter", orig, "--out", tmp_path / "merged")
    assert res.exit_code == 1 and "lmsys/vicuna-7b-v1.5" in res.stderr and "--base" in res.stderr
    res = cli("weights", "merge-lora", "--adapter", orig, "--base", tiny_ckpt, "--out", tmp_path / "merged")
    assert res.exit_code == 0, res
    assert "original LLaVA (mapped)" in res.stdout
    assert (_logits(tmp_path / "merged") - peft_logits).abs().max().item() <= 1e-5


def test_bad_adapters_are_refused_before_writing(cli, adapter, tiny_ckpt, tmp_path):
    adapter_dir, _ = adapter
    dora = tmp_path / "dora"
    shutil.copytree(adapter_dir, dora)
    acfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(acfg, use_dora=True)))
    res = cli("weights", "merge-lora", "--adapter", dora, "--out", tmp_path / "out")
    assert res.exit_code == 1 and "use_dora" in res.stderr and "Hint:" in res.stderr

    wrong = tmp_path / "wrong"
    shutil.copytree(adapter_dir, wrong)
    state = load_file(wrong / "adapter_model.safetensors")
    key = "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(4, 7)
    save_file(state, str(wrong / "adapter_model.safetensors"))
    res = cli("weights", "merge-lora", "--adapter", wrong, "--out", tmp_path / "out")
    assert res.exit_code == 1 and "layers.1.self_attn.q_proj" in res.stderr and "do not fit" in res.stderr

    res = cli("weights", "merge-lora", "--adapter", tiny_ckpt, "--out", tmp_path / "out")
    assert res.exit_code == 1 and "no adapter_config.json" in res.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
