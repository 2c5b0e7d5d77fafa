"""``llavamed eval vqa``: answer a VQA test set (or the qa50 chat benchmark) and score it.

Two modes:

- generate and score: ``--model CKPT`` (or ``--server URL``) ``--dataset vqa-rad|slake|pathvqa|FILE``
  ``--out DIR`` writes ``DIR/run.json`` (the model fingerprint and settings), ``DIR/answers.jsonl``
  (resumable, only by a run with the same model and settings; ``--overwrite`` starts over) and
  ``DIR/results.json`` (with that provenance);
- score only: ``--answers FILE --gt FILE`` for an existing answer file (ours or the original
  scripts'); results.json goes to ``--out`` or beside the answer file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import _complete, _console
from .._options import (DeviceOpt, DtypeOpt, FrameOpt, JsonOpt, PlaneOpt, SliceOpt, VolumeOpt,
                        WindowOpt, image_options)
from . import app


# The breakdown tables' column labels (short enough for 80 columns; * = the paper's headline).
BREAKDOWN_LABELS = {"paper_closed_acc": "closed (paper) *", "strict_closed_acc": "closed (strict)",
                    "paper_open_recall": "open recall (paper) *", "open_token_f1": "open token F1",
                    "exact_match": "exact match"}
HEADLINE_NOTE = "* the paper's headline numbers (its 'Closed' and 'Open' columns)"


def _print_report(report, title: str) -> None:
    from llavamed_core.eval.vqa_metrics import METRICS, breakdown_rows, render_rows

    headline = {METRICS["paper_closed_acc"], METRICS["paper_open_recall"]}
    rows = render_rows(report)
    metric_rows = [(f"{label} *" if label in headline else label, v) for label, v in rows
                   if label in METRICS.values()]
    _console.print_table(title, ["metric", "%"], metric_rows, caption=HEADLINE_NOTE)
    _console.print_table("questions", ["", "count"], [r for r in rows if r[0] not in METRICS.values()])
    for by in ("answer_type", "question_type", "modality"):
        columns, rows = breakdown_rows(report, by)
        if rows:
            labels = [by.replace("_", " "), *(BREAKDOWN_LABELS.get(c, c) for c in columns[1:])]
            _console.print_table(f"by {by.replace('_', ' ')} (%; n = questions)", labels, rows,
                                 caption=HEADLINE_NOTE)


@app.command("vqa")
def vqa(
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", autocompletion=_complete.DATASETS, help="vqa-rad, slake, pathvqa (prepared under --data-root), or a question file: a prepared test.json or the qa50 JSONL.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Checkpoint (or LoRA adapter) directory to answer with (default: the configured model).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory: answers.jsonl (resumable) and results.json (default: RUNS/eval/<model>/<dataset>/).")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Folder the records' image paths are relative to (default: images/ beside the question file).")] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Where `llavamed data prepare` wrote the named datasets (<root>/<name>/test.json; default: the configured data_dir).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split file of a named dataset.")] = "test",
    base: Annotated[Optional[Path], typer.Option("--base", help="Base checkpoint of a LoRA adapter (default: from adapter_config.json).")] = None,
    server: Annotated[Optional[str], typer.Option("--server", help="OpenAI-compatible server URL to ask instead of --model (llavamed serve, vLLM, ...).")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LLAVAMED_API_KEY", show_envvar=True, help="API key for --server.")] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Model name to request from --server (default: its first model).")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Requests in flight with --server.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Questions per forward pass.")] = 16,
    gpus: Annotated[int, typer.Option("--gpus", help="Split the questions over N GPUs (one process each).")] = 0,
    nproc: Annotated[int, typer.Option("--nproc", help="Split the questions over N CPU processes.")] = 1,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Answer only the first N questions (smoke runs).")] = None,
    closed_suffix: Annotated[str, typer.Option("--closed-suffix", help="Text appended to CLOSED questions, e.g. ' Answer yes or no.' (recorded in results.json; the original used none).")] = "",
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Answer length cap (default 128; 1024 for the qa50 chat benchmark).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (the paper's evaluation).")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.")] = None,
    answers: Annotated[Optional[Path], typer.Option("--answers", help="Score this existing answer file (with --gt) instead of generating.")] = None,
    gt: Annotated[Optional[Path], typer.Option("--gt", help="Ground-truth file for --answers.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the answers already in --out and start over (needed when the model or a setting changed; a plain rerun resumes only with the same ones).")] = False,
    window: WindowOpt = None,
    frame: FrameOpt = None,
    slice_index: SliceOpt = None,
    plane: PlaneOpt = "axial",
    volume: VolumeOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Answer a VQA test set (or the qa50 chat benchmark) and report the paper's and strict metrics."""
    from llavamed_core.errors import ConfigError

    if answers is not None or gt is not None:
        if answers is None or gt is None:
            raise ConfigError("scoring an existing file needs both --answers and --gt")
        if model is not None or server is not None or dataset is not None:
            raise ConfigError("--answers/--gt score an existing file; drop --model/--server/--dataset")
        from llavamed_core.eval.answers import answer_file_provenance, score_answer_file
        from llavamed_core.io import atomic_write_json

        if out is not None and out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: is a file, not a directory", "give a directory for results.json")

        report = score_answer_file(answers, gt)
        path = (out / "results.json") if out else answers.with_name(answers.stem + ".results.json")
        result = report.to_dict()
        result["provenance"] = answer_file_provenance(answers)
        atomic_write_json(path, result)
        output = _console.Output(json_out)
        output.result(dict(result, results_file=str(path)))
        if not output.json_mode:
            _print_report(report, f"VQA metrics: {answers.name} vs {gt.name}")
            _console.info(f"results: {path}")
        return

    from llavamed_core.eval.answers import VQAEvalConfig, evaluate_vqa, resolve_dataset

    from .. import _config

    if dataset is None:
        raise ConfigError("give --dataset (or --answers and --gt to score a file)",
                          "e.g. --dataset slake (prepared under the data folder) or --dataset FILE")
    if model is not None and server is not None:
        raise ConfigError("give exactly one of --model and --server")
    if server is None:
        model = _config.model(model, "eval vqa", server=True)
    data_root = _config.folder("data_dir", data_root)
    named = data_root / dataset / f"{split}.json"  # any dataset prepared under the data folder
    path = named if ("/" not in dataset and not Path(dataset).exists() and named.is_file()) \
        else resolve_dataset(dataset, data_root, split)
    if out is None:
        out = _config.eval_out(model, server, model_name, dataset, split)
    cfg = VQAEvalConfig(dataset=path, out=out, images=images, model=model, base=base, server=server,
                        api_key=api_key, model_name=model_name, concurrency=concurrency,
                        batch_size=batch_size, nproc=nproc, gpus=gpus, limit=limit,
                        closed_suffix=closed_suffix, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=seed, device=device, dtype=dtype,
                        dataset_name=dataset, overwrite=overwrite,
                        image_options=image_options(window, frame, slice_index, plane, volume))
    with _console.progress() as cb:
        res = evaluate_vqa(cfg, progress=cb)
    run = res.run
    output = _console.Output(json_out)
    output.result(dict(res.results, results_file=str(res.results_path)))
    if output.json_mode:
        return  # the tables and notes below are for a person
    output.table(f"eval vqa: {dataset}", ["questions", "answered now", "resumed", "processes", "questions/s",
                                          "answers"],
                 [[run.total, run.answered, run.resumed, run.processes, round(run.questions_per_second, 2),
                   str(run.answers)]])
    if res.report is not None:
        _print_report(res.report, f"VQA metrics: {dataset}")
    else:
        _console.info("no ground truth in this question file (chat benchmark): score the answers "
                      "with `llavamed eval gpt-score`")
    prov = res.results.get("provenance") or {}
    m = prov.get("model") or {}
    made_by = (f"{m.get('name')} (fingerprint {str(m.get('fingerprint'))[:12]})" if m.get("fingerprint")
               else f"{m.get('name')} at {m['server']}" if m.get("server") else str(m.get("name")))
    _console.info(f"answers made by {made_by}, run {run.run_id} (settings in {run.answers.parent / 'run.json'})")
    _console.info(f"results: {res.results_path}")
