"""Tests of the generation engine (llavamed_core.infer.engine) on the tiny random checkpoint.

Batched greedy output must equal one-at-a-time output and plain ``model.generate``; streaming,
stop strings, EOS, max_new_tokens, per-row sampling parameters, cancellation, the checkpoint's
own template and stop strings, and LoRA adapters merged into their base.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from llavamed_core.errors import ConfigError, ModelError
from llavamed_core.infer import ChatRequest, Engine, GenerationParams
from llavamed_core.infer.engine import request_images

QUESTIONS = ["Is there a lesion?", "What is the modality of this image? Describe it in detail please.",
             "hi", "Where is the lesion located in this picture, upper left or lower right?"]


def _image(seed: int, size=(40, 50)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def _requests(n: int = 12, max_new_tokens: int = 24) -> list[ChatRequest]:
    reqs = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        content = [{"type": "image", "image": _image(i)}, {"type": "text", "text": q}] if i % 3 else q
        reqs.append(ChatRequest([{"role": "user", "content": content}],
                                GenerationParams(max_new_tokens=max_new_tokens)))
    return reqs


@pytest.fixture(scope="module")
def engine(tiny_ckpt) -> Engine:
    return Engine.load(tiny_ckpt)


def test_load_reports_name_context_device(engine, tiny_ckpt):
    assert engine.model_name == tiny_ckpt.name
    assert engine.context_length == 512
    assert engine.device == "cpu"


def test_batched_greedy_equals_one_at_a_time_and_plain_generate(engine):
    reqs = _requests(12)
    single = [engine.generate([r])[0] for r in reqs]
    batched = engine.generate(reqs, batch_size=5)
    assert [b.text for b in batched] == [s.text for s in single]
    assert [b.completion_tokens for b in batched] == [s.completion_tokens for s in single]
    assert [b.prompt_tokens for b in batched] == [engine.count_tokens(r) for r in reqs]
    assert len({s.text for s in single}) > 3  # the requests really differ
    # ... and plain transformers generate (what the original scripts ran) agrees.
    r = reqs[1]
    enc = engine._encode([engine.render_prompt(r.messages)], request_images(r.messages))
    out = engine.model.generate(**enc, max_new_tokens=24, do_sample=False)
    text = engine.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False).strip()
    assert text == single[1].text


def test_streamed_deltas_add_up_to_the_text(engine):
    reqs = _requests(6, max_new_tokens=30)
    deltas: dict[int, list[str]] = {}
    res = engine.generate(reqs, batch_size=6, on_delta=lambda i, d: deltas.setdefault(i, []).append(d))
    for i, r in enumerate(res):
        assert "".join(deltas.get(i, [])) == r.text
    assert max(len(v) for v in deltas.values()) > 3  # token by token, not all at once
    pieces = list(engine.stream(reqs[1]))
    assert len(pieces) > 3 and "".join(pieces) == res[1].text


def test_stop_strings_eos_and_length(engine):
    req = _requests(2, max_new_tokens=40)[1]
    full = engine.generate([req])[0]
    assert full.finish_reason == "length" and full.completion_tokens == 40
    # A stop string taken from the middle of the answer cuts the text right before it.
    text = full.text
    k = len(text) // 2
    stop = text[k:k + 3]
    first = text.find(stop)
    req.params = GenerationParams(max_new_tokens=40, stop=[stop])
    deltas = []
    res = engine.generate([req], on_delta=lambda i, d: deltas.append(d))[0]
    assert res.finish_reason == "stop"
    assert res.text == text[:first].strip()
    assert "".join(deltas) == res.text
    assert stop not in res.text
    short = engine.generate([ChatRequest(req.messages, GenerationParams(max_new_tokens=3))])[0]
    assert short.finish_reason == "length" and short.completion_tokens == 3


def test_eos_stops_generation(engine):
    # Make the second generated token an EOS by treating it as one: every row stops at it.
    req = _requests(2, max_new_tokens=10)[1]
    ref = engine.generate([req])[0]
    ids = engine.tokenizer(ref.text, add_special_tokens=False)["input_ids"]
    saved = set(engine.eos_token_ids)
    engine.eos_token_ids = saved | {ids[0]}
    try:
        res = engine.generate([req])[0]
    finally:
        engine.eos_token_ids = saved
    assert res.finish_reason == "stop" and res.completion_tokens == 0 and res.text == ""


def test_per_row_sampling_params_in_one_batch(engine):
    base = _requests(3, max_new_tokens=16)
    params = [GenerationParams(max_new_tokens=16),
              GenerationParams(max_new_tokens=16, temperature=1.0, seed=1),
              GenerationParams(max_new_tokens=16, temperature=0.8, top_p=0.5, seed=2)]
    reqs = [ChatRequest(base[1].messages, p) for p in params]
    alone = [engine.generate([r])[0].text for r in reqs]
    together = [r.text for r in engine.generate(reqs, batch_size=3)]
    assert together == alone
    assert alone[0] != alone[1]  # sampling changed the answer
    again = engine.generate([ChatRequest(base[1].messages, GenerationParams(max_new_tokens=16,
                                                                            temperature=1.0, seed=7))] * 2)
    assert again[0].text == again[1].text  # same seed, same draw
    other = engine.generate([ChatRequest(base[1].messages, GenerationParams(max_new_tokens=16,
                                                                            temperature=1.0, seed=8))])
    assert other[0].text != again[0].text


def test_cancel_one_row_keeps_the_others(engine):
    reqs = _requests(4, max_new_tokens=20)
    ref = engine.generate(reqs)
    steps = {"n": 0}

    def should_stop(i: int) -> bool:
        if i == 2:
            steps["n"] += 1
            return steps["n"] > 3
        return False

    res = engine.generate(reqs, should_stop=should_stop)
    assert res[2].finish_reason == "cancelled" and res[2].completion_tokens == 3
    assert [r.text for i, r in enumerate(res) if i != 2] == [r.text for i, r in enumerate(ref) if i != 2]


def test_bad_parameters_and_context_length(engine):
    req = _requests(1)[0]
    with pytest.raises(ConfigError, match="temperature"):
        engine.generate([ChatRequest(req.messages, GenerationParams(temperature=-1))])
    with pytest.raises(ConfigError, match="top_p"):
        engine.generate([ChatRequest(req.messages, GenerationParams(top_p=0))])
    long = ChatRequest([{"role": "user", "content": "lesion " * 600}])
    with pytest.raises(ConfigError, match="context length is 512"):
        engine.generate([long])
    # max_new_tokens is capped by the room left in the context.
    near = ChatRequest([{"role": "user", "content": "yes " * 250}], GenerationParams(max_new_tokens=400))
    res = engine.generate([near])[0]
    assert res.prompt_tokens + res.completion_tokens <= 512


def test_template_and_stop_strings_come_from_the_checkpoint(tiny_ckpt_copy):
    from llavamed_core.model.templates import TEMPLATES

    (tiny_ckpt_copy / "chat_template.jinja").write_text(TEMPLATES["v1"])
    gen = json.loads((tiny_ckpt_copy / "generation_config.json").read_text())
    engine = Engine.load(tiny_ckpt_copy)
    prompt = engine.render_prompt([{"role": "user", "content": "Is there a lesion?"}])
    assert prompt.endswith("###Human: Is there a lesion?###Assistant:")
    ref = engine.generate([ChatRequest([{"role": "user", "content": "Is there a lesion?"}],
                                       GenerationParams(max_new_tokens=30))])[0]
    stop = ref.text[5:7]
    gen["stop_strings"] = [stop]
    (tiny_ckpt_copy / "generation_config.json").write_text(json.dumps(gen))
    engine = Engine.load(tiny_ckpt_copy)
    assert engine.stop_strings == [stop]
    res = engine.generate([ChatRequest([{"role": "user", "content": "Is there a lesion?"}],
                                       GenerationParams(max_new_tokens=30))])[0]
    assert res.finish_reason == "stop" and res.text == ref.text[:ref.text.find(stop)].strip()


def test_lora_adapter_loads_with_its_base(tiny_ckpt, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    base = Engine.load(tiny_ckpt)
    torch.manual_seed(0)
    peft_model = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    req = _requests(2, max_new_tokens=12)[1]
    expected = Engine(peft_model.eval(), base.processor).generate([req])[0].text
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_ckpt)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    merged = Engine.load(adapter)
    assert merged.model_name == "adapter"
    assert merged.generate([req])[0].text == expected
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="is not a local directory") as exc:
        Engine.load(adapter)
    assert "--base" in exc.value.hint
    assert Engine.load(adapter, base=tiny_ckpt).generate([req])[0].text == expected


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Engine.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        Engine.load(tmp_path / "empty")
    shutil.rmtree(tmp_path / "empty")
