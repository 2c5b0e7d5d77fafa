"""Models by Hugging Face Hub id: one resolver for every option that takes a model.

``--model``, ``--base``, ``--delta``, ``--target``, ``--llm``, ``--vision``, ``--adapter`` and
``weights convert SRC`` take a local directory or a Hub repo id with an optional revision,
``org/name`` or ``org/name@revision``. :func:`resolve_model` turns either into a local directory:

- a path that exists always wins (a folder ``org/name`` in the working directory shadows the id);
- anything else shaped like ``org/name[@revision]`` is fetched with ``huggingface_hub``'s
  ``snapshot_download``: its cache (``HF_HOME`` / ``HF_HUB_CACHE``), resumed downloads,
  ``HF_TOKEN``, ``HF_HUB_OFFLINE`` (the cache only) and ``HF_ENDPOINT`` (a mirror) all apply;
- every failure is one :class:`~llavamed_core.errors.ModelError` line: a missing local path, an
  unknown repo or revision, offline with nothing cached, a gated or private repo, no network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelError

__all__ = ["resolve_model", "parse_hub_id", "model_display_name", "resolve_served_model"]

# org/name[@revision]: the Hub's own name rules (letters, digits, - _ .), one slash.
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[^\s@]{1,200}))?$")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``spec`` is shaped like a Hub id, else ``None``.

    >>> parse_hub_id("microsoft/llava-med-v1.5-mistral-7b@main")
    ('microsoft/llava-med-v1.5-mistral-7b', 'main')
    >>> parse_hub_id("./ckpt/tiny") is None
    True
    """
    spec = str(spec)
    if spec.startswith(("/", ".", "~")) or "\\" in spec:
        return None
    m = _ID.match(spec)
    if m is None:
        return None
    repo = m.group("repo")
    if ".." in repo or "--" in repo or repo.endswith((".", "-")):
        return None
    return repo, m.group("rev")


def model_display_name(spec: str | os.PathLike) -> str:
    """A short name for a model given as a path (the folder's name) or a Hub id (the repo's name)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve().name
    hub = parse_hub_id(str(spec))
    return hub[0].split("/")[-1] if hub else path.name


def resolve_served_model(config) -> Path:
    """``serve``'s ``--model`` as a local directory: a Hub id is fetched, ``config.model`` becomes
    the snapshot's directory and the served name defaults to the repo's name. A local path (or
    one that is not an id) is returned unchanged, for the caller's own checks."""
    local = Path(config.model).expanduser()
    if local.exists() or parse_hub_id(str(config.model)) is None:
        return local
    path = resolve_model(config.model, "--model")
    if getattr(config, "served_model_name", None) is None:
        config.served_model_name = model_display_name(config.model)
    config.model = path
    return path


def _cache_dir() -> str | None:
    """The Hub cache, read from the environment now (``huggingface_hub`` reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None


def resolve_model(spec: str | os.PathLike, what: str = "--model", kind: str = "checkpoint directory") -> Path:
    """A local directory for a model given as a path or a Hub id ``org/name[@revision]``.

    Args:
        spec: a local path, or a Hub repo id with an optional ``@revision`` (branch, tag, commit).
        what: how the option is named in messages (``--model``, ``--base``, ``SRC``, ...).
        kind: what a missing local path is called in the message.

    Returns:
        The local directory (the path itself, or the snapshot in the Hub cache).

    Raises:
        ModelError: a local path that does not exist and is not an id; an unknown repo or
            revision; offline with nothing cached; a gated or private repo; the Hub unreachable.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{what} {text}: is a file, not a model directory",
                             "pass the checkpoint's directory")
        return path
    hub = parse_hub_id(text)
    if hub is None:
        raise ModelError(f"{what} {text}: {kind} not found",
                         "check the path, or give a Hugging Face repo id like org/name or org/name@revision")
    repo, rev = hub
    return _download(repo, rev, text, what)


def _download(repo: str, rev: str | None, text: str, what: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = constants.is_offline_mode()
    where = f"{what} {text}: not a local directory"
    shown = f"{repo}@{rev}" if rev else repo
    try:
        local = snapshot_download(repo, revision=rev, cache_dir=_cache_dir(), local_files_only=offline,
                                  endpoint=os.environ.get("HF_ENDPOINT") or None)
    except GatedRepoError:
        raise ModelError(f"{where}, and Hugging Face repo {shown} is gated: your account has not "
                         "been granted access", "accept the model's terms on its Hub page, then set "
                         "HF_TOKEN (or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        # The Hub answers 401 "RepoNotFound" alike for a repo that does not exist and for a
        # private one the token cannot read.
        raise ModelError(f"{where}, and no Hugging Face repo {repo} was found (or it is private)",
                         "check the spelling of the path or the repo id (org/name); a private repo "
                         "needs HF_TOKEN set to a token that can read it") from None
    except RevisionNotFoundError:
        raise ModelError(f"{where}, and Hugging Face repo {repo} has no revision '{rev}'",
                         "use a branch, tag or commit of the repo (e.g. @main)") from None
    except LocalEntryNotFoundError:
        if offline:
            raise ModelError(f"{where}, and Hugging Face repo {shown} is not in the cache "
                             "(offline: HF_HUB_OFFLINE is set)",
                             "download it once with HF_HUB_OFFLINE unset, or pass a local "
                             "directory") from None
        raise ModelError(f"{where}, and the Hugging Face Hub could not be reached for {shown} "
                         "(nothing cached)", "check the network or HF_ENDPOINT; or pass a local "
                         "directory") from None
    except HfHubHTTPError as exc:
        raise ModelError(f"{where}, and the Hugging Face Hub answered HTTP {_status(exc) or '?'} "
                         f"for {shown}", "try again later, or pass a local directory") from None
    except (OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"{where}, and fetching Hugging Face repo {shown} failed ({first})",
                         "check the network, HF_ENDPOINT and the disk; or pass a local directory") from None
    return Path(local)


def _status(exc: Exception) -> int | None:
    resp = getattr(exc, "response", None)
    code = getattr(resp, "status_code", None)
    return int(code) if isinstance(code, int) else None
