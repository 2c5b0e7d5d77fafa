"""A successful run leaves its output and nothing else: no ``OUT.run/`` of resumable checkpoints
unless ``--keep-checkpoints`` (the empty failure files of ``instruct gen`` and ``data extract``:
tests/test_instruct_gen.py, tests/test_data_extract.py)."""

from __future__ import annotations

from safetensors.torch import load_file


def _train(cli, tiny_ckpt, synth_data, out, *extra):
    return cli("train", "instruct", "--model", tiny_ckpt, "--data", synth_data / "instruct.json",
               "--images", synth_data / "images", "--out", out, "--max-steps", "2", "--global-batch", "4",
               "--save-steps", "1", "--seed", "3", "--set", "device=cpu", *extra)


def test_run_folder_is_removed_after_success_unless_kept(cli, tiny_ckpt, synth_data, tmp_path):
    r = _train(cli, tiny_ckpt, synth_data, tmp_path / "a")
    assert r.exit_code == 0, r
    assert (tmp_path / "a" / "model.safetensors").exists()
    assert not (tmp_path / "a.run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]

    r = _train(cli, tiny_ckpt, synth_data, tmp_path / "b", "--keep-checkpoints")
    assert r.exit_code == 0, r
    kept = sorted(p.name for p in (tmp_path / "b.run").iterdir())
    assert "checkpoint-2" in kept and "train_config.json" in kept
    # Removing the run folder changes nothing in the output: the same weights either way.
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
