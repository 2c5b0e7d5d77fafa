"""Checkpoints every runtime loads: plain transformers ``generate``/``pipeline``, transformers 4.x,
vLLM; and the shrunk presets that give the real v1 / v1.5 layouts at tiny sizes.

What transformers 4.57 needs of the tokenizer files is pinned by a fixture that 4.57 itself wrote
(``tests/data/tokenizer_config_tf457.json``: our tiny tokenizer loaded and saved again by
transformers 4.57.6); the 4.57 load itself was run by hand (docs/weights.md, "Compatibility").
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from original_llava_ref import write_clip_dir, write_original_v1, write_original_v15  # noqa: E402

from llavamed_core.errors import ModelError  # noqa: E402
from llavamed_core.model.templates import TEMPLATES  # noqa: E402

V4_FIXTURE = Path(__file__).parent / "data" / "tokenizer_config_tf457.json"
# Tokenizer classes transformers 4.4x-4.57 can instantiate from a tokenizer.json.
V4_TOKENIZER_CLASSES = {"PreTrainedTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast",
                        "CodeLlamaTokenizer", "GemmaTokenizer", "Qwen2Tokenizer", "GPT2Tokenizer"}


def _image(w=60, h=40):
    return Image.new("RGB", (w, h), (200, 30, 30))


def _make_legacy(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as an older llavamed wrote it: ``stop_strings`` in the generation config,
    no ``text_config.architectures``, a transformers-5-only tokenizer config."""
    shutil.copytree(src, dst)
    gen = json.loads((dst / "generation_config.json").read_text())
    stops = gen.pop("llavamed_stop_strings", None)
    extra = gen.pop("llavamed_stop_token_ids", [])
    eos = gen.get("eos_token_id")
    if isinstance(eos, list):
        eos = [e for e in eos if e not in extra]
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if stops:
        gen["stop_strings"] = stops
    gen["_from_model_config"] = True
    (dst / "generation_config.json").write_text(json.dumps(gen))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"].pop("architectures", None)
    (dst / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc.update(tokenizer_class="TokenizersBackend", extra_special_tokens=[])
    tc.pop("model_input_names", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    return dst


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    """``weights init --preset llava-med-v1|llava-med-v1.5 --shrink``, through the CLI."""
    from typer.testing import CliRunner

    from llavamed_cli.main import app

    root = tmp_path_factory.mktemp("shrunk")
    out = {}
    for name, preset in (("v1", "llava-med-v1"), ("v15", "llava-med-v1.5")):
        res = CliRunner().invoke(app, ["weights", "init", "--preset", preset, "--shrink", "--out",
                                       str(root / name), "--json"])
        assert res.exit_code == 0, res.output
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Original-layout v1 and v1.5 checkpoints converted with ``weights convert``."""
    from llavamed_core.model.convert import ConvertConfig, convert_checkpoint

    root = tmp_path_factory.mktemp("conv")
    clip = write_clip_dir(root / "clip")
    v1 = write_original_v1(root / "orig-v1", fmt="safetensors")
    v15 = write_original_v15(root / "orig-v15")
    convert_checkpoint(ConvertConfig(src=v1, out=root / "v1", vision=clip))
    convert_checkpoint(ConvertConfig(src=v15, out=root / "v15"))
    return {"v1": root / "v1", "v15": root / "v15", "orig-v1": v1, "clip": clip}


# ------------------------------------------------------------------------------------ the files
def _check_side_files(ckpt: Path, text_arch: str | None, stops: list[str]) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    if text_arch is not None:
        assert cfg["text_config"]["architectures"] == [text_arch], ckpt
        assert "rope_theta" in cfg["text_config"], ckpt
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert "stop_strings" not in gen, ckpt
    assert gen.get("llavamed_stop_strings", []) == stops, ckpt
    tc = json.loads((ckpt / "tokenizer_config.json").read_text())
    _check_v4_tokenizer_config(tc, ckpt)
    if stops:
        from tokenizers import Tokenizer

        ids = gen["llavamed_stop_token_ids"]
        eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
        tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        assert ids and set(ids) <= set(eos), ckpt
        assert all(tok.decode([i], skip_special_tokens=False).strip() in stops for i in ids)
        assert gen["_from_model_config"] is False


def _check_v4_tokenizer_config(tc: dict, where) -> None:
    """What transformers 4.x needs, compared with the config 4.57 itself writes."""
    v4 = json.loads(V4_FIXTURE.read_text())
    assert tc["tokenizer_class"] in V4_TOKENIZER_CLASSES, where
    assert tc["tokenizer_class"] != "TokenizersBackend"
    # 4.x calls .keys() on extra_special_tokens: a dict of named tokens, as 4.57 writes it.
    assert isinstance(v4["extra_special_tokens"], dict)
    assert isinstance(tc.get("extra_special_tokens"), dict), where
    assert isinstance(tc.get("additional_special_tokens", []), list)
    # 4.x's generic class would add token_type_ids, which Llava's generate rejects.
    assert "token_type_ids" not in tc["model_input_names"], where


def test_tiny_tokenizer_config_matches_what_457_writes(shrunk, tiny_ckpt):
    """Our tiny tokenizer, saved by transformers 4.57 itself (the fixture) and by us: the fields
    4.57 decides the class and the special tokens from are the same."""
    v4 = json.loads(V4_FIXTURE.read_text())
    for ckpt in (tiny_ckpt, shrunk["v1"], shrunk["v15"]):
        ours = json.loads((ckpt / "tokenizer_config.json").read_text())
        for key in ("tokenizer_class", "extra_special_tokens", "image_token", "bos_token", "eos_token",
                    "pad_token", "unk_token", "padding_side"):
            assert ours[key] == v4[key], (ckpt, key)


def test_every_writer_writes_loadable_side_files(tiny_ckpt, shrunk, converted, tmp_path, cli):
    """Presets (save_checkpoint), shrunk presets, compose, convert, apply-delta --to-hf, and the
    writers that copy side files (make-delta, apply-delta, merge-lora) from an older checkpoint."""
    _check_side_files(tiny_ckpt, "LlamaForCausalLM", [])
    _check_side_files(shrunk["v1"], "LlamaForCausalLM", ["###"])
    _check_side_files(shrunk["v15"], "MistralForCausalLM", [])
    _check_side_files(converted["v1"], "LlamaForCausalLM", ["###"])
    _check_side_files(converted["v15"], "MistralForCausalLM", [])

    # compose (weights init --llm --vision)
    from transformers import (CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM,
                              PreTrainedTokenizerFast)

    from llavamed_core.model import save_checkpoint
    from llavamed_core.model.compose import compose_llava
    from llavamed_core.model.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>",
                                    eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(1)
    MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
                       ).save_pretrained(tmp_path / "llm")
    plain.save_pretrained(tmp_path / "llm")
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=2, num_attention_heads=2)).save_pretrained(tmp_path / "clip")
    model, proc = compose_llava(tmp_path / "llm", tmp_path / "clip", projector="linear", template="v1")
    save_checkpoint(model, proc, tmp_path / "composed")
    _check_side_files(tmp_path / "composed", "MistralForCausalLM", ["###"])

    # apply-delta --to-hf (through convert's writer)
    orig = converted["orig-v1"]
    assert cli("weights", "make-delta", "--base", orig, "--target", orig, "--out", tmp_path / "d0").exit_code == 0
    res = cli("weights", "apply-delta", "--base", orig, "--delta", tmp_path / "d0", "--out", tmp_path / "hf",
              "--to-hf", "--vision", converted["clip"])
    assert res.exit_code == 0, res
    _check_side_files(tmp_path / "hf", "LlamaForCausalLM", ["###"])

    # Copying writers, from a checkpoint an older llavamed wrote.
    legacy = _make_legacy(shrunk["v1"], tmp_path / "legacy")
    res = cli("weights", "make-delta", "--base", legacy, "--target", legacy, "--out", tmp_path / "delta")
    assert res.exit_code == 0, res
    _check_side_files(tmp_path / "delta", "LlamaForCausalLM", ["###"])
    res = cli("weights", "apply-delta", "--base", legacy, "--delta", tmp_path / "delta", "--out", tmp_path / "applied")
    assert res.exit_code == 0, res
    _check_side_files(tmp_path / "applied", "LlamaForCausalLM", ["###"])

    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    lora = get_peft_model(LlavaForConditionalGeneration.from_pretrained(legacy),
                          LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    res = cli("weights", "merge-lora", "--adapter", tmp_path / "adapter", "--base", legacy, "--out", tmp_path / "merged")
    assert res.exit_code == 0, res
    _check_side_files(tmp_path / "merged", "LlamaForCausalLM", ["###"])


def test_written_tokenizer_reads_back_identically(shrunk, converted):
    """The 4.x-compatible tokenizer_config changes nothing for transformers 5: same ids, same
    special tokens, same <image>, no token_type_ids."""
    from transformers import AutoTokenizer

    from llavamed_core.model.tokenizer import build_tiny_tokenizer

    texts = ["Is there a lesion?", "<image>\nWhat is shown?###Assistant: yes###", "[INST] hi [/INST] ok</s>"]
    ref = build_tiny_tokenizer()
    tok = AutoTokenizer.from_pretrained(shrunk["v15"])
    for t in texts:
        assert tok(t, add_special_tokens=False)["input_ids"] == ref(t, add_special_tokens=False)["input_ids"]
        assert set(tok(t)) == {"input_ids", "attention_mask"}
    assert tok.image_token == "<image>" and tok.convert_tokens_to_ids("<image>") == ref.convert_tokens_to_ids("<image>")
    assert sorted(tok.all_special_tokens) == sorted(ref.all_special_tokens)
    conv = AutoTokenizer.from_pretrained(converted["v1"])
    ids = conv.convert_tokens_to_ids(["<image>", "<im_start>", "<im_end>"])
    assert len(set(ids)) == 3 and conv.unk_token_id not in ids
    assert ids[0] == json.loads((converted["v1"] / "config.json").read_text())["image_token_index"]
    assert conv("a")["input_ids"][0] == conv.bos_token_id  # the LLaMA tokenizer still adds BOS


# ---------------------------------------------------------------------- plain transformers + ours
def _force_token(model, token_id: int) -> None:
    """Make greedy decoding pick ``token_id`` at every step (an lm_head with a one-hot bias)."""
    old = model.lm_head
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.bias[token_id] = 10.0
    model.lm_head = new


@pytest.mark.parametrize("kind", ["v1", "v15"])
def test_plain_generate_and_pipeline_work_and_v1_stops_at_its_stop_token(shrunk, kind):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline

    ckpt = shrunk[kind]
    proc = AutoProcessor.from_pretrained(ckpt)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a lesion?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(images=[_image()], text=[prompt], return_tensors="pt", add_special_tokens=False)
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == (256 if kind == "v1" else 576)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)  # no tokenizer argument
    assert out.shape[1] > inputs["input_ids"].shape[1]
    pipe = pipeline("image-text-to-text", model=str(ckpt))
    res = pipe(text=[{"role": "user", "content": [{"type": "image", "image": _image()},
                                                   {"type": "text", "text": "Is there a lesion?"}]}],
               max_new_tokens=4, do_sample=False)
    assert res and res[0]["generated_text"]
    if kind == "v1":
        stop_id = json.loads((ckpt / "generation_config.json").read_text())["llavamed_stop_token_ids"][0]
        _force_token(model, stop_id)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert new == [stop_id]  # stopped at "###", not 6 of them
        assert proc.tokenizer.decode(new).strip() == "###"


def test_engine_reads_relocated_and_legacy_stop_strings_identically(shrunk, tmp_path):
    from llavamed_core.infer.engine import ChatRequest, Engine, GenerationParams

    legacy = _make_legacy(shrunk["v1"], tmp_path / "legacy")
    new, old = Engine.load(shrunk["v1"], device="cpu"), Engine.load(legacy, device="cpu")
    assert new.stop_strings == old.stop_strings == ["###"]
    assert new.eos_token_ids == old.eos_token_ids

    def answers(engine):
        reqs = [ChatRequest([{"role": "user", "content": [{"type": "image", "image": _image(30 + 9 * i, 40)},
                                                          {"type": "text", "text": q}]}],
                            GenerationParams(max_new_tokens=10, temperature=0.0))
                for i, q in enumerate(["Is there a lesion?", "What is the modality?"])]
        return [(r.text, r.finish_reason, r.completion_tokens) for r in engine.generate(reqs)]

    assert answers(new) == answers(old)
    stop_id = json.loads((shrunk["v1"] / "generation_config.json").read_text())["llavamed_stop_token_ids"][0]
    _force_token(new.model, stop_id)
    _force_token(old.model, stop_id)
    forced = answers(new)
    assert forced == answers(old)
    assert forced[0] == ("", "stop", 1)  # the stop string, cut and counted, as before


# ------------------------------------------------------------------------------ shrunk presets
@pytest.mark.parametrize("kind,size,tokens,act,template,pad",
                         [("v1", 224, 256, "linear", "v1", False), ("v15", 336, 576, "gelu", "v1.5", True)])
def test_shrunk_preset_keeps_the_layout(shrunk, cli, tmp_path, kind, size, tokens, act, template, pad):
    from llavamed_core.infer.engine import Engine

    ckpt = shrunk[kind]
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["image_seq_length"] == tokens and cfg["projector_hidden_act"] == act
    assert cfg["vision_config"]["image_size"] == size and cfg["vision_config"]["patch_size"] == 14
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    assert cfg["text_config"]["hidden_size"] == 64 and cfg["text_config"]["num_hidden_layers"] == 2
    assert cfg["text_config"]["model_type"] == ("llama" if kind == "v1" else "mistral")
    assert cfg["llavamed"] == {"preset": "llava-med-" + template, "template": template, "shrunk": True}
    assert (ckpt / "chat_template.jinja").read_text() == TEMPLATES[template]
    pp = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert pp["crop_size"] == {"height": size, "width": size} and bool(pp.get("do_pad")) is pad
    engine = Engine.load(ckpt, device="cpu")
    assert engine._image_tokens == tokens
    Image.new("RGB", (90, 40), (10, 200, 30)).save(tmp_path / "x.png")
    res = cli("chat", tmp_path / "x.png", "--model", ckpt, "--prompt", "Is there a lesion?",
              "--max-new-tokens", "4", "--temperature", "0", "--json")
    assert res.exit_code == 0, res
    out = json.loads(res.stdout)
    assert out["prompt_tokens"] > tokens and out["completion_tokens"] >= 1


def test_shrink_needs_a_preset(cli, tmp_path):
    res = cli("weights", "init", "--shrink", "--out", tmp_path / "x")
    assert res.exit_code != 0 and "Error:" in res.stderr and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ vLLM
def test_vllm_refuses_the_linear_projector_before_starting(shrunk, tmp_path):
    from llavamed_core.serve.config import ServeConfig, VllmConfig
    from llavamed_core.serve.vllm import VllmBackend, check_vllm_checkpoint

    check_vllm_checkpoint(shrunk["v15"])  # gelu: fine
    with pytest.raises(ModelError) as err:
        check_vllm_checkpoint(shrunk["v1"])
    assert "projector_hidden_act is 'linear'" in err.value.message and "--engine native" in err.value.hint
    assert "\n" not in err.value.message
    marker = tmp_path / "started"
    fake = tmp_path / "vllm"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nsleep 30\n")
    fake.chmod(0o755)
    backend = VllmBackend(ServeConfig(model=shrunk["v1"], engine="vllm", vllm=VllmConfig(bin=str(fake))))
    with pytest.raises(ModelError, match="vLLM cannot run"):
        backend.start()
    assert backend.proc is None and not marker.exists()  # vLLM was never launched


def test_vllm_proxy_adds_the_checkpoints_stop_strings(shrunk, tmp_path):
    from llavamed_core.serve.config import ServeConfig
    from llavamed_core.serve.protocol import ParsedChat
    from llavamed_core.serve.vllm import VllmBackend

    def fwd(ckpt, body):
        backend = VllmBackend(ServeConfig(model=ckpt, engine="vllm"))
        chat = ParsedChat.__new__(ParsedChat)
        chat.max_tokens = None
        chat.openai_messages = lambda: body["messages"]
        return backend._forward_body(chat, body)

    msgs = [{"role": "user", "content": "hi"}]
    assert fwd(shrunk["v1"], {"messages": msgs})["stop"] == ["###"]
    assert fwd(shrunk["v1"], {"messages": msgs, "stop": "END"})["stop"] == ["END", "###"]
    assert fwd(shrunk["v1"], {"messages": msgs, "stop": ["###", "x"]})["stop"] == ["###", "x"]
    assert "stop" not in fwd(shrunk["v15"], {"messages": msgs})
    legacy = _make_legacy(shrunk["v1"], tmp_path / "legacy")  # stop_strings of an older llavamed
    assert fwd(legacy, {"messages": msgs})["stop"] == ["###"]
