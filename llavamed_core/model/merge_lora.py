"""Merge a PEFT LoRA adapter into its base Llava checkpoint: PEFT's own merge, streamed.

Streamed because PEFT's ``merge_and_unload`` needs the whole base model in memory (a 7B base is 14 GB).

The arithmetic is PEFT's: each adapted weight is cut into blocks of rows, and every block is merged by
``merge_and_unload`` of a one-layer PEFT model that holds the block and the adapter's matrices for its
rows (``lora_A`` whole, the rows of ``lora_B`` and of DoRA's ``lora_magnitude_vector``). A merged linear
weight's row depends only on that row, also with DoRA (its norm is per output row), so the blocks
give PEFT's whole-model result; an embedding (DoRA normalises it per column) is merged whole. Plain
LoRA, rsLoRA (``use_rslora``), DoRA (``use_dora``) and per-module ``rank_pattern`` / ``alpha_pattern``
are honoured. Full tensors saved with the adapter (``modules_to_save``, and the original LLaVA
scripts' ``non_lora_trainables.bin``) replace the base tensors. Peak memory is a few blocks
(``chunk_bytes``) and PEFT's temporaries, whatever the model's size. :func:`merge_adapter` is the in-memory form, for a model
already loaded (``chat``/``serve`` given an adapter).

Adapter keys are mapped to the checkpoint's Hub layout from any of these namings:

- transformers 5 Llava (ours): ``model.language_model.*``, ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``lm_head``;
- transformers 4.x Llava: ``language_model.model.*``, ``language_model.lm_head``,
  ``vision_tower.*``, ``multi_modal_projector.*``;
- the original LLaVA / LLaVA-Med code (``train_mem.py --lora_enable``): ``model.layers.*``,
  ``model.embed_tokens``, ``model.norm``, ``lm_head``, ``model.mm_projector[.0/.2]``,
  ``model.vision_tower.vision_tower.vision_model.*``.

Refused with a clear error, before anything is written: other PEFT methods, LoRA biases,
``trainable_token_indices``, ``layer_replication``, ``target_parameters`` and the other LoRA variants;
adapter tensors whose shapes do not fit the base. The base model, its config, tokenizer, processor
and template are copied; tokenizer / processor files saved with the adapter take precedence.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DependencyError, ModelError
from ..io import atomic_dir
from ..progress import ProgressCallback
from .compat import finalize_checkpoint_files
from .shards import (CheckpointReader, OutTensor, WriteOptions, WriteResult, copy_aux_files, element_size,
                     write_tensors)

__all__ = ["MergeLoraConfig", "MergeLoraResult", "merge_lora", "merge_adapter", "adapter_key_to_hub"]

# Files saved beside an adapter that describe the tokenizer/processor; they override the base's.
_PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json", "processor_config.json",
                    "preprocessor_config.json")
_REFUSED = {"lora_bias": "LoRA biases", "trainable_token_indices": "trainable tokens",
            "layer_replication": "layer replication", "target_parameters": "LoRA on parameters",
            "alora_invocation_tokens": "aLoRA", "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA",
            "arrow_config": "Arrow", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
            "kasa_config": "KaSA", "mica": "MiCA"}
# What a tensor of an adapted module is called after the module's path (PEFT's saved names).
_LORA_PART = re.compile(r"\.(lora_A|lora_B)(?:\.[^.]+)?\.weight|\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?"
                        r"|\.(lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?")


@dataclass
class MergeLoraConfig(WriteOptions):
    """Options of ``weights merge-lora`` (and the output options of :class:`~.shards.WriteOptions`).

    Attributes:
        adapter: the PEFT adapter directory (``adapter_config.json`` + ``adapter_model.*``).
        base: the base Llava checkpoint (default: ``base_model_name_or_path`` of the adapter).
    """

    adapter: Path
    base: Path | None = None


@dataclass
class MergeLoraResult(WriteResult):
    """What ``merge-lora`` did (and the output counts of :class:`~.shards.WriteResult`).

    Attributes:
        base: the base checkpoint used.
        key_format: ``transformers`` or ``original LLaVA`` (keys mapped).
        merged: weights that received a LoRA update.
        replaced: weights replaced by full tensors saved with the adapter.
        merged_names: the weights merged.
    """

    base: str
    key_format: str
    merged: int = 0
    replaced: int = 0
    merged_names: list[str] = field(default_factory=list)


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
    """One adapted weight: where its adapter tensors are and the LoRA settings PEFT merges it with."""

    key: str  # hub key of the adapted weight
    module: str  # the module's path in the adapter
    parts: dict[str, str]  # saved-name suffix (".lora_A.weight", ...) -> adapter tensor name
    r: int
    alpha: float
    embedding: bool
    dora: bool
    rslora: bool
    reader: Any = None  # the adapter file holding them
    base_src: tuple[Any, str] | None = None  # the base weight saved with the adapter (PEFT saves embeddings)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches pattern keys as a suffix of the module name: (.*\.)?{pattern}$
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _read_adapter_config(adapter: Path) -> dict[str, Any]:
    from .checkpoint import read_dir_json

    path = adapter / "adapter_config.json"
    cfg = read_dir_json(adapter, "adapter_config.json", "no adapter_config.json, not a PEFT adapter directory",
                        "point --adapter at the directory the LoRA training wrote")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{path}: peft_type {cfg.get('peft_type')} is not LoRA", "only LoRA adapters merge")
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise ModelError(f"{path}: {key} is set ({what}); merging it is not supported",
                             "merge it in memory with PEFT's merge_and_unload instead")
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
    modules: dict[str, dict[str, Any]] = {}
    full: dict[str, tuple[CheckpointReader, str]] = {}
    layer_bases: dict[str, tuple[CheckpointReader, str]] = {}
    original = False
    for reader in adapters:
        for name in reader.tensors:
            stripped = name.removeprefix("base_model.model.")
            m = _LORA_PART.search(stripped)
            if m and m.end() == len(stripped):
                entry = modules.setdefault(stripped[:m.start()], {"parts": {}, "reader": reader})
                entry["parts"][name[len(name) - len(stripped) + m.start():]] = name
                continue
            if ".lora_" in stripped:
                raise ModelError(f"{where}: adapter tensor {name} is not a LoRA A/B matrix this tool merges")
            # PEFT saves a LoRA-adapted embedding's weight too (``….base_layer.weight``): the base of its merge.
            key, orig = adapter_key_to_hub(stripped.replace(".base_layer.", "."))
            original |= orig
            (layer_bases if ".base_layer." in stripped else full)[key] = (reader, name)
    dora = bool(acfg.get("use_dora"))
    plan: dict[str, _Lora] = {}
    problems: list[str] = []
    for module, entry in modules.items():
        parts, reader = entry["parts"], entry["reader"]
        embedding = any(".lora_embedding_" in k for k in parts)
        a_part, b_part = (".lora_embedding_A", ".lora_embedding_B") if embedding else (".lora_A", ".lora_B")
        a = next((reader.tensors[n] for k, n in parts.items() if k.startswith(a_part)), None)
        b = next((reader.tensors[n] for k, n in parts.items() if k.startswith(b_part)), None)
        mag = next((reader.tensors[n] for k, n in parts.items() if k.startswith(".lora_magnitude_vector")), None)
        if a is None or b is None:
            problems.append(f"adapter module {module} has {'lora_B' if a is None else 'lora_A'} without its pair")
            continue
        if (mag is not None) != dora:
            problems.append(f"adapter module {module}: " + (
                "use_dora is set in adapter_config.json but the weights have no lora_magnitude_vector" if dora
                else "a DoRA lora_magnitude_vector in the weights, but use_dora is not set in adapter_config.json"))
            continue
        key, orig = adapter_key_to_hub(module + ".weight")
        original |= orig
        w = base.tensors.get(key)
        if w is None:
            problems.append(f"adapter module {module} maps to {key}, which the base does not have")
            continue
        r = a.shape[0]
        # PEFT's shapes: A (r, in) and B (out, r) of a linear (out, in) weight; of an embedding
        # (rows, dim): A (r, rows) and B (dim, r); DoRA's magnitude: one per output / per dim.
        want = (w.shape[1], w.shape[0]) if embedding else tuple(w.shape)
        mag_len = w.shape[1] if embedding else w.shape[0]
        if (len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != want
                or (mag is not None and tuple(mag.shape) != (mag_len,))):
            problems.append(f"adapter module {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)}"
                            + (f" / lora_magnitude_vector {list(mag.shape)}" if mag is not None else "")
                            + f" do not fit base tensor {key} {list(w.shape)}")
            continue
        alpha = _pattern_value(acfg.get("alpha_pattern"), module, acfg.get("lora_alpha", 8))
        r_cfg = _pattern_value(acfg.get("rank_pattern"), module, acfg.get("r", r))
        if r_cfg != r:
            problems.append(f"adapter module {module}: rank {r} in the weights, {r_cfg} in adapter_config.json")
            continue
        layer_base = layer_bases.pop(key, None)
        if layer_base is not None and tuple(layer_base[0].tensors[layer_base[1]].shape) != tuple(w.shape):
            problems.append(f"adapter tensor {layer_base[1]} has shape "
                            f"{list(layer_base[0].tensors[layer_base[1]].shape)}, base tensor {key} has {list(w.shape)}")
            continue
        plan[key] = _Lora(key, module, parts, r, alpha, embedding, dora, bool(acfg.get("use_rslora")), reader,
                          layer_base)
    for key, (reader, name) in layer_bases.items():
        problems.append(f"adapter tensor {name} is the base of a layer the adapter does not adapt")
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


def _peft_merge(weight: Any, lora: _Lora, adapter: dict[str, Any]) -> Any:
    """``weight`` (a block of rows of the adapted weight) merged by PEFT's ``merge_and_unload``.

    Args:
        weight: the base block, in the checkpoint's dtype (merged in place).
        lora: the module's settings.
        adapter: saved-name suffix (``.lora_A.weight``, ...) → the adapter's tensor for this block.
    """
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    holder = torch.nn.Module()
    if lora.embedding:
        holder.add_module("layer", torch.nn.Embedding(*weight.shape, device="meta"))
    else:
        holder.add_module("layer", torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta"))
    holder.layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, use_rslora=lora.rslora, use_dora=lora.dora,
                        target_modules=["layer"], lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on a model without a config
        peft_model = get_peft_model(holder, config)
        loaded = set_peft_model_state_dict(peft_model, {f"base_model.model.layer{k}": v for k, v in adapter.items()})
    # The plan checked the names; a key PEFT did not take, or a LoRA tensor left at its random
    # initialisation, would be a PEFT naming change.
    left = list(getattr(loaded, "unexpected_keys", []) or []) + [
        k for k in getattr(loaded, "missing_keys", []) or [] if ".lora_" in k]
    if left:
        raise ModelError(f"adapter module {lora.module}: PEFT did not load {left[0]}",
                         "this peft version names adapter tensors differently; report it")
    return peft_model.merge_and_unload().layer.weight.detach()


def _merged_rows(base: CheckpointReader, lora: _Lora, dtype: Any, chunk_bytes: int) -> Iterator[Any]:
    """The merged weight, a block of rows at a time (an embedding whole)."""
    reader: CheckpointReader = lora.reader
    tensors = {k: reader.read_tensor(n) for k, n in lora.parts.items()}
    rows, cols = base.tensors[lora.key].shape
    step = rows if lora.embedding else max(1, chunk_bytes // max(1, cols * max(4, element_size(dtype))))
    for i in range(0, rows, step):
        j = min(rows, i + step)
        # lora_A holds no output rows; lora_B and DoRA's magnitude hold one per row (a linear's)
        block = tensors if lora.embedding else {k: (t if k.startswith(".lora_A") else t[i:j])
                                                 for k, t in tensors.items()}
        src, name = lora.base_src or (base, lora.key)
        w = src.read(name, i * cols, j * cols).to(dtype).reshape(j - i, cols)
        yield _peft_merge(w, lora, block).reshape(-1)


def merge_adapter(model: Any, adapter: str | os.PathLike) -> Any:
    """Merge a PEFT LoRA adapter directory into a loaded model, in memory: PEFT's ``merge_and_unload``.

    Refuses an adapter PEFT would apply only in part (names from another layout, such as the
    original LLaVA scripts' — those merge with ``weights merge-lora``), instead of PEFT's warning.

    Args:
        model: a ``LlavaForConditionalGeneration``.
        adapter: the adapter directory.

    Returns:
        The plain model with the adapter merged in.

    Raises:
        DependencyError: peft is not installed.
        ModelError: the adapter does not fit the model.
    """
    try:
        from peft import PeftModel, get_peft_model_state_dict
        from peft.utils import load_peft_weights
    except ImportError:
        raise DependencyError("peft is not installed (needed for LoRA adapters)", "pip install peft") from None
    adapter = Path(adapter)
    hint = "check that --base is the model the adapter was trained on"
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
        saved = set(load_peft_weights(str(adapter)))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{adapter}: could not apply the LoRA adapter ({str(exc).splitlines()[0]})", hint) from None
    unused = sorted(saved - set(get_peft_model_state_dict(peft_model)))
    if unused:
        raise ModelError(f"{adapter}: the adapter's {unused[0]}"
                         + (f" (and {len(unused) - 1} more tensors)" if len(unused) > 1 else "")
                         + " fits no module of the model",
                         hint + "; an original LLaVA LoRA merges with `llavamed weights merge-lora --base ...`")
    return peft_model.merge_and_unload()


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
    result.record(written)
    result.seconds = time.monotonic() - start
    return result
