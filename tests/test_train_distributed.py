"""Real processes: ``--nproc 2`` under torchrun (gloo) with DDP, DeepSpeed ZeRO-2/3 and FSDP2,
resuming after the training process is killed with SIGKILL, and two "nodes" on localhost
(``--nnodes 2 --node-rank 0|1``, or Slurm's variables alone) that train as one world of two.

Each run's mechanism report (what accelerate prepared, ``<run dir>/mechanism.json``) must show the
mechanism asked for: DDP's wrapper, the DeepSpeed engine at the ZeRO stage asked, FSDP2 units on
the vision-encoder and decoder layers with every parameter a DTensor shard.

The first DeepSpeed run on a machine compiles DeepSpeed's shared-memory communication op (about a
minute of CPU, cached in ~/.cache/torch_extensions afterwards); later runs take seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from train_helpers import changed_groups, check_generates, weights

# One thread per process: two ranks on a shared 2-core machine.
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_json(stdout: str, stderr: str) -> dict:
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"stdout is not one JSON document:\n{stdout[-2000:]}\n--- stderr:\n{stderr[-2000:]}") from None


_DDP_RUN: dict = {}
"""The ``--nproc 2`` DDP run of the test below (its result and output folder), which is also the
one-node reference of the two-node test (same settings): one launch fewer."""


@pytest.mark.parametrize("mode", [[], ["--deepspeed", "zero2"], ["--deepspeed", "zero3"], ["--fsdp"]],
                         ids=["ddp", "zero2", "zero3", "fsdp"])
def test_two_processes_write_a_loadable_checkpoint(cli_subprocess, tiny_ckpt, synth_data, tmp_path, mode):
    if mode and mode[0] == "--deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            pytest.skip("deepspeed is not installed (pip install 'llavamed[deepspeed]')")
    out = tmp_path / "out"
    r = cli_subprocess(*_two_node_args(tiny_ckpt, synth_data, out)[3:-4], "--nproc", "2",
                       "--master-port", str(_free_port()), *mode, "--json", "--keep-checkpoints",
                       env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = _one_json(r.stdout, r.stderr)  # one JSON document: only rank 0 printed
    assert res["world_size"] == 2 and res["steps"] == 2
    assert res["global_batch"] == 4 and res["per_device_batch"] * res["grad_accum"] == 2
    if not mode:
        _DDP_RUN.update(result=r, out=out)
    assert r.stderr.count("[tokenize] 48/48") == 1  # progress from rank 0 only
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert changed_groups(weights(tiny_ckpt), weights(out)) == {
        "projector": True, "language_model": True, "vision_tower": False}
    check_generates(out, synth_data / "images" / "train_00003.png")

    mech = res["mechanism"]
    assert mech == json.loads((tmp_path / "out.run" / "mechanism.json").read_text())
    assert mech["world_size"] == 2
    if not mode:
        assert mech["distributed"] == "MULTI_CPU" and mech["wrapper"] == "DistributedDataParallel"
    elif mode[0] == "--deepspeed":
        stage = int(mode[1][-1])
        assert mech["distributed"] == "DEEPSPEED" and mech["wrapper"] == "DeepSpeedEngine"
        assert mech["zero_stage"] == stage
        assert (mech["sharded_params"] > 0) == (stage == 3)
    else:
        assert mech["distributed"] == "FSDP" and mech["fsdp_version"] == 2
        assert mech["fsdp_units"]["CLIPEncoderLayer"] == 2 and mech["fsdp_units"]["LlamaDecoderLayer"] == 2
        assert mech["sharded_params"] == mech["params"]  # every parameter a DTensor shard


def test_resume_after_sigkill_reaches_the_same_final_step(tiny_ckpt, synth_data, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "llavamed_cli.main", "train", "finetune", "--model", str(tiny_ckpt),
            "--data", str(synth_data / "train.json"), "--images", str(synth_data / "images"), "--out", str(out),
            "--global-batch", "4", "--max-steps", "12", "--save-steps", "4", "--keep-checkpoints"]
    env = dict(os.environ, **ENV)
    first_ckpt = tmp_path / "out.run" / "checkpoint-4" / "trainer_state.json"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not first_ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()  # no half-written output

    # Starting again without --resume refuses to mix runs; --resume auto continues.
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "--resume auto" in again.stderr
    resumed = subprocess.run([*args, "--resume", "auto", "--json"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    res = _one_json(resumed.stdout, resumed.stderr)
    assert res["steps"] == 12 and res["resumed_from"] is not None
    assert int(res["resumed_from"].rsplit("-", 1)[1]) >= 4
    state = json.loads((tmp_path / "out.run" / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and state["max_steps"] == 12
    check_generates(out, synth_data / "images" / "train_00004.png")


def _no_slurm_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def _two_node_args(tiny_ckpt, synth_data, out) -> list[str]:
    return [sys.executable, "-m", "llavamed_cli.main", "train", "instruct", "--model", str(tiny_ckpt),
            "--data", str(synth_data / "instruct.json"), "--images", str(synth_data / "images"),
            "--out", str(out), "--global-batch", "4", "--max-steps", "2", "--lr", "1e-3", "--seed", "7",
            "--nproc", "1", "--json", "--keep-checkpoints"]


def _run_two_nodes(args: list[str], envs: list[dict], extra: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start the two node launchers at once (as two machines would) and wait for both."""
    procs = [subprocess.Popen([*args, *x], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for e, x in zip(envs, extra)]
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _assert_one_world_of_two(results: list[subprocess.CompletedProcess], out) -> None:
    node0, node1 = results
    assert node0.returncode == 0, node0.stderr[-3000:]
    assert node1.returncode == 0, node1.stderr[-3000:]
    res = _one_json(node0.stdout, node0.stderr)  # rank 0 (node 0) reports the run
    assert res["world_size"] == 2 and res["steps"] == 2 and res["out"] == str(out)
    assert node1.stdout == "" and "node 1 of 2: done" in node1.stderr
    assert "Traceback" not in node0.stderr + node1.stderr
    run = out.parent / f"{out.name}.run"
    mech = json.loads((run / "mechanism.json").read_text())
    assert mech["world_size"] == 2 and mech["distributed"] == "MULTI_CPU"
    assert (out / "model.safetensors").is_file()
    # Both nodes share the run dir: each removed its own config and logs, whichever finished first.
    assert not list(run.glob("launch_config*.json")) and not (run / "logs").exists()


def test_two_nodes_on_localhost_equal_one_node_of_two(tiny_ckpt, synth_data, tmp_path):
    """``--nnodes 2 --node-rank 0|1 --master-addr 127.0.0.1``, one process each: one world of two whose
    weights equal a one-node ``--nproc 2`` run with the same settings."""
    import torch

    env = dict(_no_slurm_env(), **ENV)
    if _DDP_RUN:  # test_two_processes_write_a_loadable_checkpoint[ddp] ran it
        r, ref = _DDP_RUN["result"], _DDP_RUN["out"]
    else:
        ref = tmp_path / "ref"
        r = subprocess.run([*_two_node_args(tiny_ckpt, synth_data, ref)[:-4], "--nproc", "2", "--json"],
                           env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _one_json(r.stdout, r.stderr)["world_size"] == 2

    out = tmp_path / "two-nodes"
    port = str(_free_port())
    results = _run_two_nodes(_two_node_args(tiny_ckpt, synth_data, out), [env, env],
                             [["--nnodes", "2", "--node-rank", str(k), "--master-addr", "127.0.0.1",
                               "--master-port", port] for k in (0, 1)])
    _assert_one_world_of_two(results, out)
    assert "× 2 nodes (this is node 1" in results[1].stderr
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-5
    assert changed_groups(weights(tiny_ckpt), b)["language_model"]  # it did train


@pytest.mark.slow
def test_two_nodes_from_slurm_variables_alone(tiny_ckpt, synth_data, tmp_path):
    """Under ``srun`` the node count, node rank, master address and port come from Slurm's variables
    (no node flags): the two launches form a world of two."""
    port = _free_port()
    while not 20000 <= port < 60000:
        port = _free_port()
    out = tmp_path / "slurm"
    envs = [dict(_no_slurm_env(), **ENV, SLURM_JOB_ID=str(port - 20000), SLURM_JOB_NUM_NODES="2",
                 SLURM_NODEID=str(k), SLURM_JOB_NODELIST="localhost") for k in (0, 1)]
    results = _run_two_nodes(_two_node_args(tiny_ckpt, synth_data, out), envs, [[], []])
    _assert_one_world_of_two(results, out)
    assert f"rank 0 at localhost:{port}, from Slurm" in results[0].stderr
