"""``llavamed weights apply-delta`` / ``make-delta``: original semantics, bit-exact round trips,
shards, ``.bin`` inputs, validation before writing, kill safety, progress, and ``--to-hf``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from original_llava_ref import LLAMA_VOCAB, write_clip_dir, write_original_v1

BASE_ROWS, EXTRA, H = 10, 4, 8


def save_dir(path: Path, state: dict, fmt: str = "safetensors", groups: list[list[str]] | None = None,
             legacy: bool = False) -> Path:
    """Write ``state`` as a checkpoint directory (sharded with an index when ``groups`` is given)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 0}))
    (path / "tokenizer_config.json").write_text("{}")
    groups = groups or [list(state)]
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i, names in enumerate(groups, 1):
        fname = f"{stem}.{ext}" if len(groups) == 1 else f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}"
        part = {k: state[k].contiguous() for k in names}
        if fmt == "safetensors":
            save_file(part, str(path / fname))
        else:
            torch.save(part, path / fname, _use_new_zipfile_serialization=not legacy)
        weight_map.update({k: fname for k in names})
    if len(groups) > 1:
        index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def load_dir(path: Path) -> dict:
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])) for k in a)


def models(dtype: torch.dtype, seed: int = 0) -> tuple[dict, dict]:
    """A LLaMA-like base and a LLaVA-like fine-tuned target (extra rows, projector, no rotary)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    base = {"model.embed_tokens.weight": rnd(BASE_ROWS, H), "model.layers.0.self_attn.q_proj.weight": rnd(H, H),
            "model.layers.0.mlp.up_proj.weight": rnd(2 * H, H), "model.norm.weight": 1 + rnd(H),
            "lm_head.weight": rnd(BASE_ROWS, H)}
    target = {k: v + rnd(*v.shape, scale=0.002) for k, v in base.items()}
    target["model.embed_tokens.weight"] = torch.cat([target["model.embed_tokens.weight"], rnd(EXTRA, H)])
    target["lm_head.weight"] = torch.cat([target["lm_head.weight"], rnd(EXTRA, H)])
    target["model.mm_projector.weight"] = rnd(H, 6)
    target["model.mm_projector.bias"] = rnd(H)
    base = {k: v.to(dtype) for k, v in base.items()}
    base["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(4, dtype=torch.float32)
    return base, {k: v.to(dtype) for k, v in target.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(cli, tmp_path, dtype):
    base, target = models(dtype)
    save_dir(tmp_path / "base", base)
    save_dir(tmp_path / "target", target)
    res = cli("weights", "make-delta", "--base", tmp_path / "base", "--target", tmp_path / "target",
              "--out", tmp_path / "delta", "--json")
    assert res.exit_code == 0, res
    made = json.loads(res.stdout)
    assert made["extra_rows"] == {"model.embed_tokens.weight": EXTRA, "lm_head.weight": EXTRA}
    assert sorted(made["taken_as_stored"]) == ["model.mm_projector.bias", "model.mm_projector.weight"]
    assert made["dropped"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    delta = load_dir(tmp_path / "delta")
    assert (tmp_path / "delta" / "config.json").exists() and (tmp_path / "delta" / "tokenizer_config.json").exists()
    # Extra rows and the projector are stored as they are in the target.
    assert torch.equal(bits(delta["lm_head.weight"][BASE_ROWS:]), bits(target["lm_head.weight"][BASE_ROWS:]))
    assert torch.equal(bits(delta["model.mm_projector.weight"]), bits(target["model.mm_projector.weight"]))

    res = cli("weights", "apply-delta", "--base", tmp_path / "base", "--delta", tmp_path / "delta",
              "--out", tmp_path / "applied", "--json")
    assert res.exit_code == 0, res
    applied = load_dir(tmp_path / "applied")
    # apply-delta computes exactly what the original did: delta += base in place, in the stored dtype.
    original = {k: v.clone() for k, v in delta.items()}
    for k, v in original.items():
        if k in base:
            v[: base[k].shape[0]] += base[k]
    assert same_bits(applied, original)
    # apply(make(T)) == T wherever the dtype can represent it; make-delta counts the rest.
    differing = sum(int((bits(applied[k]) != bits(target[k])).sum()) for k in target)
    assert differing == made["inexact_elements"]
    if dtype == torch.float32:
        assert differing == 0 and same_bits(applied, target)

    res = cli("weights", "make-delta", "--base", tmp_path / "base", "--target", tmp_path / "applied",
              "--out", tmp_path / "delta2", "--json")
    assert res.exit_code == 0, res
    assert json.loads(res.stdout)["inexact_elements"] == 0
    # make(apply(D)) == D bit for bit.
    assert same_bits(load_dir(tmp_path / "delta2"), delta)


def test_exact_difference_never_gets_stuck():
    """Large fp16 tensors: every reachable target is reached, and make∘apply∘make == make."""
    from llavamed_core.model.delta import _exact_difference

    g = torch.Generator().manual_seed(1)
    a = (torch.randn(200_000, generator=g) * 0.02).half()
    t = (a.float() + torch.randn(200_000, generator=g) * 0.002).half()
    d, n = _exact_difference(a, t, torch.float16)
    reached = (a.float() + d.float()).half()
    assert int((bits(reached) != bits(t)).sum()) == n
    d2, n2 = _exact_difference(a, reached, torch.float16)
    assert n2 == 0 and torch.equal(bits(d2), bits(d))


def test_shards_and_chunks_split_tensors(tmp_path):
    """Inputs sharded differently from each other, tiny read chunks that split tensors (also at the
    embedding's base/extra-row boundary) and an output sharded at a small size."""
    from llavamed_core.model.delta import ApplyDeltaConfig, apply_delta

    base, target = models(torch.float32, seed=3)
    delta = {k: (v - base[k] if k in base and v.shape == base[k].shape else v) for k, v in target.items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        delta[k] = target[k].clone()
        delta[k][:BASE_ROWS] -= base[k]
    names_b, names_d = list(base), list(delta)
    save_dir(tmp_path / "base", base, groups=[names_b[:1], names_b[1:3], names_b[3:]])
    save_dir(tmp_path / "delta", delta, groups=[names_d[:4], names_d[4:]])
    res = apply_delta(ApplyDeltaConfig(base=tmp_path / "base", delta=tmp_path / "delta", out=tmp_path / "out",
                                       max_shard_bytes=600, chunk_bytes=36))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert res.shards == len(files) > 3 and set(index["weight_map"].values()) == set(files)
    # A tensor larger than the shard limit sits alone in its shard.
    big = index["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    assert [k for k, f in index["weight_map"].items() if f == big] == ["model.layers.0.mlp.up_proj.weight"]
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in delta.values())
    out = load_dir(tmp_path / "out")
    expected = {k: v.clone() for k, v in delta.items()}
    for k, v in expected.items():
        if k in base:
            v[: base[k].shape[0]] += base[k]
    assert same_bits(out, expected)


def test_bin_only_checkpoints_give_the_same_output(cli, tmp_path):
    base, target = models(torch.float16, seed=4)
    save_dir(tmp_path / "base_st", base)
    save_dir(tmp_path / "target_st", target)
    assert cli("weights", "make-delta", "--base", tmp_path / "base_st", "--target", tmp_path / "target_st",
               "--out", tmp_path / "delta_st").exit_code == 0
    delta = load_dir(tmp_path / "delta_st")
    names = list(base)
    save_dir(tmp_path / "base_bin", base, fmt="bin", groups=[names[:2], names[2:]])  # index + shards
    save_dir(tmp_path / "delta_bin", delta, fmt="bin")  # one pytorch_model.bin
    save_dir(tmp_path / "delta_legacy", delta, fmt="bin", legacy=True)  # pre-zip torch.save format
    assert cli("weights", "apply-delta", "--base", tmp_path / "base_st", "--delta", tmp_path / "delta_st",
               "--out", tmp_path / "out_st").exit_code == 0
    res = cli("weights", "apply-delta", "--base", tmp_path / "base_bin", "--delta", tmp_path / "delta_bin",
              "--out", tmp_path / "out_bin")
    assert res.exit_code == 0, res
    assert "weights apply-delta" in res.stdout and "lm_head.weight +4" in res.stdout
    res = cli("weights", "apply-delta", "--base", tmp_path / "base_bin", "--delta", tmp_path / "delta_legacy",
              "--out", tmp_path / "out_legacy", "--json")
    assert res.exit_code == 0, res
    assert any("legacy" in n for n in json.loads(res.stdout)["notes"])
    reference = load_dir(tmp_path / "out_st")
    assert same_bits(load_dir(tmp_path / "out_bin"), reference)
    assert same_bits(load_dir(tmp_path / "out_legacy"), reference)


def _bad_delta(kind: str, base: dict, target: dict) -> tuple[dict, str]:
    delta = dict(target)
    if kind == "missing":
        del delta["model.norm.weight"]
        return delta, "model.norm.weight is in the base but missing from the delta"
    if kind == "extra":
        delta["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
        return delta, "model.layers.9.mlp.up_proj.weight is in the delta but not in the base"
    if kind == "shape":
        delta["model.layers.0.mlp.up_proj.weight"] = torch.zeros(2 * H + 1, H)
        return delta, f"model.layers.0.mlp.up_proj.weight: delta shape [{2 * H + 1}, {H}]"
    if kind == "fewer_rows":
        delta["lm_head.weight"] = delta["lm_head.weight"][: BASE_ROWS - 1]
        return delta, f"lm_head.weight: delta shape [{BASE_ROWS - 1}, {H}]"
    delta["model.norm.weight"] = delta["model.norm.weight"].half()
    return delta, "model.norm.weight: delta dtype torch.float16 but base dtype torch.float32"


@pytest.mark.parametrize("kind", ["missing", "extra", "shape", "fewer_rows", "dtype"])
def test_bad_inputs_fail_before_writing(cli, tmp_path, kind):
    base, target = models(torch.float32, seed=5)
    delta, message = _bad_delta(kind, base, target)
    save_dir(tmp_path / "base", base)
    save_dir(tmp_path / "delta", delta)
    res = cli("weights", "apply-delta", "--base", tmp_path / "base", "--delta", tmp_path / "delta",
              "--out", tmp_path / "out")
    assert res.exit_code == 1
    assert "Error:" in res.stderr and message in res.stderr and "Hint:" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    if kind == "dtype":
        assert "--dtype float16" in res.stderr
        res = cli("weights", "apply-delta", "--base", tmp_path / "base", "--delta", tmp_path / "delta",
                  "--out", tmp_path / "out", "--dtype", "float16")
        assert res.exit_code == 0, res
        assert all(v.dtype == torch.float16 for v in load_dir(tmp_path / "out").values())


def test_killed_apply_delta_leaves_no_complete_looking_output(tmp_path, cli_subprocess):
    g = torch.Generator().manual_seed(6)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(1024, 1024, generator=g) for i in range(40)}
    delta = {k: torch.randn(1024, 1024, generator=g) for k in base}
    save_dir(tmp_path / "base", base)
    save_dir(tmp_path / "delta", delta)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llavamed_cli.main", "weights", "apply-delta", "--base", str(tmp_path / "base"),
           "--delta", str(tmp_path / "delta"), "--out", str(out), "--max-shard-size", "8MB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.glob(".out.*.partial") if any(p.glob("*.safetensors"))]
        if partial:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed, "apply-delta finished before it could be killed"
    assert not out.exists()  # only the hidden .out.*.partial directory is left
    res = cli_subprocess("weights", "apply-delta", "--base", tmp_path / "base", "--delta", tmp_path / "delta",
                         "--out", out, "--max-shard-size", "8MB")
    assert res.returncode == 0, res.stderr
    assert "[apply-delta]" in res.stderr and "tensor=40" in res.stderr  # plain progress lines off a TTY
    result = load_dir(out)
    assert torch.equal(result["model.layers.7.mlp.up_proj.weight"],
                       delta["model.layers.7.mlp.up_proj.weight"] + base["model.layers.7.mlp.up_proj.weight"])


def test_progress_by_tensor_and_bytes(tmp_path):
    from llavamed_core.model.delta import ApplyDeltaConfig, apply_delta

    base, target = models(torch.float32, seed=7)
    save_dir(tmp_path / "base", base)
    save_dir(tmp_path / "delta", target)
    events = []
    res = apply_delta(ApplyDeltaConfig(base=tmp_path / "base", delta=tmp_path / "delta", out=tmp_path / "out"),
                      progress=events.append)
    assert events[-1].finished and events[-1].unit == "B"
    assert events[-1].done == events[-1].total == res.bytes
    assert [e.info["tensor"] for e in events[:-1]] == list(range(len(target) + 1))
    assert all(a.done <= b.done for a, b in zip(events, events[1:]))


@pytest.fixture(scope="module")
def v1_release(tmp_path_factory):
    """A tiny LLaVA-Med v1 model, the 'LLaMA' base it was tuned from, its delta and a CLIP tower."""
    root = tmp_path_factory.mktemp("v1release")
    target = write_original_v1(root / "llava-med-7b", fmt="bin")
    clip = write_clip_dir(root / "clip")
    state = {}
    for f in target.glob("*.bin"):
        state.update(torch.load(f, weights_only=True))
    rows = LLAMA_VOCAB
    g = torch.Generator().manual_seed(11)
    llama = {}
    for k, v in state.items():
        if "mm_projector" in k:
            continue
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            v = v[:rows]
        llama[k] = v if "rotary" in k else v - torch.randn(v.shape, generator=g) * 0.002
    save_dir(root / "llama-7b", llama, fmt="bin", groups=[list(llama)[:9], list(llama)[9:]])
    return root, target, clip


def test_apply_delta_to_hf_equals_convert(cli, v1_release):
    root, target, clip = v1_release
    res = cli("weights", "make-delta", "--base", root / "llama-7b", "--target", target, "--out", root / "delta")
    assert res.exit_code == 0, res
    res = cli("weights", "apply-delta", "--base", root / "llama-7b", "--delta", root / "delta",
              "--out", root / "applied")
    assert res.exit_code == 0, res
    assert {"config.json", "tokenizer.model", "added_tokens.json"} <= {p.name for p in (root / "applied").iterdir()}
    assert cli("weights", "convert", root / "applied", "--out", root / "converted", "--vision", clip).exit_code == 0
    res = cli("weights", "apply-delta", "--base", root / "llama-7b", "--delta", root / "delta",
              "--out", root / "hf", "--to-hf", "--vision", clip)
    assert res.exit_code == 0, res
    assert "converted: llava-med-v1" in res.stdout and "<im_patch>" in res.stdout
    assert same_bits(load_dir(root / "hf"), load_dir(root / "converted"))
    assert json.loads((root / "hf" / "config.json").read_text()) == \
        json.loads((root / "converted" / "config.json").read_text())
    with safe_open(str(root / "hf" / "model.safetensors"), "pt") as fh:
        assert "language_model.model.embed_tokens.weight" in fh.keys()


def test_vision_without_to_hf_is_refused(cli, v1_release):
    root, _, clip = v1_release
    res = cli("weights", "apply-delta", "--base", root / "llama-7b", "--delta", root / "llama-7b",
              "--out", root / "never", "--vision", clip)
    assert res.exit_code == 1 and "--vision is only used with --to-hf" in res.stderr
    assert not (root / "never").exists()
