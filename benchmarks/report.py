"""Run the benchmarks and write docs/benchmarks.md from their ``--json`` figures.

Each benchmark script prints its figures as one JSON document at the end of its output when given
``--json``. This script runs them (``--run``), keeps each document in ``benchmarks/results/NAME.json``
with the machine it ran on, and renders ``docs/benchmarks.md`` from those files alone, so the page
shows exactly what the scripts printed — no figure is typed by hand. ``tests/test_bench_report.py``
checks that the page matches the stored results.

Run::

    python benchmarks/report.py                       # re-render docs/benchmarks.md from results/
    python benchmarks/report.py --run all             # run every CPU benchmark, then render
    python benchmarks/report.py --run serve_load,eval_throughput
    python benchmarks/report.py --check               # exit 1 if the page is not the rendering of results/

The GPU suite (``benchmarks/gpu_suite.py --out DIR``) runs on a GPU machine; copy its
``DIR/results.json`` to ``benchmarks/results/gpu_suite.json`` and re-render.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PAGE = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Bench:
    name: str          # results/NAME.json
    title: str
    command: list[str]  # argv after the interpreter; "{tmp}" is replaced by a scratch folder
    shown: str          # the command as the page shows it
    method: str         # what is measured against what (no history, no figures)
    render: Callable[[dict], str]


def _f(x: float, nd: int = 2) -> str:
    return f"{x:,.{nd}f}"


def _met(value: float, target: float, higher: bool = True) -> str:
    ok = value >= target if higher else value <= target
    return "met" if ok else "**not met**"


def _table(columns: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(columns) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# --- renderers: JSON figures → Markdown -------------------------------------------------------


def _llm(d: dict) -> str:
    rows = [[f"original: batches of {d['batch']}, each waiting for its slowest", d["baseline_requests"],
             _f(d["baseline_s"]), _f(d["baseline_rps"])],
            [f"`instruct gen --concurrency {d['concurrency']}` (sliding window)", d["requests"],
             _f(d["seconds"]), _f(d["rps"])]]
    return (_table(["scheme", "requests", "s", "req/s"], rows)
            + f"\n\n**{_f(d['ratio'])}×** requests/s (target ≥ 4×: {_met(d['ratio'], 4)}); "
              f"server latency {d['latency_s'] * 1000:.0f} ms per request.")


def _images(d: dict) -> str:
    n = d["figures"]
    rows = [["original `download_images.py`", _f(d["original_s"]), _f(n / d["original_s"]),
             _f(d["peak_disk_original"] / 1e6)],
            [f"`llavamed data extract --workers {d.get('workers', 16)}`", _f(d["new_s"]), _f(n / d["new_s"]),
             _f(d["peak_disk_new"] / 1e6)]]
    return (_table(["run", "seconds", "figures/s", "peak disk MB"], rows)
            + f"\n\n**{_f(d['ratio'], 1)}×** the original's figures/s (target ≥ 8×: {_met(d['ratio'], 8)}); "
              f"peak disk {_f(d['peak_disk_new'] / 1e6)} MB against a limit of images + one tarball per "
              f"worker = {_f(d['limit_bytes'] / 1e6)} MB ({_met(d['limit_bytes'] - d['peak_disk_new'], 0)}).")


def _delta(d: dict) -> str:
    rows = []
    for fmt, r in sorted(d["runs"].items()):
        rows.append([fmt, f"{r['ours_peak_bytes'] / 2**20:,.0f} MiB, {_f(r['ours_s'], 1)} s",
                     f"{r['baseline_peak_bytes'] / 2**20:,.0f} MiB, {_f(r['baseline_s'], 1)} s",
                     f"**{r['ratio'] * 100:.1f} %**", r["tensors_differing"]])
    worst = max(r["ratio"] for r in d["runs"].values())
    return (_table(["shards", "ours (streaming `apply-delta`)", "baseline (both models in memory)",
                    "peak ratio", "tensors differing"], rows)
            + f"\n\nTarget ≤ 25 % of the baseline's peak ({_met(worst, 0.25, higher=False)}); "
              f"base model {d['runs'][next(iter(d['runs']))]['size_gb']:g} GB of fp16 weights.")


def _serve(d: dict) -> str:
    rows = [[r["config"], r["clients"], r["requests"], _f(r["req_per_s"]), _f(r["p50_ms"], 1),
             _f(r["p99_ms"], 1), _f(r.get("mean_batch", 0), 1), f"{r['malformed_4xx']}", r["errors"]]
            for r in d["runs"]]
    out = _table(["config", "clients", "requests", "req/s", "p50 ms", "p99 ms", "mean batch",
                  "malformed → 4xx", "errors"], rows, "lrrrrrrrr")
    gap = ""  # the closed-loop table, after the sentences
    ratio = d["ratio_at_max_clients"]
    errors = sum(r["errors"] for r in d["runs"])
    out += (f"\n\n**{_f(ratio)}×** the requests/s of `--max-batch 1` at the most clients "
            f"(target ≥ 3×: {_met(ratio, 3)}); {errors} errors.")
    if "server_over_engine" in d:
        srv, eng = d["server_at_max_clients"], d["engine_standalone"]
        r = d["server_over_engine"]
        rounds = d.get("server_over_engine_rounds") or []
        out += (f"\n\nServer requests/s at {srv['clients']} clients ÷ the standalone engine's on the same "
                f"{eng['requests']} requests at batch {eng['batch_size']}: **{_f(r)}**"
                + (f", the median of {len(rounds)} alternating rounds ({', '.join(_f(x) for x in rounds)}); "
                   f"each side's best round {_f(srv['req_per_s'])} vs {_f(eng['req_per_s'])} req/s"
                   if rounds else f" ({_f(srv['req_per_s'])} vs {_f(eng['req_per_s'])} req/s")
                + f"; target ≥ 0.8: {_met(r, 0.8)}"
                + (f"; the server's decode steps held {srv['mean_rows_per_step']:.1f} rows on average "
                   f"(the standalone engine {eng['batch_size']}) and it ran "
                   f"{srv['prefills_per_request']:.2f} prefills per request "
                   f"(the standalone engine {1 / eng['batch_size']:.2f})" if "mean_rows_per_step" in srv else "")
                + ".")
        loops = eng.get("closed_loop", [])
        if loops:
            rows = [[f"{cl['turnaround_ms']:,.0f} ms", _f(cl["req_per_s"]),
                     _f(cl.get("standalone_req_per_s", eng["req_per_s"])),
                     f"**{cl.get('ratio', cl['req_per_s'] / eng['req_per_s']):.2f}**",
                     f"{cl['prefills_per_request']:.2f}", f"{cl['steps_per_request']:.2f}"] for cl in loops]
            gap = ("\n\nWhere the gap comes from: the server's scheduler alone in the benchmark's process (prepared "
                   f"requests, no HTTP, no engine process), {srv['clients']} clients in a closed loop, each sending "
                    "its next request a turnaround after its answer (0, then the server's measured turnaround), "
                    "each right after a standalone round on the same requests:\n\n"
                    + _table(["turnaround", "req/s", "standalone req/s", "÷ standalone", "prefills per request",
                              "steps per request"], rows, "lrrrrr"))
    if "short_during_long" in d:
        sdl = d["short_during_long"]
        out += (f" A {sdl.get('short_completion_tokens', 4)}-token request sent a tenth of the way into "
                f"{sdl['long_requests']} answers of up to {sdl['long_max_tokens']} tokens: its latency "
                f"{sdl['short_latency_s'] * 1000:,.0f} ms ÷ the batch's {_f(sdl['long_batch_s'])} s = "
                f"**{sdl['ratio']:.3f}** (target ≤ 0.25: {_met(sdl['ratio'], 0.25, higher=False)}).")
    if "api_processes" in d:
        api = d["api_processes"]
        out += (f"\n\nAPI-bound load ({api['image_side']}-px PNGs of noise, {api['max_tokens']}-token answers, "
                f"{api['clients']} clients, {api['rounds']} alternating rounds of {api['requests_per_round']} "
                f"requests): `--api-processes {api['processes']}` ÷ `--api-processes 1` = **{_f(api['ratio'])}×** "
                f"requests/s (median of {', '.join(_f(x) for x in api['round_ratios'])}; "
                f"{', '.join(_f(x, 1) for x in api['many_req_per_s'])} vs "
                f"{', '.join(_f(x, 1) for x in api['one_req_per_s'])} req/s; mean read-and-prepare time "
                f"{api['many_mean_ingest_ms']:,.0f} vs {api['one_mean_ingest_ms']:,.0f} ms; {api['errors']} errors).")
    if "start_stop" in d:
        ss = d["start_stop"]
        out += ("\n\nStart and stop as a user meets them (the command to the first healthy `/health`; SIGTERM "
                "to exit): " + "; ".join(f"{s['config']} {s['ready_s']:.1f} s and {s['stop_s']:.2f} s" for s in ss)
                + ".")
    return out + gap


def _eval(d: dict) -> str:
    rows = [[d["threads"], _f(d["one_at_a_time_qps"]), _f(d["batched_qps"]), f"**{_f(d['speedup'])}×**",
             d["same_answers"]]]
    return (_table(["torch threads", "one at a time (q/s)", f"`eval vqa` batch {d['batch_size']} (q/s)",
                    "speedup", "identical answers"], rows)
            + f"\n\n{d['questions']} questions, {d['max_new_tokens']} new tokens, greedy, {d['size']} model "
              f"({d['parameters'] / 1e6:.1f} M parameters, {d['dtype']}) on {d['device']}. "
              f"Target ≥ 4× on CPU ({_met(d['speedup'], 4)}).")


def _train(d: dict) -> str:
    rows = [[name, _f(r["tokens_per_s"], 0), f"{r['padding_share'] * 100:.1f} %", r["steps"],
             _f(r["runtime_s"], 1), f"{r['heldout_loss']:.4f}"] for name, r in d["runs"].items()]
    out = _table(["batches", "tokens/s", "padding", "steps", "seconds", "held-out loss"], rows)
    out += (f"\n\nLength-grouped ÷ random: **{_f(d['tokens_per_s_ratio'])}×** tokens/s (target ≥ 1.3×: "
            f"{_met(d['tokens_per_s_ratio'], 1.3)}), held-out loss {d['heldout_loss_difference']:+.4f}.")
    if "packing_tokens_per_s_ratio" in d:
        out += (f" Packed ÷ length-grouped: **{_f(d['packing_tokens_per_s_ratio'])}×** tokens/s (target ≥ 1.25×: "
                f"{_met(d['packing_tokens_per_s_ratio'], 1.25)}), held-out loss "
                f"{d['packing_heldout_loss_difference']:+.4f}.")
    out += (f" {d['parameters'] / 1e6:.1f} M parameters, {d['samples']} conversations, batch {d['batch']}, "
            f"on {d['device']}.")
    return out


def _demo(d: dict) -> str:
    b, a = d["before"], d["after"]
    keys = [("closed accuracy (paper)", "paper_closed_acc"), ("closed accuracy (strict)", "strict_closed_acc"),
            ("open recall (paper)", "paper_open_recall")]
    rows = [[label, _pct(b.get(k)), _pct(a.get(k))] for label, k in keys]
    secs = d["seconds"]
    steps = ", ".join(f"{k.replace('_', ' ')} {v:g} s" for k, v in secs.items() if k != "total")
    return (_table(["", "before training", "after `train align` + `train instruct`"], rows)
            + f"\n\n{_f(secs['total'], 0)} s wall time ({steps}).")


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * float(x):.1f} %"


def _gpu(d: dict) -> str:
    """The suite's own Markdown (``gpu_suite.render_markdown``), its headings nested under this section."""
    sys.path.insert(0, str(HERE))
    import gpu_suite

    lines = gpu_suite.render_markdown(d).splitlines()
    return "\n".join("##" + ln if ln.startswith("#") else ln for ln in lines).strip()


BENCHES: list[Bench] = [
    Bench("llm_throughput", "LLM client throughput (`instruct gen`)",
          ["benchmarks/llm_throughput.py", "--json"], "python benchmarks/llm_throughput.py",
          "A local OpenAI-compatible server in its own process answers every request after a fixed "
          "latency. The baseline is the original generator's scheme (batches of 3, each waiting for its "
          "slowest request); ours is `instruct gen`'s sliding window of concurrent requests.", _llm),
    Bench("images_throughput", "Figure extraction (`data extract`)",
          ["benchmarks/images_throughput.py", "--json"], "python benchmarks/images_throughput.py",
          "A local server adds 50 ms to every request and limits each connection to 4 MB/s; each article "
          "tarball holds an .nxml, a PDF-sized blob and 4 JPEG figures. The baseline is the original "
          "`download_images.py` step for step (one tarball download per figure, untar every package, copy). "
          "Both write byte-identical images.", _images),
    Bench("delta_memory", "Delta weights memory (`weights apply-delta`)",
          ["benchmarks/delta_memory.py", "--json"], "python benchmarks/delta_memory.py [--format bin]",
          "A synthetic LLaMA-shaped fp16 base and a LLaVA-shaped delta are written as shards; each run is its "
          "own process and its peak RSS is the kernel's `ru_maxrss`. The baseline loads both models whole, "
          "adds the base into the delta and saves. Both outputs are compared tensor by tensor.", _delta),
    Bench("serve_load", "Serving under load (`serve`)",
          ["benchmarks/serve_load.py", "--json"], "python benchmarks/serve_load.py",
          "The real `llavamed serve` is started with batching and with `--max-batch 1` on the same tiny "
          "checkpoint and driven by 1, 8 and 32 closed-loop clients sending image chats (greedy); every "
          "tenth request is malformed and must get a 4xx. The standalone engine is loaded in the "
          "benchmark's process and runs the same requests at batch 32, in rounds alternating with the "
          "server's (the same engine run back to back varies by ±25 % on this shared machine, more "
          "than the effects measured); the ratio is the median of the rounds' ratios. The clients are a minimal "
          "keep-alive HTTP/1.1 load generator (~0.3 ms of CPU per request; httpx took ~3 ms). On a "
          "2-core machine the clients, the API process (~2.5 ms of CPU per request) and the engine "
          "process (~5.5 ms) share the two cores, and in a closed loop each row waits empty while its "
          "client reads the answer and sends the next request; the standalone engine keeps all rows "
          "busy on one core of its own. The GPU suite measures the same ratio where the GPU decodes. "
          "Last, two more servers (`--api-processes 1` and `2`) take a load where the API process is the "
          "limit (large images, 2-token answers); on 2 cores the second process has at most one more "
          "core to use, shared with the clients and the engine.",
          _serve),
    Bench("eval_throughput", "Evaluation throughput (`eval vqa`)",
          ["benchmarks/eval_throughput.py", "--threads", "1", "--json"],
          "python benchmarks/eval_throughput.py --threads 1",
          "Questions per second of `eval vqa`'s answer generation (length-sorted, left-padded batches "
          "through the engine) against one question at a time with plain `model.generate` (the original "
          "scripts' way): same model, same questions, greedy, in one process; the answers are compared.",
          _eval),
    Bench("train_throughput", "Training batches (`train`, `--packing`)",
          ["benchmarks/train_throughput.py", "--packing", "--json"],
          "python benchmarks/train_throughput.py --packing",
          "The same model, initial weights and synthetic conversations trained three times through "
          "`llavamed_core.train.train` at one thread: random batches padded to their longest sample (the "
          "original), length-grouped batches, and packed rows. Tokens/s counts non-padding tokens; the "
          "held-out loss is over unseen conversations.", _train),
    Bench("demo", "The demo (`llavamed demo`)",
          ["-m", "llavamed_cli.main", "demo", "--out", "{tmp}/demo", "--json"], "llavamed demo",
          "Synthetic data → tiny model → eval → `train align` → `train instruct` → eval, seed 0. The demo's "
          "settings are chosen for a CPU in minutes (see docs/train.md), not the paper's recipes.", _demo),
]
GPU = Bench("gpu_suite", "The GPU suite (`benchmarks/gpu_suite.py`)", [], "python benchmarks/gpu_suite.py --out DIR",
            "One command for every GPU figure (serving, eval, training mechanisms, MFU); its smoke mode runs "
            "in the tests. Copy `DIR/results.json` to `benchmarks/results/gpu_suite.json` to show it here.",
            _gpu)


def last_json(stdout: str) -> dict:
    """The last JSON object in a script's output (one line, or indented across lines)."""
    lines = stdout.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON document in the output (was --json passed?)")


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
            "load_1min": round(os.getloadavg()[0], 2)}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def run_one(b: Bench) -> dict:
    if b.name == "delta_memory":
        runs = {}
        for fmt in ("safetensors", "bin"):
            d = _run_argv(b.command + ["--format", fmt])
            runs[fmt] = d
        return {"runs": runs}
    return _run_argv(b.command)


def _run_argv(argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        cmd = [sys.executable] + [a.replace("{tmp}", tmp) for a in argv]
        print("running:", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        sys.stdout.write(proc.stdout[-3000:])
        if proc.returncode:
            raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return last_json(proc.stdout)


def render(results: dict[str, dict]) -> str:
    parts = ["# Benchmarks", "",
             "Each script under `benchmarks/` measures llavamed against a baseline run in the same process "
             "or command and prints its figures; `--json` prints them as JSON. This page is written by "
             "`python benchmarks/report.py` from the stored JSON in `benchmarks/results/` — rerun a "
             "benchmark with `python benchmarks/report.py --run NAME` to refresh its section.", ""]
    for b in BENCHES + [GPU]:
        parts += [f"## {b.title}", "", "```bash", b.shown, "```", "", b.method, ""]
        rec = results.get(b.name)
        if rec is None:
            parts += ["Not measured here" + (" (no GPU was available)." if b is GPU else "."), ""]
            continue
        m = rec.get("machine", {})
        parts += [f"Measured {m.get('date', '?')} on {m.get('cpus', '?')} CPU cores"
                  + (f" (1-minute load {m['load_1min']})" if "load_1min" in m else "")
                  + (f", torch {m['torch']}" if "torch" in m else "") + ":", "",
                  b.render(rec["figures"]), ""]
    return "\n".join(parts).rstrip() + "\n"


def load_results() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="", help="comma-separated benchmark names, or 'all' (CPU ones)")
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is out of date")
    args = ap.parse_args()
    names = [b.name for b in BENCHES] if args.run == "all" else [n for n in args.run.split(",") if n]
    known = {b.name: b for b in BENCHES}
    for n in names:
        if n not in known:
            raise SystemExit(f"unknown benchmark {n!r}; known: {', '.join(known)}")
        figures = run_one(known[n])
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{n}.json").write_text(json.dumps({"machine": machine(), "figures": figures}, indent=1) + "\n")
    page = render(load_results())
    if args.check:
        if PAGE.read_text() != page:
            raise SystemExit("docs/benchmarks.md is not the rendering of benchmarks/results/: "
                             "run python benchmarks/report.py")
        return
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
