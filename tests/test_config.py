"""Settings (``llavamed_core.config``, ``llavamed config``) and the short everyday commands.

Precedence is tested one level at a time (flag > environment > llavamed.toml > user file >
default), with the source ``config show`` reports; ``config set`` keeps the rest of the file; bad
files fail with one line naming file and line. Then the three everyday lines run as typed in a
project folder, and each is compared with the same command given every path explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llavamed_core.config import KEYS, Settings, set_value
from llavamed_core.io import read_jsonl


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (with a subfolder we work in) and an empty user config home."""
    root = tmp_path / "proj"
    (root / "sub").mkdir(parents=True)
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.chdir(root / "sub")
    return root


def _show(cli) -> dict:
    r = cli("config", "show", "--json")
    assert r.exit_code == 0, r
    return json.loads(r.stdout)["settings"]


# --- precedence, one level at a time ---------------------------------------------------------


def test_each_level_overrides_the_next(cli, project, tmp_path, monkeypatch):
    user = tmp_path / "xdg" / "llavamed" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text('# mine\nmodel = "/u/model"\nruns_dir = "/u/runs"\n')
    (project / "llavamed.toml").write_text('data_dir = "d"\n\nmodel = "ckpt/p"\n')
    monkeypatch.setenv("LLAVAMED_MODEL", "envmodel")

    # environment > project file > user file > default, each with its source
    s = _show(cli)
    assert s["model"] == {"value": str(project / "sub" / "envmodel"), "source": "env LLAVAMED_MODEL",
                          "env": "LLAVAMED_MODEL"}
    assert s["data_dir"]["value"] == str(project / "d") and s["data_dir"]["source"] == f"{project / 'llavamed.toml'}:1"
    assert s["runs_dir"] == {"value": "/u/runs", "source": f"{user}:3", "env": "LLAVAMED_RUNS_DIR"}
    assert s["train.align.model"] == {"value": None, "source": "not set", "env": "LLAVAMED_TRAIN_ALIGN_MODEL"}

    # a flag beats them all
    st = Settings()
    assert st.resolve("model", Path("flag"), "--model").value == Path("flag")
    assert st.resolve("model", Path("flag"), "--model").source == "--model"
    assert st.resolve("model", None, "--model").source == "env LLAVAMED_MODEL"

    monkeypatch.delenv("LLAVAMED_MODEL")
    s = _show(cli)
    assert s["model"]["value"] == str(project / "ckpt" / "p")  # relative to the file's folder
    assert s["model"]["source"] == f"{project / 'llavamed.toml'}:3"

    (project / "llavamed.toml").unlink()
    s = _show(cli)
    assert s["model"] == {"value": "/u/model", "source": f"{user}:2", "env": "LLAVAMED_MODEL"}
    # without a project file the built-in folders are relative to the current folder
    assert s["data_dir"] == {"value": str(project / "sub" / "data"), "source": "default", "env": "LLAVAMED_DATA_DIR"}

    user.unlink()
    s = _show(cli)
    assert s["model"]["source"] == "not set" and s["runs_dir"]["value"] == str(project / "sub" / "runs")


def test_builtin_folders_are_relative_to_the_project_and_show_prints_sources(cli, project):
    (project / "llavamed.toml").write_text('[train.instruct]\ndata = "inst.json"\n')
    r = cli("config", "show")
    assert r.exit_code == 0, r
    row = next(line for line in r.stdout.splitlines() if "train.instruct.data" in line)
    assert str(project / "inst.json") in row and "llavamed.toml:2" in row
    row = next(line for line in r.stdout.splitlines() if "data_dir" in line)
    assert str(project / "data") in row and "default" in row
    assert f"project file: {project / 'llavamed.toml'}" in r.stderr


def test_user_file_location():
    from llavamed_core.config import user_config_path

    assert user_config_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/llavamed/config.toml")
    for env in ({}, {"XDG_CONFIG_HOME": ""}):
        assert user_config_path(env) == Path.home() / ".config" / "llavamed" / "config.toml"


def test_environment_names_come_from_the_key_table():
    assert KEYS["model"].env == "LLAVAMED_MODEL" and KEYS["data_dir"].env == "LLAVAMED_DATA_DIR"
    assert KEYS["runs_dir"].env == "LLAVAMED_RUNS_DIR"
    assert KEYS["train.finetune.images"].env == "LLAVAMED_TRAIN_FINETUNE_IMAGES"


# --- the training chain ------------------------------------------------------------------------


def _fake_run(path: Path, finished: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if finished:
        (path / "train_config.json").write_text("{}")
    return path


def test_stage_model_chains_from_the_previous_stage(project):
    (project / "llavamed.toml").write_text('runs_dir = "r"\n')
    s = Settings()
    assert not s.get("train.instruct.model").is_set
    old = _fake_run(project / "r" / "train" / "align-20250101-000000")
    _fake_run(project / "r" / "train" / "align-20250102-000000", finished=False)  # newer but killed
    v = Settings().get("train.instruct.model")
    assert v.value == old and v.source == f"newest finished align run in {project / 'r' / 'train'}"
    new = _fake_run(project / "r" / "train" / "align-20250103-000000")
    assert Settings().get("train.instruct.model").value == new
    assert not Settings().get("train.finetune.model").is_set  # no instruct run yet
    # a configured align output wins over the runs folder; an own setting wins over both
    set_value(project / "llavamed.toml", "train.align.out", "ckpt/align")
    v = Settings().get("train.instruct.model")
    assert v.value == project / "ckpt" / "align" and v.source.startswith("train.align.out (")
    set_value(project / "llavamed.toml", "train.instruct.model", "mine")
    assert Settings().get("train.instruct.model").value == project / "mine"


# --- config set -----------------------------------------------------------------------------


def test_config_set_keeps_the_rest_of_the_file(cli, project):
    toml = project / "llavamed.toml"
    toml.write_text('# my project\nmodel = "old"  # the checkpoint\n\n[train.align]\n# the captions\ndata = "a.json"\n')
    r = cli("config", "set", "model", "../ckpt/new")  # from sub/: stored relative to the file
    assert r.exit_code == 0, r
    r = cli("config", "set", "train.align.images", "/abs/imgs")
    assert r.exit_code == 0, r
    r = cli("config", "set", "train.instruct.data", "i.json")
    assert r.exit_code == 0, r
    r = cli("config", "set", "data_dir", 'we"ird\\dir')
    assert r.exit_code == 0, r
    assert toml.read_text() == ('# my project\nmodel = "ckpt/new"  # the checkpoint\ndata_dir = "sub/we\\"ird\\\\dir"\n\n'
                                '[train.align]\n# the captions\ndata = "a.json"\nimages = "/abs/imgs"\n\n'
                                '[train.instruct]\ndata = "sub/i.json"\n')
    s = Settings()
    assert s.get("model").value == project / "ckpt" / "new"
    assert s.get("data_dir").value == project / "sub" / 'we"ird\\dir'
    assert s.get("train.instruct.data").value == project / "sub" / "i.json"
    assert [p.name for p in project.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_config_set_user_and_new_project_file(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    r = cli("config", "set", "runs_dir", "out/runs", "--user")
    assert r.exit_code == 0, r
    user = tmp_path / "xdg" / "llavamed" / "config.toml"
    assert user.read_text() == f'runs_dir = "{tmp_path / "out" / "runs"}"\n'  # absolute in the user file
    r = cli("config", "set", "model", "m")
    assert r.exit_code == 0, r
    assert (tmp_path / "llavamed.toml").read_text() == 'model = "m"\n'
    r = cli("config", "set", "model", "m", "--user", "--project")
    assert r.exit_code == 1 and "both given" in r.stderr


def test_config_set_refuses_unknown_keys_and_leaves_the_file(cli, project):
    toml = project / "llavamed.toml"
    toml.write_text('model = "a"\n')
    r = cli("config", "set", "modle", "x")
    assert r.exit_code == 1
    assert "Error: unknown key 'modle'" in r.stderr and "did you mean 'model'" in r.stderr
    r = cli("config", "set", "model", "  ")
    assert r.exit_code == 1 and "empty" in r.stderr
    assert toml.read_text() == 'model = "a"\n'


# --- bad files: one line naming file and line ------------------------------------------------


@pytest.mark.parametrize("text, line, words", [
    ('model = "a"\n[train.align]\nmodle = "x"\n', 3, "unknown key 'train.align.modle'"),
    ('model = "a"\ndata_dir = 3\n', 2, "data_dir must be a path in quotes, got a number"),
    ('\n\nmodel = \n', 3, "not valid TOML"),
    ('train = "x"\n', 1, "train must be a table"),
    ('[trian.align]\nmodel = "x"\n', 2, "unknown key 'trian.align.model'"),
])
def test_bad_files_are_one_line_errors(cli, project, text, line, words):
    (project / "llavamed.toml").write_text(text)
    r = cli("serve")
    assert r.exit_code == 1, r
    err = r.stderr.strip().splitlines()
    assert err[0].startswith(f"Error: {project / 'llavamed.toml'}:{line}: ") and words in err[0], err
    assert len(err) == 2 and err[1].startswith("Hint: ") and "Traceback" not in r.stderr
    r = cli("config", "show")
    assert r.exit_code == 1 and words in r.stderr


def test_a_given_flag_does_not_read_the_files(project, tiny_ckpt, synth_data, cli, monkeypatch):
    (project / "llavamed.toml").write_text('modle = "x"\n')  # broken, but never needed
    monkeypatch.setenv("LLAVAMED_MODEL", str(project / "nope"))  # the flag beats the environment too
    r = cli("chat", synth_data / "images" / "test_00000.png", "--model", tiny_ckpt, "--prompt", "hi",
            "--max-new-tokens", "2")
    assert r.exit_code == 0, r
    monkeypatch.delenv("LLAVAMED_MODEL")
    r = cli("serve")  # needs the model setting: reads the file, names the bad line
    assert r.exit_code == 1 and "llavamed.toml:1: unknown key 'modle'" in r.stderr


def test_no_model_error_names_the_three_ways(cli, project, synth_data):
    for args in (["chat", synth_data / "images" / "test_00000.png", "--prompt", "hi"], ["eval", "vqa", "--dataset", "slake"], ["serve"]):
        r = cli(*args)
        assert r.exit_code == 1, r
        assert "Error: no model" in r.stderr
        assert "--model" in r.stderr and "LLAVAMED_MODEL" in r.stderr and "llavamed config set model" in r.stderr


# --- the three everyday lines, as typed ----------------------------------------------------------


def test_chat_as_typed_equals_chat_with_model(cli, project, tiny_ckpt, synth_data):
    (project / "llavamed.toml").write_text(f'model = "{tiny_ckpt}"\n')
    image = synth_data / "images" / "test_00000.png"
    short = cli("chat", image, "--prompt", "Is there a lesion?", "--temperature", "0", "--max-new-tokens", "8")
    assert short.exit_code == 0, short
    assert f"model: {tiny_ckpt} (from {project / 'llavamed.toml'}:1)" in short.stderr
    full = cli("chat", image, "--prompt", "Is there a lesion?", "--temperature", "0", "--max-new-tokens", "8",
               "--model", tiny_ckpt)
    assert full.exit_code == 0, full
    assert short.stdout == full.stdout and short.stdout.strip()


def test_prepare_then_eval_vqa_dataset_as_typed(cli, project, tiny_ckpt, synth_data, monkeypatch):
    from test_data_prepare import make_slake

    src = make_slake(project / "raw" / "Slake1.0")
    (project / "llavamed.toml").write_text("# an empty project file marks the project folder\n")
    monkeypatch.setenv("LLAVAMED_MODEL", str(tiny_ckpt))
    r = cli("data", "prepare", "slake", "--src", src)  # → DATA/slake, DATA = <project>/data
    assert r.exit_code == 0, r
    data = project / "data" / "slake"
    assert (data / "test.json").is_file() and (data / "images").is_dir()

    r = cli("eval", "vqa", "--dataset", "slake", "--limit", "2", "--max-new-tokens", "8")
    assert r.exit_code == 0, r
    out = project / "runs" / "eval" / tiny_ckpt.name / "slake"
    assert f"output: {out}" in r.stderr and f"results: {out / 'results.json'}" in r.stderr
    ref = project / "ref"
    r = cli("eval", "vqa", "--model", tiny_ckpt, "--dataset", data / "test.json", "--images", data / "images",
            "--out", ref, "--limit", "2", "--max-new-tokens", "8")
    assert r.exit_code == 0, r
    short = [(o["question_id"], o["text"]) for o in read_jsonl(out / "answers.jsonl")]
    assert short == [(o["question_id"], o["text"]) for o in read_jsonl(ref / "answers.jsonl")] and len(short) == 1
    a, b = (json.loads((d / "results.json").read_text())["metrics"] for d in (out, ref))
    assert a == b


def test_train_stages_as_typed_chain_and_equal_the_explicit_run(cli, project, tiny_ckpt, synth_data):
    from train_helpers import weights

    import torch

    (project / "llavamed.toml").write_text(
        f'[train.align]\nmodel = "{tiny_ckpt}"\ndata = "{synth_data / "align.json"}"\nimages = "{synth_data / "images"}"\n\n'
        f'[train.instruct]\ndata = "{synth_data / "instruct.json"}"\nimages = "{synth_data / "images"}"\n')
    fast = ["--global-batch", "4", "--max-steps", "1"]
    r = cli("train", "align", *fast, "--json")
    assert r.exit_code == 0, r
    align = Path(json.loads(r.stdout)["out"])
    assert align.parent == project / "runs" / "train" and align.name.startswith("align-")
    r = cli("train", "instruct", "--nproc", "1", *fast, "--json")  # `--gpus 8` on a GPU machine
    assert r.exit_code == 0, r
    inst = Path(json.loads(r.stdout)["out"])
    assert inst.parent == align.parent and inst.name.startswith("instruct-")
    assert f"model: {align} (from newest finished align run in {project / 'runs' / 'train'})" in r.stderr
    ref = project / "ref"
    r = cli("train", "instruct", "--model", align, "--data", synth_data / "instruct.json",
            "--images", synth_data / "images", "--out", ref, *fast, "--nproc", "1", "--json")
    assert r.exit_code == 0, r
    a, b = weights(inst), weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((inst / "train_config.json").read_text())["model"] == str(align)
    # finetune has no data configured: one line naming the missing option and the key to set
    r = cli("train", "finetune")
    assert r.exit_code == 1
    assert "missing --data, --images" in r.stderr and "train.finetune.data" in r.stderr


def test_missing_train_paths_say_how_to_set_them(cli, project):
    r = cli("train", "align")
    assert r.exit_code == 1
    assert "Error: missing --model, --data, --images" in r.stderr
    assert "llavamed config set train.align.model" in r.stderr
    assert not (project / "runs").exists()  # nothing made for a run that did not start


@pytest.mark.slow
def test_train_as_typed_under_torchrun_writes_one_run_folder(cli_subprocess, project, tiny_ckpt, synth_data):
    """`--nproc 2` stands in for `--gpus 8`: the launcher picks the timestamped folder once."""
    (project / "llavamed.toml").write_text(
        f'[train.instruct]\nmodel = "{tiny_ckpt}"\ndata = "{synth_data / "instruct.json"}"\n'
        f'images = "{synth_data / "images"}"\n')
    r = cli_subprocess("train", "instruct", "--nproc", "2", "--global-batch", "4", "--max-steps", "1", "--json",
                       cwd=project / "sub", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p.name for p in (project / "runs" / "train").iterdir() if p.suffix != ".run")
    assert len(runs) == 1 and runs[0].startswith("instruct-"), runs
    out = project / "runs" / "train" / runs[0]
    assert json.loads(r.stdout)["out"] == str(out) and json.loads(r.stdout)["world_size"] == 2
    assert (out / "config.json").is_file() and (out / "train_config.json").is_file()
