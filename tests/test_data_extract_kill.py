"""Kill ``llavamed data extract`` (SIGKILL) in the middle of a run, rerun it, and compare.

The real CLI runs in a subprocess against a local server slowed to ~100 kB/s per connection, is
killed once some images exist, and is run again. The final folder must equal an uninterrupted
run's (same files, same bytes, the same failures), with no temporary files left; and at the moment
of the kill every image on disk must already decode (no partial images).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from http_fixtures import FileServer, jpeg_bytes, make_tarball, png_bytes
from llavamed_core.data.extract import ExtractConfig, extract_figures
from llavamed_core.http import HttpConfig


def folder_state(out: Path) -> dict[str, object]:
    """Every file in ``out`` → its bytes (failures.jsonl as a sorted list of lines)."""
    state: dict[str, object] = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(out))
            state[rel] = sorted(p.read_text().splitlines()) if p.name == "failures.jsonl" else p.read_bytes()
    return state


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    rows = []
    with FileServer() as srv:
        for t in range(20):
            name = f"PMC{100 + t}"
            members = {f"{name}/a.jpg": jpeg_bytes(1000 + t, (96, 96)),
                       f"{name}/supp/data.bin": os.urandom(40_000),
                       f"{name}/figs/b.png": png_bytes(2000 + t, (64, 48), "RGB"),
                       f"{name}/c.jpg": jpeg_bytes(3000 + t, (80, 64))}
            url = srv.add(f"pmc/{name}.tar.gz", make_tarball(members))
            rows += [(url, f"{name}/a.jpg", f"{t}_F1"), (url, f"{name}/figs/b.png", f"{t}_F2"),
                     (url, f"{name}/c.jpg", f"{t}_F3")]
        rows += [(srv.url("pmc/PMC999.tar.gz"), "PMC999/x.jpg", "999_F1"),
                 (rows[0][0], "PMC100/missing.jpg", "0_F9")]
        urls = tmp_path / "urls.jsonl"
        urls.write_text("".join(json.dumps({"pmc_tar_url": u, "image_file_path": m, "pair_id": p}) + "\n"
                                for u, m, p in rows))

        reference = tmp_path / "reference"
        ref = extract_figures(ExtractConfig(urls=urls, out=reference, workers=4, http=HttpConfig(backoff=0.05)))
        assert ref.extracted == 60 and ref.failed == 2

        srv.bandwidth = 100_000
        out = tmp_path / "images"
        cmd = [sys.executable, "-m", "llavamed_cli.main", "data", "extract", "--urls", str(urls),
               "--out", str(out), "--workers", "2"]
        env = dict(os.environ, NO_PROXY="127.0.0.1,localhost")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(out.glob("*.jpg"))) < 9:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        at_kill = sorted(out.glob("*.jpg"))
        assert 9 <= len(at_kill) < 60, "the kill should land mid-run"
        for p in at_kill:  # an image is either whole or absent
            with Image.open(p) as im:
                im.load()

        srv.bandwidth = None
        done = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["present"] >= 9 and result["present"] + result["extracted"] == 60

    assert folder_state(out) == folder_state(reference)
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".part", ".part.json"))]
