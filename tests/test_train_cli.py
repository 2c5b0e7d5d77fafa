"""``llavamed train align|instruct|finetune`` end to end through the CLI, in one process (tiny model).

Each stage trains a few steps on the synthetic set and writes a checkpoint that plain transformers
loads; the weights show what the stage trained. Bad data and bad options fail with one clear line.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from train_helpers import changed_groups, check_generates, make_images, weights, write_records

FAST = ["--global-batch", "8", "--max-steps", "3"]


@pytest.fixture(scope="module")
def linear_ckpt(tmp_path_factory):
    """A tiny checkpoint with the v1 single linear projector (``linear_2`` the identity)."""
    from llavamed_core.model import build_from_preset, get_preset, save_checkpoint

    out = tmp_path_factory.mktemp("linear") / "ckpt"
    model, processor = build_from_preset(dataclasses.replace(get_preset("tiny"), projector_hidden_act="linear"), seed=1)
    save_checkpoint(model, processor, out)
    return out


def test_align_trains_only_the_projector_and_keeps_linear_2_the_identity(cli, linear_ckpt, synth_data, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "align"
    r = cli("train", "align", "--model", linear_ckpt, "--data", synth_data / "align.json",
            "--images", synth_data / "images", "--out", out, *FAST, "--json")
    assert r.exit_code == 0, r
    res = json.loads(r.stdout)
    assert res["stage"] == "align" and res["steps"] == 3 and res["learning_rate"] == 2e-3
    assert res["samples"] == 48 and res["dropped"] == 0

    before, after = weights(linear_ckpt), weights(out)
    assert changed_groups(before, after) == {"projector": True, "language_model": False, "vision_tower": False}
    w2 = after["multi_modal_projector.linear_2.weight"]
    assert torch.equal(w2, torch.eye(*w2.shape)) and not after["multi_modal_projector.linear_2.bias"].any()
    assert not torch.equal(before["multi_modal_projector.linear_1.weight"], after["multi_modal_projector.linear_1.weight"])

    # The projector alone, for reuse as the start of stage 2.
    proj = load_file(str(out / "mm_projector.safetensors"))
    assert sorted(proj) == sorted(k for k in after if k.startswith("multi_modal_projector."))
    assert all(torch.equal(proj[k], after[k]) for k in proj)

    saved = json.loads((out / "train_config.json").read_text())
    assert saved["stage"] == "align" and saved["epochs"] == 1.0 and saved["global_batch"] == 8
    check_generates(out, synth_data / "images" / "train_00000.png")


def test_instruct_trains_lm_and_projector_not_vision(cli, tiny_ckpt, synth_data, tmp_path):
    out = tmp_path / "instruct"
    config = tmp_path / "run.yaml"
    config.write_text("global_batch: 4\nmax_steps: 2\nseed: 7\nlogging_steps: 1\n")
    r = cli("train", "instruct", "--model", tiny_ckpt, "--data", synth_data / "instruct.json",
            "--images", synth_data / "images", "--out", out, "--config", config, "--max-steps", "3",
            "--set", "max_grad_norm=0.5")
    assert r.exit_code == 0, r
    assert "train instruct" in r.stdout and "steps" in r.stdout and "4 = " in r.stdout  # summary table
    assert "[train] 3/3 step" in r.stderr and "loss=" in r.stderr  # plain progress lines (not a TTY)
    assert changed_groups(weights(tiny_ckpt), weights(out)) == {
        "projector": True, "language_model": True, "vision_tower": False}
    args = json.loads((out / "training_args.json").read_text())
    assert args["max_grad_norm"] == 0.5 and args["max_steps"] == 3 and args["learning_rate"] == 2e-5
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] == 4
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["seed"] == 7 and saved["overrides"] == {"logging_steps": 1, "max_grad_norm": 0.5}
    check_generates(out, synth_data / "images" / "train_00001.png")


def test_finetune_with_lora_merges_into_a_standalone_checkpoint(cli, tiny_ckpt, synth_data, tmp_path):
    out = tmp_path / "lora"
    common = ["--model", tiny_ckpt, "--data", synth_data / "train.json", "--images", synth_data / "images",
              "--lora", "--lora-r", "4", "--lora-alpha", "8", *FAST]
    r = cli("train", "finetune", *common, "--out", out, "--json")
    assert r.exit_code == 0, r
    res = json.loads(r.stdout)
    assert res["merged"] is True and res["learning_rate"] == 2e-4
    assert res["trainable_params"] < res["total_params"] / 2
    before, after = weights(tiny_ckpt), weights(out)
    assert set(after) == set(before)  # no adapter keys: merged into the plain layout
    assert changed_groups(before, after) == {"projector": True, "language_model": True, "vision_tower": False}
    check_generates(out, synth_data / "images" / "train_00002.png")

    adapter = tmp_path / "adapter"
    r = cli("train", "finetune", *common, "--out", adapter, "--no-merge", "--max-steps", "1")
    assert r.exit_code == 0, r
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert "adapter only" in r.stdout


def _bad_records(tmp_path):
    """Broken records (each to go among good ones); each record id is to be named in the error."""
    from PIL import Image

    make_images(tmp_path / "img", ["ok.png", "other.png"])
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    # A valid header whose pixel data is cut short: found when the image is loaded, mid-run.
    Image.effect_noise((64, 64), 60).convert("RGB").save(tmp_path / "img" / "big.png")
    big = (tmp_path / "img" / "big.png").read_bytes()
    (tmp_path / "img" / "truncated.png").write_bytes(big[: len(big) // 2])
    good = {"id": "good-1", "image": "ok.png", "domain": {"ct_scan": True}, "question_type": "presence",
            "answer_type": "CLOSED", "conversations": [{"from": "human", "value": "<image>\nIs there a lesion?"},
                                                       {"from": "gpt", "value": "yes"}]}

    def bad(rid, **change):
        return dict(good, id=rid, **change)

    conv = good["conversations"]
    return {
        "missing image": bad("rec-missing", image="nowhere.png"),
        "corrupt image": bad("rec-corrupt", image="corrupt.png"),
        "truncated image": bad("rec-truncated", image="truncated.png"),
        "no <image>": bad("rec-noimage", conversations=[{"from": "human", "value": "Is there a lesion?"}, conv[1]]),
        "two <image>": bad("rec-twoimage", conversations=[{"from": "human", "value": "<image> <image> Lesion?"}, conv[1]]),
        "empty conversation": bad("rec-empty", conversations=[]),
        "bad role": bad("rec-role", conversations=[conv[0], {"from": "doctor", "value": "yes"}]),
    }, good


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "truncated image", "no <image>", "two <image>",
                                  "empty conversation", "bad role"])
def test_bad_data_exits_1_naming_the_record(cli, tiny_ckpt, tmp_path, case):
    cases, good = _bad_records(tmp_path)
    data = write_records(tmp_path / "data.json", [good, cases[case], dict(good, id="good-2", image="other.png")])
    r = cli("train", "instruct", "--model", tiny_ckpt, "--data", data, "--images", tmp_path / "img",
            "--out", tmp_path / "out", *FAST)
    assert r.exit_code == 1, r
    assert cases[case]["id"] in r.stderr and "Error:" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "out").exists()


def test_extra_keys_pass_and_jsonl_is_read(cli, tiny_ckpt, tmp_path):
    cases, good = _bad_records(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(dict(good, id=f"r{i}", pmc_id="PMC1", extra={"k": i})) for i in range(4)))
    r = cli("train", "finetune", "--model", tiny_ckpt, "--data", data, "--images", tmp_path / "img",
            "--out", tmp_path / "out", "--global-batch", "4", "--max-steps", "1", "--json")
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["samples"] == 4


@pytest.mark.parametrize("args, message", [
    (["--qlora", "--deepspeed", "zero2"], "--qlora with --fsdp/--deepspeed is not supported"),
    (["--gpus", "64"], "--gpus 64: "),
    (["--set", "learning_rat=1"], "unknown option 'learning_rat'"),
    (["--deepspeed", "zero9"], "neither zero2, zero3"),
    (["--global-batch", "7", "--nproc", "2"], "does not divide over 2 processes"),
    (["--resume", "nowhere"], "no such checkpoint directory"),
])
def test_bad_options_exit_1_with_a_hint(cli, tiny_ckpt, synth_data, tmp_path, args, message):
    r = cli("train", "instruct", "--model", tiny_ckpt, "--data", synth_data / "instruct.json",
            "--images", synth_data / "images", "--out", tmp_path / "out", "--max-steps", "1", *args)
    assert r.exit_code == 1, r
    assert message in r.stderr and "Hint:" in r.stderr


def test_existing_output_and_missing_options(cli, tiny_ckpt, synth_data, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    r = cli("train", "align", "--model", tiny_ckpt, "--data", synth_data / "align.json",
            "--images", synth_data / "images", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "exists and is not empty" in r.stderr and "--overwrite" in r.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    r = cli("train", "align", "--data", synth_data / "align.json")
    # --out has a default (RUNS/train/<stage>-<timestamp>, tests/test_config.py); the others do not
    assert r.exit_code == 1 and "Error: missing --model, --images\n" in r.stderr
