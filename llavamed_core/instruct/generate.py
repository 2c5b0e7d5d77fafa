"""``instruct gen``: ask an LLM to write a conversation about each figure, from its caption.

Input is the released ``llava_med_instruct_fig_captions.json`` (a JSON object of per-domain lists of
figure records; a plain JSON array or JSONL of records works too). Figures are taken round-robin
across the domain lists (the first of every list, then the second of every list, …), so
``max_size`` samples stay balanced across domains; a figure listed under several domains is asked
once. The order is deterministic, so a rerun selects the same figures.

Output is JSONL, appended as each answer arrives (:func:`~llavamed_core.llm_jobs.run_llm_job`): the
input record plus ``domain``, ``model``, ``response`` (the raw model text), ``finish_reason``,
``usage`` and ``cached``. A rerun asks only for ``pair_id``\\ s not yet in the output. Requests that
fail for good are written to ``<output stem>.failures.jsonl`` (pair_id, reason, attempts) and asked
again on the next run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, data_error
from ..io import ResumableJsonl, check_text_file, iter_records, read_jsonl, reading
from ..llm import LLMClient, LLMConfig
from ..llm_jobs import check_max_failures, failures_path, job_client, run_llm_job
from ..progress import ProgressCallback
from ..records import DOMAINS, no_records_error
from .prompt import build_messages, load_prompt, mention_texts

__all__ = ["GenConfig", "GenResult", "FigureSample", "load_figures", "select_round_robin",
           "failures_path", "generate_instructions", "GEN_REQUEST"]

GEN_REQUEST = {"model": "gpt-4o", "temperature": 0.7, "max_tokens": 1024}
"""The request settings of ``instruct gen`` unless told otherwise (``LLMConfig`` fields): a warm
temperature, for varied conversations; room for a multi-turn one."""


@dataclass
class GenConfig:
    """Settings of one ``instruct gen`` run."""

    input: Path
    """Figure-caption file (JSON object of per-domain lists, JSON array, or JSONL)."""
    output: Path
    """JSONL output, appended and resumed."""
    llm: LLMConfig
    """Endpoint, model and request settings."""
    max_size: int | None = None
    """Figures to take, round-robin across the domain lists (``None``: all)."""
    inline_mentions: bool = False
    """Also show the model the article sentences that mention the figure."""
    prompt_file: Path | None = None
    """Prompt file replacing the packaged ``prompt.md``."""
    max_failures: int | None = None
    """Stop, and fail, once more than this many requests have failed for good (``None``: no
    limit; a run where every request failed fails in any case)."""


@dataclass
class FigureSample:
    """One figure to ask about: its record, domain flags, and the text the model sees."""

    pair_id: str
    record: dict[str, Any]
    domain: dict[str, bool]
    caption: str
    mentions: list[str]


@dataclass
class GenResult:
    """What one run did (this run's figures; ``already_done`` were in the output before)."""

    output: Path
    failures_path: Path
    selected: int
    already_done: int
    requested: int
    succeeded: int
    failed: int
    cached: int
    duplicates: int
    failure_reasons: dict[str, int] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    endpoint: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = dict(self.__dict__)
        d["output"] = str(self.output)
        d["failures_path"] = str(self.failures_path)
        return d


def load_figures(path: str | os.PathLike) -> list[tuple[str | None, list[Any]]]:
    """The figure lists of a caption file as ``(list name, records)`` pairs.

    A JSON object gives one list per key (the released layout); a JSON array or JSONL gives one
    unnamed list.

    Raises:
        DataError: a missing or malformed file, or a top-level value that is neither.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found", "check --input")
    with reading(path):
        lists = _load_figure_lists(path)
    if not any(records for _, records in lists):
        raise no_records_error(path, "figure records")
    return lists


def _load_figure_lists(path: Path) -> list[tuple[str | None, list[Any]]]:
    check_text_file(path)
    with open(path, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip("\ufeff \t\r\n")
    if not head:
        return []
    if head.startswith("["):
        return [(None, list(iter_records(path)))]
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values: JSON lines
            return [(None, list(read_jsonl(path)))]
        raise data_error(path, f"line {exc.lineno}", None, f"not valid JSON ({exc.msg})",
                         "the file may be truncated; download it again") from None
    if not isinstance(obj, dict):
        raise data_error(path, None, None, f"expected a JSON object of figure lists, found {type(obj).__name__}")
    if "pair_id" in obj:  # a JSONL file with a single record
        return [(None, [obj])]
    lists = []
    for name, value in obj.items():
        if not isinstance(value, list):
            raise data_error(path, None, name, f"expected a list of figure records, found {type(value).__name__}")
        lists.append((name, value))
    return lists


def _check_figure(path: Path, where: str, rec: Any, list_name: str | None) -> FigureSample:
    if not isinstance(rec, dict):
        raise data_error(path, where, None, f"expected an object, found {type(rec).__name__}")
    pid = rec.get("pair_id")
    if not isinstance(pid, str) or not pid.strip():
        raise data_error(path, where, "pair_id", "missing or not a string", "every figure needs a pair_id")
    cap = rec.get("fig_caption")
    if not isinstance(cap, str) or not cap.strip():
        raise data_error(path, pid, "fig_caption", "missing or empty")
    try:
        mentions = mention_texts(rec.get("in_text_mention"))
    except ValueError as exc:
        raise data_error(path, pid, "in_text_mention", str(exc),
                         "use null, a list of strings, or a list of {\"tokens\": ...}") from None
    dom = rec.get("domain")
    if dom is None:
        domain = {d: d == list_name for d in DOMAINS}
    elif isinstance(dom, dict):
        domain = {d: bool(dom.get(d)) for d in DOMAINS}
    else:
        raise data_error(path, pid, "domain", f"expected an object of booleans, found {type(dom).__name__}")
    return FigureSample(pid, rec, domain, cap, mentions)


def select_round_robin(path: Path, lists: list[tuple[str | None, list[dict]]],
                       max_size: int | None) -> tuple[list[FigureSample], int]:
    """Take figures round-robin across the lists, skipping a pair_id already taken.

    Returns:
        The chosen samples (checked) and how many duplicates were skipped.

    Raises:
        DataError: a chosen record without pair_id/caption or with a malformed field.
    """
    chosen: list[FigureSample] = []
    seen: set[str] = set()
    dups = 0
    longest = max((len(lst) for _, lst in lists), default=0)
    for i in range(longest):
        for name, lst in lists:
            if max_size is not None and len(chosen) >= max_size:
                return chosen, dups
            if i >= len(lst):
                continue
            where = f"{name}[{i}]" if name is not None else f"#{i}"
            sample = _check_figure(path, where, lst[i], name)
            if sample.pair_id in seen:
                dups += 1
                continue
            seen.add(sample.pair_id)
            chosen.append(sample)
    return chosen, dups


def generate_instructions(cfg: GenConfig, progress: ProgressCallback | None = None,
                          client: LLMClient | None = None) -> GenResult:
    """Ask the LLM for a conversation about each selected figure; append answers to the output.

    Args:
        cfg: the run settings.
        progress: receives ``instruct gen`` events (done/total with ok, failed, tokens, cost).
        client: an existing client (default: one built from ``cfg.llm``).

    Returns:
        Counts, failure reasons, token usage and the endpoint used (no secrets).

    Raises:
        DataError: bad input, prompt file or existing output.
        LLMError: the endpoint refused the credentials, the model is unknown, too many
            requests failed in a row, more than ``max_failures`` failed, or every request failed.
            Everything answered so far is kept; a rerun resumes.
    """
    cfg.llm.check()
    if cfg.max_size is not None and cfg.max_size < 1:
        raise ConfigError(f"--max-size must be at least 1, got {cfg.max_size}")
    check_max_failures(cfg.max_failures)
    prompt = load_prompt(cfg.prompt_file)
    samples, dups = select_round_robin(Path(cfg.input), load_figures(cfg.input), cfg.max_size)
    output = ResumableJsonl(cfg.output, "pair_id", "the existing output",
                            "is --output another kind of file? choose a new path")
    todo = output.pending(samples, lambda s: s.pair_id)
    with job_client(cfg.llm, client) as client:
        result = GenResult(output.path, failures_path(output.path), len(samples), len(samples) - len(todo),
                           len(todo), 0, 0, 0, dups, endpoint={**client.endpoint.describe(), "model": cfg.llm.model})

        def ask(sample: FigureSample):
            return client.complete(build_messages(prompt, sample.caption, sample.mentions, cfg.inline_mentions))

        def to_record(sample: FigureSample, res: Any) -> dict:
            result.cached += int(res.cached)
            return {**sample.record, "domain": sample.domain, "model": cfg.llm.model,
                    "inline_mentions": cfg.inline_mentions, "response": res.text,
                    "finish_reason": res.finish_reason, "cached": res.cached,
                    "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens}}

        tally = run_llm_job(todo, ask, to_record, output, lambda s: s.pair_id, client,
                            max_failures=cfg.max_failures, progress=progress, task="instruct gen", unit="pair")
    result.succeeded, result.failed, result.failure_reasons = tally.succeeded, tally.failed, tally.failure_reasons
    result.usage, result.elapsed_s = tally.usage, tally.elapsed_s
    return result
