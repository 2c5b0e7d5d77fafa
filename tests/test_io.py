"""Atomic writes, kill-safe JSONL appends, streaming JSON arrays."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llavamed_core.errors import DataError
from llavamed_core.io import (JsonlAppender, atomic_dir, atomic_write, atomic_write_json, iter_json_array,
                              iter_records, read_jsonl)


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(p) as fh:
            fh.write("{broken")
            raise RuntimeError("boom")
    assert json.loads(p.read_text()) == {"a": 1}
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_atomic_dir_leaves_nothing_on_error_and_refuses_nonempty(tmp_path):
    out = tmp_path / "ck"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(DataError, match="not empty"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(x.name for x in out.iterdir()) == ["b"]


def test_jsonl_appender_cuts_half_written_tail(tmp_path):
    p = tmp_path / "a.jsonl"
    with JsonlAppender(p) as w:
        w.write({"id": 1})
        w.write({"id": 2})
    with open(p, "a") as fh:
        fh.write('{"id": 3, "te')  # a kill in the middle of a write
    assert [r["id"] for r in read_jsonl(p)] == [1, 2]  # the partial tail is ignored on read
    with JsonlAppender(p) as w:
        w.write({"id": 3})
    assert [r["id"] for r in read_jsonl(p)] == [1, 2, 3]


def test_jsonl_appender_survives_sigkill(tmp_path):
    p = tmp_path / "k.jsonl"
    code = ("import sys; from llavamed_core.io import JsonlAppender\n"
            "w = JsonlAppender(sys.argv[1])\n"
            "i = 0\n"
            "while True:\n    w.write({'i': i, 'pad': 'x' * 5000}); i += 1\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(p)])
    deadline = time.time() + 30
    while time.time() < deadline and (not p.exists() or p.stat().st_size < 200_000):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = list(read_jsonl(p))
    assert [r["i"] for r in rows] == list(range(len(rows))) and len(rows) > 10
    with JsonlAppender(p) as w:
        w.write({"i": len(rows)})
    assert [r["i"] for r in read_jsonl(p)] == list(range(len(rows) + 1))


def test_read_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(DataError, match=r"b.jsonl, record line 2"):
        list(read_jsonl(p))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4), max_leaves=10)


@settings(max_examples=60, deadline=None)
@given(items=st.lists(json_values, max_size=30), chunk=st.integers(1, 64), indent=st.sampled_from([None, 1]))
def test_iter_json_array_matches_json_load(tmp_path_factory, items, chunk, indent):
    p = tmp_path_factory.mktemp("arr") / "a.json"
    p.write_text(json.dumps(items, indent=indent))
    assert list(iter_json_array(p, chunk_size=chunk)) == items


def test_iter_json_array_errors(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('[{"id": 1}, {"id": 2}')
    with pytest.raises(DataError, match="truncated|end of file"):
        list(iter_json_array(p))
    p.write_text('{"id": 1}')
    with pytest.raises(DataError, match="expected a JSON array"):
        list(iter_json_array(p))


def test_iter_records_reads_both_layouts(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"id": 1}, {"id": 2}]))
    b = tmp_path / "b.jsonl"
    b.write_text('{"id": 1}\n{"id": 2}\n')
    assert list(iter_records(a)) == list(iter_records(b)) == [{"id": 1}, {"id": 2}]


def test_atomic_dir_removes_what_a_killed_run_left(tmp_path):
    stale = tmp_path / ".ck.abc123.partial"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
