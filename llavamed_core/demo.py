"""``llavamed demo``: the whole pipeline on a CPU in minutes, with nothing downloaded.

Steps, each through the same core functions as the real commands:

1. ``data synth``: a synthetic, medical-looking VQA set (lesion yes/no, modality, location);
2. ``weights init --preset tiny``: a randomly initialised ~0.2M-parameter LLaVA;
3. ``eval vqa`` on the test split (before training);
4. ``train align`` (projector only, on the captions) then ``train instruct`` (projector and
   language model, on the questions);
5. ``eval vqa`` again (after training), and one ``chat`` answer about a test image.

Everything stays in ``out``: ``data/``, ``checkpoints/{base,align,instruct}``,
``eval/{before,after}/`` (answers and results.json) and ``demo.json`` (the summary), so every
other command can be tried on them.

The demo's hyperparameters are not the paper's: a tiny model learns at a high learning rate
(align 1e-3, instruct 2e-3, instead of 2e-3 and 2e-5), batch 32 instead of 128, 12 instruct epochs
instead of 3, batches not grouped by length; and the synthetic lesions are made large and strong
(radius 5–7 px of 32, amplitude 3) so that the frozen, random vision tower of the tiny model shows
them. The paper's recipes are the ``train`` commands' defaults (``llavamed_core.train.stages``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import atomic_write_json
from .progress import ProgressCallback, ProgressEvent, emit

# The demo's stages and their share of the wall time (measured on 2 CPU cores), so that the
# overall row's ETA follows time, not a count of stages. --quick trains 6 steps per stage.
STAGE_WEIGHTS = {"synthetic data": 3, "tiny model": 1, "evaluate before training": 5, "train align": 6,
                 "train instruct": 90, "evaluate after training": 5, "chat": 2}
_QUICK_WEIGHTS = {**STAGE_WEIGHTS, "train align": 8, "train instruct": 8}
# The sub-task whose progress stands for its stage's (the others, e.g. tokenize, are short).
_MAIN_TASKS = ("synth", "answers", "train")
LOG_FILE = "demo.log"
README_FILE = "README.txt"


@contextlib.contextmanager
def library_output_to(fh: Any) -> Iterator[None]:
    """Send what libraries print and warn (DeepSpeed's WARNING lines on stdout, transformers and
    torch warnings) to ``fh`` instead of the terminal, for the duration of the block."""
    import sys
    import warnings

    handler = logging.StreamHandler(fh)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    names = ("py.warnings", "transformers", "DeepSpeed", "torch", "accelerate", "huggingface_hub")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    for n in names:
        logging.getLogger(n).handlers = [handler]
        logging.getLogger(n).propagate = False
    logging.captureWarnings(True)
    old_showwarning = warnings.showwarning
    try:
        with contextlib.redirect_stdout(fh), warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        warnings.showwarning = old_showwarning
        for n, (handlers, propagate) in saved.items():
            logging.getLogger(n).handlers = handlers
            logging.getLogger(n).propagate = propagate
        handler.flush()
        sys.stdout.flush()

__all__ = ["DemoConfig", "DemoResult", "run_demo", "DEMO_METRICS"]

DEMO_METRICS = {"paper_closed_acc": "closed accuracy (paper)",
                "paper_open_recall": "open recall (paper)",
                "strict_closed_acc": "closed accuracy (strict)"}
"""The metrics the demo's before/after table shows, with their labels."""

_OWNED = ("data", "checkpoints", "eval", "demo.json")


@dataclass
class DemoConfig:
    """Options of :func:`run_demo`.

    Attributes:
        out: output directory.
        quick: a smaller, faster run (fewer images and steps) that shows the pipeline works but
            does not train long enough to learn the task (used by tests).
        seed: seed of the data, the weights and the training order.
        overwrite: replace the demo's outputs in an existing ``out``.
        n_train: training images (each gives 2–3 questions).
        n_test: test images.
        lesion_amplitude: lesion strength of the synthetic images (see ``SynthConfig``); at the
            synthetic set's default (1.0) the tiny model, whose vision tower stays frozen and
            random as the paper's stages keep it, stays at chance on the yes/no question.
        lesion_radius: lesion radius range in pixels.
        align_epochs: epochs of ``train align``.
        align_lr: learning rate of ``train align``.
        instruct_epochs: epochs of ``train instruct``.
        instruct_lr: learning rate of ``train instruct``.
        batch: global batch of both stages.
        max_steps: cap on the optimizer steps of each stage (``None``: the epochs decide).
        eval_batch: questions per forward pass in the evaluations.
        threads: torch CPU threads during the demo (tiny matrices: one thread avoids
            synchronisation costs, and keeps a shared machine responsive); ``None`` leaves torch's.
        group_by_length: batch samples of similar length together. Off here: the synthetic
            questions' lengths follow their type, so grouped batches hold one question type each
            and the tiny model learns the yes/no question far slower (measured: 77 % vs 96 %
            strict closed accuracy after the same 630 steps on 800 images).
    """

    out: Path
    quick: bool = False
    seed: int = 0
    overwrite: bool = False
    n_train: int = 2000
    n_test: int = 100
    lesion_amplitude: float = 3.0
    lesion_radius: tuple[float, float] = (5.0, 7.0)
    align_epochs: float = 1.0
    align_lr: float = 1e-3
    instruct_epochs: float = 12.0
    instruct_lr: float = 2e-3
    batch: int = 32
    max_steps: int | None = None
    eval_batch: int = 32
    threads: int | None = 1
    group_by_length: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.quick:
            self.n_train, self.n_test = min(self.n_train, 48), min(self.n_test, 16)
            self.max_steps = self.max_steps or 6


@dataclass
class DemoResult:
    """What the demo did.

    Attributes:
        out: the output directory.
        before: metrics (fractions) of the untrained model.
        after: metrics after ``train align`` + ``train instruct``.
        sample: one chat exchange: image, question, answer, ground truth.
        seconds: wall time per step and in all.
        paths: the data, checkpoints and results it left.
        train: the two training results (steps, final loss, learning rate, ...).
        config: the demo's settings.
    """

    out: Path
    before: dict[str, float | None]
    after: dict[str, float | None]
    sample: dict[str, str]
    seconds: dict[str, float]
    paths: dict[str, str]
    train: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"out": str(self.out), "before": self.before, "after": self.after, "sample": self.sample,
                "seconds": self.seconds, "paths": self.paths, "train": self.train, "config": self.config}


def _prepare_out(cfg: DemoConfig) -> None:
    out = cfg.out
    if out.exists() and any(out.iterdir()):
        present = [n for n in _OWNED if (out / n).exists()]
        others = [p.name for p in out.iterdir() if p.name not in _OWNED]
        if not cfg.overwrite:
            raise ConfigError(f"--out {out}: exists and is not empty",
                              "choose another --out, or pass --overwrite to replace a previous demo's outputs")
        if others and not present:
            raise ConfigError(f"--out {out}: holds files that are not a demo's ({', '.join(sorted(others)[:3])})",
                              "choose another --out")
        for name in present:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _metrics(results: dict[str, Any]) -> dict[str, float | None]:
    return {k: results["metrics"].get(k) for k in DEMO_METRICS}


def run_demo(cfg: DemoConfig, progress: ProgressCallback | None = None) -> DemoResult:
    """Run the demo pipeline (synthetic data → tiny model → eval → align → instruct → eval → chat).

    Args:
        cfg: the options.
        progress: receives ``demo`` events (step i of 7, with the step's name) and the events
            of each step (``synth``, ``answers``, ``train``, ...).

    Returns:
        The :class:`DemoResult` (also written to ``out/demo.json``).

    Raises:
        ConfigError: ``out`` is not empty (without ``overwrite``).
    """
    import torch

    from .data.synth import SynthConfig, make_synthetic_vqa
    from .eval.answers import VQAEvalConfig, evaluate_vqa, load_questions
    from .infer import Engine, GenerationParams
    from .infer.session import ChatSession
    from .model import build_from_preset, save_checkpoint
    from .train import TrainConfig, train

    _prepare_out(cfg)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = cfg.out
    data, ckpts, evals = out / "data", out / "checkpoints", out / "eval"
    seconds: dict[str, float] = {}
    start = time.monotonic()
    weights = _QUICK_WEIGHTS if cfg.quick else STAGE_WEIGHTS
    names = list(weights)
    total_steps = len(names)
    total_weight = sum(weights.values())
    at = {"i": 0}

    def overall(fraction: float) -> None:
        i = at["i"]
        done = sum(weights[n] for n in names[:i]) + weights[names[i]] * min(1.0, fraction)
        emit(progress, "demo", round(100 * done / total_weight, 1), 100, "%", step=names[i])

    def row(i: int) -> str:
        return f"{i + 1}/{total_steps} {names[i]}"

    def stage_progress(ev: ProgressEvent) -> None:
        # One row per stage: every event of a stage (tokenize, train, …) updates that stage's row.
        if progress is None:
            return
        progress(ProgressEvent(row(at["i"]), ev.done, ev.total, ev.unit, {"phase": ev.task, **ev.info}))
        if ev.task in _MAIN_TASKS and ev.total:
            overall(ev.done / ev.total)

    def step(i: int, name: str) -> float:
        if i > 0:  # the previous stage is over
            emit(progress, row(i - 1), 1, 1, "stage", finished=True)
        at["i"] = i
        overall(0.0)
        return time.monotonic()

    log = open(out / LOG_FILE, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    try:
        with library_output_to(log):
            t = step(0, "synthetic data")
            synth = make_synthetic_vqa(SynthConfig(out=data, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed,
                                                   lesion_amplitude=cfg.lesion_amplitude,
                                                   lesion_radius=cfg.lesion_radius), stage_progress)
            seconds["data"] = time.monotonic() - t

            t = step(1, "tiny model")
            model, processor = build_from_preset("tiny", seed=cfg.seed)
            save_checkpoint(model, processor, ckpts / "base")
            del model
            seconds["model"] = time.monotonic() - t

            def evaluate(ckpt: Path, name: str) -> dict[str, Any]:
                res = evaluate_vqa(VQAEvalConfig(dataset=synth.test, out=evals / name, model=ckpt,
                                                 batch_size=cfg.eval_batch, max_new_tokens=16,
                                                 dataset_name="synthetic"), stage_progress)
                return res.results

            t = step(2, "evaluate before training")
            before = evaluate(ckpts / "base", "before")
            seconds["eval_before"] = time.monotonic() - t

            common = dict(images=data / "images", global_batch=cfg.batch, per_device_batch=cfg.batch,
                          max_steps=cfg.max_steps, seed=cfg.seed, device="cpu", overwrite=True,
                          run_dir=ckpts / ".runs", save_steps=10**9,
                          group_by_length=cfg.group_by_length)
            t = step(3, "train align")
            align = train(TrainConfig(stage="align", model=ckpts / "base", data=synth.align, out=ckpts / "align",
                                      epochs=cfg.align_epochs, learning_rate=cfg.align_lr, **common), stage_progress)
            seconds["train_align"] = time.monotonic() - t

            t = step(4, "train instruct")
            instruct = train(TrainConfig(stage="instruct", model=ckpts / "align", data=synth.train,
                                         out=ckpts / "instruct", epochs=cfg.instruct_epochs,
                                         learning_rate=cfg.instruct_lr, **common), stage_progress)
            seconds["train_instruct"] = time.monotonic() - t

            t = step(5, "evaluate after training")
            after = evaluate(ckpts / "instruct", "after")
            seconds["eval_after"] = time.monotonic() - t

            t = step(6, "chat")
            _kind, questions = load_questions(synth.test)
            q = next((q for q in questions if q.conversation is not None
                      and q.conversation.extra.get("question_type") == "presence"
                      and q.conversation.answer().strip().lower() == "yes"), questions[0])
            session = ChatSession(Engine.load(ckpts / "instruct"), GenerationParams(max_new_tokens=16))
            session.attach_image(data / "images" / q.image)
            answer = session.answer(q.text).text
            sample = {"image": str(data / "images" / q.image), "question": q.text, "answer": answer,
                      "truth": q.conversation.answer() if q.conversation else ""}
            seconds["chat"] = time.monotonic() - t
    finally:
        log.close()
        torch.set_num_threads(threads)
    seconds["total"] = time.monotonic() - start
    emit(progress, row(total_steps - 1), 1, 1, "stage", finished=True)
    emit(progress, "demo", 100, 100, "%", finished=True, step="done")
    shutil.rmtree(ckpts / ".runs", ignore_errors=True)
    result = DemoResult(
        out=out, before=_metrics(before), after=_metrics(after), sample=sample,
        seconds={k: round(v, 1) for k, v in seconds.items()},
        paths={"data": str(data), "train": str(synth.train), "test": str(synth.test),
               "images": str(data / "images"), "base": str(ckpts / "base"), "align": str(ckpts / "align"),
               "instruct": str(ckpts / "instruct"), "eval_before": str(evals / "before" / "results.json"),
               "eval_after": str(evals / "after" / "results.json")},
        train={"align": _train_summary(align), "instruct": _train_summary(instruct)},
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()})
    atomic_write_json(out / "demo.json", result.to_dict())
    (out / README_FILE).write_text(readme_text(result), encoding="utf-8")
    return result


def readme_text(result: DemoResult) -> str:
    """The demo folder's README.txt: what each file is and what to run next."""
    p, s = result.paths, result.sample
    image = Path(s["image"]).relative_to(result.out) if Path(s["image"]).is_relative_to(result.out) else s["image"]
    return f"""\
What `llavamed demo` made here
==============================

data/                   synthetic VQA set: align.json (captions), train.json and test.json
                        (questions with answer_type), images/ (the PNG images)
checkpoints/base/       the untrained tiny model (random weights)
checkpoints/align/      after `train align` (the projector learnt)
checkpoints/instruct/   after `train instruct` (the final model)
eval/before/, eval/after/
                        answers.jsonl and results.json of the test set before and after training
demo.json               the figures, timings and settings of this run
{LOG_FILE:<24}warnings and messages of the libraries (DeepSpeed, transformers) during the run
llavamed.toml           project settings: in this folder, commands need no --model

Try next (in this folder):

  llavamed chat {image}
  llavamed eval vqa --dataset data/test.json --out eval/again
  llavamed serve

or from anywhere:

  llavamed chat {s["image"]} --model {p["instruct"]}

The demo's training settings (lr 1e-3 align, 2e-3 instruct, batch 32) suit this tiny model; the
paper's recipes are the `llavamed train` defaults.
"""


def _train_summary(res: Any) -> dict[str, Any]:
    return {"steps": res.steps, "epochs": round(res.epochs, 2), "final_loss": res.final_loss,
            "learning_rate": res.learning_rate, "global_batch": res.global_batch,
            "seconds": round(res.train_runtime_s, 1)}
