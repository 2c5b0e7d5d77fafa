"""Presets, the tiny factory, chat templates and the checkpoint contract (DESIGN.md 1-2)."""

from __future__ import annotations

import json

import pytest
import torch

from llavamed_core.errors import ModelError
from llavamed_core.model import PRESETS, build_from_preset, load_checkpoint, save_checkpoint
from llavamed_core.model.templates import TEMPLATES, render_messages

HUB_PREFIXES = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                "multi_modal_projector.")


def test_presets_are_data_with_the_papers_shapes():
    assert PRESETS["llava-med-v1"].num_image_tokens == 256
    assert PRESETS["llava-med-v1"].projector_hidden_act == "linear"
    assert PRESETS["llava-med-v1.5"].num_image_tokens == 576 and PRESETS["llava-med-v1.5"].pad_to_square
    assert PRESETS["tiny"].num_image_tokens == 16


def test_tiny_checkpoint_layout_and_round_trip(tiny_ckpt):
    from safetensors import safe_open
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    names = sorted(p.name for p in tiny_ckpt.iterdir())
    for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
              "preprocessor_config.json", "chat_template.jinja", "generation_config.json"):
        assert f in names
    with safe_open(tiny_ckpt / "model.safetensors", "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith(HUB_PREFIXES) for k in keys)
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["image_seq_length"] == 16
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    model = LlavaForConditionalGeneration.from_pretrained(tiny_ckpt)
    fresh, _ = build_from_preset("tiny", seed=0)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k  # nothing re-initialised on load
    proc = AutoProcessor.from_pretrained(tiny_ckpt)
    from PIL import Image
    batch = proc(images=[Image.new("RGB", (40, 30), "white")], text=["[INST] <image>\nhi [/INST]"],
                 return_tensors="pt")
    assert int((batch["input_ids"] == cfg["image_token_index"]).sum()) == 16
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def test_templates_render_like_the_originals():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a mass?"}]},
            {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Where?"}]
    v15 = render_messages(TEMPLATES["v1.5"], msgs, True)
    assert v15 == "<s>[INST] <image>\nIs there a mass? [/INST] Yes.</s>[INST] Where? [/INST]"
    v1 = render_messages(TEMPLATES["v1"], msgs, True)
    assert v1.endswith("###Human: <image>\nIs there a mass?###Assistant: Yes.###Human: Where?###Assistant:")
    assert v1.startswith("<s>You are LLaVA-Med")


def test_v1_preset_has_exact_single_linear_projector_and_stop_string(tmp_path):
    small = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=32, num_attention_heads=2,
                 num_key_value_heads=2)
    model, proc = build_from_preset("llava-med-v1", text_overrides=small,
                                    vision_overrides=dict(num_hidden_layers=1, hidden_size=16, intermediate_size=16,
                                                          num_attention_heads=2, image_size=28))
    proj = model.model.multi_modal_projector
    x = torch.randn(3, 16)
    assert torch.allclose(proj(x), proj.linear_1(x))  # linear_2 is the identity
    save_checkpoint(model, proc, tmp_path / "v1")
    gen = json.loads((tmp_path / "v1" / "generation_config.json").read_text())
    assert gen["llavamed_stop_strings"] == ["###"] and "stop_strings" not in gen
    assert (tmp_path / "v1" / "chat_template.jinja").read_text() == TEMPLATES["v1"]


def test_load_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(ModelError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "orig").mkdir()
    (tmp_path / "orig" / "config.json").write_text(json.dumps({"model_type": "llava_mistral"}))
    with pytest.raises(ModelError, match="model_type is 'llava_mistral'") as ei:
        load_checkpoint(tmp_path / "orig")
    assert "llavamed weights convert" in ei.value.hint


def test_weights_init_cli(cli, tmp_path):
    res = cli("weights", "init", "--preset", "tiny", "--out", tmp_path / "t", "--json")
    assert res.exit_code == 0, res
    out = json.loads(res.stdout)
    assert out["parameters"] > 100_000 and out["image_tokens"] == 16
    model, proc = load_checkpoint(tmp_path / "t")
    assert model.config.model_type == "llava"


def test_weights_init_composes_from_local_llm_and_clip(cli, tmp_path):
    """The paper's "from Vicuna" start: pretrained LM and CLIP kept, <image> added, projector new."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from llavamed_core.model.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    # A "pretrained" LM whose tokenizer lacks <image>: rebuild a tokenizer without it.
    from transformers import PreTrainedTokenizerFast
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>")
    torch.manual_seed(1)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2))
    lm.save_pretrained(tmp_path / "llm")
    plain.save_pretrained(tmp_path / "llm")
    vis = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=2, num_attention_heads=2))
    vis.save_pretrained(tmp_path / "clip")
    res = cli("weights", "init", "--llm", tmp_path / "llm", "--vision", tmp_path / "clip", "--projector", "linear",
              "--template", "v1", "--out", tmp_path / "composed")
    assert res.exit_code == 0, res
    model, proc = load_checkpoint(tmp_path / "composed")
    assert model.config.projector_hidden_act == "linear" and model.config.image_seq_length == 16
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(model.model.vision_tower.encoder.layers[1].mlp.fc1.weight,
                       vis.encoder.layers[1].mlp.fc1.weight)
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index


def test_corrupt_weights_are_a_model_error(tiny_ckpt_copy):
    (tiny_ckpt_copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="could not load the checkpoint"):
        load_checkpoint(tiny_ckpt_copy)


# -- the one checkpoint writer ------------------------------------------------------------------------------

def test_sharded_checkpoint_is_standard_and_loads_with_transformers(tmp_path):
    """save_checkpoint writes through the streaming writer: huggingface_hub's shard split (a tensor
    over the limit alone in its shard), the standard index, files that safetensors and transformers read."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from llavamed_core.model.checkpoint import hub_key

    model, processor = build_from_preset("tiny", seed=0)
    state = {hub_key(k): v for k, v in model.state_dict().items()}
    biggest = max(state, key=lambda k: state[k].numel())
    limit = state[biggest].numel() * 4 - 1  # float32: the biggest tensors exceed it
    out = save_checkpoint(model, processor, tmp_path / "ckpt", max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    on_disk = {}
    for f in files:
        shard = load_file(out / f)
        size = sum(v.numel() * 4 for v in shard.values())
        assert size <= limit or (len(shard) == 1 and size == limit + 1)  # one over the limit: alone
        on_disk.update(shard)
    assert set(on_disk) == set(state) and all(torch.equal(on_disk[k], state[k]) for k in state)
    loaded, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_failure_mid_write_leaves_no_output(tmp_path):
    """A producer that fails after shards are on disk: nothing at the output, no temporary folder;
    an existing output (overwrite) is kept as it was."""
    from llavamed_core.io import atomic_dir
    from llavamed_core.model.shards import OutTensor, write_tensors

    def plan(fail_at):
        def pieces(i):
            yield torch.full((100,), float(i))
            if i == fail_at:
                raise ModelError(f"tensor {i}: injected failure")
            yield torch.full((100,), float(i))

        return [OutTensor(f"t{i}", (200,), torch.float32, (lambda i=i: pieces(i))) for i in range(6)]

    with atomic_dir(tmp_path / "old") as tmp:
        write_tensors(tmp, plan(None), max_shard_bytes=1600)
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    assert len(before) == 4  # 3 shards + index
    for out, overwrite in ((tmp_path / "new", False), (tmp_path / "old", True)):
        with pytest.raises(ModelError, match="injected failure"):
            with atomic_dir(out, overwrite=overwrite) as tmp:
                write_tensors(tmp, plan(4), max_shard_bytes=1600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
