"""Resuming a training run from one of the Trainer's intermediate checkpoints, exactly.

A resume restores everything the checkpoint holds: the weights that train (every weight for full
training, the adapters and the projector for LoRA), the optimizer, the learning-rate schedule,
the step counter and log history, and the random-number state; the data order is a function of
the seed and the epoch alone, so the resumed run sees the batches the uninterrupted run would.

The Trainer writes a full model's weights with ``save_pretrained``, in the llava-hf Hub key layout
(``language_model.model.*``), while the live transformers-5 model names them
``model.language_model.*``; the Trainer's own loader compares the two layouts key by key, loads
nothing and only logs a warning. :func:`load_full_weights` maps the saved names back with
:func:`~llavamed_core.model.checkpoint.hub_key`, the same mapping the output checkpoints are written
with, and loads strictly: a missing, unexpected or mis-shaped tensor is a :class:`TrainingError`
that names it. LoRA checkpoints (PEFT's ``adapter_model.safetensors``) are checked the same way,
and so are the names in DeepSpeed's LoRA model states and FSDP's full-state file, which their own
loaders would let pass (DeepSpeed loads full weights strictly itself).

The stock length-grouped sampler draws each epoch's order from the global random state, which a
resumed run cannot reproduce; :class:`~llavamed_core.train.trainer.EpochSeededLengthGroupedSampler`
seeds it with the seed and the epoch.

:func:`check_resume_checkpoint` looks at a checkpoint before any work starts: it must be of the
kind the run writes (DeepSpeed, FSDP, LoRA or full weights) and every file must be whole (a
truncated or overwritten file is named in a one-line error).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from ..errors import LlavamedError, TrainingError
from ..model.checkpoint import safetensors_problem

__all__ = ["check_resume_checkpoint", "load_full_weights", "load_adapter_weights", "check_fsdp_keys",
           "check_deepspeed_adapter_keys", "resume_error"]

_HINT_SETTINGS = ("resume with the settings that wrote it (same --model, stage, --lora and "
                  "--deepspeed/--fsdp; the run folder's train_config.json lists them), or start over with --overwrite")
_HINT_DAMAGED = "pass an older checkpoint with --resume DIR, or delete this one and use --resume auto"


def _names(keys: list[str], limit: int = 3) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" … ({len(keys)} in all)" if len(keys) > limit else "")


def resume_error(ckpt: Path, exc: BaseException) -> TrainingError:
    """A one-line error for a checkpoint that failed while the Trainer loaded it."""
    if isinstance(exc, LlavamedError):
        return TrainingError(exc.message, exc.hint)
    # One line: a strict load's "Missing key(s) …" and "Unexpected key(s) …" come on later lines.
    text = " ".join(str(exc).split())
    text = (text[:400] + " …") if len(text) > 400 else (text or "no message")
    return TrainingError(f"--resume {ckpt}: could not load the checkpoint ({type(exc).__name__}: {text})",
                         _HINT_DAMAGED)


# -- checking a checkpoint before the run starts ------------------------------------------------


def _torch_file_problem(path: Path, verify_data: bool) -> str | None:
    """What is wrong with a ``torch.save`` file (a zip archive), or None. A truncated archive has
    no central directory at its end; with ``verify_data`` every member's CRC-32 is checked too
    (it reads the whole file: ``torch.load`` itself does not check them)."""
    try:
        with zipfile.ZipFile(path) as z:
            size = path.stat().st_size
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"truncated: {info.filename} runs past the end of the file"
            bad = z.testzip() if verify_data else None
            if bad is not None:
                return f"{bad} fails its checksum: the file was overwritten or damaged"
    except zipfile.BadZipFile as exc:
        if "CRC" in str(exc) or "Bad magic" in str(exc):
            return f"{str(exc).splitlines()[0][:120]}: the file was overwritten or damaged"
        return "truncated, or not a torch.save file: no zip directory at its end"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None


def _damaged(path: Path, problem: str) -> TrainingError:
    return TrainingError(f"--resume {path.parent}: {path.name} is damaged ({problem})", _HINT_DAMAGED)


def check_resume_checkpoint(ckpt: Path, *, lora: bool, deepspeed: bool, fsdp: bool,
                            verify_data: bool = True) -> dict[str, Any]:
    """Check that ``ckpt`` is a whole Trainer checkpoint of the kind this run writes.

    Args:
        ckpt: the checkpoint directory (``<run>/checkpoint-N``).
        lora: the run trains LoRA adapters (PEFT's ``adapter_model.safetensors``).
        deepspeed: the run uses DeepSpeed (its ``global_step*`` folder holds weights and optimizer).
        fsdp: the run uses FSDP (``pytorch_model_fsdp*`` and ``optimizer*`` in accelerate's layout).
        verify_data: also check the checksums of the optimizer, scheduler and RNG files (reads them
            once; in a distributed run one process does it).

    Returns:
        The checkpoint's ``trainer_state.json``.

    Raises:
        TrainingError: a file is missing, truncated or unreadable, or the checkpoint was written by a
            run of another kind (LoRA vs full, DeepSpeed, FSDP).
    """
    state_path = ckpt / "trainer_state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        int(state["global_step"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        problem = (f"not valid JSON ({exc.msg}, line {exc.lineno})" if isinstance(exc, json.JSONDecodeError)
                   else "no global_step" if isinstance(exc, (KeyError, TypeError)) else str(exc).splitlines()[0])
        raise _damaged(state_path, problem) from None

    names = {p.name for p in ckpt.iterdir()}
    ds_dirs = sorted(p for p in ckpt.glob("global_step*") if p.is_dir())
    fsdp_parts = [n for n in names if n.startswith("pytorch_model_fsdp")]
    has_adapter = "adapter_model.safetensors" in names or "adapter_model.bin" in names
    has_full = bool({"model.safetensors", "model.safetensors.index.json"} & names)
    engine = "DeepSpeed" if ds_dirs else "FSDP" if fsdp_parts else None
    wanted_engine = "DeepSpeed" if deepspeed else "FSDP" if fsdp else None
    # FSDP's sharded checkpoints may hold no Hugging Face weights file: LoRA or not shows only there.
    written_lora = has_adapter if (has_adapter or has_full) else lora
    if engine != wanted_engine or written_lora != lora:
        def kind(eng: str | None, adapters: bool) -> str:
            return " ".join(filter(None, [eng, "LoRA" if adapters else "full-weight"]))
        raise TrainingError(f"--resume {ckpt}: written by a {kind(engine, written_lora)} run, "
                            f"this run is {kind(wanted_engine, lora)}", _HINT_SETTINGS)

    required = []
    if deepspeed:
        required.append("scheduler.pt")
    elif fsdp:
        required.append("scheduler.pt")
        if not any(n.startswith("optimizer") for n in names):
            raise TrainingError(f"--resume {ckpt}: no optimizer state (optimizer*)", _HINT_DAMAGED)
    else:
        required += ["optimizer.pt", "scheduler.pt"]
        if lora and not has_adapter:
            raise TrainingError(f"--resume {ckpt}: no adapter_model.safetensors (LoRA weights)", _HINT_DAMAGED)
        if not lora and not has_full:
            raise TrainingError(f"--resume {ckpt}: no model.safetensors (the weights)", _HINT_DAMAGED)
    for name in required:
        if name not in names:
            raise TrainingError(f"--resume {ckpt}: no {name}", _HINT_DAMAGED)

    files = [p for p in ckpt.iterdir() if p.is_file()]
    for d in ds_dirs + [ckpt / n for n in fsdp_parts if (ckpt / n).is_dir()]:
        files += [p for p in d.iterdir() if p.is_file()]
    for p in sorted(files):
        if p.suffix == ".safetensors":
            problem = safetensors_problem(p)
        elif p.suffix in (".pt", ".pth", ".bin"):
            problem = _torch_file_problem(p, verify_data)
        elif p.suffix == ".json":
            try:
                json.loads(p.read_text(encoding="utf-8"))
                problem = None
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                problem = f"not valid JSON ({str(exc).splitlines()[0][:120]})"
        else:
            problem = None
        if problem is not None:
            raise _damaged(p, problem)
    return state


# -- loading the weights strictly ---------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path, str(exc).splitlines()[0][:200]) from None


def _full_weight_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _damaged(index, str(exc).splitlines()[0][:200]) from None
        return [ckpt / n for n in names]
    single = ckpt / "model.safetensors"
    if not single.is_file():
        raise TrainingError(f"--resume {ckpt}: no model.safetensors (the weights)", _HINT_DAMAGED)
    return [single]


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path, str(exc).splitlines()[0][:200]) from None


def _mismatch(ckpt: Path, what: str, missing: list[str], unexpected: list[str]) -> TrainingError:
    parts = []
    if missing:
        parts.append(f"missing {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected {_names(unexpected)}")
    return TrainingError(f"--resume {ckpt}: the saved {what} do not match the model ({'; '.join(parts)})",
                         _HINT_SETTINGS)


def load_full_weights(model: Any, ckpt: Path) -> None:
    """Load a full model's Trainer checkpoint (Hub key layout) into ``model``, strictly.

    Every tensor of the model must be in the checkpoint (a weight tied to one that is, e.g. an
    ``lm_head`` tied to the embeddings, excepted) and every tensor of the checkpoint must be in the
    model, with the same shape.

    Raises:
        TrainingError: a missing, unexpected or mis-shaped tensor (named), or an unreadable file.
    """
    from ..model.checkpoint import hub_key

    files = _full_weight_files(ckpt)
    saved_names = [k for f in files for k in _safetensors_keys(f)]
    live = model.state_dict()
    by_saved_name = {hub_key(k): k for k in live}
    unexpected = [k for k in saved_names if k not in by_saved_name]
    loaded = {by_saved_name[k] for k in saved_names if k in by_saved_name}
    loaded_ptrs = {live[k].data_ptr() for k in loaded}
    # A tied weight (same storage as a saved one) is left out by save_pretrained: not missing.
    missing = [hub_key(k) for k in live if k not in loaded and live[k].data_ptr() not in loaded_ptrs]
    if missing or unexpected:
        raise _mismatch(ckpt, "weights", missing, unexpected)
    for f in files:  # one shard in memory at a time
        part = {by_saved_name[k]: v for k, v in _read_safetensors(f).items()}
        wrong = [f"{hub_key(k)} {tuple(v.shape)} vs {tuple(live[k].shape)}" for k, v in part.items()
                 if tuple(v.shape) != tuple(live[k].shape)]
        if wrong:
            raise TrainingError(f"--resume {ckpt}: saved tensors have other shapes than the model's "
                                f"({_names(wrong, 2)})", _HINT_SETTINGS)
        _check_finite(ckpt, {hub_key(k): v for k, v in part.items()})
        model.load_state_dict(part, strict=False)
        del part


def _check_finite(ckpt: Path, state: dict[str, Any]) -> None:
    """NaN or infinite weights are nothing to resume from (a diverged run), and overwritten bytes
    often read as such (safetensors files carry no checksum)."""
    import torch

    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainingError(f"--resume {ckpt}: saved weights hold NaN or infinite values ({_names(bad)})",
                            _HINT_DAMAGED)


def check_fsdp_keys(model: Any, ckpt: Path, adapter_only: bool) -> None:
    """Check an FSDP full-state checkpoint's tensor names against the FSDP-wrapped ``model``
    before accelerate loads it (its FSDP2 loader lets missing names pass, and all mismatches for
    LoRA, which saves the trained parameters only).

    A sharded (``torch.distributed.checkpoint``) checkpoint is left to its loader, which fails on
    a tensor the checkpoint lacks.

    Raises:
        TrainingError: a missing or unexpected tensor (named), or an unreadable file.
    """
    import torch

    path = ckpt / "pytorch_model_fsdp.bin"
    if not path.is_file():
        return
    try:
        saved = set(torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys())
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise _damaged(path, " ".join(str(exc).split())[:200]) from None
    if adapter_only:
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
    else:
        expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise _mismatch(ckpt, "weights", missing, unexpected)


def check_deepspeed_adapter_keys(model: Any, ckpt: Path) -> None:
    """Check a DeepSpeed LoRA checkpoint's tensor names against the PEFT ``model`` before the
    engine loads it. DeepSpeed saves a LoRA run's trained parameters only and the Trainer has it
    load them non-strictly, so a missing or renamed tensor would pass silently. (Full-weight
    DeepSpeed checkpoints load strictly in the engine.)

    Raises:
        TrainingError: a missing or unexpected tensor (named), or an unreadable file.
    """
    import torch

    # ZeRO-2: mp_rank_00_model_states.pt; ZeRO-3: zero_pp_rank_<r>_mp_rank_00_model_states.pt (same names).
    files = sorted(ckpt.glob("global_step*/*model_states.pt"))
    if not files:
        raise TrainingError(f"--resume {ckpt}: no DeepSpeed model states (global_step*/*model_states.pt)",
                            _HINT_DAMAGED)
    try:  # DeepSpeed's own file (its config objects inside): the engine unpickles it the same way
        states = torch.load(files[-1], map_location="cpu", weights_only=False, mmap=True)
        saved = set(states["module"].keys())
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise _damaged(files[-1], " ".join(str(exc).split())[:200]) from None
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise _mismatch(ckpt, "adapter weights", missing, unexpected)


def load_adapter_weights(model: Any, ckpt: Path) -> None:
    """Load a LoRA run's Trainer checkpoint (PEFT's ``adapter_model.safetensors``: the adapters and
    the trained projector) into the PEFT ``model``, strictly, and check that it took.

    Raises:
        TrainingError: a missing, unexpected or mis-shaped tensor (named), or an unreadable file.
    """
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    path = ckpt / "adapter_model.safetensors"
    if not path.is_file():
        raise TrainingError(f"--resume {ckpt}: no adapter_model.safetensors (LoRA weights)", _HINT_SETTINGS)
    saved = _read_safetensors(path)
    expected = get_peft_model_state_dict(model)
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        raise _mismatch(ckpt, "adapter weights", missing, unexpected)
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in saved.items()
             if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise TrainingError(f"--resume {ckpt}: saved tensors have other shapes than the model's "
                            f"({_names(wrong, 2)})", _HINT_SETTINGS)
    _check_finite(ckpt, saved)
    result = set_peft_model_state_dict(model, saved)
    bad = list(getattr(result, "unexpected_keys", []) or [])
    now = get_peft_model_state_dict(model)
    bad += [k for k, v in saved.items() if not torch.equal(now[k].detach().cpu(), v.to(now[k].dtype))]
    if bad:
        raise _mismatch(ckpt, "adapter weights", [], bad)
