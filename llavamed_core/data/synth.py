"""A synthetic, medical-flavoured VQA set that a tiny model can learn on a CPU in minutes.

Backgrounds are crops of the real medical sample images that scikit-image ships (a fundus
photograph, an immunohistochemistry stain, a fluorescence-microscopy cell image and a CT phantom;
they load offline). Half of the images get a synthetic lesion: a soft round spot whose sign and
colour suit the modality (bright exudate-like on fundus, dark on stains, bright on CT). Questions:

- CLOSED ``presence``: "Is there a lesion in this image?" → ``yes`` / ``no``
- OPEN ``modality``: "What is the modality of this image?" → e.g. ``fundus photograph``
- OPEN ``location`` (lesion images only): "Where is the lesion located?" → e.g. ``upper left``

Writes, under ``out``: ``images/``, ``train.json`` and ``test.json`` (one question per record, with
``answer_type``, ``question_type`` and ``modality``, as prepared VQA sets are), ``align.json``
(one "describe the image" turn and a caption per train image, the alignment format) and
``instruct.json`` (all questions about a train image as one multi-turn conversation).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import atomic_write_json, write_records_json
from ..progress import ProgressCallback, emit

__all__ = ["SynthConfig", "SynthResult", "make_synthetic_vqa", "MODALITIES", "QUESTIONS"]

MODALITIES = {
    # name: (scikit-image loader, lesion colour as RGB offsets)
    "fundus photograph": ("retina", (70, 60, 10)),
    "histology": ("immunohistochemistry", (-90, -90, -70)),
    "microscopy": ("cell", (90, -30, -40)),  # a red tint: the grey image has bright cells of its own
    "CT": ("shepp_logan_phantom", (90, 90, 90)),
}

QUESTIONS = {
    "presence": ["Is there a lesion in this image?", "Is there an abnormality in this image?"],
    "modality": ["What is the modality of this image?", "What imaging modality was used?"],
    "location": ["Where is the lesion located?", "Which quadrant contains the lesion?"],
}

QUADRANTS = ["upper left", "upper right", "lower left", "lower right"]


@dataclass
class SynthConfig:
    """Options of :func:`make_synthetic_vqa`.

    Attributes:
        out: output directory (created; existing files of the set are replaced).
        n_train: number of training images (each gives 2–3 questions).
        n_test: number of test images.
        seed: random seed; the same seed gives byte-identical files.
        size: image side in pixels (square). The tiny model sees 32 px.
        lesion_prob: share of images with a lesion.
        lesion_amplitude: strength of the lesion (a multiple of the modality's colour offset).
        lesion_radius: (min, max) lesion radius in pixels at ``size``. The defaults are large and
            strong on purpose: LLaVA's recipe keeps the vision tower frozen, and the tiny model's
            tower is random, so only a clear spot survives into its features (with amplitude 1
            and radius 2.5–4 px the tiny model stays at chance).
    """

    out: Path
    n_train: int = 600
    n_test: int = 150
    seed: int = 0
    size: int = 32
    lesion_prob: float = 0.5
    lesion_amplitude: float = 3.0
    lesion_radius: tuple[float, float] = (5.0, 7.0)


@dataclass
class SynthResult:
    """What was written: paths and record counts."""

    out: Path
    train: Path
    test: Path
    align: Path
    instruct: Path
    images: int
    train_records: int
    test_records: int
    closed_test: int
    open_test: int


def _backgrounds() -> dict[str, Any]:
    import numpy as np
    from skimage import data as skdata

    bgs = {}
    for name, (loader, _) in MODALITIES.items():
        arr = getattr(skdata, loader)()
        if arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6)).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        bgs[name] = arr[..., :3]
    return bgs


def _render(rng: Any, bg: Any, size: int, lesion: tuple[float, float, float] | None,
            colour: tuple[int, int, int], amplitude: float) -> Any:
    """Crop, resize, jitter, and optionally add a soft round spot at (x, y) with radius r."""
    import numpy as np
    from PIL import Image

    h, w = bg.shape[:2]
    # Crops of 25–60 % of the shorter side keep each modality's texture visible at small sizes.
    side = int(min(h, w) * rng.uniform(0.25, 0.6))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(bg[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.BILINEAR)
    img = np.asarray(crop).astype(np.float32)
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 6, img.shape)
    if lesion is not None:
        x, y, r = lesion
        yy, xx = np.mgrid[0:size, 0:size]
        spot = np.exp(-(((xx - x) ** 2 + (yy - y) ** 2) / (2 * (r / 1.5) ** 2)))
        img = img + spot[..., None] * np.asarray(colour, np.float32) * amplitude
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _lesion_position(rng: Any, size: int, rmin: float, rmax: float) -> tuple[str, tuple[float, float, float]]:
    q = int(rng.integers(0, 4))
    r = float(rng.uniform(rmin, rmax))
    half = size / 2
    margin = r * 0.8
    lo_x = (0 if q % 2 == 0 else half) + margin
    lo_y = (0 if q < 2 else half) + margin
    x = float(rng.uniform(lo_x, lo_x + half - 2 * margin))
    y = float(rng.uniform(lo_y, lo_y + half - 2 * margin))
    return QUADRANTS[q], (x, y, r)


def _caption(modality: str, where: str | None) -> str:
    if where is None:
        return f"A {modality} image with no visible lesion."
    return f"A {modality} image with a lesion in the {where}."


def make_synthetic_vqa(cfg: SynthConfig, progress: ProgressCallback | None = None) -> SynthResult:
    """Write the synthetic set described in the module docstring.

    Args:
        cfg: options.
        progress: optional progress callback (task ``synth``, unit ``image``).

    Returns:
        Paths and counts of what was written.

    Raises:
        ConfigError: non-positive sizes or counts.
    """
    import numpy as np

    if cfg.n_train < 1 or cfg.n_test < 1:
        raise ConfigError("--n and --n-test must be at least 1")
    if cfg.size < 8:
        raise ConfigError(f"--size {cfg.size}: images must be at least 8 px")
    out = Path(cfg.out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    bgs = _backgrounds()
    names = list(MODALITIES)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    align: list[dict] = []
    instruct: list[dict] = []
    total = cfg.n_train + cfg.n_test
    done = 0
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        for i in range(n):
            modality = names[int(rng.integers(0, len(names)))]
            has = bool(rng.random() < cfg.lesion_prob)
            where, lesion = _lesion_position(rng, cfg.size, *cfg.lesion_radius) if has else (None, None)
            img = _render(rng, bgs[modality], cfg.size, lesion, MODALITIES[modality][1], cfg.lesion_amplitude)
            fname = f"{split}_{i:05d}.png"
            tmp = img_dir / f".{fname}.tmp"
            img.save(tmp, format="PNG")
            os.replace(tmp, img_dir / fname)
            qa = [("presence", "CLOSED", "yes" if has else "no"), ("modality", "OPEN", modality)]
            if has:
                qa.append(("location", "OPEN", where))
            turns = []
            for j, (qtype, atype, answer) in enumerate(qa):
                question = QUESTIONS[qtype][int(rng.integers(0, len(QUESTIONS[qtype])))]
                image_first = bool(rng.random() < 0.5)
                human = f"<image>\n{question}" if image_first else f"{question}\n<image>"
                splits[split].append({
                    "id": f"synth-{split}-{i:05d}-{qtype}", "image": fname,
                    "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
                    "answer_type": atype, "question_type": qtype, "modality": modality,
                })
                turns += [{"from": "human", "value": human if j == 0 else question},
                          {"from": "gpt", "value": answer}]
            if split == "train":
                align.append({"id": f"synth-align-{i:05d}", "image": fname, "conversations": [
                    {"from": "human", "value": "Describe the image briefly.\n<image>"},
                    {"from": "gpt", "value": _caption(modality, where)}]})
                instruct.append({"id": f"synth-instruct-{i:05d}", "image": fname, "conversations": turns,
                                 "modality": modality})
            done += 1
            emit(progress, "synth", done, total, unit="image")
    paths = {name: out / f"{name}.json" for name in ("train", "test", "align", "instruct")}
    write_records_json(paths["train"], splits["train"])
    write_records_json(paths["test"], splits["test"])
    write_records_json(paths["align"], align)
    write_records_json(paths["instruct"], instruct)
    meta = {k: v for k, v in asdict(cfg).items() if k != "out"}  # path-free: same seed, same bytes
    atomic_write_json(out / "synth_config.json", meta)
    emit(progress, "synth", total, total, unit="image", finished=True)
    test = splits["test"]
    return SynthResult(out, paths["train"], paths["test"], paths["align"], paths["instruct"], total,
                       len(splits["train"]), len(test),
                       sum(r["answer_type"] == "CLOSED" for r in test),
                       sum(r["answer_type"] == "OPEN" for r in test))
