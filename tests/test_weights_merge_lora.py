"""``llavamed weights merge-lora``: PEFT LoRA adapters (ours, and the original LLaVA scripts' key
layout; plain LoRA, rsLoRA and DoRA) folded into a standalone checkpoint that loads without PEFT, by
PEFT's merge streamed block by block (== PEFT's whole-model merge); the in-memory merge of chat/serve."""

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


# -- the variants: plain LoRA, rsLoRA, DoRA; streamed == PEFT-merged == adapter on the base ---------------

VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def _variant_adapter(base_dir, out, variant):
    """A PEFT adapter of ``variant`` on the tiny model, built in-process (random B; DoRA magnitudes moved
    off their initial norms), with LoRA on an embedding too; returns the live ``PeftModel``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base_dir)
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, rank_pattern={"down_proj": 2},
                     target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj|embed_tokens)",
                     **VARIANTS[variant])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    peft_model.save_pretrained(out)
    return peft_model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streamed_merge_is_peft_merge_for_each_variant(variant, tiny_ckpt, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavamed_core.model.checkpoint import hub_key
    from llavamed_core.model.merge_lora import MergeLoraConfig, merge_lora

    peft_model = _variant_adapter(tiny_ckpt, tmp_path / "adapter", variant)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in saved) == (variant == "dora")
    assert any("lora_embedding_A" in k for k in saved)
    inputs = _inputs(AutoProcessor.from_pretrained(tiny_ckpt))
    with torch.no_grad():
        on_base = peft_model(**inputs).logits  # the adapter applied on the fly, not merged
    # Small blocks (several per weight) and small shards: the streamed path at its finest.
    result = merge_lora(MergeLoraConfig(adapter=tmp_path / "adapter", base=tiny_ckpt, out=tmp_path / "merged",
                                        chunk_bytes=2048, max_shard_bytes=60_000))
    assert result.merged == 7 and result.shards > 1  # q, v, down in 2 layers + embed_tokens
    peft_merged = {hub_key(k): v for k, v in peft_model.merge_and_unload().state_dict().items()}
    streamed, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, tensor in streamed.state_dict().items():
        assert (tensor - peft_merged[hub_key(key)]).abs().max().item() <= 1e-6, key
    with torch.no_grad():
        merged_logits = streamed.eval()(**inputs).logits
    assert (merged_logits - on_base).abs().max().item() <= 1e-5
    base = load_file(tiny_ckpt / "model.safetensors")
    changed = [k for k in result.merged_names if not torch.equal(base[k], streamed.state_dict()[
        next(n for n in streamed.state_dict() if hub_key(n) == k)])]
    assert changed == result.merged_names  # every adapted weight really moved


def test_in_memory_merge_is_peft_and_refuses_foreign_names(tiny_ckpt, tmp_path):
    """``merge_adapter`` (chat/serve given an adapter) is PEFT's merge; an adapter whose names fit no
    module (the original LLaVA layout) is refused instead of being silently left out."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavamed_core.errors import ModelError
    from llavamed_core.model.merge_lora import merge_adapter

    peft_model = _variant_adapter(tiny_ckpt, tmp_path / "adapter", "dora")
    inputs = _inputs(AutoProcessor.from_pretrained(tiny_ckpt))
    with torch.no_grad():
        on_base = peft_model(**inputs).logits
        merged = merge_adapter(LlavaForConditionalGeneration.from_pretrained(tiny_ckpt), tmp_path / "adapter")
        assert (merged.eval()(**inputs).logits - on_base).abs().max().item() <= 1e-5
    state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    save_file({k.replace("model.language_model.", "model."): v for k, v in state.items()},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(ModelError) as err:
        merge_adapter(LlavaForConditionalGeneration.from_pretrained(tiny_ckpt), tmp_path / "adapter")
    assert "fits no module" in err.value.message and "weights merge-lora" in err.value.hint
    from llavamed_core.infer.engine import Engine

    with pytest.raises(ModelError, match="fits no module"):  # what chat/serve/eval load an adapter with
        Engine.load(tmp_path / "adapter", base=tiny_ckpt)


def test_dora_without_use_dora_is_refused(tiny_ckpt, tmp_path):
    _variant_adapter(tiny_ckpt, tmp_path / "adapter", "dora")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), use_dora=False)))
    from llavamed_core.errors import ModelError
    from llavamed_core.model.merge_lora import MergeLoraConfig, merge_lora

    with pytest.raises(ModelError) as err:
        merge_lora(MergeLoraConfig(adapter=tmp_path / "adapter", base=tiny_ckpt, out=tmp_path / "out"))
    assert "lora_magnitude_vector" in err.value.message and "use_dora is not set" in err.value.message
    assert not (tmp_path / "out").exists()


def test_a_failure_mid_merge_leaves_no_output(cli, adapter, tiny_ckpt, tmp_path, monkeypatch):
    """A merge that fails after some shards are on disk leaves nothing at --out, and an existing
    --out (with --overwrite) untouched."""
    import llavamed_core.model.merge_lora as ml
    from llavamed_core.errors import ModelError

    adapter_dir, _ = adapter
    real, calls = ml._peft_merge, []

    def fail_late(*args):
        calls.append(1)
        if len(calls) == 4:
            raise ModelError("injected failure")
        return real(*args)

    monkeypatch.setattr(ml, "_peft_merge", fail_late)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("kept")
    for out, extra in ((tmp_path / "new", []), (tmp_path / "old", ["--overwrite"])):
        calls.clear()
        res = cli("weights", "merge-lora", "--adapter", adapter_dir, "--out", out, "--max-shard-size", "20000",
                  *extra)
        assert res.exit_code == 1 and "injected failure" in res.stderr
        assert len(calls) == 4
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".*"))
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]
