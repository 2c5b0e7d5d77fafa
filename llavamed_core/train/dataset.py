"""Supervised dataset and collator: conversations → token ids, labels and pixel values.

Each conversation is rendered with the checkpoint's own chat template (the Jinja template saved
in the checkpoint, whose ``{% generation %}`` blocks mark the assistant's tokens), tokenized once
up front, and kept compact (one ``<image>`` id). ``__getitem__`` expands the ``<image>`` id to the
model's image-token count — exactly what the processor does — and loads and preprocesses the image
lazily with the checkpoint's image processor (pad-to-square for v1.5).

Labels: only assistant tokens are trained; the prompt, the image tokens and the padding are −100.
The original LLaVA code masked by re-tokenizing the prompt pieces and silently masked a whole
sample on a mismatch (STYLE.md); here the template itself says which characters are the
assistant's, so nothing needs guessing.

Over-long samples: the image span is never cut. With ``on_long="truncate"`` whole trailing
(question, answer) pairs are removed until the sample fits; a sample whose first exchange does not
fit is dropped. Both counts are reported.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, data_error
from ..images import image_problem
from ..progress import ProgressCallback, emit
from ..records import Conversation, image_in_folder, load_conversations

__all__ = ["DataStats", "EncodedSample", "ConversationEncoder", "SupervisedDataset", "PaddingCollator",
           "PackingCollator", "load_training_conversations", "build_dataset", "image_token_count", "IGNORE_INDEX"]

IGNORE_INDEX = -100
"""Label value the loss ignores (prompt, image and padding positions)."""


@dataclass
class DataStats:
    """What became of the records.

    Attributes:
        records: records in the file.
        samples: samples kept for training.
        truncated: samples shortened at a turn boundary to fit ``max_length``.
        dropped: samples left out because even their first exchange does not fit.
        tokens: tokens of the kept samples (image tokens included).
        trained_tokens: of those, the assistant tokens that carry a label.
        max_length: the length limit used.
        image_tokens: tokens one image expands to.
    """

    records: int = 0
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_length: int = 0
    image_tokens: int = 0


@dataclass
class EncodedSample:
    """One tokenized conversation, compact (the image is one ``<image>`` id until expanded).

    Attributes:
        record_id: the record's id (named in errors).
        image: the image path, or ``None``.
        ids: token ids, numpy int32, with one image-token id where the image goes.
        assistant: numpy uint8 mask, 1 on assistant tokens.
        length: tokens after the image expansion.
        truncated: trailing turns were removed to fit.
    """

    record_id: Any
    image: Path | None
    ids: Any
    assistant: Any
    length: int
    truncated: bool = False


def image_token_count(processor: Any) -> int:
    """How many tokens one image expands to, asked of the processor itself.

    The processor is run once on a blank image of its input size, so the count follows whatever
    the checkpoint's processor does (patch size, CLS handling, select strategy).
    """
    from PIL import Image

    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or {}
    size = crop.get("height") or (getattr(ip, "size", None) or {}).get("shortest_edge") or 32
    image_token = processor.image_token
    enc = processor(text=image_token, images=[Image.new("RGB", (int(size), int(size)))])
    image_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    return int(sum(1 for t in enc["input_ids"][0] if t == image_id))


class ConversationEncoder:
    """Turns a :class:`Conversation` into an :class:`EncodedSample` with the checkpoint's template.

    Args:
        processor: the checkpoint's ``LlavaProcessor`` (tokenizer + chat template).
        max_length: longest sample in tokens, image tokens included.
        on_long: ``"truncate"`` or ``"drop"``.
        images: folder of the images.

    Raises:
        ConfigError: the checkpoint's template does not mark assistant turns.
    """

    def __init__(self, processor: Any, max_length: int, on_long: str = "truncate",
                 images: Path | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = processor.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not self.template:
            raise ConfigError("the checkpoint has no chat template",
                              "rebuild it with `llavamed weights init`, which saves one")
        if "generation" not in self.template:
            raise ConfigError("the checkpoint's chat template has no {% generation %} block, so the "
                              "assistant's tokens cannot be found",
                              "wrap the assistant's content in {% generation %}…{% endgeneration %}")
        self.max_length = max_length
        self.on_long = on_long
        self.images = images
        self.image_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.n_image = image_token_count(processor)

    def render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids and the assistant mask of ``messages`` (compact image)."""
        enc = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), list(enc["assistant_masks"])

    def expanded_length(self, ids: list[int]) -> int:
        """Length after each image id becomes :attr:`n_image` tokens."""
        n = sum(1 for t in ids if t == self.image_id)
        return len(ids) + n * (self.n_image - 1)

    def encode(self, conv: Conversation, path: Path | str = "") -> EncodedSample | None:
        """Encode one conversation; ``None`` when it must be dropped (too long).

        Raises:
            DataError: the conversation ends with a question (nothing to train on).
        """
        import numpy as np

        if conv.turns[-1].role != "gpt":
            raise data_error(path, conv.id, conv.key,
                             "the conversation ends with a human turn, so there is no answer to train on",
                             "remove the last question or add its answer")
        messages = conv.to_messages()
        ids, mask = self.render(messages)
        truncated = False
        if self.expanded_length(ids) > self.max_length:
            if self.on_long == "drop":
                return None
            pairs = len(messages) // 2
            fitted = None
            for k in range(pairs - 1, 0, -1):
                ids_k, mask_k = self.render(messages[: 2 * k])
                if self.expanded_length(ids_k) <= self.max_length:
                    fitted = (ids_k, mask_k)
                    break
            if fitted is None:
                return None
            ids, mask = fitted
            truncated = True
        image = (self.images / conv.image) if (self.images is not None and conv.image) else None
        return EncodedSample(conv.id, image, np.asarray(ids, dtype=np.int32),
                             np.asarray(mask, dtype=np.uint8), self.expanded_length(ids), truncated)


def load_training_conversations(data: Path, images: Path, check_images: bool = True,
                                progress: ProgressCallback | None = None) -> list[Conversation]:
    """Read and check every record before training starts.

    Schema problems (no ``<image>``, two ``<image>``, an empty conversation, a role that is neither
    human nor gpt, …) come from :func:`llavamed_core.records.load_conversations`; then every image
    must exist and open. Extra keys (``domain``, ``answer_type``, …) pass.

    Raises:
        DataError: the first bad record, by id.
    """
    data, images = Path(data), Path(images)
    if not images.is_dir():
        raise DataError(f"--images {images}: folder not found", "point --images at the folder of the records' images")
    convs = load_conversations(data, require_image=True, strict=True)
    if not convs:
        raise DataError(f"{data}: no records", "check that this is the conversation file you meant")
    for conv in convs:  # an absolute path or '..' would read outside --images
        image_in_folder(images, conv.image or "", data, conv.id)
    if check_images:
        workers = min(16, (os.cpu_count() or 2) * 2)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            paths = [images / c.image for c in convs]
            check = functools.partial(image_problem, header_only=True)  # pixels decode when batched
            for i, (conv, problem) in enumerate(zip(convs, pool.map(check, paths))):
                if problem is not None:
                    raise data_error(data, conv.id, "image", f"{images / conv.image}: {problem[1]}",
                                     "fix or remove the record, or point --images at the right folder")
                if i % 5000 == 0:
                    emit(progress, "check images", i, len(convs), unit="image")
        emit(progress, "check images", len(convs), len(convs), unit="image", finished=True)
    return convs


def build_dataset(convs: list[Conversation], processor: Any, images: Path, max_length: int,
                  on_long: str = "truncate", path: Path | str = "",
                  progress: ProgressCallback | None = None) -> tuple["SupervisedDataset", DataStats]:
    """Tokenize every conversation and build the training dataset.

    Args:
        convs: checked conversations.
        processor: the checkpoint's processor.
        images: the images folder.
        max_length: token limit, image tokens included.
        on_long: ``"truncate"`` or ``"drop"`` (see the module docstring).
        path: the data file, named in errors.
        progress: progress callback (task ``tokenize``).

    Returns:
        ``(dataset, stats)``.

    Raises:
        DataError: a sample with nothing to train on; or none left after dropping.
    """
    encoder = ConversationEncoder(processor, max_length, on_long, Path(images))
    stats = DataStats(records=len(convs), max_length=max_length, image_tokens=encoder.n_image)
    samples: list[EncodedSample] = []
    for i, conv in enumerate(convs):
        sample = encoder.encode(conv, path)
        if sample is None:
            stats.dropped += 1
        else:
            stats.truncated += int(sample.truncated)
            stats.tokens += sample.length
            stats.trained_tokens += int(sample.assistant.sum())
            samples.append(sample)
        if i % 2000 == 0:
            emit(progress, "tokenize", i, len(convs), unit="record")
    emit(progress, "tokenize", len(convs), len(convs), unit="record", finished=True)
    stats.samples = len(samples)
    if not samples:
        raise DataError(f"{path}: every one of the {len(convs)} records is longer than {max_length} tokens",
                        "raise --max-length (the image alone takes "
                        f"{encoder.n_image} tokens)")
    if stats.trained_tokens == 0:
        raise DataError(f"{path}: no assistant tokens to train on",
                        "check that the records have gpt turns with text")
    return SupervisedDataset(samples, processor, encoder.image_id, encoder.n_image, path), stats


class SupervisedDataset:
    """A map-style dataset of :class:`EncodedSample` that loads images lazily.

    Items are ``{"input_ids", "labels", "pixel_values"}`` tensors (no padding: the collator pads).
    :attr:`lengths` are the expanded lengths, for length-grouped batching without touching the
    images.
    """

    def __init__(self, samples: list[EncodedSample], processor: Any, image_id: int, n_image: int,
                 source: Path | str = ""):
        self.samples = samples
        self.source = source
        self.image_processor = processor.image_processor
        self.image_id = int(image_id)
        self.n_image = int(n_image)
        self.lengths = [s.length for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def expand(self, sample: EncodedSample) -> tuple[Any, Any]:
        """``(input_ids, labels)`` as int64 tensors with the image id expanded."""
        import numpy as np
        import torch

        ids, mask = sample.ids, sample.assistant
        where = np.flatnonzero(ids == self.image_id)
        if len(where):
            k = int(where[0])
            ids = np.concatenate([ids[:k], np.full(self.n_image, self.image_id, dtype=ids.dtype), ids[k + 1:]])
            mask = np.concatenate([mask[:k], np.zeros(self.n_image, dtype=mask.dtype), mask[k + 1:]])
        labels = np.where((mask == 1) & (ids != self.image_id), ids, IGNORE_INDEX)
        return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))

    def load_pixels(self, sample: EncodedSample) -> Any:
        """The sample's image through the checkpoint's image processor, ``[3, H, W]`` float."""
        from ..images import load_record_image

        # the project's one loader: DICOM/NIfTI windowed as chat, serve and eval show them
        rgb = load_record_image(sample.image, self.source, sample.record_id)
        return self.image_processor(images=[rgb], return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.samples[i]
        input_ids, labels = self.expand(sample)
        item = {"input_ids": input_ids, "labels": labels}
        if sample.image is not None:
            item["pixel_values"] = self.load_pixels(sample)
        return item


class PaddingCollator:
    """Pads a batch to its longest sample (right side): ``input_ids`` with the pad id,
    ``labels`` with −100, ``attention_mask`` 0 on padding; stacks ``pixel_values``.

    Args:
        pad_token_id: the tokenizer's pad id.
        pad_to_multiple_of: round the padded length up (8 helps tensor cores on GPU).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        n = len(features)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, longest), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = f["input_ids"]
            labels[i, :k] = f["labels"]
            attention[i, :k] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
        pixels = [f["pixel_values"] for f in features if "pixel_values" in f]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        return batch


class PackingCollator:
    """Packs a batch's samples end to end into rows: no attention across samples, little padding.

    By default (``row_tokens=None``) the whole batch becomes ONE row with no padding at all, in the
    samples' order, as transformers' ``DataCollatorWithFlattening`` does: for attention kernels
    that keep the samples apart without a dense mask (the packed SDPA of
    :mod:`~llavamed_core.train.packed_attention`, flash-attention's varlen path), whose cost is
    ``sum(len_i²)`` whatever the row's width. With ``row_tokens`` set, samples are placed, longest
    first, into the first row with room (first-fit decreasing) in rows of at most
    ``max(row_tokens, longest sample)`` tokens (``0``: the longest sample): for kernels that attend
    through a dense block-diagonal mask (``eager``), whose cost grows with the row's width squared.

    In a row the samples' ``input_ids`` and ``labels`` follow each other; ``position_ids`` restart
    at 0 for each sample and there is no ``attention_mask``: the attention learns each sample's span
    from the position ids. Rows shorter than the widest end with a padding segment of their own
    (labels −100). The first label of every sample is −100, so no token is trained to predict
    across a boundary. ``pixel_values`` are stacked in the order the samples appear (row by row):
    Llava scatters image features into the ``<image>`` positions in that order. ``use_cache`` is off
    (with a KV cache the model would not look for packed sequences). ``num_real_tokens`` carries the
    count of non-padding tokens for the trainer's accounting (taken out before the model sees the
    batch).

    Args:
        pad_token_id: the tokenizer's pad id (for the padding segments).
        row_tokens: a row's capacity in tokens (``None``: the whole batch in one row; ``0``: the
            batch's longest sample).
        pad_to_multiple_of: round the row length up (8 helps tensor cores on GPU).
    """

    def __init__(self, pad_token_id: int, row_tokens: int | None = None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.row_tokens = row_tokens
        self.pad_to_multiple_of = pad_to_multiple_of

    def layout(self, lengths: list[int]) -> list[list[int]]:
        """The sample indices of each row, in their order within the row."""
        if self.row_tokens is None:
            return [list(range(len(lengths)))]
        capacity = max(self.row_tokens, max(lengths))
        rows: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
            for r, free in enumerate(room):
                if lengths[i] <= free:
                    rows[r].append(i)
                    room[r] -= lengths[i]
                    break
            else:
                rows.append([i])
                room.append(capacity - lengths[i])
        return rows

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        rows = self.layout(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        pixels = []
        for r, row in enumerate(rows):
            k = 0
            for i in row:
                f, n = features[i], lengths[i]
                input_ids[r, k:k + n] = f["input_ids"]
                labels[r, k:k + n] = f["labels"]
                labels[r, k] = IGNORE_INDEX
                positions[r, k:k + n] = torch.arange(n)
                if "pixel_values" in f:
                    pixels.append(f["pixel_values"])
                k += n
            positions[r, k:] = torch.arange(width - k)  # the padding is a segment of its own
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions, "use_cache": False,
                 "num_real_tokens": torch.tensor(sum(lengths))}
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        return batch
