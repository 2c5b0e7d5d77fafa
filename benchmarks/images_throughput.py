"""Figures per second of ``data extract`` vs the original ``download_images.py``, and peak disk.

A local server (tests/http_fixtures.py) serves PMC-like article tarballs (an .nxml, a PDF-sized
blob and a few JPEG figures each) with a latency added to every request and a bandwidth limit per
connection. Two runs fetch the same figures:

- baseline, as LLaVA-Med's ``llava/data/download_images.py`` does it: for every figure download
  its article's tarball (``urllib.request.urlretrieve``, so a tarball is fetched once per figure),
  then untar every package whole, then copy each figure to ``<pair_id>.jpg``; sequential, and the
  tarballs and extracted packages stay on disk;
- ``llavamed_core.data.extract.extract_figures`` with ``--workers N`` (default 16): one streamed
  request per tarball, only the named members read, each image decoded and written atomically.

It prints figures/s of each, the ratio (target ≥ 8×), and the peak disk each used (sampled every
5 ms) against the target "≤ the images plus one tarball per worker". Also the new code with one
worker, to show how much comes from grouping and how much from parallel streams.

Run::

    python benchmarks/images_throughput.py                      # 32 tarballs × 4 figures, ~40 s
    python benchmarks/images_throughput.py --tarballs 8 --figures 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from http_fixtures import FileServer, jpeg_bytes, make_tarball  # noqa: E402

from llavamed_core.data.extract import ExtractConfig, extract_figures  # noqa: E402
from llavamed_core.http import HttpConfig  # noqa: E402


def tree_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    total = 0
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(Path(e.path))
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue  # renamed or removed while we looked
        except FileNotFoundError:
            continue
    return total


class PeakDisk:
    """Sample the bytes under a folder every few milliseconds; keep the maximum."""

    def __init__(self, path: Path, interval: float = 0.005):
        self.path, self.interval, self.peak = path, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_bytes(self.path))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakDisk":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_bytes(self.path))


def build(srv: FileServer, n_tarballs: int, n_figures: int, blob_kb: int) -> list[dict]:
    """Serve ``n_tarballs`` article packages; return the URL-list records of their figures."""
    rnd = random.Random(0)
    records = []
    for t in range(n_tarballs):
        name = f"PMC{7000000 + t}"
        members = {f"{name}/article.nxml": b"<article>" + b"x" * 20_000 + b"</article>",
                   f"{name}/paper.pdf": rnd.randbytes(blob_kb * 1024)}
        for f in range(n_figures):
            members[f"{name}/fig{f}.jpg"] = jpeg_bytes(t * 100 + f, (224, 192))
        url = srv.add(f"pub/pmc/oa_package/{t % 256:02x}/{name}.tar.gz", make_tarball(members))
        records += [{"pmc_tar_url": url, "image_file_path": f"{name}/fig{f}.jpg",
                     "pair_id": f"{30000000 + t}_F{f + 1}"} for f in range(n_figures)]
    return records


def run_original(records: list[dict], root: Path) -> None:
    """LLaVA-Med's download_images.py, step for step (download per figure, untar all, copy)."""
    pmc, images = root / "pmc_articles", root / "images"
    pmc.mkdir(parents=True)
    images.mkdir(parents=True)
    for s in records:
        urllib.request.urlretrieve(s["pmc_tar_url"], pmc / os.path.basename(s["pmc_tar_url"]))
    for s in records:
        with tarfile.open(pmc / os.path.basename(s["pmc_tar_url"]), "r:gz") as tar:
            tar.extractall(pmc, filter="data")
    for s in records:
        shutil.copyfile(pmc / s["image_file_path"], images / (s["pair_id"] + ".jpg"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tarballs", type=int, default=32)
    ap.add_argument("--figures", type=int, default=4, help="figures per tarball")
    ap.add_argument("--blob-kb", type=int, default=256, help="size of each package's PDF stand-in")
    ap.add_argument("--latency", type=float, default=0.05, help="seconds added to every request")
    ap.add_argument("--bandwidth", type=float, default=4e6, help="bytes/s per connection")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"

    with FileServer(latency=args.latency, bandwidth=args.bandwidth) as srv, \
            tempfile.TemporaryDirectory() as tmp:
        records = build(srv, args.tarballs, args.figures, args.blob_kb)
        root = Path(tmp)
        urls = root / "llava_med_image_urls.jsonl"
        urls.write_text("".join(json.dumps(r) + "\n" for r in records))
        n = len(records)
        tar_sizes = sorted(len(v) for k, v in srv.files.items())

        base_dir = root / "original"
        base_dir.mkdir()
        with PeakDisk(base_dir) as base_disk:
            t0 = time.perf_counter()
            run_original(records, base_dir)
            t_base = time.perf_counter() - t0

        runs = {}
        for workers in (1, args.workers):
            out = root / f"llavamed-w{workers}"
            out.mkdir()
            with PeakDisk(out) as disk:
                t0 = time.perf_counter()
                res = extract_figures(ExtractConfig(urls=urls, out=out, workers=workers,
                                                    http=HttpConfig(pool_size=2)))
                dt = time.perf_counter() - t0
            assert res.extracted == n and res.failed == 0, res
            images = tree_bytes(out)
            runs[workers] = (dt, disk.peak, images)
            # Same images as the original's copies (JPEG members are kept byte for byte).
            for r in records[:: max(1, n // 16)]:
                name = r["pair_id"] + ".jpg"
                assert (out / name).read_bytes() == (base_dir / "images" / name).read_bytes()

    w = args.workers
    t_new, peak_new, images = runs[w]
    limit = images + w * tar_sizes[-1]
    print(f"images_throughput: {args.tarballs} tarballs × {args.figures} figures = {n} figures; "
          f"tarballs {tar_sizes[0] / 1e3:.0f}-{tar_sizes[-1] / 1e3:.0f} kB; server latency "
          f"{args.latency * 1e3:.0f} ms/request, {args.bandwidth / 1e6:.1f} MB/s per connection")
    print(f"{'run':<34}{'seconds':>9}{'figures/s':>11}{'peak disk MB':>14}")
    print(f"{'original download_images.py':<34}{t_base:>9.2f}{n / t_base:>11.2f}{base_disk.peak / 1e6:>14.2f}")
    for workers, (dt, peak, _img) in runs.items():
        print(f"{f'llavamed data extract --workers {workers}':<34}{dt:>9.2f}{n / dt:>11.2f}{peak / 1e6:>14.2f}")
    ratio = t_base / t_new
    print(f"speed-up --workers {w} vs original: {ratio:.1f}x (target >= 8x: {'met' if ratio >= 8 else 'NOT met'})")
    print(f"peak disk --workers {w}: {peak_new / 1e6:.2f} MB; images {images / 1e6:.2f} MB + {w} tarballs "
          f"= {limit / 1e6:.2f} MB (target peak <= that: {'met' if peak_new <= limit else 'NOT met'}); "
          f"original peaked at {base_disk.peak / 1e6:.2f} MB")
    if args.json:
        print(json.dumps({"figures": n, "workers": w, "original_s": t_base, "new_s": t_new, "ratio": ratio,
                          "peak_disk_new": peak_new, "peak_disk_original": base_disk.peak,
                          "images_bytes": images, "limit_bytes": limit}))


if __name__ == "__main__":
    main()
