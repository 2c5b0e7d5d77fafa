"""Packed training (``--packing``): several conversations per row, no padding, no attention across them.

The contract: a packed batch computes, token for token, what the same samples compute padded in
a batch of their own (per-token losses and gradients equal within float tolerance), for every
attention kernel and layout (the packed SDPA of ``llavamed_core.train.packed_attention`` on one row
or several, transformers' sdpa and eager with their block-diagonal mask); the packed kernel
equals SDPA on each sample alone (grouped K/V included) and refuses what it does not compute; a
model carrying it computes what sdpa computes for anything that is not a full packed row (padded
batches, KV-cache continuations); a packed training run makes the same updates as the padded run
on the same batches, and falls back to narrow rows when the packed attention cannot be set; and the
packed attention never leaves the training run (the model is set back, the saved checkpoint loads
in stock transformers with sdpa).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

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


def _model(ckpt, attn):
    """The checkpoint with ``attn`` on its language model (the packed SDPA set as training sets it)."""
    from transformers import LlavaForConditionalGeneration

    from llavamed_core.train.packed_attention import PACKED_ATTENTION, use_language_attention

    model = LlavaForConditionalGeneration.from_pretrained(ckpt, attn_implementation="sdpa" if attn == PACKED_ATTENTION
                                                          else attn)
    if attn == PACKED_ATTENTION:
        use_language_attention(model, attn)
        assert model.config.vision_config._attn_implementation == "sdpa"  # the vision tower keeps its own
    return model.eval()


PACKED = "llavamed_packed_sdpa"  # llavamed_core.train.packed_attention.PACKED_ATTENTION


@pytest.mark.parametrize("attn,row_tokens", [(PACKED, None), (PACKED, 0), ("sdpa", 0), ("eager", 0), ("sdpa", None)])
def test_packed_per_token_losses_equal_unpadded(tiny_ckpt, mixed_data, attn, row_tokens):
    import torch

    from llavamed_core.train.dataset import PackingCollator, PaddingCollator

    feats, processor = _dataset(tiny_ckpt, mixed_data, 7)
    lengths = [len(f["input_ids"]) for f in feats]
    assert len(set(lengths)) > 1  # different lengths: a padded batch needs padding
    model = _model(tiny_ckpt, attn)

    # All samples in one row (the default), or rows as wide as the longest sample (first-fit decreasing).
    collate = PackingCollator(processor.tokenizer.pad_token_id, row_tokens)
    rows = collate.layout(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(feats)))
    assert 1 < max(len(row) for row in rows) and len(rows) < len(feats)  # some row holds several samples
    assert len(rows) == 1 if row_tokens is None else len(rows) > 1
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


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_packed_attention_gradients_equal_unpadded(tiny_ckpt, mixed_data, tmp_path, kv_heads):
    """One packed row through the packed SDPA: the same summed answer loss and the same gradient for
    every parameter (language model, projector, vision tower) as the samples padded through sdpa;
    also with grouped-query attention (one key/value head for four query heads, as Mistral groups)."""
    import torch

    from llavamed_core.model import build_from_preset, save_checkpoint
    from llavamed_core.train.dataset import PackingCollator, PaddingCollator

    if kv_heads is not None:
        model, processor = build_from_preset("tiny", seed=1, text_overrides={"num_key_value_heads": kv_heads})
        assert model.config.text_config.num_attention_heads > kv_heads
        save_checkpoint(model, processor, tmp_path / "gqa")
        tiny_ckpt = tmp_path / "gqa"
    feats, processor = _dataset(tiny_ckpt, mixed_data, 6)
    pad_id = processor.tokenizer.pad_token_id

    def loss_and_grads(model, batch):
        batch = dict(batch)
        batch.pop("num_real_tokens", None)
        labels = batch.pop("labels")
        model.zero_grad()
        logits = model(**batch).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="sum")
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_p, grads_p = loss_and_grads(_model(tiny_ckpt, PACKED), PackingCollator(pad_id)(feats))
    loss_u, grads_u = loss_and_grads(_model(tiny_ckpt, "sdpa"), PaddingCollator(pad_id)(feats))
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-4)
    assert grads_p.keys() == grads_u.keys()
    assert all(any(n.startswith(part) for n in grads_p)
               for part in ("model.language_model", "model.multi_modal_projector", "model.vision_tower", "lm_head"))
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=2e-6, msg=name)


def test_packed_attention_builds_no_mask_and_keeps_padded_batches(tiny_ckpt, mixed_data):
    """The packed attention's mask function builds no mask for a full packed row (sdpa builds a
    dense one); a padded batch (the eval loss, generation) gets transformers' own mask and kernel,
    logit for logit what an sdpa model computes (KV-cache continuations: see below)."""
    import torch
    from transformers.masking_utils import create_causal_mask

    from llavamed_core.train.dataset import PackingCollator, PaddingCollator

    feats, processor = _dataset(tiny_ckpt, mixed_data, 4)
    packed = PackingCollator(processor.tokenizer.pad_token_id)(feats)
    ours, stock = _model(tiny_ckpt, PACKED), _model(tiny_ckpt, "sdpa")
    embeds = torch.zeros(1, packed["input_ids"].shape[1], 8)
    args = dict(inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=packed["position_ids"])
    assert create_causal_mask(config=ours.config.text_config, **args) is None
    dense = create_causal_mask(config=stock.config.text_config, **args)
    assert dense is not None and tuple(dense.shape[-2:]) == (embeds.shape[1],) * 2

    padded = PaddingCollator(processor.tokenizer.pad_token_id)(feats)
    padded.pop("labels")
    assert not padded["attention_mask"].all()
    with torch.no_grad():
        torch.testing.assert_close(ours(**padded).logits, stock(**padded).logits, rtol=0, atol=0)


def test_segment_bounds_follow_transformers_rule():
    """Sample spans from the position ids are the ones transformers' own packed-sequence detection
    finds (several rows, a padding segment, a one-token sample), and flash-attention's cumulative
    lengths for a one-row batch give the same spans."""
    import torch
    from transformers.masking_utils import find_packed_sequence_indices

    from llavamed_core.train.packed_attention import _bounds_from_cu_seq_lens, segment_bounds

    lengths = [[5, 1, 7, 3], [9, 4, 3]]  # the second row ends with a padding segment of 3
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    bounds = segment_bounds(pos, 2, pos.shape[1])
    ids = find_packed_sequence_indices(pos)
    for r, spans in enumerate(bounds):
        assert [e - s for s, e in spans] == lengths[r]
        assert [int(ids[r, s]) for s, _ in spans] == list(range(len(spans)))
        assert all(bool((ids[r, s:e] == ids[r, s]).all()) for s, e in spans)
    assert segment_bounds(torch.arange(6)[None], 3, 6) == [[(0, 6)]] * 3  # unsqueezed, not packed
    cu = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)
    assert _bounds_from_cu_seq_lens(cu, 16) == bounds[:1]
    assert _bounds_from_cu_seq_lens(cu, 17) is None  # does not describe this row: position ids decide


def test_packing_plan_per_attention():
    from types import SimpleNamespace

    from llavamed_core.errors import ConfigError
    from llavamed_core.train.packed_attention import PACKED_ATTENTION
    from llavamed_core.train.packed_attention import packing_plan as plan

    def packing_plan(attn, text_config, max_length):
        p = plan(attn, text_config, max_length)
        return p.language_attention, p.row_tokens

    plain = SimpleNamespace(sliding_window=None)
    assert packing_plan("sdpa", plain, 2048) == (PACKED_ATTENTION, None)  # one row, ours
    assert packing_plan("flash_attention_2", plain, 2048) == (None, None)  # one row, flash varlen
    assert packing_plan("eager", plain, 2048) == (None, 0)  # dense mask: narrow rows
    # a sliding window shorter than a sample: per-sample SDPA would not apply it, stock sdpa does
    assert packing_plan("sdpa", SimpleNamespace(sliding_window=512), 2048) == (None, 0)
    assert packing_plan("sdpa", SimpleNamespace(sliding_window=4096), 2048) == (PACKED_ATTENTION, None)
    with pytest.raises(ConfigError, match="--packing with attention 'flex_attention'"):
        packing_plan("flex_attention", plain, 2048)
    # logit softcapping (Gemma 2): no SDPA applies it, the packed one included; eager and flash do
    capped = SimpleNamespace(sliding_window=None, attn_logit_softcapping=50.0)
    with pytest.raises(ConfigError, match="attn_logit_softcapping=50.0") as exc:
        packing_plan("sdpa", capped, 2048)
    assert "attn_implementation=eager" in exc.value.hint
    assert packing_plan("eager", capped, 2048) == (None, 0)
    assert packing_plan("flash_attention_2", capped, 2048) == (None, None)


def test_packing_refuses_unknown_attention_before_loading(tiny_ckpt, synth_data, tmp_path):
    from llavamed_core.errors import ConfigError
    from llavamed_core.train import TrainConfig, train

    cfg = TrainConfig(stage="instruct", model=tiny_ckpt, data=synth_data / "instruct.json", out=tmp_path / "out",
                      images=synth_data / "images", max_steps=1, device="cpu", packing=True,
                      attn_implementation="flex_attention")
    with pytest.raises(ConfigError) as exc:
        train(cfg)
    assert "sdpa" in exc.value.hint
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()


def test_packed_training_matches_padded_and_learns(tiny_ckpt, mixed_data, tmp_path, monkeypatch):
    from llavamed_core.train import TrainConfig, packed_attention, train
    from llavamed_core.train import run as train_run

    trained = []  # the model the run set the packed attention on, to check that the run sets it back
    apply = packed_attention.apply_packing_plan
    monkeypatch.setattr(train_run, "apply_packing_plan", lambda model, plan: trained.append(model) or
                        apply(model, plan))

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
    # It ran the packed SDPA on one row per batch: no padding at all.
    assert packed.mechanism["language_attention"] == PACKED and padded.mechanism["language_attention"] == "sdpa"
    assert packed.mechanism["packing"] == "one row per batch, SDPA per sample" and packed.padding_share == 0
    # The attention never leaves the run: the model object is set back to sdpa at the end, no file of
    # the output names it, and stock transformers (a fresh process that never imported llavamed)
    # loads the checkpoint with sdpa.
    assert len(trained) == 1 and packed_attention.language_attention(trained[0]) == "sdpa"
    assert trained[0].config.text_config._attn_implementation == "sdpa"
    for f in (tmp_path / "packed").rglob("*.json"):
        assert PACKED not in f.read_text(), f
    code = ("import sys; from transformers import LlavaForConditionalGeneration as L; "
            "m = L.from_pretrained(sys.argv[1]); assert 'llavamed' not in sys.modules; "
            "print(m.config.text_config._attn_implementation, m.config.vision_config._attn_implementation)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "packed")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["sdpa", "sdpa"]


def test_cli_packing_flag(cli, tiny_ckpt, synth_data, tmp_path):
    out = tmp_path / "out"
    r = cli("train", "instruct", "--model", tiny_ckpt, "--data", synth_data / "instruct.json",
            "--images", synth_data / "images", "--out", out, "--global-batch", "4", "--max-steps", "2",
            "--packing", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["steps"] == 2
    assert json.loads((out / "train_config.json").read_text())["packing"] is True


def _qkv(heads=4, kv_heads=2, length=24, batch=2, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, length, 8, generator=g, requires_grad=True) for h in (heads, kv_heads, kv_heads)]


def test_packed_kernel_equals_per_sample_sdpa_splits_and_keeps_grouped_kv():
    """The kernel on two rows of packed samples (grouped K/V: two query heads per K/V head) computes
    what each sample alone computes through SDPA with its K/V heads repeated, outputs and gradients;
    its backward graph holds no per-sample slice (each would write a zero gradient as large as the
    whole input), and autograd keeps K/V at their grouped size, not repeated to the query heads."""
    from types import SimpleNamespace

    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    from llavamed_core.train.packed_attention import packed_sdpa_attention_forward

    lengths = [[5, 1, 11, 7], [24]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    module = SimpleNamespace(training=False, is_causal=True, num_key_value_groups=2)
    q, k, v = _qkv()
    out, _ = packed_sdpa_attention_forward(module, q, k, v, None, scaling=0.3, position_ids=pos)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * w).sum().backward()

    # The straight path: every sample on its own leaf tensors, K/V heads repeated, plain causal SDPA.
    refs, grads = [], {n: [] for n in "qkv"}
    for r, row in enumerate(lengths):
        s, outs = 0, []
        for n in row:
            qs, ks, vs = (t[r:r + 1, :, s:s + n].detach().clone().requires_grad_() for t in (q, k, v))
            o = torch.nn.functional.scaled_dot_product_attention(qs, repeat_kv(ks, 2), repeat_kv(vs, 2),
                                                                 scale=0.3, is_causal=True).transpose(1, 2)
            (o * w[r:r + 1, s:s + n]).sum().backward()
            outs.append(o)
            for name, t in zip("qkv", (qs, ks, vs)):
                grads[name].append((r, s, n, t.grad))
            s += n
        refs.append(torch.cat(outs, dim=1))
    torch.testing.assert_close(out, torch.cat(refs, dim=0))
    for name, leaf in zip("qkv", (q, k, v)):
        for r, s, n, g in grads[name]:
            torch.testing.assert_close(leaf.grad[r:r + 1, :, s:s + n], g, msg=f"d{name} row {r} at {s}")

    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(f for f, _ in node.next_functions)
    assert not [n.name() for n in seen if "Slice" in n.name()]
    assert any("Split" in n.name() for n in seen)

    def saved_elements(q, k, v, groups):
        total = [0]

        def pack(t):
            total[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            packed_sdpa_attention_forward(SimpleNamespace(training=False, is_causal=True, num_key_value_groups=groups),
                                          q, k, v, None, position_ids=pos)
        return total[0]

    grouped = saved_elements(q, k, v, 2)
    repeated = saved_elements(q, repeat_kv(k, 2), repeat_kv(v, 2), 1)
    assert grouped <= repeated - (k.numel() + v.numel())  # K/V kept once, not once per query head


@pytest.mark.parametrize("kwarg", ["softcap", "s_aux", "position_bias", "sliding_window"])
def test_packed_kernel_refuses_what_it_does_not_compute(kwarg):
    """Logit softcapping, attention sinks, a position bias, a window shorter than a sample: the
    packed kernel refuses them with a hint rather than computing without them."""
    from types import SimpleNamespace

    import torch

    from llavamed_core.errors import ConfigError
    from llavamed_core.train.packed_attention import packed_sdpa_attention_forward

    q, k, v = _qkv(batch=1)
    value = {"softcap": 30.0, "s_aux": torch.zeros(4), "position_bias": torch.zeros(1, 4, 24, 24),
             "sliding_window": 8}[kwarg]
    module = SimpleNamespace(training=False, is_causal=True, num_key_value_groups=2)
    with pytest.raises(ConfigError) as exc:
        packed_sdpa_attention_forward(module, q, k, v, None, position_ids=torch.arange(24)[None], **{kwarg: value})
    assert "attn_implementation=eager" in exc.value.hint
    if kwarg == "sliding_window":  # a window no shorter than every sample changes nothing: it runs
        pos = torch.cat([torch.arange(8), torch.arange(16)])[None]
        with pytest.raises(ConfigError):
            packed_sdpa_attention_forward(module, q, k, v, None, position_ids=pos, sliding_window=8)
        out, _ = packed_sdpa_attention_forward(module, q, k, v, None, position_ids=pos, sliding_window=16)
        assert out.shape == (1, 24, 4, 8)


def test_packed_attention_cache_continuation_equals_sdpa(tiny_ckpt):
    """A KV-cache continuation (several new tokens after a cached prefix, with or without an
    all-ones attention mask) is not a packed row: the packed model builds transformers' mask and
    computes what an sdpa model computes."""
    import torch
    from transformers import DynamicCache

    ours, stock = _model(tiny_ckpt, PACKED), _model(tiny_ckpt, "sdpa")
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    for with_mask in (True, False):
        logits = []
        for model in (ours, stock):
            cache = DynamicCache(config=model.config.text_config)
            with torch.no_grad():
                model(input_ids=ids[:, :10], attention_mask=torch.ones(1, 10, dtype=torch.long) if with_mask else None,
                      cache=cache, use_cache=True)
                mask = torch.ones(1, 16, dtype=torch.long) if with_mask else None
                logits.append(model(input_ids=ids[:, 10:], attention_mask=mask, cache=cache,
                                    use_cache=True).logits)
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_packed_spans_read_once_per_forward(tiny_ckpt, mixed_data, monkeypatch):
    """The samples' spans (a device sync) are read from the position ids once per forward, not in
    every decoder layer nor again in gradient checkpointing's recompute; position ids changed in
    place are read afresh, and the result equals a forward on a fresh copy."""
    import torch

    from llavamed_core.train import packed_attention
    from llavamed_core.train.dataset import PackingCollator

    reads, calls = [], []
    read, call = packed_attention.segment_bounds, packed_attention.sample_bounds
    monkeypatch.setattr(packed_attention, "segment_bounds", lambda *a: reads.append(1) or read(*a))
    monkeypatch.setattr(packed_attention, "sample_bounds", lambda *a: calls.append(1) or call(*a))
    feats, processor = _dataset(tiny_ckpt, mixed_data, 3)
    batch = PackingCollator(processor.tokenizer.pad_token_id)(feats)
    batch.pop("num_real_tokens")
    labels = batch.pop("labels")
    model = _model(tiny_ckpt, PACKED)
    model.activation_checkpointing_enable()
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    layers = model.config.text_config.num_hidden_layers
    assert len(calls) == 2 * layers  # each layer's attention ran twice (forward, recompute) ...
    assert len(reads) == 1  # ... on spans read once

    model.eval()
    pos = batch["position_ids"]
    cut, n = int(torch.nonzero(pos[0] == 0)[1]), len(feats[1]["input_ids"])
    with torch.no_grad():
        before = model(**batch).logits  # the same position ids: no new read
        pos[0, cut:cut + n] += cut  # the first two samples become one, in place: the same tensor object
        got = model(**batch).logits
        want = model(**dict(batch, position_ids=pos.clone())).logits
    assert len(reads) == 3
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, before, atol=1e-3)


def test_packing_falls_back_to_narrow_rows_when_attention_does_not_switch(tiny_ckpt, mixed_data, tmp_path,
                                                                          monkeypatch):
    """transformers only logs when a model cannot switch its attention: the run checks that the
    packed attention took, and if it did not, packs rows of the longest sample for sdpa's dense
    block-diagonal mask (not the whole batch into one row under it), as its mechanism report says."""
    from transformers import LlavaForConditionalGeneration

    from llavamed_core.train import TrainConfig, train

    monkeypatch.setattr(LlavaForConditionalGeneration, "set_attn_implementation", lambda self, *a, **kw: None)
    res = train(TrainConfig(stage="instruct", model=tiny_ckpt, data=mixed_data / "instruct.json",
                            images=mixed_data / "images", out=tmp_path / "out", global_batch=6, max_steps=1,
                            device="cpu", packing=True, attn_implementation="sdpa"))
    assert res.steps == 1 and res.mechanism["language_attention"] == "sdpa"
    assert res.mechanism["packing"] == ("rows of the longest sample, sdpa with a block-diagonal mask "
                                        f"({PACKED} could not be set on this model)")
    assert res.padding_share > 0  # several rows, padded to the widest: not the single unpadded row
