"""llavamed's processes freeze their objects before Python's exit-time collection
(``llavamed_core.quick_exit``): the mechanism engages, and what must still happen at exit does —
atexit handlers, ``weakref.finalize`` clean-ups (a temporary directory), the exit status, and
buffered output flushed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHILD = r'''
import atexit, gc, sys, tempfile
out = sys.argv[1]
# Registered before the freeze, so it runs after it (atexit is last in, first out).
atexit.register(lambda: open(out + ".frozen", "w").write(str(gc.get_freeze_count())))
from llavamed_core.quick_exit import freeze_objects_at_exit
freeze_objects_at_exit()
freeze_objects_at_exit()  # once only
cycle = []
cycle.append(cycle)  # cyclic garbage left at exit
tmp = tempfile.TemporaryDirectory()  # removed by weakref.finalize at exit
open(out + ".tmpdir", "w").write(tmp.name)
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
sys.stdout.write("buffered, never flushed by hand")
sys.exit(3)
'''


def test_the_exit_freezes_objects_and_still_cleans_up(tmp_path):
    out = tmp_path / "child"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, never flushed by hand"
    assert int(Path(f"{out}.frozen").read_text()) > 0  # the freeze ran before the final collection
    assert Path(f"{out}.atexit").read_text() == "ran"
    assert not Path(Path(f"{out}.tmpdir").read_text()).exists()
    assert "Traceback" not in proc.stderr and proc.stderr == ""
