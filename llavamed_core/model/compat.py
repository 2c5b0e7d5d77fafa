"""Side files every runtime loads: transformers 4.4x–5.x, ``pipeline``, plain ``generate``, vLLM.

Every writer of a checkpoint directory (``save_checkpoint`` for presets, training and composing;
``weights convert`` and ``apply-delta --to-hf``; ``make-delta``/``apply-delta`` and ``merge-lora``,
which copy the side files of their input) ends with :func:`finalize_checkpoint_files`, which
rewrites, in place and idempotently:

- ``config.json``: ``text_config.rope_theta`` beside ``rope_parameters`` (transformers 4.x, vLLM)
  and ``text_config.architectures`` (``["LlamaForCausalLM"]``, ``["MistralForCausalLM"]``, as the
  llava-hf checkpoints have; some vLLM versions fail without it).
- ``generation_config.json``: no ``stop_strings`` (plain ``generate`` and ``pipeline`` raise on
  them without a tokenizer argument, and vLLM ignores them). The template's stop strings are kept in
  ``llavamed_stop_strings``, which our engine and the ``--engine vllm`` proxy read; every token
  that decodes to a stop string (``###`` for v1) joins ``eos_token_id``, so transformers and vLLM
  stop there too; those ids are listed in ``llavamed_stop_token_ids`` so that our engine keeps
  treating them as the stop string (cut from the text, counted) rather than as EOS.
- ``tokenizer_config.json``: what transformers 4.x reads. transformers 5 writes
  ``tokenizer_class: TokenizersBackend`` (unknown to 4.x) and ``extra_special_tokens`` as a list
  (4.x wants a dict of named tokens and calls ``.keys()`` on it); the class becomes
  ``PreTrainedTokenizerFast`` (the same ``tokenizer.json``, read as is), the list moves to
  ``additional_special_tokens`` and ``extra_special_tokens`` holds the named tokens
  (``{"image_token": "<image>"}``) as 4.x itself writes them, and ``model_input_names`` is
  ``input_ids, attention_mask`` (4.x's generic class adds ``token_type_ids``, which Llava's
  ``generate`` rejects). transformers 5 reads both back to the same tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..io import atomic_write_json

__all__ = ["finalize_checkpoint_files", "stop_settings", "read_stop_strings", "TEXT_ARCHITECTURES"]

TEXT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                      "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM", "phi3": "Phi3ForCausalLM"}
"""Text ``model_type`` → the architecture name llava-hf writes in ``text_config.architectures``."""

# Tokenizer classes transformers 5 writes that 4.x does not have: read the tokenizer.json as is.
_V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend"}
_STANDARD_SPECIALS = {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token"}


def finalize_checkpoint_files(ckpt: str | Path, stop_strings: list[str] | None = None) -> None:
    """Make a written checkpoint's side files load everywhere (see the module doc).

    Args:
        ckpt: the checkpoint directory (a temporary one, before it is renamed into place).
        stop_strings: the template's stop strings; default: those already in the directory's
            generation config (``llavamed_stop_strings``, or ``stop_strings`` from an older
            llavamed).

    Raises:
        ModelError: a side file that is not valid JSON.
    """
    ckpt = Path(ckpt)
    if (ckpt / "config.json").is_file():
        _fix_config(ckpt / "config.json")
    if (ckpt / "tokenizer_config.json").is_file():
        _fix_tokenizer_config(ckpt / "tokenizer_config.json")
    if (ckpt / "generation_config.json").is_file() or stop_strings:
        _fix_generation_config(ckpt, stop_strings)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})", "the checkpoint's side files are damaged") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object", "the checkpoint's side files are damaged")
    return data


def _fix_config(path: Path) -> None:
    cfg = _read(path)
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        return  # not a Llava config (e.g. an original LLaVA-Med layout copied by make-delta)
    new = dict(text)
    rope = new.get("rope_parameters") or {}
    if "rope_theta" not in new and isinstance(rope, dict) and "rope_theta" in rope:
        new["rope_theta"] = rope["rope_theta"]
    if not new.get("architectures"):
        arch = TEXT_ARCHITECTURES.get(str(new.get("model_type")))
        if arch is None:
            try:
                from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

                arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(new.get("model_type")))
            except ImportError:
                arch = None
        if arch:
            new["architectures"] = [arch]
    if new != text:
        cfg["text_config"] = new
        atomic_write_json(path, cfg)


def _fix_tokenizer_config(path: Path) -> None:
    tc = _read(path)
    new = dict(tc)
    if new.get("tokenizer_class") in _V5_ONLY_TOKENIZER_CLASSES:
        new["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = new.get("extra_special_tokens")
    if isinstance(extra, list):
        if extra and not new.get("additional_special_tokens"):
            new["additional_special_tokens"] = extra
        extra = None
    if "model_input_names" not in new:
        # 4.x's PreTrainedTokenizerFast also returns token_type_ids, which Llava's generate rejects.
        new["model_input_names"] = ["input_ids", "attention_mask"]
    if not isinstance(extra, dict):
        named = {k: v for k, v in new.items()
                 if k.endswith("_token") and k not in _STANDARD_SPECIALS and isinstance(v, str)}
        new["extra_special_tokens"] = named
    if new != tc:
        atomic_write_json(path, new)


def read_stop_strings(gen: Any) -> list[str]:
    """The stop strings of a generation config (object or dict): ``llavamed_stop_strings``, else
    ``stop_strings`` (checkpoints written by older llavamed)."""
    get = gen.get if isinstance(gen, dict) else (lambda k, d=None: getattr(gen, k, d))
    stops = get("llavamed_stop_strings", None)
    if stops is None:
        stops = get("stop_strings", None)
    if isinstance(stops, str):
        stops = [stops]
    return [s for s in (stops or []) if isinstance(s, str) and s]


def stop_settings(gen: Any) -> tuple[list[str], set[int]]:
    """``(stop_strings, stop_token_ids)`` of a generation config: the strings our engine cuts at,
    and the ids that were added to ``eos_token_id`` only to stand for those strings elsewhere."""
    get = gen.get if isinstance(gen, dict) else (lambda k, d=None: getattr(gen, k, d))
    ids = get("llavamed_stop_token_ids", None) or []
    return read_stop_strings(gen), {int(i) for i in ids if isinstance(i, int)}


def _stop_token_ids(ckpt: Path, stops: list[str]) -> list[int]:
    """Ids of the tokens whose text (spaces stripped) is a stop string, from ``tokenizer.json``."""
    path = ckpt / "tokenizer.json"
    if not stops or not path.is_file():
        return []
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own Exception type
        raise ModelError(f"{path}: cannot read the tokenizer ({str(exc).splitlines()[0][:200]})",
                         "the checkpoint's tokenizer.json is damaged") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    texts = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    wanted = set(stops)
    return [i for i, t in enumerate(texts) if t.strip() in wanted]


def _fix_generation_config(ckpt: Path, stop_strings: list[str] | None) -> None:
    path = ckpt / "generation_config.json"
    gen = _read(path) if path.is_file() else {}
    new = dict(gen)
    stops = list(stop_strings) if stop_strings is not None else read_stop_strings(gen)
    new.pop("stop_strings", None)
    if not stops:
        new.pop("llavamed_stop_strings", None)
        new.pop("llavamed_stop_token_ids", None)
    else:
        new["llavamed_stop_strings"] = stops
        extra = _stop_token_ids(ckpt, stops)
        eos = new.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        old_extra = set(gen.get("llavamed_stop_token_ids") or [])
        eos = [e for e in eos if e not in old_extra or e in extra]
        eos += [i for i in extra if i not in eos]
        if eos:
            new["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        new["llavamed_stop_token_ids"] = extra
        if extra:
            new["_from_model_config"] = False  # keep transformers from rebuilding it from config.json
    if new != gen:
        atomic_write_json(path, new)
