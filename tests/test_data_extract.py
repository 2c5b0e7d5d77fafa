"""``llavamed data extract`` end to end against a real local server serving PMC-like tarballs.

The tarballs are built here: JPEG, PNG and TIFF members in nested folders, a member shared by two
pair_ids, and hostile ones (a ``../`` name, a symlink, a decompression bomb, a non-image, an
oversized member); the server misbehaves on purpose (404, 500 then OK, 429 with Retry-After, a
body cut halfway, Range ignored, a truncated gzip). Then: reruns, ``--only``/``--limit``/
``--mirror``/``--keep-tarballs``/``--strict``, the disk-space and lock guards.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from http_fixtures import FileServer, bomb_png, jpeg_bytes, make_tarball, png_bytes, tiff_bytes
from llavamed_core.data.extract import ExtractConfig, extract_figures
from llavamed_core.errors import ConfigError
from llavamed_core.http import HttpConfig


def write_urls(path: Path, rows: list[tuple[str, str, str]], extra_lines: list[str] = ()) -> Path:
    """Write a URL list from (tarball URL, member, pair_id) rows."""
    with open(path, "w") as fh:
        for url, member, pid in rows:
            fh.write(json.dumps({"pmc_tar_url": url, "image_file_path": member, "pair_id": pid}) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return path


class World:
    """Tarballs on a server plus the URL list that names their figures, and what should happen."""

    def __init__(self, srv: FileServer, tmp: Path, prefix: str = "pub/pmc"):
        self.srv = srv
        self.prefix = prefix
        self.members: dict[str, bytes] = {}
        fig1, fig2, fig3 = jpeg_bytes(1), png_bytes(2), tiff_bytes(3)
        self.add("PMC1", {"PMC1/article.nxml": b"<article/>", "PMC1/fig1.jpg": fig1,
                          "PMC1/figs/fig2.png": fig2, "PMC1/figs/deep/fig3.tif": fig3,
                          "PMC1/paper.pdf": os.urandom(20_000)})
        self.add("PMC3", {"PMC3/fig.jpg": jpeg_bytes(30)})
        big_jpeg = jpeg_bytes(40, size=(160, 160))
        self.add("PMC4", {"PMC4/a.jpg": jpeg_bytes(41), "PMC4/b.jpg": big_jpeg}, truncate_to=0.6)
        self.add("PMC5", {"../../escape.jpg": jpeg_bytes(50), "PMC5/bomb.png": bomb_png(),
                          "PMC5/notimg.jpg": b"this is not an image at all",
                          "PMC5/huge.jpg": jpeg_bytes(51, size=(200, 200)) + os.urandom(60_000)},
                 symlinks={"PMC5/link.jpg": "/etc/passwd"})
        for i in (6, 7, 8, 9):
            self.add(f"PMC{i}", {f"PMC{i}/f.jpg": jpeg_bytes(60 + i), f"PMC{i}/supp.bin": os.urandom(80_000)})
        srv.fault(f"{prefix}/PMC6.tar.gz", "status", times=1, status=500)
        srv.fault(f"{prefix}/PMC7.tar.gz", "status", times=1, status=429, retry_after="1")
        srv.fault(f"{prefix}/PMC8.tar.gz", "drop", times=1, after_bytes=30_000)
        srv.fault(f"{prefix}/PMC9.tar.gz", "drop", times=1, after_bytes=30_000)
        srv.fault(f"{prefix}/PMC9.tar.gz", "ignore_range", times=None)
        u = self.url
        self.rows = [
            (u("PMC1"), "PMC1/fig1.jpg", "1_F1"), (u("PMC1"), "PMC1/figs/fig2.png", "1_F2"),
            (u("PMC1"), "PMC1/figs/deep/fig3.tif", "1_F3"), (u("PMC1"), "./PMC1/fig1.jpg", "1_F1b"),
            (u("PMC2"), "PMC2/gone.jpg", "2_F1"),
            (u("PMC3"), "PMC3/fig.jpg", "3_F1"), (u("PMC3"), "PMC3/absent.jpg", "3_F2"),
            (u("PMC4"), "PMC4/b.jpg", "4_F1"),
            (u("PMC5"), "../../escape.jpg", "5_F1"), (u("PMC5"), "PMC5/link.jpg", "5_F2"),
            (u("PMC5"), "PMC5/bomb.png", "5_F3"), (u("PMC5"), "PMC5/notimg.jpg", "5_F4"),
            (u("PMC5"), "PMC5/huge.jpg", "5_F5"),
        ] + [(u(f"PMC{i}"), f"PMC{i}/f.jpg", f"{i}_F1") for i in (6, 7, 8, 9)]
        self.ok = {"1_F1": fig1, "1_F1b": fig1, "1_F2": None, "1_F3": None, "3_F1": self.members["PMC3/fig.jpg"],
                   "5_F1": self.members["../../escape.jpg"],
                   **{f"{i}_F1": self.members[f"PMC{i}/f.jpg"] for i in (6, 7, 8, 9)}}
        self.failed = {"2_F1": "not-found", "3_F2": "member-missing", "4_F1": "corrupt-archive",
                       "5_F2": "member-missing", "5_F3": "too-large", "5_F4": "not-an-image",
                       "5_F5": "too-large"}
        self.urls = write_urls(tmp / "llava_med_image_urls.jsonl", self.rows)

    def url(self, name: str) -> str:
        return self.srv.url(f"{self.prefix}/{name}.tar.gz")

    def add(self, name: str, members: dict[str, bytes], symlinks=None, truncate_to=None) -> None:
        self.members.update(members)
        self.srv.add(f"{self.prefix}/{name}.tar.gz", make_tarball(members, symlinks, truncate_to))

    def gets(self, name: str) -> int:
        return len(self.srv.requests_for(f"{self.prefix}/{name}.tar.gz"))


@pytest.fixture
def world(tmp_path):
    with FileServer() as srv:
        yield World(srv, tmp_path)


def failures(out: Path) -> dict[str, str]:
    recs = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(recs) == len({r["pair_id"] for r in recs}), "a figure listed twice"
    return {r["pair_id"]: r["reason"] for r in recs}


def test_extract_everything_that_can_be_had(cli, world, tmp_path):
    out = tmp_path / "images"
    res = cli("data", "extract", "--urls", world.urls, "--out", out, "--workers", "4",
              "--max-member-mb", "0.05")
    assert res.exit_code == 0, res
    # Summary table and reasons on stdout; the plain progress line on stderr (not a TTY).
    assert "data extract" in res.stdout and "failures by reason" in res.stdout
    for reason in set(world.failed.values()):
        assert reason in res.stdout
    assert "[figures] 17/17 fig" in res.stderr and "failures.jsonl" in res.stderr

    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{pid}.jpg" for pid in world.ok] + ["failures.jsonl"])
    for pid, original in world.ok.items():
        data = (out / f"{pid}.jpg").read_bytes()
        if original is not None:
            assert data == original  # JPEG members are kept byte for byte
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG"
            im.load()
    with Image.open(out / "1_F2.jpg") as im:  # PNG (RGBA) → JPEG, same size
        assert im.size == (40, 32) and im.mode == "RGB"
    with Image.open(out / "1_F3.jpg") as im:  # 16-bit TIFF → JPEG
        assert im.size == (36, 30)
    assert failures(out) == world.failed
    detail = {json.loads(x)["pair_id"]: json.loads(x)["detail"] for x in (out / "failures.jsonl").read_text().splitlines()}
    assert "link" in detail["5_F2"] and "decompression bomb" in detail["5_F3"]
    assert "over the 52,428-byte limit" in detail["5_F5"]

    # The ../ member went to 5_F1.jpg and nowhere else; nothing but images was written.
    assert not list(tmp_path.rglob("escape.jpg")) and not (tmp_path.parent / "escape.jpg").exists()
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.part*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "llava_med_image_urls.jsonl"]

    # Each tarball fetched once (four figures from PMC1 in one request); faults retried.
    assert world.gets("PMC1") == 1 and world.gets("PMC3") == 1 and world.gets("PMC2") == 1
    assert [r.status for r in world.srv.requests_for("pub/pmc/PMC6.tar.gz")] == [500, 200]
    assert [r.status for r in world.srv.requests_for("pub/pmc/PMC7.tar.gz")] == [429, 200]
    assert [r.range for r in world.srv.requests_for("pub/pmc/PMC8.tar.gz")] == [None, "bytes=30000-"]
    assert [r.status for r in world.srv.requests_for("pub/pmc/PMC9.tar.gz")] == [200, 200]


def test_rerun_is_idempotent_and_retry_failed_asks_again(cli, world, tmp_path):
    out = tmp_path / "images"
    args = ("data", "extract", "--urls", world.urls, "--out", out, "--max-member-mb", "0.05", "--json")
    first = json.loads(cli(*args).stdout)
    assert first["extracted"] == 10 and first["converted"] == 2 and first["failed"] == 7
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    requests_before = len(world.srv.log)

    res = cli(*args)
    assert res.exit_code == 0, res
    second = json.loads(res.stdout)
    assert second["present"] == 10 and second["extracted"] == 0 and second["known_failures"] == 7
    assert second["failures_by_reason"] == first["failures_by_reason"]
    assert len(world.srv.log) == requests_before  # nothing fetched: done, or failed for good
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot

    # A corrupt image left by some other tool is detected and replaced.
    (out / "3_F1.jpg").write_bytes(snapshot["3_F1.jpg"][:200])
    res = cli(*args, "--retry-failed")
    third = json.loads(res.stdout)
    assert third["extracted"] == 1 and third["present"] == 9 and third["known_failures"] == 0
    assert (out / "3_F1.jpg").read_bytes() == snapshot["3_F1.jpg"]
    assert world.gets("PMC2") == 2 and world.gets("PMC5") == 2  # final failures asked again
    assert failures(out) == world.failed


def test_strict_exits_1_when_figures_are_missing(cli, world, tmp_path):
    res = cli("data", "extract", "--urls", world.urls, "--out", tmp_path / "images", "--strict")
    assert res.exit_code == 1
    assert "Error: 6 of 17 figures could not be had (--strict)" in res.stderr
    assert "Hint:" in res.stderr and "failures by reason" in res.stdout


def test_only_limit_and_mirror(cli, world, tmp_path):
    # The list names a dead host; --mirror rewrites it to the server.
    rows = [(u.replace(world.srv.url(""), "https://ftp.ncbi.invalid/"), m, p) for u, m, p in world.rows]
    urls = write_urls(tmp_path / "urls.jsonl", rows, extra_lines=[
        json.dumps({"pmc_tar_url": rows[0][0], "image_file_path": "x.jpg", "pair_id": "../../etc/x"}),
        json.dumps({"pmc_tar_url": rows[0][0], "pair_id": "7_F9"})])
    convs = tmp_path / "instruct.json"
    convs.write_text(json.dumps([
        {"id": "1_F2", "image": "1_F2.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                           {"from": "gpt", "value": "A figure."}]},
        {"id": "3", "image": "images/3_F1.jpg", "conversatons": [{"from": "human", "value": "<image>\nWhat?"},
                                                               {"from": "gpt", "value": "A figure."}]},
        {"id": "x", "image": "99_F1.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                          {"from": "gpt", "value": "A figure."}]},
        {"id": "y", "image": "7_F9.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                         {"from": "gpt", "value": "A figure."}]},
    ]))
    out = tmp_path / "images"
    res = cli("data", "extract", "--urls", urls, "--out", out, "--only", convs,
              "--mirror", f"https://ftp.ncbi.invalid/={world.srv.url('')}", "--json")
    assert res.exit_code == 0, res
    result = json.loads(res.stdout)
    assert sorted(p.name for p in out.glob("*.jpg")) == ["1_F2.jpg", "3_F1.jpg"]
    assert failures(out) == {"99_F1": "not-listed", "7_F9": "bad-record"}
    assert result["tarballs_fetched"] == 2 and world.gets("PMC6") == 0

    out2 = tmp_path / "trial"
    res = cli("data", "extract", "--urls", urls, "--out", out2, "--limit", "3",
              "--mirror", f"https://ftp.ncbi.invalid/={world.srv.url('')}", "--json")
    assert res.exit_code == 0, res
    assert sorted(p.name for p in out2.glob("*.jpg")) == ["1_F1.jpg", "1_F2.jpg", "1_F3.jpg"]
    assert not (out2 / "failures.jsonl").exists()  # nothing failed: no empty failures file


def test_keep_tarballs_reuses_them(cli, world, tmp_path):
    out = tmp_path / "images"
    args = ("data", "extract", "--urls", world.urls, "--out", out, "--keep-tarballs", "--json")
    res = cli(*args)
    assert res.exit_code == 0, res
    kept = sorted(p.name for p in (out / "tarballs").iterdir())
    assert kept == ["PMC1.tar.gz", "PMC3.tar.gz", "PMC4.tar.gz", "PMC5.tar.gz", "PMC6.tar.gz",
                    "PMC7.tar.gz", "PMC8.tar.gz", "PMC9.tar.gz"]
    assert (out / "tarballs/PMC1.tar.gz").read_bytes() == world.srv.files["pub/pmc/PMC1.tar.gz"]
    for p in out.glob("*.jpg"):
        p.unlink()
    before = len(world.srv.log)
    res = cli(*args)
    assert json.loads(res.stdout)["extracted"] == 11
    assert len(world.srv.log) == before  # every image came from a kept tarball


def test_default_run_keeps_no_tarball_on_disk(world, tmp_path):
    res = extract_figures(ExtractConfig(urls=world.urls, out=tmp_path / "images", workers=2,
                                        http=HttpConfig(backoff=0.05)))
    assert res.extracted == 11 and res.tarballs_fetched == 8
    assert not (tmp_path / "images" / "tarballs").exists()
    assert res.bytes_downloaded >= sum(len(world.srv.files[f"pub/pmc/PMC{i}.tar.gz"]) for i in (6, 7))


def test_disk_space_is_checked_before_starting(world, tmp_path):
    with pytest.raises(ConfigError) as ei:
        extract_figures(ExtractConfig(urls=world.urls, out=tmp_path / "images",
                                      figure_bytes_estimate=10**15))
    assert "not enough disk space: 17 figures need about" in ei.value.message
    assert "--only" in ei.value.hint
    assert world.srv.log == []


def test_a_second_run_on_the_same_folder_is_refused(cli, world, tmp_path):
    out = tmp_path / "images"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = cli("data", "extract", "--urls", world.urls, "--out", out)
    finally:
        os.close(fd)
    assert res.exit_code == 1
    assert "another `llavamed data extract` is writing to this folder" in res.stderr


def test_bad_inputs_are_one_line_errors(cli, tmp_path):
    res = cli("data", "extract", "--urls", tmp_path / "nope.jsonl", "--out", tmp_path / "o")
    assert res.exit_code == 1 and "nope.jsonl: file not found" in res.stderr
    assert "llavamed data download image-urls" in res.stderr
    urls = tmp_path / "u.jsonl"
    urls.write_text('{"pmc_tar_url": "http://x/a.tar.gz", "image_file_path": "a", "pair_id": "a"}\nnot json\n')
    res = cli("data", "extract", "--urls", urls, "--out", tmp_path / "o")
    assert res.exit_code == 1 and "u.jsonl, record line 2: not valid JSON" in res.stderr
    res = cli("data", "extract", "--urls", urls, "--out", tmp_path / "o", "--mirror", "nonsense")
    assert res.exit_code == 1 and "--mirror 'nonsense': expected OLD=NEW" in res.stderr


def test_cli_defaults_are_the_core_defaults():
    import inspect

    from llavamed_cli.data.extract import extract

    params = inspect.signature(extract).parameters
    assert params["workers"].default == ExtractConfig.workers
    assert params["max_member_mb"].default * 2**20 == ExtractConfig.max_member_bytes
    assert params["keep_tarballs"].default == ExtractConfig.keep_tarballs
    assert params["retry_failed"].default == ExtractConfig.retry_failed
    assert params["trust_existing"].default == (not ExtractConfig.check_existing)
    assert params["retries"].default == HttpConfig.retries
    assert params["timeout"].default == HttpConfig.read_timeout
