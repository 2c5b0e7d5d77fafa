"""Tests of the one launcher (``llavamed_core.launch``) and the training entry it starts.

- Slurm: the host-list parser (bracket ranges, zero padding, several groups), ``scontrol`` when it
  is on PATH, and how the node settings resolve (flags over Slurm's variables over one node).
- The quiet torchrun: a real two-process launch where rank 1 fails prints one line naming the
  rank and its log, exits with its status, and shows no traceback.
- Nodes sharing a run dir finish and tidy up in any order: each removes only its own config and
  its ranks' logs, and never fails on what another node already removed.
- ``python -m llavamed_core.train CONFIG`` trains the same weights as ``train()`` called directly.
- A real ``--nproc 2`` run that meets a bad record: one ``Error:`` line (not one per rank), no
  output, and the run dir keeps the config it ran and the ranks' logs.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from llavamed_core.errors import ConfigError
from llavamed_core.launch import (DEFAULT_PORT, LaunchSpec, expand_hostlist, rank_log, resolve_spec,
                                  slurm_hostnames, slurm_settings, torchrun_command)

ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ host lists
@pytest.mark.parametrize("nodelist, hosts", [
    ("localhost", ["localhost"]),
    ("127.0.0.1", ["127.0.0.1"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu5,node[8-10]", ["gpu5", "node8", "node9", "node10"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
    ("a[1],b-[2-3],c", ["a1", "b-2", "b-3", "c"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node1]", "node[3-1]", "node[a-b]", "node[]", ","])
def test_expand_hostlist_refuses_what_is_not_a_host_list(bad):
    with pytest.raises(ConfigError) as exc:
        expand_hostlist(bad)
    assert "SLURM_JOB_NODELIST" in exc.value.message and "--master-addr" in exc.value.hint


def test_slurm_hostnames_asks_scontrol_when_it_is_on_path(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 2\necho first-of-$3\necho second\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert slurm_hostnames("n[1-2]") == ["first-of-n[1-2]", "second"]
    fake.write_text("#!/bin/sh\nexit 1\n")  # scontrol fails: our own reading
    assert slurm_hostnames("n[1-2]") == ["n1", "n2"]
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    assert slurm_hostnames("n[1-2]") == ["n1", "n2"]


# ---------------------------------------------------------------------------- settings resolved
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_NODEID": "2",
         "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_NTASKS_PER_NODE": "1"}


def test_slurm_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the parser
    assert slurm_settings({}) == {}
    assert slurm_settings({"SLURM_JOB_ID": "1"}) == {}  # not a job step with nodes
    assert slurm_settings(SLURM) == {"nnodes": 3, "node_rank": 2, "master_addr": "gpu07",
                                     "master_port": 20000 + 4242}
    # SLURM_NNODES is the older name; srun's step variables win over the job's.
    old = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_NODELIST": "x[3-4]"}
    assert slurm_settings(old) == {"nnodes": 2, "node_rank": 1, "master_addr": "x3"}
    step = dict(SLURM, SLURM_STEP_NUM_NODES="2", SLURM_STEP_NODELIST="gpu[08-09]", SLURM_NODEID="1")
    assert slurm_settings(step)["nnodes"] == 2 and slurm_settings(step)["master_addr"] == "gpu08"


def test_slurm_settings_refuse_bad_values_and_many_tasks_per_node():
    with pytest.raises(ConfigError) as exc:
        slurm_settings(dict(SLURM, SLURM_NODEID="two"))
    assert "SLURM_NODEID='two'" in exc.value.message
    with pytest.raises(ConfigError) as exc:
        slurm_settings(dict(SLURM, SLURM_STEP_TASKS_PER_NODE="8(x3)"))
    assert "8 tasks per node" in exc.value.message and "--ntasks-per-node=1" in exc.value.hint


def test_resolve_spec_flags_over_slurm_over_one_node(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    one = resolve_spec(2, env={})
    assert (one.nnodes, one.node_rank, one.master_addr, one.source, one.world_size) == (1, 0, "127.0.0.1", "default", 2)
    assert 0 < one.master_port < 65536  # a free port (one node): runs side by side do not collide
    many = resolve_spec(1, nnodes=2, node_rank=1, master_addr="10.0.0.1", env={})
    assert (many.nnodes, many.node_rank, many.master_addr, many.master_port, many.source) == \
        (2, 1, "10.0.0.1", DEFAULT_PORT, "flags")
    slurm = resolve_spec(4, env=SLURM)
    assert slurm == LaunchSpec(4, 3, 2, "gpu07", 24242, "slurm")
    # Each flag overrides its Slurm value, the others still come from Slurm.
    mixed = resolve_spec(4, node_rank=0, master_port=1234, env=SLURM)
    assert (mixed.nnodes, mixed.node_rank, mixed.master_addr, mixed.master_port) == (3, 0, "gpu07", 1234)


@pytest.mark.parametrize("kwargs, env, text", [
    ({"nnodes": 2, "node_rank": 2}, {}, "--node-rank 2: must be between 0 and 1"),
    ({"nnodes": 0}, {}, "--nnodes 0: must be at least 1"),
    ({"master_port": 70000}, {}, "--master-port 70000"),
    ({}, dict(SLURM, SLURM_NODEID="5"), "(from Slurm's SLURM_NODEID)"),
])
def test_resolve_spec_refuses(kwargs, env, text, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError) as exc:
        resolve_spec(1, env=env, **kwargs)
    assert text in exc.value.message


def test_torchrun_command_and_rank_logs():
    cmd = torchrun_command(LaunchSpec(2, 3, 1, "h0", 1234), "llavamed_core.train", ["c.json"])
    assert cmd[:3] == [sys.executable, "-m", "llavamed_core.launch"]
    assert cmd[3:] == ["--nproc_per_node=2", "--nnodes=3", "--node_rank=1", "--master_addr=h0",
                       "--master_port=1234", "-m", "llavamed_core.train", "c.json"]
    env = {"LLAVAMED_RANK_LOGS": "1:/r/logs/rank{rank}.log"}
    assert rank_log(0, env) is None and str(rank_log(3, env)) == "/r/logs/rank3.log"
    assert rank_log(0, {}) is None



# ------------------------------------------------------------------------ nodes sharing a run dir
@pytest.mark.parametrize("interrupted", [0, 1], ids=["node0-interrupted", "node1-interrupted"])
def test_nodes_sharing_a_run_dir_finish_in_any_order(tmp_path, monkeypatch, interrupted):
    """Two nodes (one process each) share the run dir, as on one machine or an NFS ``--out``: the
    other node's whole run (config, processes, tidying) may happen before any file-system call of
    this node's tidying, and neither fails (the CI race: one node listed ``logs/`` while the other
    removed it, and a run that had trained exited with ``…/logs: file not found``). Each node keeps
    only its own files; both done, no launcher file is left."""
    import llavamed_core.launch as launcher
    from llavamed_core.train import TrainConfig

    out = tmp_path / "out"
    run = tmp_path / "out.run"
    cfg = TrainConfig(stage="instruct", model=tmp_path / "m", data=tmp_path / "d.json", images=tmp_path / "i",
                      out=out, global_batch=4, max_steps=2)
    specs = [LaunchSpec(1, 2, k, "127.0.0.1", 29500, "flags") for k in (0, 1)]
    calls = {"armed": False, "n": 0, "at": -1, "fired": False}

    def fake_launch(spec, module, args, device="cpu", env=None, rank_logs=None, first_logged_rank=1, **kw):
        assert rank_logs and json.loads(open(args[0]).read())["out"] == str(out)  # its own config is there
        for r in range(spec.node_rank * spec.nproc_per_node, (spec.node_rank + 1) * spec.nproc_per_node):
            if r >= first_logged_rank:  # what redirect_rank_output does in the rank
                log = launcher.Path(rank_logs.format(rank=r))
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(f"rank {r}\n")
        calls["armed"] = spec.node_rank == interrupted  # from here on: this node's tidying
        return 0

    def hooked(name):
        real = getattr(os, name)

        def call(*a, **kw):
            if calls["armed"] and not calls["fired"]:
                if calls["n"] == calls["at"]:  # the other node runs start to end right now
                    calls["armed"], calls["fired"] = False, True
                    assert launcher.launch_training(cfg, specs[1 - interrupted], "cpu") == (0, None)
                calls["n"] += 1
            return real(*a, **kw)
        return call

    monkeypatch.setattr(launcher, "launch", fake_launch)
    for name in ("stat", "lstat", "scandir", "listdir", "unlink", "rmdir", "mkdir", "open", "replace"):
        monkeypatch.setattr(os, name, hooked(name))
    at = 0
    while True:
        (run / "checkpoint-2").mkdir(parents=True, exist_ok=True)  # kept (--keep-checkpoints)
        calls.update(armed=False, n=0, at=at, fired=False)
        assert launcher.launch_training(cfg, specs[interrupted], "cpu") == (0, None)
        calls["armed"] = False
        if not calls["fired"]:  # the other node ran after this one's last file-system call
            assert launcher.launch_training(cfg, specs[1 - interrupted], "cpu") == (0, None)
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2"], at  # no config, no logs left
        if not calls["fired"]:
            break
        at += 1
    assert at >= 2  # tidying was interrupted at each of its file-system calls


def test_each_node_keeps_its_own_files_when_it_fails(tmp_path, monkeypatch):
    """Node 1 fails after node 0 succeeded: node 1's config and its rank's log stay (what ran, and
    why it failed); node 0 removed only its own config."""
    import llavamed_core.launch as launcher
    from llavamed_core.train import TrainConfig

    cfg = TrainConfig(stage="instruct", model=tmp_path / "m", data=tmp_path / "d.json", images=tmp_path / "i",
                      out=tmp_path / "out", global_batch=4, max_steps=2)

    def fake_launch(spec, module, args, rank_logs=None, **kw):
        if spec.node_rank == 1:
            log = launcher.Path(rank_logs.format(rank=1))
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("Error: out of memory\n")
        return spec.node_rank  # node 1 fails

    monkeypatch.setattr(launcher, "launch", fake_launch)
    assert launcher.launch_config_name(0) == "launch_config.json"
    assert launcher.launch_config_name(1) == "launch_config.node1.json"
    node1 = launcher.launch_training(cfg, LaunchSpec(1, 2, 1), "cpu")
    node0 = launcher.launch_training(cfg, LaunchSpec(1, 2, 0), "cpu")
    assert node0 == (0, None) and node1 == (1, None)
    run = tmp_path / "out.run"
    assert sorted(p.name for p in run.iterdir()) == ["launch_config.node1.json", "logs"]
    assert (run / "logs" / "rank1.log").read_text() == "Error: out of memory\n"


# ---------------------------------------------------------------------------------- real launches
def test_a_failing_rank_is_named_in_one_line_with_its_log(tmp_path):
    from llavamed_core.launch import launch

    (tmp_path / "job.py").write_text(
        "import os, sys, time\n"
        "from llavamed_core.launch import redirect_rank_output\n"
        "redirect_rank_output()\n"
        "rank = int(os.environ['RANK'])\n"
        "print(f'rank {rank} of {os.environ[\"WORLD_SIZE\"]} here', flush=True)\n"
        "if rank == 1:\n"
        "    raise SystemExit(3)\n"
        "time.sleep(20)\n")
    proc = launch(LaunchSpec(2, master_port=_free_port()), "job", [], env=dict(ENV, PYTHONPATH=str(tmp_path)),
                  rank_logs=str(tmp_path / "logs" / "r{rank}.log"), first_logged_rank=1,
                  stderr=subprocess.PIPE, wait=False)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 3
    log = tmp_path / "logs" / "r1.log"
    assert err.count("Error:") == 1 and f"Error: process of rank 1 failed (exit status 3); its log: {log}" in err
    assert "Traceback" not in err and "ChildFailedError" not in err
    assert log.read_text() == "rank 1 of 2 here\n"
    assert not (tmp_path / "logs" / "r0.log").exists()  # rank 0 writes to the console


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stopped_launch_stops_its_processes_quietly(tmp_path, sig):
    """Ctrl-C (SIGINT) or the parent's terminate() (SIGTERM): the workers stop, no traceback."""
    import signal
    import time

    from llavamed_core.launch import launch

    (tmp_path / "job.py").write_text(
        "import os, pathlib, time\n"
        "pathlib.Path(os.environ['MARK'], os.environ['RANK']).write_text(str(os.getpid()))\n"
        "try:\n"
        "    time.sleep(120)\n"
        "except KeyboardInterrupt:\n"  # (the job's own Ctrl-C handling, as the training entry's)
        "    raise SystemExit(130)\n")
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = launch(LaunchSpec(2, master_port=_free_port()), "job", [],
                  env=dict(ENV, PYTHONPATH=str(tmp_path), MARK=str(marks)), stderr=subprocess.PIPE, wait=False)
    deadline = time.monotonic() + 60
    while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in marks.iterdir()]
    assert len(pids) == 2
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, sig)
    assert "Traceback" not in err.decode()
    for pid in pids:  # the workers are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _config(tiny_ckpt, synth_data, out, **kw):
    from llavamed_core.train import TrainConfig

    return TrainConfig(stage="instruct", model=tiny_ckpt, data=synth_data / "instruct.json",
                       images=synth_data / "images", out=out, global_batch=4, max_steps=2,
                       learning_rate=1e-3, device="cpu", **kw)


def test_the_launch_config_file_gives_every_process_the_resolved_config(tmp_path):
    """Every TrainConfig field, set away from its default, survives the file the launcher writes
    and the training entry reads (a field added later is covered too)."""
    import dataclasses
    from pathlib import Path

    from llavamed_core.train import TrainConfig
    from llavamed_core.train.__main__ import load_train_config
    from llavamed_core.train.config import config_to_dict

    values = {}
    for f in dataclasses.fields(TrainConfig):
        kind = str(f.type)
        default = None if f.default is dataclasses.MISSING else f.default
        if "Path" in kind:
            values[f.name] = Path(f"/data/{f.name}")
        elif kind.startswith("bool"):
            values[f.name] = not default if isinstance(default, bool) else True
        elif kind.startswith("int"):
            values[f.name] = (default or 0) + 3
        elif kind.startswith("float"):
            values[f.name] = (default or 0) + 0.25
        elif kind.startswith("dict"):
            values[f.name] = {"warmup_steps": 3, "weight_decay": 0.1}
        elif kind.startswith("str"):
            values[f.name] = f"{f.name}-value"
    values["stage"] = "finetune"
    cfg = TrainConfig(**values)
    path = tmp_path / "launch_config.json"
    path.write_text(json.dumps(config_to_dict(cfg)))
    again = load_train_config(str(path))
    assert again == cfg
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(values)  # every field was set


def test_the_training_entry_trains_what_train_trains(tiny_ckpt, synth_data, tmp_path, capsys):
    """``python -m llavamed_core.train CONFIG`` (here called in-process) reads the config file the
    launcher writes and trains the same weights as ``train(cfg)``; rank 0 writes the result file."""
    import torch

    from llavamed_core.train import train
    from llavamed_core.train.__main__ import main
    from llavamed_core.train.config import config_to_dict
    from train_helpers import weights

    direct = train(_config(tiny_ckpt, synth_data, tmp_path / "direct"))
    cfg_file = tmp_path / "launch_config.json"
    cfg_file.write_text(json.dumps(config_to_dict(_config(tiny_ckpt, synth_data, tmp_path / "entry"))))
    result = tmp_path / "result.json"
    assert main([str(cfg_file), "--result", str(result)]) == 0
    res = json.loads(result.read_text())
    assert res["out"] == str(tmp_path / "entry") and res["steps"] == direct.steps == 2
    assert res["final_loss"] == pytest.approx(direct.final_loss)
    a, b = weights(tmp_path / "direct"), weights(tmp_path / "entry")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "[train] 2/2 step" in capsys.readouterr().err  # progress as plain lines

    cfg_file.write_text(json.dumps({"model": str(tiny_ckpt)}))
    assert main([str(cfg_file)]) == 1
    err = capsys.readouterr().err
    assert f"Error: {cfg_file}: missing stage, data, images, out" in err and "Hint:" in err


def test_two_processes_meeting_a_bad_record_report_it_once(cli_subprocess, tiny_ckpt, synth_data, tmp_path):
    records = json.loads((synth_data / "instruct.json").read_text())
    records[5]["conversations"] = "not a list"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    out = tmp_path / "out"
    r = cli_subprocess("train", "instruct", "--model", tiny_ckpt, "--data", bad, "--images", synth_data / "images",
                       "--out", out, "--global-batch", "4", "--max-steps", "1", "--nproc", "2", env=ENV, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count("Error:") == 1 and str(records[5]["id"]) in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists()
    run = tmp_path / "out.run"
    kept = json.loads((run / "launch_config.json").read_text())  # what ran, to read or rerun
    assert kept["data"] == str(bad) and kept["stage"] == "instruct"
    assert (run / "logs" / "rank1.log").is_file()
