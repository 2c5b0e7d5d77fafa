"""Training data: label masks token by token, truncation at turn boundaries, batching maths, config.

No training here: these check what the model would be trained on.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from llavamed_core.errors import ConfigError, DataError
from llavamed_core.records import parse_conversation
from llavamed_core.train.config import (TrainConfig, config_to_dict, load_config_file, merge_settings,
                                        parse_set_items, plan_batch)
from llavamed_core.train.dataset import IGNORE_INDEX, PaddingCollator, build_dataset

from train_helpers import MULTI_TURN, make_images

TERMINATOR = {"tiny": "</s>", "v1": "###"}


@pytest.fixture(scope="module")
def processors():
    """Processors of the tiny preset with its own template and with the v1 (``###``) template."""
    from llavamed_core.model import build_from_preset, get_preset

    out = {}
    for template in ("tiny", "v1"):
        _, out[template] = build_from_preset(dataclasses.replace(get_preset("tiny"), template=template), seed=0)
    return out


def _runs(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of labelled tokens."""
    runs, cur = [], []
    for t in labels:
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("template", ["tiny", "v1"])
def test_labels_only_on_assistant_turns_token_by_token(tmp_path, processors, template):
    from PIL import Image

    processor = processors[template]
    tok = processor.tokenizer
    make_images(tmp_path, ["a.png"])
    conv = parse_conversation(MULTI_TURN, "f.json", 0)
    ds, stats = build_dataset([conv], processor, tmp_path, max_length=512)
    item = ds[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()

    # The ids are exactly what the checkpoint's processor produces, image expansion included.
    # (Rendered, then processed: apply_chat_template(images=…) is not accepted by every transformers 5.x.)
    rendered = processor.apply_chat_template(conv.to_messages(), tokenize=False)
    ref = processor(text=rendered, images=[Image.open(tmp_path / "a.png").convert("RGB")],
                    add_special_tokens=not (tok.bos_token and rendered.startswith(tok.bos_token)))
    assert ids == list(ref["input_ids"][0])
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == stats.image_tokens == 16

    # An independent expectation: the characters of each answer (with the template's terminator)
    # in the rendered text, mapped to tokens by their offsets (a token that starts with the space
    # before an answer, like "ĠYes", is the answer's first token); the image token expanded in place.
    text = processor.apply_chat_template(conv.to_messages(), tokenize=False)
    spans, pos = [], 0
    for turn in conv.turns[1::2]:
        start = text.index(turn.value + TERMINATOR[template], pos)
        pos = start + len(turn.value) + len(TERMINATOR[template])
        spans.append((start, pos))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    expected = []
    for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        trained = any(a < e and b > s for s, e in spans)
        expected += [False] * 16 if t == image_id else [trained]
    got = [lab != IGNORE_INDEX for lab in labels]
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"token {i} {tok.convert_ids_to_tokens(ids[i])!r}: labelled={g}, expected {e}"
    assert all(lab == t for lab, t in zip(labels, ids) if lab != IGNORE_INDEX)

    # Read back: the labelled runs are the three answers, each with its terminator, nothing else.
    decoded = [tok.decode(run) for run in _runs(labels)]
    assert [d.strip() for d in decoded] == [t.value + TERMINATOR[template] for t in conv.turns[1::2]]
    assert stats.trained_tokens == sum(got)


def test_image_is_loaded_with_the_checkpoints_processor(tmp_path, processors):
    import torch
    from PIL import Image

    processor = processors["tiny"]
    make_images(tmp_path, ["a.png"])
    ds, _ = build_dataset([parse_conversation(MULTI_TURN, "f.json", 0)], processor, tmp_path, 512)
    expected = processor.image_processor(images=[Image.open(tmp_path / "a.png").convert("RGB")],
                                         return_tensors="pt")["pixel_values"][0]
    assert ds[0]["pixel_values"].shape == (3, 32, 32)
    assert torch.equal(ds[0]["pixel_values"], expected)


def test_long_samples_are_truncated_at_turn_boundaries_or_dropped(tmp_path, processors):
    processor = processors["tiny"]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    make_images(tmp_path, ["a.png"])
    long = parse_conversation(MULTI_TURN, "f.json", 0)
    two = parse_conversation(dict(MULTI_TURN, id="two", conversations=MULTI_TURN["conversations"][:4]), "f.json", 1)
    one = parse_conversation(dict(MULTI_TURN, id="one", conversations=MULTI_TURN["conversations"][:2]), "f.json", 2)
    ref, _ = build_dataset([two, one], processor, tmp_path, 512)
    len_two, len_one = len(ref[0]["input_ids"]), len(ref[1]["input_ids"])

    # Room for two (question, answer) pairs, not three: cut after the second answer, exactly.
    ds, stats = build_dataset([long, one], processor, tmp_path, len_two)
    assert (stats.samples, stats.truncated, stats.dropped) == (2, 1, 0)
    ids, labels = ds[0]["input_ids"].tolist(), ds[0]["labels"].tolist()
    assert ids == ref[0]["input_ids"].tolist() and labels == ref[0]["labels"].tolist()
    assert ids.count(image_id) == 16  # the image span is never cut
    assert processor.tokenizer.decode(_runs(labels)[-1]).strip() == "Yes, in the upper left.</s>"

    # Room for one pair.
    ds, stats = build_dataset([long, one], processor, tmp_path, len_one)
    assert (stats.samples, stats.truncated, stats.dropped) == (2, 1, 0)
    assert ds[0]["input_ids"].tolist() == ref[1]["input_ids"].tolist()

    # --on-long drop: the long sample goes, counted.
    ds, stats = build_dataset([long, one], processor, tmp_path, len_two, on_long="drop")
    assert (stats.samples, stats.truncated, stats.dropped) == (1, 0, 1)
    assert ds.samples[0].record_id == "one"

    # Not even the first exchange fits: dropped; when nothing is left, that is an error.
    ds, stats = build_dataset([long, one, two], processor, tmp_path, len_one)
    assert (stats.samples, stats.truncated, stats.dropped) == (3, 2, 0)
    with pytest.raises(DataError, match="longer than"):
        build_dataset([long, one], processor, tmp_path, len_one - 1)


def test_collator_pads_right_with_ignored_labels():
    import torch

    features = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]),
                 "pixel_values": torch.zeros(3, 4, 4)},
                {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "pixel_values": torch.ones(3, 4, 4)}]
    batch = PaddingCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert PaddingCollator(0, pad_to_multiple_of=8)(features)["input_ids"].shape == (2, 8)


def test_global_batch_is_kept_whatever_the_number_of_processes():
    assert plan_batch(128, 1, max_per_device=16) == plan_batch(128, 1, None, 16)
    for world in (1, 2, 4, 8):
        p = plan_batch(128, world, max_per_device=4)
        assert p.per_device * p.grad_accum * p.world_size == 128 and p.per_device == 4
    p = plan_batch(128, 8, per_device=16)
    assert (p.per_device, p.grad_accum) == (16, 1)
    p = plan_batch(12, 2, max_per_device=4)
    assert (p.per_device, p.grad_accum) == (3, 2)  # largest divisor of 6 not above 4
    with pytest.raises(ConfigError, match="does not divide over 3"):
        plan_batch(128, 3)
    with pytest.raises(ConfigError, match="--per-device-batch 5"):
        plan_batch(128, 2, per_device=5)


def test_config_layers_set_items_and_round_trip(tmp_path):
    names = {"warmup_steps", "logging_steps", "max_grad_norm"}
    base = {"model": "m", "data": "d.json", "images": "i", "out": "o"}
    s = merge_settings({}, base, "test", names)
    s = merge_settings(s, parse_set_items(["max_grad_norm=0.5", "epochs=2", "lora=true"]), "--set", names)
    cfg = TrainConfig(stage="instruct", **s)
    assert cfg.epochs == 2.0 and cfg.lora is True and cfg.overrides == {"max_grad_norm": 0.5}
    assert cfg.resolved_learning_rate() == 2e-4  # LoRA's rate
    with pytest.raises(ConfigError, match="unknown option 'max_grad'"):
        merge_settings(s, {"max_grad": 1}, "--set", names)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set_items(["nonsense"])
    with pytest.raises(ConfigError, match="not a valid int"):
        merge_settings(s, {"max_steps": "ten"}, "--config x.yaml", names)

    saved = tmp_path / "train_config.json"
    saved.write_text(json.dumps(config_to_dict(cfg)))
    again = TrainConfig(**merge_settings({}, load_config_file(saved), "--config", names))
    assert again == cfg

    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(tmp_path / "bad.yaml")


def test_stage_option_combinations_are_checked():
    with pytest.raises(ConfigError, match="only the projector trains"):
        TrainConfig("align", "m", "d", "i", "o", lora=True).check()
    with pytest.raises(ConfigError, match="unknown training stage"):
        TrainConfig("pretrain", "m", "d", "i", "o").check()
    with pytest.raises(ConfigError, match="--deepspeed and --fsdp"):
        TrainConfig("instruct", "m", "d", "i", "o", deepspeed="zero2", fsdp=True).check()
    with pytest.raises(ConfigError, match="neither zero2"):
        TrainConfig("instruct", "m", "d", "i", "o", deepspeed="zero9").check()
