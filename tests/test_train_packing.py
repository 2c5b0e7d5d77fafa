"""Packed training (``--packing``): several conversations per row, no padding, no attention across them.

The contract: a packed batch computes, token for token, what the same samples compute padded in
a batch of their own (per-token losses equal within float tolerance), for both attention kernels;
and a packed training run makes the same updates as the padded run on the same batches.
"""

from __future__ import annotations

import json
import shutil

import pytest

from train_helpers import weights


def _dataset(ckpt, data, n):
    from transformers import AutoProcessor

    from llavamed_core.train.dataset import build_dataset, load_training_conversations

    processor = AutoProcessor.from_pretrained(ckpt)
    convs = load_training_conversations(data / "instruct.json", data / "images")
    ds, _ = build_dataset(convs, processor, data / "images", 512)
    return [ds[i] for i in range(n)], processor


def _token_losses(model, batch):
    """Per-token cross-entropy at the labelled positions, row by row (next-token shift)."""
    import torch

    batch = dict(batch)
    batch.pop("num_real_tokens", None)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
    return ce, target != -100


@pytest.fixture(scope="module")
def mixed_data(synth_data, tmp_path_factory):
    """The synthetic instruct set, every other record cut to its first exchange, the others lengthened
    with their later exchanges repeated: lengths from ~35 to ~150 tokens, as in real data."""
    recs = json.loads((synth_data / "instruct.json").read_text())
    for i, r in enumerate(recs):
        conv = r["conversations"]
        r["conversations"] = conv[:2] if i % 2 == 0 else conv + conv[2:] * 3
    folder = tmp_path_factory.mktemp("mixed")
    (folder / "instruct.json").write_text(json.dumps(recs))
    shutil.copytree(synth_data / "images", folder / "images")
    return folder


@pytest.mark.parametrize("attn,rows_wanted", [("sdpa", None), ("eager", None), ("sdpa", 1)])
def test_packed_per_token_losses_equal_unpadded(tiny_ckpt, mixed_data, attn, rows_wanted):
    import torch
    from transformers import LlavaForConditionalGeneration

    from llavamed_core.train.dataset import PackingCollator, PaddingCollator

    feats, processor = _dataset(tiny_ckpt, mixed_data, 7)
    lengths = [len(f["input_ids"]) for f in feats]
    assert len(set(lengths)) > 1  # different lengths: a padded batch needs padding
    model = LlavaForConditionalGeneration.from_pretrained(tiny_ckpt, attn_implementation=attn).eval()

    # Rows as wide as the longest sample (the default), or all samples in one row.
    collate = PackingCollator(processor.tokenizer.pad_token_id, sum(lengths) if rows_wanted == 1 else None)
    rows = collate.layout(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(feats)))
    assert 1 < max(len(row) for row in rows) and len(rows) < len(feats)  # some row holds several samples
    assert len(rows) == (rows_wanted or len(rows))
    packed = collate(feats)
    assert "attention_mask" not in packed and int(packed["num_real_tokens"]) == sum(lengths)
    assert packed["input_ids"].shape[0] == len(rows) and packed["pixel_values"].shape[0] == len(feats)

    ce_p, m_p = _token_losses(model, packed)
    padded = PaddingCollator(processor.tokenizer.pad_token_id)(feats)
    ce_u, m_u = _token_losses(model, padded)
    assert int(m_p.sum()) == int(m_u.sum()) > 0
    compared = 0
    for r, row in enumerate(rows):
        k = 0
        for i in row:
            n = lengths[i]
            assert packed["position_ids"][r, k] == 0 and packed["labels"][r, k] == -100
            # Row r, tokens k..k+n-1 predict sample i's tokens 1..n-1, as row i of the padded batch.
            got = ce_p[r, k:k + n - 1][m_p[r, k:k + n - 1]]
            torch.testing.assert_close(got, ce_u[i, :n - 1][m_u[i, :n - 1]], rtol=1e-4, atol=1e-5)
            compared += got.numel()
            k += n
    assert compared == int(m_u.sum())

    # The same rows with one running position sequence let samples see each other: the losses move.
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    ce_l, _ = _token_losses(model, leaky)
    assert not torch.allclose(ce_l[m_p], ce_p[m_p], atol=1e-3)


def test_packed_training_matches_padded_and_learns(tiny_ckpt, mixed_data, tmp_path):
    from llavamed_core.train import TrainConfig, train

    common = dict(stage="instruct", model=tiny_ckpt, data=mixed_data / "instruct.json", images=mixed_data / "images",
                  global_batch=8, per_device_batch=8, max_steps=6, learning_rate=2e-3, save_steps=10**9,
                  device="cpu", seed=3, attn_implementation="sdpa")
    losses: dict[str, list[float]] = {"padded": [], "packed": []}

    def recorder(name):
        return lambda ev: losses[name].append(ev.info["loss"]) if ev.task == "train" and "loss" in ev.info \
            and not ev.finished else None

    # --packing draws batches at random by default (packing removes the padding that length grouping
    # would): the padded run with random batches sees the very same batches.
    padded = train(TrainConfig(out=tmp_path / "padded", group_by_length=False, **common), progress=recorder("padded"))
    packed = train(TrainConfig(out=tmp_path / "packed", packing=True, **common), progress=recorder("packed"))

    assert packed.steps == padded.steps == 6
    assert packed.padding_share < 0.5 * padded.padding_share
    # The same real tokens were counted in both runs: the token accounting stays honest.
    assert packed.tokens_per_s * packed.train_runtime_s == pytest.approx(
        padded.tokens_per_s * padded.train_runtime_s, rel=1e-6)
    # Same batches, same maths: the packed run makes the padded run's updates and losses.
    assert losses["packed"] == pytest.approx(losses["padded"], rel=1e-4, abs=1e-4)
    a, b, start = weights(tmp_path / "padded"), weights(tmp_path / "packed"), weights(tiny_ckpt)
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-4, key
    assert any((b[k] - start[k]).abs().max() > 1e-3 for k in b)  # it trained
    assert len(losses["packed"]) == 6 and losses["packed"][-1] < losses["packed"][0] - 0.3  # and learnt
    assert json.loads((tmp_path / "packed" / "train_config.json").read_text())["packing"] is True


def test_cli_packing_flag(cli, tiny_ckpt, synth_data, tmp_path):
    out = tmp_path / "out"
    r = cli("train", "instruct", "--model", tiny_ckpt, "--data", synth_data / "instruct.json",
            "--images", synth_data / "images", "--out", out, "--global-batch", "4", "--max-steps", "2",
            "--packing", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["steps"] == 2
    assert json.loads((out / "train_config.json").read_text())["packing"] is True
