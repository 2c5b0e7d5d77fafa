"""Requests per second of ``instruct gen`` against a local OpenAI-compatible server with fixed latency.

Compares ``instruct gen --concurrency 16`` (a sliding window: a new request starts as soon as one
finishes) with the original generator's way of working, batches of 3 requests that each wait for
the slowest, against the same server (``tests/llm_server.py`` in its own process, 200 ms per
request by default). Both sides use the same client, prompt and JSONL output; the response cache
is off. Prints requests/s for each and the ratio (target ≥ 4×).

Run::

    python benchmarks/llm_throughput.py                      # 240 figures at c=16, 60 in batches of 3
    python benchmarks/llm_throughput.py --latency 0.2 --concurrency 16 --n 480
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["chest_xray", "mri", "histology", "gross", "ct_scan"]


def write_figures(path: Path, n: int) -> Path:
    """``n`` synthetic figure records in the released layout (one list per domain)."""
    data = {d: [] for d in DOMAINS}
    for i in range(n):
        d = DOMAINS[i % 5]
        data[d].append({"pair_id": f"bench-{i}", "fig_caption": f"Synthetic {d} figure number {i} with a finding.",
                        "in_text_mention": None, "domain": {k: k == d for k in DOMAINS}})
    path.write_text(json.dumps(data))
    return path


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "llm_server.py"), "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "PORT":
        proc.kill()
        raise SystemExit(f"the test server did not start: {line}")
    return proc, f"http://127.0.0.1:{line[1]}/v1"


def run_sliding(figs: Path, out: Path, url: str, concurrency: int, n: int) -> tuple[int, float]:
    """``instruct gen`` itself (the core function the command calls)."""
    from llavamed_core.instruct import GenConfig, generate_instructions
    from llavamed_core.llm import LLMConfig

    llm = LLMConfig(model="bench", base_url=url, concurrency=concurrency, use_cache=False, max_tokens=256)
    t0 = time.perf_counter()
    res = generate_instructions(GenConfig(input=figs, output=out, llm=llm, max_size=n))
    return res.succeeded, time.perf_counter() - t0


def run_batches(figs: Path, out: Path, url: str, batch: int, n: int) -> tuple[int, float]:
    """The original's scheme: send ``batch`` requests, wait for all of them, write, repeat."""
    from llavamed_core.instruct.generate import load_figures, select_round_robin
    from llavamed_core.instruct.prompt import build_messages, load_prompt
    from llavamed_core.io import JsonlAppender
    from llavamed_core.llm import LLMClient, LLMConfig

    prompt = load_prompt()
    samples, _ = select_round_robin(figs, load_figures(figs), n)
    client = LLMClient(LLMConfig(model="bench", base_url=url, use_cache=False, max_tokens=256))
    done = 0
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(batch) as pool, JsonlAppender(out) as sink:
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            answers = list(pool.map(lambda s: client.complete(
                build_messages(prompt, s.caption, s.mentions, False)), chunk))
            for s, a in zip(chunk, answers):
                sink.write({**s.record, "response": a.text})
                done += 1
    client.close()
    return done, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency", type=float, default=0.2, help="server latency per request (s)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch", type=int, default=3, help="batch size of the original scheme")
    ap.add_argument("--n", type=int, default=240, help="figures for the concurrent run")
    ap.add_argument("--n-baseline", type=int, default=60, help="figures for the batched baseline")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON (last line)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    proc, url = start_server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            os.environ["LLAVAMED_HOME"] = str(tmp / "home")
            figs = write_figures(tmp / "figs.json", max(args.n, args.n_baseline))
            run_sliding(figs, tmp / "warm.jsonl", url, args.concurrency, 8)  # connections, imports
            base_n, base_t = run_batches(figs, tmp / "base.jsonl", url, args.batch, args.n_baseline)
            new_n, new_t = run_sliding(figs, tmp / "new.jsonl", url, args.concurrency, args.n)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    base_rps, new_rps = base_n / base_t, new_n / new_t
    print(f"server latency {args.latency * 1000:.0f} ms per request, {os.cpu_count()} CPUs")
    print(f"{'scheme':<40} {'requests':>9} {'seconds':>8} {'req/s':>7}")
    print(f"{f'original: batches of {args.batch}':<40} {base_n:>9} {base_t:>8.2f} {base_rps:>7.2f}")
    print(f"{f'instruct gen --concurrency {args.concurrency}':<40} {new_n:>9} {new_t:>8.2f} {new_rps:>7.2f}")
    print(f"ratio: {new_rps / base_rps:.2f}x (target >= 4x)")
    if args.json:
        print(json.dumps({"latency_s": args.latency, "concurrency": args.concurrency, "batch": args.batch,
                          "baseline_requests": base_n, "baseline_s": base_t, "baseline_rps": base_rps,
                          "requests": new_n, "seconds": new_t, "rps": new_rps, "ratio": new_rps / base_rps}))


if __name__ == "__main__":
    main()
