"""``llavamed serve`` command-line failures: each one line with a hint and exit 1, never a hang."""

from __future__ import annotations

import socket

from serve_helpers import start_cli_server


def test_missing_checkpoint(cli, tmp_path):
    res = cli("serve", "--model", tmp_path / "nope")
    assert res.exit_code == 1 and res.stdout == ""
    assert "Error: --model" in res.stderr and "no such checkpoint directory" in res.stderr
    assert "Hint: make one with `llavamed weights init" in res.stderr


def test_port_in_use(cli, tiny_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        res = cli("serve", "--model", tiny_ckpt, "--port", port)
    assert res.exit_code == 1
    assert f"Error: 127.0.0.1:{port} is already in use" in res.stderr and "--port" in res.stderr


def test_bad_settings(cli, tiny_ckpt):
    res = cli("serve", "--model", tiny_ckpt, "--allow-remote-images")
    assert res.exit_code == 1 and "needs --allowed-domains" in res.stderr
    res = cli("serve", "--model", tiny_ckpt, "--max-batch", "0")
    assert res.exit_code == 1 and "--max-batch must be at least 1" in res.stderr
    res = cli("serve", "--model", tiny_ckpt, "--engine", "tgi")  # a choice: a usage error listing them
    assert res.exit_code == 2 and "'tgi' is not one of" in res.stderr and "'vllm'" in res.stderr
    res = cli("serve", "--model", tiny_ckpt, "--api-key", "  ")
    assert res.exit_code == 1 and "the API key is empty" in res.stderr
    res = cli("serve", "--model", tiny_ckpt, "--cors-origin", "https://ok.example,app.example.org/")
    assert res.exit_code == 1 and "Error: --cors-origin 'app.example.org/' is not a web origin" in res.stderr
    assert "Hint: give scheme, host and optional port" in res.stderr
    res = cli("serve", "--model", tiny_ckpt, "--max-n", "0")
    assert res.exit_code == 1 and "max_n must be at least 1" in res.stderr
    res = cli("serve", "--model", tiny_ckpt, "--join-wait-ms", "-1")
    assert res.exit_code == 1 and "--join-wait-ms must not be negative" in res.stderr
    res = cli("serve", "--model", tiny_ckpt, "--inline-prep-pixels", "-1")
    assert res.exit_code == 1 and "--inline-prep-pixels must not be negative" in res.stderr
    res = cli("serve", "--model", tiny_ckpt, "--api-processes", "0")
    assert res.exit_code == 1 and "--api-processes must be at least 1" in res.stderr
    res = cli("serve", "--model", tiny_ckpt, "--api-processes", "2", "--engine", "vllm")
    assert res.exit_code == 1 and "--api-processes above 1 needs --engine native" in res.stderr
    assert "--api-server-count" in res.stderr  # the hint: vLLM's own


def test_a_checkpoint_that_fails_to_load_stops_the_server(tiny_ckpt_copy, tmp_path):
    (tiny_ckpt_copy / "model.safetensors").write_bytes(b"\0" * 64)
    srv = start_cli_server(["--model", str(tiny_ckpt_copy)], tmp_path / "log.txt", wait=False)
    code = srv.proc.wait(timeout=120)
    log = srv.log()
    assert code == 1
    assert "Error:" in log and "Traceback" not in log


def test_listening_socket_is_tcp_so_responses_are_not_delayed():
    # asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets; a socket made with proto 0 left
    # Nagle's algorithm on, and every response waited ~40 ms for a delayed ACK.
    from llavamed_core.serve.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_ctrl_c_while_the_model_loads_stops_at_once_without_a_loading_error(tiny_ckpt, tmp_path):
    """Ctrl-C (SIGINT) while the engine process still loads the model ends the server within a
    few seconds — the load is abandoned, not awaited — with no "loading failed" line and no
    engine process left behind."""
    import re
    import signal
    import subprocess
    import time

    srv = start_cli_server(["--model", str(tiny_ckpt)], tmp_path / "log.txt", wait=False)
    try:
        # The engine process starts with the server and spends seconds importing torch and
        # transformers before it loads anything: interrupt now.
        children = subprocess.run(["pgrep", "-P", str(srv.proc.pid)], capture_output=True, text=True).stdout.split()
        srv.proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        code = srv.proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        srv.stop()
    log = srv.log()
    assert "loaded in" not in log, "the model loaded before the interrupt: nothing was tested"
    assert code == 130 and took < 5, (code, took, log)
    assert "loading failed" not in log and "Traceback" not in log
    assert re.search(r"INFO stopped \(Ctrl-C\)", log) and "Error:" not in log
    for pid in children:
        try:
            with open(f"/proc/{pid}/status") as f:
                assert "\nState:\tZ" in f.read(), f"process {pid} outlived the server"
        except FileNotFoundError:
            pass
