"""Training you can watch: the loss history, the eval loss, what trains, LoRA variants, Hub ids.

- ``history.jsonl`` holds every logged step (and every evaluation); a run resumed after a kill
  (its history holding steps past the checkpoint) ends with the uninterrupted run's history.
- ``--eval-split`` holds records out (seeded; they do not train); the eval loss in the history is
  the mean token loss of the saved weights on those records, computed here the straight way.
- ``--train-*/--freeze-*`` change what trains whatever the stage: frozen parts stay bitwise equal.
- ``--lora-target``, ``--dora``, ``--rslora`` reach PEFT's adapter config; DoRA's magnitudes train.
- ``--model org/name@rev`` trains from the Hub cache like the local path.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from test_hub_ids import hub  # noqa: F401 - the fake Hub server fixture
from train_helpers import changed_groups, check_generates, weights

N, K = 6, 3  # steps in all; a checkpoint (and an evaluation) every K


# -- pure functions --------------------------------------------------------------------------------

def test_sparkline_draws_the_shape():
    from llavamed_core.train.history import sparkline

    assert sparkline([4.0, 3.0, 2.0, 1.0]) == "█▆▃▁"
    assert sparkline([1.0, 2.0, None, float("nan"), 3.0]) == "▁▅█"
    assert sparkline([2.5] * 5) == "▄▄▄▄▄"
    assert sparkline([]) == "" and sparkline([None, float("inf")]) == ""
    long = sparkline([float(i) for i in range(100)], width=10)  # means of 10 equal spans
    assert len(long) == 10 and long[0] == "▁" and long[-1] == "█" and list(long) == sorted(long)


def test_history_rows_keep_steps_and_evaluations_only():
    from llavamed_core.train.history import history_rows

    log = [{"loss": 2.0, "grad_norm": 1.5, "learning_rate": 1e-3, "epoch": 0.5, "step": 1, "tokens_per_s": 10.0},
           {"eval_loss": 1.9, "eval_tokens": 40, "epoch": 0.5, "step": 1},
           {"train_runtime": 3.0, "train_loss": 2.0, "epoch": 1.0, "step": 2}]
    assert history_rows(log) == [
        {"step": 1, "epoch": 0.5, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.5, "tokens_per_s": 10.0},
        {"step": 1, "epoch": 0.5, "eval_loss": 1.9, "eval_tokens": 40}]


def test_plot_without_matplotlib_is_none(tmp_path, monkeypatch):
    from llavamed_core.train.history import plot_history

    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 2, "eval_loss": 1.5}]
    assert plot_history(rows, tmp_path / "a.png") == tmp_path / "a.png"
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert plot_history(rows, tmp_path / "b.png") is None and not (tmp_path / "b.png").exists()


def test_eval_split_is_seeded_and_disjoint():
    from llavamed_core.errors import ConfigError
    from llavamed_core.train.run import split_eval

    items = list(range(40))
    train, held = split_eval(items, 0.1, seed=3)
    assert len(held) == 4 and sorted(train + held) == items and not set(train) & set(held)
    assert split_eval(items, 0.1, seed=3) == (train, held)
    assert split_eval(items, 0.1, seed=4)[1] != held
    assert len(split_eval(items[:3], 0.01, seed=0)[1]) == 1  # at least one record
    with pytest.raises(ConfigError, match="cannot be split"):
        split_eval(items[:1], 0.5, seed=0)


def test_pyproject_extras_match_the_report_to_check():
    import tomllib

    from llavamed_core.train.preflight import INTEGRATIONS

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for name in ("tensorboard", "wandb"):
        package = INTEGRATIONS[name][1]
        assert any(req.startswith(package) for req in extras[name]), (name, extras[name])
    assert any(req.startswith("matplotlib") for req in extras["plot"])


# -- history, resume and eval loss -----------------------------------------------------------------

def _data(synth_data: Path, folder: Path, n: int = 16) -> Path:
    path = folder / "train.json"
    path.write_text(json.dumps(json.loads((synth_data / "instruct.json").read_text())[:n]))
    return path


def _config(tiny_ckpt: Path, data: Path, images: Path, out: Path, **kw):
    from llavamed_core.train import TrainConfig

    return TrainConfig(stage="instruct", model=tiny_ckpt, data=data, images=images, out=out, max_steps=N,
                       global_batch=4, per_device_batch=2, save_steps=K, learning_rate=1e-3, seed=7, eval_split=0.25,
                       keep_checkpoints=True, **kw)


@pytest.fixture(scope="module")
def watched(tiny_ckpt, synth_data, tmp_path_factory):
    """Run A: N steps with an eval split (4 records, in two eval batches), a checkpoint every K.
    Run C: A's run folder as a run killed after step N-1 leaves it (no checkpoint-N; the history
    holding steps 1..N-1, past checkpoint-K), resumed with --resume auto."""
    from llavamed_core.train import train

    root = tmp_path_factory.mktemp("watch")
    data, images = _data(synth_data, root), synth_data / "images"
    a = train(_config(tiny_ckpt, data, images, root / "A"))
    shutil.copytree(root / "A.run", root / "C.run")
    shutil.rmtree(root / "C.run" / f"checkpoint-{N}")
    history = root / "C.run" / "history.jsonl"
    killed_rows = [ln for ln in history.read_text().splitlines() if json.loads(ln)["step"] < N]
    history.write_text("".join(ln + "\n" for ln in killed_rows))
    c = train(_config(tiny_ckpt, data, images, root / "C", resume="auto"))
    return root, data, images, a, c, killed_rows


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_history_is_written_as_it_happens_and_copied_beside_the_output(watched):
    root, _, _, a, _, killed_rows = watched
    rows = _rows(root / "A" / "history.jsonl")
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, N + 1))
    for r in rows:
        if "loss" in r:
            assert set(r) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"}
            assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["lr"] >= 0
    # An evaluation right before each save and none twice at the end (N falls on a save).
    assert [r["step"] for r in rows if "eval_loss" in r] == [K, N]
    # The run folder's file (appended step by step) and the output's are the same rows.
    assert _rows(root / "A.run" / "history.jsonl") == rows
    assert max(json.loads(ln)["step"] for ln in killed_rows) == N - 1 > K  # rows past the resume point
    assert a.history_path == root / "A" / "history.jsonl"
    assert a.plot_path == root / "A" / "loss.png" and a.plot_path.read_bytes()[:4] == b"\x89PNG"
    assert len(a.loss_sparkline) == N and set(a.loss_sparkline) <= set("▁▂▃▄▅▆▇█")
    assert a.eval_loss == pytest.approx(rows[-1]["eval_loss"]) and a.eval_samples == 4


def test_resumed_history_equals_the_uninterrupted_one(watched):
    root, _, _, a, c, _ = watched
    ha, hc = _rows(root / "A" / "history.jsonl"), _rows(root / "C" / "history.jsonl")
    key = [(r["step"], "eval_loss" in r) for r in ha]
    assert [(r["step"], "eval_loss" in r) for r in hc] == key  # no step twice, none missing
    assert _rows(root / "C.run" / "history.jsonl") == hc
    for ra, rc in zip(ha, hc):
        assert set(ra) == set(rc)
        for name in ("epoch", "loss", "lr", "grad_norm", "eval_loss", "eval_tokens"):
            if name in ra:
                assert rc[name] == pytest.approx(ra[name], rel=1e-4, abs=1e-6), (ra, rc)
    assert c.resumed_from == root / "C.run" / f"checkpoint-{K}"


def _straight_mean_token_loss(ckpt: Path, data: Path, images: Path, ids: list[str]) -> float:
    """Load ``ckpt`` with plain transformers; for each eval record, the model's own mean loss times
    its number of answer tokens, summed, over the total number of answer tokens."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavamed_core.records import load_conversations
    from llavamed_core.train.dataset import build_dataset

    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    convs = [c for c in load_conversations(data, require_image=True, strict=True) if c.id in set(ids)]
    assert len(convs) == len(ids)
    dataset, _ = build_dataset(convs, processor, images, 2048)
    total = count = 0.0
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            labels = item["labels"][None]
            out = model(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"][None],
                        attention_mask=torch.ones_like(item["input_ids"])[None], labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    return total / count


def test_eval_loss_is_the_saved_weights_mean_token_loss_on_held_out_records(watched):
    from llavamed_core.records import load_conversations
    from llavamed_core.train.run import split_eval

    root, data, images, a, _, _ = watched
    held = json.loads((root / "A" / "eval_records.json").read_text())
    records = load_conversations(data, require_image=True, strict=True)
    train_part, eval_part = split_eval(records, 0.25, 7)
    assert held["ids"] == [c.id for c in eval_part] and len(held["ids"]) == 4
    assert not {c.id for c in train_part} & set(held["ids"])  # the held-out records did not train
    assert a.samples == len(records) - 4
    rows = _rows(root / "A" / "history.jsonl")
    at_k = next(r["eval_loss"] for r in rows if "eval_loss" in r and r["step"] == K)
    assert at_k == pytest.approx(_straight_mean_token_loss(root / "A.run" / f"checkpoint-{K}", data, images,
                                                           held["ids"]), rel=1e-4)
    assert a.eval_loss == pytest.approx(_straight_mean_token_loss(root / "A", data, images, held["ids"]), rel=1e-4)
    assert at_k != pytest.approx(a.eval_loss, rel=1e-3)  # the weights moved between the two


def test_eval_loss_split_over_processes_pools_to_the_one_process_value(tiny_ckpt, synth_data):
    """Each process takes every world_size-th record, a short share padded with weight-0 repeats:
    the shares' sums pool to the one-process mean (5 records over 2 and 3 processes, batches of 2)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavamed_core.records import load_conversations
    from llavamed_core.train.dataset import PaddingCollator, build_dataset
    from llavamed_core.train.trainer import mean_token_loss

    model = LlavaForConditionalGeneration.from_pretrained(tiny_ckpt)
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    convs = load_conversations(synth_data / "instruct.json", require_image=True, strict=True)[:5]
    dataset, _ = build_dataset(convs, processor, synth_data / "images", 2048)
    collator = PaddingCollator(processor.tokenizer.pad_token_id, None)
    model.train()
    one, tokens = mean_token_loss(model, dataset, collator, 2, "cpu")
    assert math.isfinite(one) and tokens > 0 and model.training  # train mode given back
    for world in (2, 3):
        shares = [mean_token_loss(model, dataset, collator, 2, "cpu", rank, world) for rank in range(world)]
        assert sum(t for _, t in shares) == tokens
        assert sum(loss * t for loss, t in shares) / tokens == pytest.approx(one, rel=1e-6)
    assert torch.is_grad_enabled()


def test_eval_data_and_eval_split_together_is_a_usage_error(cli, tiny_ckpt, synth_data, tmp_path):
    r = cli("train", "instruct", "--model", tiny_ckpt, "--data", synth_data / "instruct.json",
            "--images", synth_data / "images", "--out", tmp_path / "out", "--eval-split", "0.1",
            "--eval-data", synth_data / "instruct.json")
    assert r.exit_code == 2, r
    assert _error_lines(r)[0] == "Error: --eval-data and --eval-split both given" and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def _error_lines(r) -> tuple[str, str]:
    """The ``Error:`` line of a CLI result's stderr (after any progress lines) and the line after it."""
    lines = r.stderr.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("Error:"))
    return lines[i], (lines[i + 1] if i + 1 < len(lines) else "")


# -- what trains -----------------------------------------------------------------------------------

FAST = ["--global-batch", "4", "--max-steps", "2"]


def test_freeze_switches_override_the_stage(cli, tiny_ckpt, synth_data, tmp_path, monkeypatch):
    common = ["--model", tiny_ckpt, "--data", synth_data / "instruct.json", "--images", synth_data / "images", *FAST]
    # instruct, but the vision tower trains and the language model is frozen; without matplotlib.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "vision"
    r = cli("train", "instruct", *common, "--out", out, "--train-vision", "--freeze-llm", "--keep-checkpoints")
    assert r.exit_code == 0, r
    assert changed_groups(weights(tiny_ckpt), weights(out)) == {
        "projector": True, "language_model": False, "vision_tower": True}
    warnings = [ln for ln in r.stderr.splitlines() if "matplotlib" in ln]
    assert len(warnings) == 1 and "llavamed[plot]" in warnings[0] and not (out / "loss.png").exists()
    parts = json.loads((tmp_path / "vision.run" / "mechanism.json").read_text())["trainable_params_by_part"]
    assert parts["vision_tower"] > 0 and parts["projector"] > 0 and parts["language_model"] == 0
    row = next(ln for ln in r.stdout.splitlines() if "trained by part" in ln)
    assert f"vision {parts['vision_tower']:,}, projector {parts['projector']:,}, LM 0" in row
    assert any(ch in r.stdout for ch in "▁▂▃▄▅▆▇█")  # the loss sparkline in the summary
    assert (out / "history.jsonl").is_file()

    # align, but the language model trains and the projector is frozen.
    out = tmp_path / "llm"
    r = cli("train", "align", *common, "--out", out, "--train-llm", "--freeze-projector", "--json")
    assert r.exit_code == 0, r
    res = json.loads(r.stdout)
    assert changed_groups(weights(tiny_ckpt), weights(out)) == {
        "projector": False, "language_model": True, "vision_tower": False}
    assert res["trainable_by_part"]["projector"] == 0 and res["trainable_by_part"]["vision_tower"] == 0
    assert res["trainable_by_part"]["language_model"] == res["trainable_params"]
    assert res["projector_path"] is None  # the language model trained: a whole checkpoint, no projector file


@pytest.mark.parametrize("args, message", [
    (["--freeze-projector"], "nothing trains"),
    (["--lora", "--freeze-llm"], "--lora/--qlora with --freeze-llm"),
    (["--dora"], "--dora without --lora"),
    (["--lora", "--lora-target", "nope_proj"], "'nope_proj' is not a linear layer of the language model"),
])
def test_bad_switches_fail_in_one_line(cli, tiny_ckpt, synth_data, tmp_path, args, message):
    stage = "align" if args == ["--freeze-projector"] else "instruct"
    r = cli("train", stage, "--model", tiny_ckpt, "--data", synth_data / "instruct.json",
            "--images", synth_data / "images", "--out", tmp_path / "out", "--max-steps", "1", *args)
    assert r.exit_code == 1, r
    err, hint = _error_lines(r)
    assert message in err and hint.startswith("Hint:") and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


# -- LoRA variants ---------------------------------------------------------------------------------

def test_lora_targets_resolve_against_the_model(tiny_ckpt):
    import re

    from transformers import LlavaForConditionalGeneration

    from llavamed_core.train.lora import LORA_TARGETS, lora_targets

    model = LlavaForConditionalGeneration.from_pretrained(tiny_ckpt)
    names = [n for n, _ in model.named_modules()]
    everything = [n for n in names if re.fullmatch(lora_targets(model, "all-linear"), n)]
    assert everything and all(".language_model." in n for n in everything)
    assert {n.rsplit(".", 1)[1] for n in everything} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"}
    qv = [n for n in names if re.fullmatch(lora_targets(model, "q_proj,v_proj"), n)]
    assert {n.rsplit(".", 1)[1] for n in qv} == {"q_proj", "v_proj"}
    assert lora_targets(model, None) == LORA_TARGETS


def test_dora_rslora_and_targets_reach_the_adapter(cli, tiny_ckpt, synth_data, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from test_checkpoint_compat import _check_v4_tokenizer_config

    out = tmp_path / "adapter"
    r = cli("train", "finetune", "--model", tiny_ckpt, "--data", synth_data / "train.json",
            "--images", synth_data / "images", "--out", out, "--lora", "--lora-r", "4", "--lora-alpha", "8",
            "--lora-target", "q_proj,v_proj", "--dora", "--rslora", "--no-merge", *FAST, "--lr", "1e-2")
    assert r.exit_code == 0, r
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["use_dora"] is True and conf["use_rslora"] is True
    assert "q_proj" in conf["target_modules"] and "v_proj" in conf["target_modules"]
    assert "k_proj" not in conf["target_modules"] and "up_proj" not in conf["target_modules"]
    saved = load_file(str(out / "adapter_model.safetensors"))
    magnitudes = {k: v for k, v in saved.items() if "lora_magnitude_vector" in k}
    assert magnitudes and all(("q_proj" in k or "v_proj" in k) for k in magnitudes)
    # DoRA's magnitudes trained: they moved away from their start (the base weights' row norms).
    fresh = get_peft_model(LlavaForConditionalGeneration.from_pretrained(tiny_ckpt),
                           LoraConfig(**{k: conf[k] for k in ("r", "lora_alpha", "target_modules", "use_dora",
                                                              "use_rslora")}))
    start = get_peft_model_state_dict(fresh)
    assert set(magnitudes) <= set(start)
    moved = [k for k, v in magnitudes.items() if not torch.equal(v, start[k].to(v.dtype))]
    assert len(moved) == len(magnitudes), f"{len(magnitudes) - len(moved)} DoRA magnitude vectors did not change"
    # The adapter folder's tokenizer files load in transformers 4.x too.
    _check_v4_tokenizer_config(json.loads((out / "tokenizer_config.json").read_text()), out)

    # Merged (the default): DoRA on every linear layer of the LM folds into a plain checkpoint.
    merged = tmp_path / "merged"
    r = cli("train", "finetune", "--model", tiny_ckpt, "--data", synth_data / "train.json",
            "--images", synth_data / "images", "--out", merged, "--lora", "--lora-r", "4", "--lora-alpha", "8",
            "--lora-target", "all-linear", "--dora", *FAST, "--lr", "1e-2", "--json")
    assert r.exit_code == 0, r
    before, after = weights(tiny_ckpt), weights(merged)
    assert set(after) == set(before)  # no adapter or magnitude keys left
    assert changed_groups(before, after) == {"projector": True, "language_model": True, "vision_tower": False}
    check_generates(merged, synth_data / "images" / "train_00002.png")


def test_adapter_folder_carries_the_side_files_of_a_full_checkpoint(cli, synth_data, tmp_path):
    """A v1-template model's adapter (--no-merge): the generation config with the template's stop
    strings and the base eos, and a tokenizer config transformers 4.x loads — as save_checkpoint
    writes them for the merged output (tests/test_checkpoint_compat.py)."""
    import dataclasses

    from llavamed_core.model import build_from_preset, get_preset, save_checkpoint
    from test_checkpoint_compat import _check_v4_tokenizer_config

    base = tmp_path / "v1"
    save_checkpoint(*build_from_preset(dataclasses.replace(get_preset("tiny"), template="v1"), seed=1), base)
    common = ["--model", base, "--data", synth_data / "train.json", "--images", synth_data / "images",
              "--lora", "--lora-r", "4", "--lora-alpha", "8", "--global-batch", "4", "--max-steps", "1"]
    r = cli("train", "finetune", *common, "--out", tmp_path / "adapter", "--no-merge")
    assert r.exit_code == 0, r
    adapter, full = tmp_path / "adapter", base
    assert json.loads((adapter / "generation_config.json").read_text()) == \
        json.loads((full / "generation_config.json").read_text())
    ours, theirs = (json.loads((d / "tokenizer_config.json").read_text()) for d in (adapter, full))
    for key in ("tokenizer_class", "extra_special_tokens", "model_input_names", "eos_token", "pad_token"):
        assert ours.get(key) == theirs.get(key), key
    gen = json.loads((adapter / "generation_config.json").read_text())
    assert gen["llavamed_stop_strings"] == ["###"] and set(gen["llavamed_stop_token_ids"]) < set(gen["eos_token_id"])
    _check_v4_tokenizer_config(json.loads((adapter / "tokenizer_config.json").read_text()), adapter)


# -- Hub ids ---------------------------------------------------------------------------------------

def test_train_from_a_hub_id_equals_the_local_path(hub, cli, tiny_ckpt, synth_data, tmp_path):  # noqa: F811
    common = ["--data", synth_data / "align.json", "--images", synth_data / "images", *FAST]
    by_path = cli("train", "align", "--model", tiny_ckpt, "--out", tmp_path / "a", *common)
    by_id = cli("train", "align", "--model", "org/tiny@main", "--out", tmp_path / "b", *common)
    assert by_path.exit_code == 0 and by_id.exit_code == 0, (by_path, by_id)
    assert (tmp_path / "a" / "mm_projector.safetensors").read_bytes() == \
        (tmp_path / "b" / "mm_projector.safetensors").read_bytes()
    assert changed_groups(weights(tiny_ckpt), weights(tmp_path / "b"))["projector"]  # it trained
    saved = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert Path(saved["model"]).is_dir() and (Path(saved["model"]) / "config.json").is_file()
    miss = cli("train", "align", "--model", "org/absent", "--out", tmp_path / "c", *common)
    assert miss.exit_code == 1 and "org/absent" in miss.stderr and "Traceback" not in miss.stderr
    assert not (tmp_path / "c").exists()
