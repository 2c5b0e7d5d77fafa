"""Answer generation for ``llavamed eval vqa``: batched, resumable, split over processes, scored.

- Questions come from a prepared VQA test file (our conversation format, ``llavamed data
  prepare``) or from the chat benchmark's qa50 JSONL (``docs/formats.md``); ids must be unique.
- Answers are appended one line each to ``OUT/answers.jsonl`` (``docs/formats.md`` answer format,
  ``question_id`` = the record's id) with :class:`~llavamed_core.io.JsonlAppender`, so a kill loses
  at most the batch in flight and a rerun answers only the ids still missing. When every
  question is answered the file is rewritten (atomically) in the question file's order, as the
  original scripts wrote it.
- ``nproc`` > 1 splits the missing questions over that many worker processes (one GPU each with
  ``gpus``); each appends to ``answers.part<k>.jsonl``; the parts are merged at the end (and at
  the start of a rerun after a kill).
- With a ``server`` the questions go to an OpenAI-compatible endpoint, ``concurrency`` in flight.
- ``OUT/run.json`` (written atomically before the first answer, see :func:`answer_provenance`)
  records the model's fingerprint, the question file's hash, the prompt suffix, the generation
  settings and the llavamed version; its ``run_id`` is stored in every answer
  (``metadata.run_id``). A rerun resumes only with the same ones, else stops naming what differs
  (``overwrite`` starts over); batch size and process count do not matter. A model that fails to
  load leaves no ``OUT`` behind.
- VQA sets are then scored with :func:`~llavamed_core.eval.vqa_metrics.score_vqa` and
  ``OUT/results.json`` records the scores with everything that decided the answers (model,
  prompt suffix for closed questions, generation parameters) and the run header (``provenance``).

The workers run under torchrun through the one launcher (:mod:`llavamed_core.launch`): ``python -m
llavamed_core.eval.answers SPEC.json`` in each process, rank k of n answering slice k.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, LlavamedError, data_error
from ..images import ImageOptions
from ..images import load_record_image
from ..io import JsonlAppender, ResumableJsonl, atomic_write_json, iter_records, read_jsonl
from ..progress import ProgressCallback, emit
from ..records import Conversation, load_conversations, load_qa50

__all__ = ["DATASETS", "VQAEvalConfig", "Question", "AnswerRun", "resolve_dataset", "load_questions",
           "question_request", "answer_questions", "score_answer_file", "evaluate_vqa",
           "load_image", "VQAEvalResult", "ANSWERS_FILE", "RESULTS_FILE", "RUN_FILE", "answer_provenance",
           "answer_file_provenance"]

DATASETS = ("vqa-rad", "slake", "pathvqa")
"""Dataset names that resolve to ``DATA_ROOT/<name>/<split>.json`` (written by ``data prepare``)."""

ANSWERS_FILE = "answers.jsonl"
RESULTS_FILE = "results.json"
RUN_FILE = "run.json"
"""The run header beside the answers: which model, data and settings made them (see :func:`answer_provenance`)."""

# Answer length when not given: short for VQA (one word or phrase), long for the chat benchmark,
# whose reference answers are paragraphs (the original model_vqa used 1024).
_DEFAULT_MAX_NEW = {"vqa": 128, "qa50": 1024}


@dataclass
class VQAEvalConfig:
    """Options of :func:`evaluate_vqa` (the flags of ``llavamed eval vqa``).

    Attributes:
        dataset: question file: a prepared VQA test file (conversation format) or qa50 JSONL.
        out: output directory (``answers.jsonl``, ``results.json``).
        images: folder the records' image paths are relative to (default: ``images/`` beside
            the question file, else its folder).
        model: checkpoint (or LoRA adapter) directory, for in-process generation.
        base: base checkpoint of a LoRA adapter (default: from its adapter_config.json).
        server: URL of an OpenAI-compatible server to ask instead of loading ``model``.
        api_key: API key for ``server``.
        model_name: model name to request from ``server`` (default: its first listed model).
        concurrency: requests in flight at once with ``server``.
        batch_size: requests per forward pass in-process.
        nproc: worker processes to split the questions over (in-process generation only).
        gpus: number of GPUs; one worker per GPU (sets ``nproc``).
        limit: answer only the first ``limit`` questions of the file (smoke runs).
        closed_suffix: text appended to CLOSED questions' prompts (e.g. " Answer yes or no.");
            recorded in results.json. The original evaluation used none.
        max_new_tokens: answer length cap (default 128 for VQA sets, 1024 for qa50).
        temperature: 0 = greedy (the paper's evaluation).
        top_p: nucleus sampling threshold.
        seed: sampling seed (each question gets ``seed + its position``).
        device: torch device (default CUDA when present).
        dtype: torch dtype name (default bf16 on CUDA, fp32 on CPU).
        dataset_name: name shown in tables and results.json (default: the file's name).
        shard: for worker processes: ``(k, n)`` = answer the k-th of n slices of the missing ids.
        overwrite: delete the answers (and run.json, results.json) already in ``out`` and start
            over, instead of resuming; needed when the model or a setting changed.
        run_id: for worker processes: the run's id, written into each answer (set by the parent).
    """

    dataset: Path
    out: Path
    images: Path | None = None
    model: Path | None = None
    base: Path | None = None
    server: str | None = None
    api_key: str | None = field(default=None, repr=False)
    model_name: str | None = None
    concurrency: int = 8
    batch_size: int = 16
    nproc: int = 1
    gpus: int = 0
    limit: int | None = None
    closed_suffix: str = ""
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None
    dataset_name: str = ""
    shard: tuple[int, int] | None = None
    overwrite: bool = False
    run_id: str = ""
    image_options: ImageOptions | None = None
    """How DICOM/NIfTI images are rendered (window, frame, slice, plane, volume)."""


@dataclass
class Question:
    """One question to answer.

    Attributes:
        id: record id (``question_id`` of the answer).
        image: image path relative to the images folder ("" for text-only questions).
        text: question text without ``<image>``.
        image_first: the image goes before the text (as in the record).
        answer_type: ``OPEN``/``CLOSED`` for VQA records, else ``None``.
        conversation: the ground-truth record (VQA sets), else ``None``.
    """

    id: Any
    image: str
    text: str
    image_first: bool
    answer_type: str | None = None
    conversation: Conversation | None = None


@dataclass
class AnswerRun:
    """What :func:`answer_questions` did.

    Attributes:
        answers: the answer file.
        kind: ``vqa`` (has ground truth) or ``qa50``.
        total: questions in scope (after ``limit``).
        answered: answers written by this run.
        resumed: answers that were already on disk.
        seconds: generation time of this run.
        model_id: the model name written in the answers.
        processes: worker processes used.
        questions: the questions in scope.
        run_id: the id of the model and settings that made the answers (``run.json``).
    """

    answers: Path
    kind: str
    total: int
    answered: int
    resumed: int
    seconds: float
    model_id: str
    processes: int = 1
    questions: list[Question] = field(default_factory=list, repr=False)
    run_id: str = ""

    @property
    def questions_per_second(self) -> float:
        """Answers written per second of generation."""
        return self.answered / self.seconds if self.seconds > 0 else 0.0


def resolve_dataset(name_or_path: str, data_root: str | os.PathLike = "data", split: str = "test") -> Path:
    """The question file behind ``--dataset``: a known name under ``data_root``, or a path.

    Raises:
        DataError: neither an existing file nor a prepared dataset.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if name_or_path in DATASETS:
        candidate = Path(data_root) / name_or_path / f"{split}.json"
        if candidate.is_file():
            return candidate
        raise DataError(f"{candidate}: {name_or_path} is not prepared under {data_root}",
                        f"run `llavamed data prepare {name_or_path} --src RAW --out "
                        f"{Path(data_root) / name_or_path}`, or pass --data-root")
    import difflib

    close = difflib.get_close_matches(name_or_path, DATASETS, n=1)
    raise DataError(f"{name_or_path}: no such question file",
                    (f"did you mean '{close[0]}'? " if close else "")
                    + f"give a file, or one of {', '.join(DATASETS)} (prepared with `llavamed data prepare`)")


def _kind_of(path: Path) -> str:
    for obj in iter_records(path):
        return "qa50" if "question_id" in obj and "text" in obj and "conversations" not in obj \
            and "conversatons" not in obj else "vqa"
    raise DataError(f"{path}: the question file is empty")


def load_questions(path: str | os.PathLike) -> tuple[str, list[Question]]:
    """Read a question file: ``("vqa", questions)`` or ``("qa50", questions)``.

    Raises:
        DataError: a malformed record or a duplicate id (file, record id, field named).
    """
    path = Path(path)
    kind = _kind_of(path)
    out = []
    if kind == "qa50":
        for q in load_qa50(path):
            text = q.text
            first = text.lstrip().startswith("<image>")
            out.append(Question(q.question_id, q.image or "", text.replace("<image>", "").strip(),
                                first))
        return kind, out
    for conv in load_conversations(path, require_image=True, strict=False):
        if len(conv.turns) < 1:
            raise data_error(path, conv.id, conv.key, "no question turn")
        first = conv.turns[0].value.lstrip().startswith("<image>")
        out.append(Question(conv.id, conv.image or "", conv.question(), first, conv.answer_type, conv))
    return kind, out


def load_image(images: Path, q: Question, questions_path: Path | str,
               options: ImageOptions | None = None) -> Any:
    """Open and decode a question's image (RGB); DICOM and NIfTI rendered with ``options``.

    Raises:
        DataError: missing file, or one that does not decode (naming the question file, the
            question and its ``image`` field).
    """
    return load_record_image(images / q.image, questions_path, q.id, options,
                             then="answers so far are kept and a rerun resumes")


def question_prompt(q: Question, closed_suffix: str = "") -> str:
    """The question text sent to the model (with the closed-question suffix where it applies)."""
    return q.text + (closed_suffix if closed_suffix and q.answer_type == "CLOSED" else "")


def question_request(q: Question, image: Any, cfg: VQAEvalConfig, kind: str, position: int) -> Any:
    """The chat request for one question: its text and image, in the record's order."""
    from ..infer import ChatRequest, GenerationParams

    text = question_prompt(q, cfg.closed_suffix)
    if image is None:
        content: Any = text
    elif q.image_first:
        content = [{"type": "image", "image": image}, {"type": "text", "text": text}]
    else:
        content = [{"type": "text", "text": text + "\n"}, {"type": "image", "image": image}]
    params = GenerationParams(max_new_tokens=cfg.max_new_tokens or _DEFAULT_MAX_NEW[kind],
                              temperature=cfg.temperature, top_p=cfg.top_p,
                              seed=None if cfg.seed is None else cfg.seed + position)
    return ChatRequest([{"role": "user", "content": content}], params)


def _default_images(dataset: Path) -> Path:
    img = dataset.parent / "images"
    return img if img.is_dir() else dataset.parent


def _read_done(path: Path) -> dict[str, dict]:
    """Answers already in an answer file, by ``str(question_id)`` (a half-written tail ignored)."""
    return _answer_file(path).done


def _answer_file(path: Path) -> ResumableJsonl:
    """An answer file as a resumable output keyed by ``question_id``."""
    return ResumableJsonl(path, "question_id", "the answer file",
                          "this is not an answer file; choose another --out")


def _merge_parts(out: Path) -> None:
    """Append the answers of ``answers.part*.jsonl`` to ``answers.jsonl`` (once each), then delete the parts."""
    main = out / ANSWERS_FILE
    parts = sorted(out.glob("answers.part*.jsonl"))
    if not parts:
        return
    with _answer_file(main) as app:
        for part in parts:
            for obj in _read_done(part).values():
                app.write(obj)  # an id already in the main file is skipped
    for part in parts:
        part.unlink()


def _check_ids(done: dict[str, dict], questions: list[Question], answers: Path, dataset: Path) -> None:
    ids = {str(q.id) for q in questions}
    strangers = [k for k in done if k not in ids]
    if strangers:
        raise DataError(f"{answers}: holds answers for ids that are not in {dataset} "
                        f"(e.g. {strangers[0]!r}); is it another dataset's answer file?",
                        "choose another --out for this dataset")


def _open_engine(cfg: VQAEvalConfig) -> Any:
    if cfg.server:
        from ..infer.remote import RemoteEngine

        return RemoteEngine.connect(cfg.server, api_key=cfg.api_key, model_name=cfg.model_name,
                                    concurrency=cfg.concurrency)
    from ..infer import Engine

    return Engine.load(cfg.model, device=cfg.device, dtype=cfg.dtype, base=cfg.base)


def answer_provenance(cfg: VQAEvalConfig, kind: str, engine: Any = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The run header of an answer file, and readable labels of its checked values.

    ``checked`` (hashed into the ``run_id`` stored in every answer) holds what decides the answers:
    the model's fingerprint (or the server URL and model name), the dtype, the question file's
    sha256, the closed-question suffix, the generation settings (``top_p`` and ``seed`` only when
    sampling), and the llavamed version (which fixes the prompt layout). Batch size, processes,
    device, ``--limit`` and the images folder are recorded but not checked.

    Raises:
        ModelError: ``cfg.model`` is not a checkpoint folder (or an adapter without its base).
    """
    from ..infer.remote import RemoteEngine, api_base
    from .provenance import checkpoint_identity, file_sha256, llavamed_version, make_header, short

    checked: dict[str, Any] = {}
    labels: dict[str, str] = {}
    model_info: dict[str, Any]
    remote = isinstance(engine, RemoteEngine) or (engine is None and cfg.server)
    if remote:
        url = engine.base_url if engine is not None else api_base(cfg.server or "")
        name = engine.model_name if engine is not None else (cfg.model_name or "")
        checked.update(server=url, server_model=name)
        model_info = {"server": url, "name": name, "fingerprint": None}
    else:
        path = cfg.model if cfg.model is not None else getattr(engine, "path", None)
        if path is not None:
            model_info = checkpoint_identity(path, cfg.base)
            checked["model_fingerprint"] = model_info["fingerprint"]
            labels["model_fingerprint"] = f"{model_info['name']} ({short(model_info['fingerprint'])})"
        else:  # an engine built in memory (benchmarks): only its name is known
            model_info = {"name": engine.model_name, "path": None, "fingerprint": None}
            checked["model"] = engine.model_name
        if engine is not None:
            dtype = str(engine.dtype)
        else:
            from ..model.checkpoint import resolve_device, resolve_dtype

            # Where the answers are generated: the workers' device when split over processes.
            device = _worker_device(cfg) if (cfg.gpus or cfg.nproc > 1) and not cfg.server else cfg.device
            dtype = str(resolve_dtype(cfg.dtype, resolve_device(device)))
        checked["dtype"] = dtype.replace("torch.", "")
    dataset_sha = file_sha256(cfg.dataset)
    gen: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens or _DEFAULT_MAX_NEW[kind],
                           "temperature": float(cfg.temperature)}
    if cfg.temperature > 0:
        gen.update(top_p=float(cfg.top_p), seed=cfg.seed)
    checked.update(dataset_sha256=dataset_sha, closed_suffix=cfg.closed_suffix, **gen,
                   llavamed_version=llavamed_version())
    if cfg.image_options is not None and cfg.image_options != ImageOptions():
        checked["image_options"] = asdict(cfg.image_options)  # how DICOM/NIfTI images were rendered
    header = make_header(checked, {
        "model": model_info,
        "dataset": {"path": str(Path(cfg.dataset).resolve()), "name": cfg.dataset_name or Path(cfg.dataset).name,
                    "kind": kind, "sha256": dataset_sha,
                    "images": str(Path(cfg.images).resolve()) if cfg.images else None},
        "prompt": {"closed_suffix": cfg.closed_suffix,
                   "chat_template_sha256": model_info.get("chat_template_sha256"),
                   "layout": "image and text in the record's order; the suffix on CLOSED questions only"},
        "generation": {"max_new_tokens": gen["max_new_tokens"], "temperature": float(cfg.temperature),
                       "top_p": float(cfg.top_p), "seed": cfg.seed, "num_beams": 1,
                       "decoding": "sampling" if cfg.temperature > 0 else "greedy",
                       "dtype": checked.get("dtype")},
        "image_preprocessing": model_info.get("image_preprocessing"),
        "llavamed_version": checked["llavamed_version"],
        "not_checked": {"batch_size": cfg.batch_size, "processes": cfg.gpus or cfg.nproc,
                        "device": cfg.device, "limit": cfg.limit},
    })
    return header, labels


def _existing_answers(out: Path) -> dict[str, dict]:
    """Answers in ``answers.jsonl`` and in the part files of an interrupted split run."""
    done = _read_done(out / ANSWERS_FILE)
    for part in sorted(out.glob("answers.part*.jsonl")):
        for k, v in _read_done(part).items():
            done.setdefault(k, v)
    return done


def _check_resume(out: Path, header: dict[str, Any], labels: dict[str, str], done: dict[str, dict]) -> None:
    """Refuse to extend answers that another model or other settings made.

    Raises:
        ConfigError: run.json's checked settings differ from this run's (naming each difference),
            the answers carry no run.json and no matching run id, or a record's run id is foreign.
    """
    from .provenance import differences, mismatch_error, read_header

    if not done:
        return
    answers = out / ANSWERS_FILE
    hint = "pass --overwrite to delete them and start over, or choose another --out"
    old = read_header(out / RUN_FILE)
    if old is None:
        ids = {str((o.get("metadata") or {}).get("run_id")) for o in done.values()}
        if ids == {header["run_id"]}:
            return  # run.json was lost, but every answer says it was made by this very run
        raise ConfigError(f"{answers}: holds {len(done)} answer(s) but no {RUN_FILE} records which model "
                          "and settings made them, so this run cannot tell whether it may add to them", hint)
    if old["checked"] != header["checked"]:
        old_model = old.get("model") or {}
        old_labels = {"model_fingerprint": f"{old_model.get('name')} ({str(old_model.get('fingerprint'))[:12]})"} \
            if old_model.get("fingerprint") else {}
        raise mismatch_error(str(answers), len(done), out / RUN_FILE,
                             differences(old["checked"], header["checked"], old_labels, labels), hint)
    for o in done.values():
        rid = (o.get("metadata") or {}).get("run_id")
        if rid != old["run_id"]:
            raise data_error(answers, o.get("question_id"), "metadata.run_id",
                             f"{rid!r} is not this file's run ({old['run_id']} in {RUN_FILE}): the file mixes "
                             "answers of different runs", hint)


def _clear_outputs(out: Path) -> None:
    """Delete what an earlier run left in ``out`` (``--overwrite``)."""
    for p in [out / ANSWERS_FILE, out / RUN_FILE, out / RESULTS_FILE, *out.glob("answers.part*.jsonl"),
              *out.glob(".worker*.json"), *out.glob(".worker*.log")]:
        p.unlink(missing_ok=True)


def _discard_empty(out: Path, made: Path | None, header: bool) -> None:
    """Undo an output folder that a failed run left without a single answer (``made``: the
    outermost folder the run created, removed whole)."""
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for p in [out / ANSWERS_FILE, *out.glob("answers.part*.jsonl"), *out.glob(".worker*.json")]:
        if p.exists() and p.stat().st_size == 0 or p.name.startswith(".worker"):
            p.unlink(missing_ok=True)
    if header:
        (out / RUN_FILE).unlink(missing_ok=True)


def _has_answers(out: Path) -> bool:
    try:
        return bool(_existing_answers(out))
    except (OSError, LlavamedError):
        return True  # unreadable: keep it


def _answer_in_process(cfg: VQAEvalConfig, kind: str, todo: list[tuple[int, Question]], images: Path,
                       target: Path, progress: ProgressCallback | None, total: int, already: int,
                       engine: Any = None) -> str:
    """Answer ``todo`` (position, question) into ``target``; returns the model id."""
    if engine is None:
        engine = _open_engine(cfg)
        try:
            return _answer_in_process(cfg, kind, todo, images, target, progress, total, already, engine)
        finally:
            if hasattr(engine, "close"):
                engine.close()  # a RemoteEngine's connections
    chunk_size = max(cfg.batch_size * 8, cfg.concurrency * 4, 64)
    done = already
    emit(progress, "answers", done, total, "question")
    with JsonlAppender(target) as app:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            reqs, prompts = [], []
            for pos, q in chunk:
                image = load_image(images, q, cfg.dataset, cfg.image_options) if q.image else None
                reqs.append(question_request(q, image, cfg, kind, pos))
                prompts.append(question_prompt(q, cfg.closed_suffix))

            def write(i: int, res: Any, chunk=chunk, prompts=prompts) -> None:
                nonlocal done
                app.write({"question_id": chunk[i][1].id, "prompt": prompts[i], "text": res.text,
                           "answer_id": uuid.uuid4().hex, "model_id": engine.model_name,
                           "metadata": {"finish_reason": res.finish_reason,
                                        "prompt_tokens": res.prompt_tokens,
                                        "completion_tokens": res.completion_tokens,
                                        "run_id": cfg.run_id}})
                done += 1
                emit(progress, "answers", done, total, "question")

            engine.generate(reqs, batch_size=cfg.batch_size, on_result=write)
    return engine.model_name


def _worker_env(k: int, n: int, gpus: int) -> dict[str, str]:
    """Worker ``k`` of ``n``: with ``gpus`` it sees only the k-th GPU (as ``cuda:0``); otherwise it
    is a CPU process and sees no GPU at all (``--nproc`` on a GPU machine must not put every copy
    of the model on ``cuda:0``)."""
    env = dict(os.environ)
    if gpus:
        # The k-th GPU of those this process may use (CUDA_VISIBLE_DEVICES="2,3" → "2", "3").
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[k] if k < len(visible) else str(k)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        threads = max(1, (os.cpu_count() or 1) // n)
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def _worker_device(cfg: VQAEvalConfig) -> str:
    """The device of every worker: its own GPU (``cuda``, see :func:`_worker_env`) with ``--gpus``,
    else the CPU.

    Raises:
        ConfigError: ``--nproc`` with a CUDA ``--device`` (that would load every copy on one GPU).
    """
    if cfg.gpus:
        return "cuda"
    if cfg.device and not str(cfg.device).startswith("cpu"):
        raise ConfigError(f"--nproc {cfg.nproc} splits over CPU processes; --device {cfg.device} would load "
                          f"{cfg.nproc} copies of the model on one GPU",
                          f"use --gpus {cfg.nproc} for one process per GPU, or drop --device")
    return "cpu"


def _answer_with_workers(cfg: VQAEvalConfig, n: int, progress: ProgressCallback | None,
                         total: int, already: int) -> None:
    """Run ``n`` worker processes under torchrun (the one launcher, :mod:`llavamed_core.launch`):
    rank k answers the k-th of n slices of the missing ids into ``answers.part<k>.jsonl``, its
    output in ``.worker<k>.log``; then merge the part files."""
    from ..launch import LaunchSpec, free_port, launch

    out = cfg.out
    spec = out / ".worker.json"
    d = asdict(cfg)
    d.update(shard=None, nproc=1, gpus=0, device=_worker_device(cfg))  # each rank takes RANK of WORLD_SIZE
    atomic_write_json(spec, {key: (str(v) if isinstance(v, Path) else v) for key, v in d.items()})
    launcher_log = out / ".worker-launch.log"
    with open(launcher_log, "w", encoding="utf-8") as log:
        proc = launch(LaunchSpec(n, master_port=free_port()), "llavamed_core.eval.answers", [str(spec)],
                      device="cuda" if cfg.gpus else "cpu", rank_logs=str(out / ".worker{rank}.log"),
                      first_logged_rank=0, stderr=log, wait=False)
        try:
            while proc.poll() is None:
                parts = sum(sum(1 for _ in open(f, encoding="utf-8")) for f in out.glob("answers.part*.jsonl"))
                emit(progress, "answers", already + parts, total, "question")
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.terminate()  # torchrun passes it on to the workers
                proc.wait()
    if proc.returncode != 0:
        # The rank that failed first (the launcher names it), else the first that reported an error.
        found = re.search(r"process of rank (\d+) failed", launcher_log.read_text(encoding="utf-8", errors="replace"))
        ranks = [int(found.group(1))] if found else []
        reported = [k for k in range(n) if "LLAVAMED_ERROR " in _read_text(out / f".worker{k}.log")]
        k = next(iter(reported or ranks), 0)
        raise _worker_error(out / f".worker{k}.log", k, proc.returncode)
    for p in [spec, launcher_log, *(out / f".worker{k}.log" for k in range(n))]:
        p.unlink(missing_ok=True)
    _merge_parts(out)


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def _worker_error(log: Path, k: int, code: int) -> LlavamedError:
    """The error a worker reported (its last ``LLAVAMED_ERROR`` line), as a typed error."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    for line in reversed(text.splitlines()):
        if line.startswith("LLAVAMED_ERROR "):
            info = json.loads(line[len("LLAVAMED_ERROR "):])
            return LlavamedError(info["message"], info.get("hint"))
    tail = text.strip().splitlines()[-1] if text.strip() else "no output"
    return LlavamedError(f"worker {k} exited with status {code}: {tail}",
                         f"see {log}; the answers so far are kept and a rerun resumes")


def _check_options(cfg: VQAEvalConfig) -> None:
    """Refuse out-of-range options up front, naming the flag (before any model is loaded).

    Raises:
        ConfigError: the first bad option.
    """
    import math

    for flag, value, least in (("--batch-size", cfg.batch_size, 1), ("--concurrency", cfg.concurrency, 1),
                               ("--nproc", cfg.nproc, 1), ("--gpus", cfg.gpus, 0), ("--limit", cfg.limit, 1),
                               ("--max-new-tokens", cfg.max_new_tokens, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} {value}: must be at least {least}")
    if not math.isfinite(cfg.temperature) or cfg.temperature < 0:
        raise ConfigError(f"--temperature {cfg.temperature}: must be a finite number >= 0 (0 = greedy)")
    if not math.isfinite(cfg.top_p) or not 0 < cfg.top_p <= 1:
        raise ConfigError(f"--top-p {cfg.top_p}: must be in (0, 1]")
    if cfg.shard is None:
        out = Path(cfg.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: is a file, not a directory",
                              "give a directory for answers.jsonl, run.json and results.json")
        from ..io import check_out_not_overlapping

        check_out_not_overlapping(out, [("--model", cfg.model), ("--base", cfg.base),
                                        ("--dataset", cfg.dataset), ("--images", cfg.images)])


def answer_questions(cfg: VQAEvalConfig, progress: ProgressCallback | None = None,
                     engine: Any = None) -> AnswerRun:
    """Answer every question of ``cfg.dataset`` not yet in ``cfg.out/answers.jsonl``.

    Args:
        cfg: the options.
        progress: receives ``answers`` events (questions answered / total).
        engine: an already loaded engine to use (else one is loaded from ``cfg``).

    Returns:
        What was done (:class:`AnswerRun`).

    Raises:
        ConfigError: neither or both of model and server, or a bad option.
        DataError: a bad question file (duplicate ids, malformed records), an image that does
            not decode, or an answer file in ``out`` that belongs to another dataset.
    """
    if engine is None and (cfg.model is None) == (cfg.server is None):
        raise ConfigError("give exactly one of --model and --server")
    _check_options(cfg)
    if cfg.gpus and cfg.shard is None and not cfg.server:
        import torch

        if torch.cuda.device_count() < cfg.gpus:
            raise ConfigError(f"--gpus {cfg.gpus}: this machine has {torch.cuda.device_count()} CUDA GPU(s)",
                              "use --nproc N to split over CPU processes")
    kind, all_questions = load_questions(cfg.dataset)
    questions = all_questions[:cfg.limit] if cfg.limit is not None else all_questions
    images = cfg.images if cfg.images is not None else _default_images(Path(cfg.dataset))
    if cfg.images is not None and not Path(cfg.images).is_dir():
        raise DataError(f"--images {cfg.images}: not a directory", "give the folder holding the images")
    out = Path(cfg.out)
    main = out / ANSWERS_FILE
    if cfg.shard is not None:  # a worker process: answer its slice into its part file
        k, n = cfg.shard
        todo = [(i, q) for i, q in enumerate(questions) if str(q.id) not in _read_done(main)]
        part = out / f"answers.part{k}.jsonl"
        part_done = _read_done(part)
        mine = [t for t in todo[k::n] if str(t[1].id) not in part_done]
        start = time.monotonic()
        model_id = _answer_in_process(cfg, kind, mine, images, part, None, len(questions), 0, engine)
        return AnswerRun(answers=main, kind=kind, total=len(questions), answered=len(mine),
                         resumed=len(questions) - len(todo), seconds=time.monotonic() - start,
                         model_id=model_id, processes=1, questions=questions, run_id=cfg.run_id)
    done = _existing_answers(out) if out.is_dir() else {}
    if done and not cfg.overwrite:
        _check_ids(done, all_questions, main, Path(cfg.dataset))
    own_engine = engine is None
    if engine is None and cfg.server:
        engine = _open_engine(cfg)  # connects, and learns the served model's name
    try:
        header, labels = answer_provenance(cfg, kind, engine)
        if cfg.overwrite:
            done = {}
        else:
            _check_resume(out, header, labels, done)
        cfg = replace(cfg, run_id=header["run_id"])
        todo = [(i, q) for i, q in enumerate(questions) if str(q.id) not in done]
        already = len(questions) - len(todo)
        nproc = cfg.gpus or cfg.nproc
        workers = bool(todo) and nproc > 1 and not cfg.server and engine is None
        if todo and not workers and engine is None:
            engine = _open_engine(cfg)  # before --out is made: a model that fails to load leaves none
        created = not out.exists()
        top = out  # the outermost folder this run makes (--out a/b/c with no a: a)
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        wrote_header = False
        try:
            out.mkdir(parents=True, exist_ok=True)
            if cfg.overwrite:
                _clear_outputs(out)
            if not done or not (out / RUN_FILE).exists():
                atomic_write_json(out / RUN_FILE, header)  # before the first answer
                wrote_header = True
            _merge_parts(out)
            start = time.monotonic()
            model_id = next(iter(done.values()), {}).get("model_id", "")
            if workers:
                nproc = min(nproc, len(todo))
                _answer_with_workers(cfg, nproc, progress, len(questions), already)
            elif todo:
                model_id = _answer_in_process(cfg, kind, todo, images, main, progress, len(questions),
                                              already, engine)
                nproc = 1
            seconds = time.monotonic() - start
        except BaseException as exc:
            if not _has_answers(out):  # nothing worth keeping: leave no empty --out behind
                log_named = isinstance(exc, LlavamedError) and ".worker" in f"{exc.message} {exc.hint}"
                _discard_empty(out, top if created and not log_named else None, wrote_header)
            raise
    finally:
        if own_engine and engine is not None and hasattr(engine, "close"):
            engine.close()  # a RemoteEngine's connections
    emit(progress, "answers", len(questions), len(questions), "question", finished=True)
    final = _read_done(main)
    if all(str(q.id) in final for q in questions):
        _rewrite_in_order(main, questions)
    model_id = model_id or next(iter(final.values()), {}).get("model_id", "")
    return AnswerRun(answers=main, kind=kind, total=len(questions), answered=len(todo), resumed=already,
                     seconds=seconds, model_id=model_id, processes=nproc, questions=questions,
                     run_id=header["run_id"])


def _rewrite_in_order(path: Path, questions: list[Question]) -> None:
    """Rewrite a complete answer file in question order (atomically), keeping any extra lines after."""
    ids = [str(q.id) for q in questions]
    answers = _answer_file(path)
    if list(answers.done)[:len(ids)] != ids or answers.duplicates:
        answers.rewrite(ids)


def score_answer_file(answers: str | os.PathLike, gt: str | os.PathLike) -> Any:
    """Score an answer file against a VQA ground-truth file (conversation format).

    Questions without an answer count as missing (and score 0).

    Args:
        answers: answer JSONL (ours or the original scripts').
        gt: ground-truth file.

    Returns:
        The :class:`~llavamed_core.eval.vqa_metrics.VQAReport`.

    Raises:
        DataError: malformed files, duplicate ids, or answers for another dataset.
    """
    from ..records import load_answers
    from .vqa_metrics import score_vqa

    convs = load_conversations(gt, require_image=False, strict=False)
    ans = load_answers(answers)
    return score_vqa(convs, ans, gt_path=str(gt), answers_path=str(answers))


@dataclass
class VQAEvalResult:
    """The outcome of :func:`evaluate_vqa`: the run, the report (VQA sets) and results.json."""

    run: AnswerRun
    report: Any
    results_path: Path
    results: dict[str, Any]


def evaluate_vqa(cfg: VQAEvalConfig, progress: ProgressCallback | None = None,
                 engine: Any = None) -> VQAEvalResult:
    """Answer the questions (resuming), score them when there is ground truth, write results.json.

    Args:
        cfg: the options.
        progress: progress callback.
        engine: an already loaded engine (else loaded from ``cfg``).

    Returns:
        :class:`VQAEvalResult`; ``report`` is ``None`` for the qa50 chat benchmark.
    """
    from .vqa_metrics import score_vqa

    run = answer_questions(cfg, progress, engine)
    report = None
    results: dict[str, Any] = {
        "dataset": cfg.dataset_name or Path(cfg.dataset).name, "questions_file": str(cfg.dataset),
        "model": str(cfg.model) if cfg.model else None, "server": cfg.server,
        "model_id": run.model_id, "kind": run.kind, "limit": cfg.limit,
        "closed_suffix": cfg.closed_suffix,
        "generation": {"max_new_tokens": cfg.max_new_tokens or _DEFAULT_MAX_NEW[run.kind],
                       "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed,
                       "batch_size": cfg.batch_size, "processes": run.processes},
        "run": {"total": run.total, "answered": run.answered, "resumed": run.resumed,
                "seconds": round(run.seconds, 3),
                "questions_per_second": round(run.questions_per_second, 3)},
        "answers_file": str(run.answers),
        "run_id": run.run_id,
        "provenance": _provenance_of(run.answers),
    }
    if run.kind == "vqa":
        from ..records import load_answers

        in_scope = {str(q.id) for q in run.questions}  # with --limit, the file may hold more
        answers = [a for a in load_answers(run.answers) if str(a.question_id) in in_scope]
        report = score_vqa([q.conversation for q in run.questions], answers,
                           gt_path=str(cfg.dataset), answers_path=str(run.answers))
        results.update(report.to_dict())
    path = atomic_write_json(Path(cfg.out) / RESULTS_FILE, results)
    return VQAEvalResult(run, report, path, results)


def _provenance_of(answers: Path) -> dict[str, Any] | None:
    """The run header beside an answer file (``None`` when there is none), without the per-file hashes."""
    from .provenance import read_header

    head = read_header(answers.parent / RUN_FILE)
    if head is None:
        return None
    head = json.loads(json.dumps(head))
    if isinstance(head.get("model"), dict):
        head["model"].pop("files", None)
    return head


def answer_file_provenance(answers: str | os.PathLike) -> dict[str, Any] | None:
    """Provenance of an existing answer file (``eval vqa --answers``): the ``run.json`` beside it
    when every answer carries its run id, else ``None`` for a file from another tool.

    Raises:
        ConfigError: the file mixes answers of several runs or models, or its run.json is not theirs.
    """
    answers = Path(answers)
    runs: dict[str, int] = {}
    models: dict[str, int] = {}
    for obj in read_jsonl(answers):
        rid = str((obj.get("metadata") or {}).get("run_id") or "")
        runs[rid] = runs.get(rid, 0) + 1
        if obj.get("model_id"):  # a record without one says nothing about its model
            models[str(obj["model_id"])] = models.get(str(obj["model_id"]), 0) + 1
    hint = "score each model's answers separately; regenerate the file with `eval vqa --overwrite`"
    if len(runs) > 1:
        shown = ", ".join(f"{k or '(none)'}: {v}" for k, v in sorted(runs.items()))
        raise ConfigError(f"{answers}: mixes answers of {len(runs)} runs (run ids {shown})", hint)
    if len(models) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(models.items()))
        raise ConfigError(f"{answers}: mixes answers of {len(models)} models (model_id {shown})", hint)
    head = _provenance_of(answers) if (answers.parent / RUN_FILE).exists() else None
    rid = next(iter(runs), "")
    if head is not None and rid and head.get("run_id") != rid:
        raise ConfigError(f"{answers}: its answers' run id {rid} is not the one in "
                          f"{answers.parent / RUN_FILE} ({head.get('run_id')})",
                          "the run.json beside it describes another run; move one of them")
    if head is None or not rid:
        return None
    return head


def _worker_main(spec_path: str) -> int:
    """Entry point of a worker process (one rank under torchrun): answer one slice, report a typed
    error as one line. The slice is the spec's ``shard``, else ``RANK`` of ``WORLD_SIZE``; with
    ``--gpus`` the process sees only its own GPU (``LOCAL_RANK``-th of those visible)."""
    from ..launch import LAUNCHED_ENV, redirect_rank_output

    redirect_rank_output()
    if os.environ.get(LAUNCHED_ENV) == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        os.environ["CUDA_VISIBLE_DEVICES"] = _worker_env(local, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1),
                                                         1)["CUDA_VISIBLE_DEVICES"]
    spec = json.loads(Path(spec_path).read_text())
    for key in ("dataset", "out", "images", "model", "base"):
        if spec.get(key) is not None:
            spec[key] = Path(spec[key])
    if spec.get("shard") is None:
        spec["shard"] = (int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1))
    spec["shard"] = tuple(spec["shard"])
    if spec.get("image_options") is not None:
        spec["image_options"] = ImageOptions(**spec["image_options"])
    cfg = VQAEvalConfig(**spec)
    try:
        answer_questions(cfg)
    except LlavamedError as exc:
        sys.stderr.write("LLAVAMED_ERROR " + json.dumps({"message": exc.message, "hint": exc.hint}) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    from ..quick_exit import freeze_objects_at_exit

    freeze_objects_at_exit()
    sys.exit(_worker_main(sys.argv[1]))
