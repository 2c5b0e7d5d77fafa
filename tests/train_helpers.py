"""Helpers shared by the training tests: tiny data made with PIL, weight snapshots, bad records."""

from __future__ import annotations

import json
from pathlib import Path

MULTI_TURN = {
    "id": "multi-1",
    "image": "a.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat is the modality of this image?"},
        {"from": "gpt", "value": "A chest x-ray."},
        {"from": "human", "value": "Is there a lesion?"},
        {"from": "gpt", "value": "Yes, in the upper left."},
        {"from": "human", "value": "How many lesions are there?"},
        {"from": "gpt", "value": "one"},
    ],
    "domain": {"chest_xray": True, "ct_scan": False},
    "question_type": "modality",
}


def make_images(folder: Path, names: list[str], size: int = 40) -> None:
    """Write small RGB PNGs (different colours) named ``names`` into ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (size, size - 8), ((40 * i) % 256, 90, 200 - (20 * i) % 200)).save(folder / name)


def write_records(path: Path, records: list[dict]) -> Path:
    """Write a conversation file (a JSON array)."""
    path.write_text(json.dumps(records, indent=1))
    return path


def weights(ckpt: Path) -> dict:
    """All tensors of a checkpoint directory, by their on-disk (Hub layout) key."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        if f.name != "mm_projector.safetensors":
            out.update(load_file(str(f)))
    return out


def changed_groups(before: dict, after: dict) -> dict[str, bool]:
    """For each part of the model (projector, language model, vision tower): did any tensor change?"""
    import torch

    assert before.keys() == after.keys(), set(before) ^ set(after)
    groups = {"projector": "multi_modal_projector.", "language_model": "language_model.",
              "vision_tower": "vision_tower."}
    return {g: any(not torch.equal(before[k], after[k]) for k in before if k.startswith(p))
            for g, p in groups.items()}


def load_standard(ckpt: Path):
    """Load a checkpoint the way users do: plain transformers, no llavamed code."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(ckpt), AutoProcessor.from_pretrained(ckpt)


def check_generates(ckpt: Path, image: Path) -> None:
    """The checkpoint loads with plain transformers and runs a forward pass on an image prompt."""
    import torch
    from PIL import Image

    model, processor = load_standard(ckpt)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.open(image).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
