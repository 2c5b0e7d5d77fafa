"""Merge a PEFT LoRA adapter into its base Llava checkpoint, streaming, without PEFT at load time.

For every adapted weight ``W`` (``out × in``): ``W + s · B @ A`` with ``s = lora_alpha / r``
(``lora_alpha / √r`` with ``use_rslora``; per-module ``rank_pattern`` / ``alpha_pattern`` honoured),
computed in float32 and rounded once to ``W``'s dtype — the same sum PEFT's ``merge_and_unload``
forms. ``fan_in_fan_out`` weights and LoRA on embeddings (``lora_embedding_A/B``) are transposed
accordingly. Full tensors saved with the adapter (``modules_to_save``, and the original LLaVA
scripts' ``non_lora_trainables.bin``) replace the base tensors.

Adapter keys are mapped to the checkpoint's Hub layout from any of these namings:

- transformers 5 Llava (ours): ``model.language_model.*``, ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``lm_head``;
- transformers 4.x Llava: ``language_model.model.*``, ``language_model.lm_head``,
  ``vision_tower.*``, ``multi_modal_projector.*``;
- the original LLaVA / LLaVA-Med code (``train_mem.py --lora_enable``): ``model.layers.*``,
  ``model.embed_tokens``, ``model.norm``, ``lm_head``, ``model.mm_projector[.0/.2]``,
  ``model.vision_tower.vision_tower.vision_model.*``.

Refused with a clear error: other PEFT methods, DoRA, LoRA biases, ``trainable_token_indices``,
``layer_replication`` and ``target_parameters``; adapter tensors whose shapes do not fit the base.
The base model, its config, tokenizer, processor and template are copied; tokenizer / processor
files saved with the adapter take precedence.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..io import atomic_dir
from ..progress import ProgressCallback
from .compat import finalize_checkpoint_files
from .shards import (DEFAULT_CHUNK_BYTES, DEFAULT_SHARD_BYTES, CheckpointReader, OutTensor, copy_aux_files,
                     element_size, write_tensors)

__all__ = ["MergeLoraConfig", "MergeLoraResult", "merge_lora", "adapter_key_to_hub"]

# Files saved beside an adapter that describe the tokenizer/processor; they override the base's.
_PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json", "processor_config.json",
                    "preprocessor_config.json")
_REFUSED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "trainable_token_indices": "trainable tokens",
            "layer_replication": "layer replication", "target_parameters": "LoRA on parameters",
            "alora_invocation_tokens": "aLoRA", "use_qalora": "QALoRA"}


@dataclass
class MergeLoraConfig:
    """Options of ``weights merge-lora``.

    Attributes:
        adapter: the PEFT adapter directory (``adapter_config.json`` + ``adapter_model.*``).
        out: output checkpoint directory.
        base: the base Llava checkpoint (default: ``base_model_name_or_path`` of the adapter).
        overwrite: replace an existing ``out``.
        max_shard_bytes: output shard size.
        chunk_bytes: bytes read per piece.
    """

    adapter: Path
    out: Path
    base: Path | None = None
    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


@dataclass
class MergeLoraResult:
    """What ``merge-lora`` did.

    Attributes:
        out: the output directory.
        base: the base checkpoint used.
        key_format: ``transformers`` or ``original LLaVA`` (keys mapped).
        merged: weights that received a LoRA update.
        replaced: weights replaced by full tensors saved with the adapter.
        tensors: tensors written.
        bytes: bytes written.
        shards: safetensors files written.
        seconds: wall time.
    """

    out: str
    base: str
    key_format: str
    merged: int = 0
    replaced: int = 0
    tensors: int = 0
    bytes: int = 0
    shards: int = 0
    merged_names: list[str] = field(default_factory=list)
    seconds: float = 0.0


def adapter_key_to_hub(path: str) -> tuple[str, bool]:
    """Map a module/parameter path of an adapter to the Hub key layout.

    Returns:
        ``(key, original)`` with ``original`` true when the path used the original LLaVA naming.
    """
    from .checkpoint import hub_key

    rules = (("model.mm_projector.0.", "multi_modal_projector.linear_1."),
             ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
             ("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model."),
             ("model.embed_tokens.", "language_model.model.embed_tokens."),
             ("model.layers.", "language_model.model.layers."),
             ("model.norm.", "language_model.model.norm."))
    for old, new in rules:
        if path.startswith(old):
            return new + path[len(old):], True
    m = re.fullmatch(r"model\.mm_projector\.(weight|bias)", path)
    if m:
        return f"multi_modal_projector.linear_1.{m.group(1)}", True
    if path.startswith(("language_model.", "vision_tower.", "multi_modal_projector.")):
        return path, False
    return hub_key(path), False


@dataclass
class _Lora:
    key: str  # hub key of the adapted weight
    a: str
    b: str
    scale: float
    transpose: bool  # the update is (B @ A).T (fan_in_fan_out, embeddings)
    reader: Any = None  # the adapter file holding A and B


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches pattern keys as a suffix of the module name: (.*\.)?{pattern}$
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _read_adapter_config(adapter: Path) -> dict[str, Any]:
    path = adapter / "adapter_config.json"
    if not path.exists():
        raise ModelError(f"{adapter}: no adapter_config.json, not a PEFT adapter directory",
                         "point --adapter at the directory the LoRA training wrote")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc.msg})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{path}: peft_type {cfg.get('peft_type')} is not LoRA", "only LoRA adapters merge")
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise ModelError(f"{path}: {key} is set ({what}); merging it is not supported",
                             "merge it with PEFT's merge_and_unload instead")
    return cfg


def _adapter_readers(adapter: Path) -> list[CheckpointReader]:
    files = [adapter / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (adapter / n).exists()]
    if not files:
        raise ModelError(f"{adapter}: no adapter_model.safetensors or adapter_model.bin",
                         "the adapter directory is incomplete")
    readers = [CheckpointReader(files[0], "--adapter")]
    if (adapter / "non_lora_trainables.bin").exists():
        readers.append(CheckpointReader(adapter / "non_lora_trainables.bin", "--adapter"))
    return readers


def _plan(acfg: dict[str, Any], adapters: list[CheckpointReader], base: CheckpointReader, where: Path
          ) -> tuple[dict[str, _Lora], dict[str, tuple[CheckpointReader, str]], bool]:
    """Map adapter keys to base keys and check every shape (before writing)."""
    loras: dict[str, dict[str, Any]] = {}
    full: dict[str, tuple[CheckpointReader, str]] = {}
    original = False
    for reader in adapters:
        for name in reader.tensors:
            stripped = name.removeprefix("base_model.model.")
            if "lora_magnitude_vector" in stripped:
                raise ModelError(f"{where}: {name} is a DoRA magnitude; DoRA merging is not supported")
            m = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight", stripped) or \
                re.fullmatch(r"(.+)\.lora_embedding_(A|B)(?:\.[^.]+)?", stripped)
            if m:
                module = m.group(1)
                entry = loras.setdefault(module, {})
                entry[m.group(2)] = name
                entry["embedding"] = "lora_embedding" in stripped
                entry["reader"] = reader
                continue
            if ".lora_" in stripped:
                raise ModelError(f"{where}: adapter tensor {name} is not a LoRA A/B matrix this tool merges")
            key, orig = adapter_key_to_hub(stripped)
            original |= orig
            full[key] = (reader, name)
    plan: dict[str, _Lora] = {}
    problems: list[str] = []
    for module, entry in loras.items():
        if "A" not in entry or "B" not in entry:
            problems.append(f"adapter module {module} has lora_{'B' if 'A' in entry else 'A'} without its pair")
            continue
        key, orig = adapter_key_to_hub(module + ".weight")
        original |= orig
        reader = entry["reader"]
        a, b = reader.tensors[entry["A"]], reader.tensors[entry["B"]]
        w = base.tensors.get(key)
        if w is None:
            problems.append(f"adapter module {module} maps to {key}, which the base does not have")
            continue
        r = a.shape[0]
        embedding = bool(entry["embedding"])
        transpose = embedding or bool(acfg.get("fan_in_fan_out"))
        want = (w.shape[1], w.shape[0]) if transpose else tuple(w.shape)
        if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != want:
            problems.append(f"adapter module {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                            f"base tensor {key} {list(w.shape)}")
            continue
        alpha = _pattern_value(acfg.get("alpha_pattern"), module, acfg.get("lora_alpha", 8))
        r_cfg = _pattern_value(acfg.get("rank_pattern"), module, acfg.get("r", r))
        if r_cfg != r:
            problems.append(f"adapter module {module}: rank {r} in the weights, {r_cfg} in adapter_config.json")
            continue
        scale = alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r
        plan[key] = _Lora(key, entry["A"], entry["B"], float(scale), transpose, reader)
    for key, (reader, name) in full.items():
        w = base.tensors.get(key)
        if w is None:
            problems.append(f"adapter tensor {name} maps to {key}, which the base does not have")
        elif tuple(reader.tensors[name].shape) != tuple(w.shape):
            problems.append(f"adapter tensor {name} has shape {list(reader.tensors[name].shape)}, base tensor {key} "
                            f"has {list(w.shape)}")
        elif key in plan:
            problems.append(f"base tensor {key} is both replaced and LoRA-adapted by the adapter")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ModelError(f"{where}: {problems[0]}{more}",
                         "check that --base is the checkpoint the adapter was trained on; nothing was written")
    return plan, full, original


def _merged_rows(base: CheckpointReader, lora: _Lora, dtype: Any, chunk_bytes: int) -> Iterator[Any]:
    """``W + s·ΔW`` row block by row block (ΔW = B@A, or (B@A).T when transposed)."""
    import torch

    reader: CheckpointReader = lora.reader
    a = reader.read_tensor(lora.a).to(torch.float32)
    b = reader.read_tensor(lora.b).to(torch.float32)
    rows, cols = base.tensors[lora.key].shape
    step = max(1, chunk_bytes // max(1, cols * max(4, element_size(dtype))))
    for i in range(0, rows, step):
        j = min(rows, i + step)
        w = base.read(lora.key, i * cols, j * cols).reshape(j - i, cols)
        update = (b @ a[:, i:j]).T if lora.transpose else b[i:j] @ a
        yield (w.to(torch.float32) + update * lora.scale).to(dtype).reshape(-1)


def merge_lora(cfg: MergeLoraConfig, progress: ProgressCallback | None = None) -> MergeLoraResult:
    """Merge a LoRA adapter into its base checkpoint and write a standalone checkpoint.

    Args:
        cfg: the options.
        progress: progress callback (bytes, with ``tensor``/``tensors``).

    Returns:
        A :class:`MergeLoraResult`.

    Raises:
        ModelError: not an adapter, an unsupported adapter type, a base that cannot be found, or
            adapter tensors that do not fit the base (all checked before writing).
    """
    from .checkpoint import check_checkpoint_dir

    start = time.monotonic()
    from .hub import parse_hub_id, resolve_model

    adapter = resolve_model(cfg.adapter, "--adapter", "directory")
    acfg = _read_adapter_config(adapter)
    base_dir = Path(cfg.base) if cfg.base is not None else (
        Path(acfg["base_model_name_or_path"]) if acfg.get("base_model_name_or_path") else None)
    if base_dir is not None and (cfg.base is not None or parse_hub_id(str(base_dir))) and not base_dir.is_dir():
        base_dir = resolve_model(base_dir, "--base")  # a Hub id (a recorded local path that is gone: below)
    if base_dir is None or not base_dir.is_dir():
        raise ModelError(f"{adapter}: the adapter's base '{base_dir or '(not recorded)'}' is not a local directory",
                         "pass the base Llava checkpoint with --base DIR (for an original LLaVA LoRA: the base "
                         "made with `weights init --llm ... --vision ...` or `weights convert`)")
    check_checkpoint_dir(base_dir)
    adapters = _adapter_readers(adapter)
    try:
        with CheckpointReader(base_dir, "--base") as base:
            loras, full, original = _plan(acfg, adapters, base, adapter)
            result = MergeLoraResult(out=str(cfg.out), base=str(base_dir),
                                     key_format="original LLaVA (mapped)" if original else "transformers")
            plan = []
            for name, info in base.tensors.items():
                if name in loras:
                    produce = (lambda lo=loras[name], dt=info.dtype: _merged_rows(base, lo, dt, cfg.chunk_bytes))
                    result.merged_names.append(name)
                elif name in full:
                    reader, src = full[name]
                    produce = (lambda r=reader, s=src, dt=info.dtype: (p.to(dt) for p in r.chunks(s, cfg.chunk_bytes)))
                else:
                    produce = (lambda n=name: base.chunks(n, cfg.chunk_bytes))
                plan.append(OutTensor(name, info.shape, info.dtype, produce, (lambda n=name: base.release(n))))
            result.merged, result.replaced = len(loras), len(full)
            with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
                written = write_tensors(tmp, plan, cfg.max_shard_bytes, progress, task="merge-lora")
                copy_aux_files(base_dir, tmp)
                for fname in _PROCESSOR_FILES:
                    if (adapter / fname).is_file():
                        shutil.copy2(adapter / fname, tmp / fname)
                finalize_checkpoint_files(tmp)  # copied side files made loadable everywhere
    finally:
        for r in adapters:
            r.close()
    result.tensors, result.bytes, result.shards = len(plan), written["total_size"], len(written["files"])
    result.seconds = time.monotonic() - start
    return result
