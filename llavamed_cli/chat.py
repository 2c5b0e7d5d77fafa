"""``llavamed chat``: ask a model about an image, once or in a conversation.

- ``llavamed chat IMAGE --prompt "…"`` answers once: the answer on stdout (``--json``: the record).
- ``llavamed chat [IMAGE]`` opens a conversation: answers stream as they are generated;
  ``/image PATH`` (or a path to an image file typed in a message) attaches an image and starts a
  new conversation about it, ``/reset`` forgets everything, ``/save FILE`` writes the conversation
  as a conversation-format JSON file, ``/help`` lists the commands, ``/exit`` (or Ctrl-D, or
  Ctrl-C twice) leaves. Ctrl-C stops an answer or clears the line. On a terminal the line is
  edited with readline: Up recalls earlier lines (kept in :func:`history_path`), Tab completes
  commands and image paths.
- DICOM (``.dcm``) and NIfTI (``.nii``, ``.nii.gz``) files are rendered as ``llavamed data view``
  shows them; ``--window``, ``--frame``, ``--slice``, ``--plane``, ``--volume`` choose how.
- ``--model CKPT`` runs the model in this process; ``--server URL`` talks to any
  OpenAI-compatible server (``llavamed serve``, vLLM, a hosted model) instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import _console
from ._options import (DeviceOpt, DtypeOpt, FrameOpt, JsonOpt, PlaneOpt, SliceOpt, VolumeOpt,
                       WindowOpt, image_options)

HELP_TEXT = ("Commands: /image PATH (attach an image; starts a new conversation), /reset, "
             "/save FILE, /help, /exit. A path to an image file typed in a message attaches it too.")

HELP_LONG = """\
Commands:
  /image PATH   attach an image (starts a new conversation); Tab completes the path
  /reset        forget the conversation and the image
  /save FILE    write the conversation as a conversation-format JSON file
  /help         this text
  /exit         leave (or Ctrl-D, or Ctrl-C twice)
A path to an image file typed in a message attaches it too.
Keys: Up/Down recall earlier lines (kept across sessions), Ctrl-A/Ctrl-E/Ctrl-W edit the line,
Tab completes commands and paths, Ctrl-C clears the line or stops an answer."""

COMMANDS = ("/image ", "/reset", "/save ", "/help", "/exit")


def history_path() -> Path:
    """Where the REPL keeps its line history: ``$LLAVAMED_HISTORY``, else
    ``$XDG_STATE_HOME/llavamed/chat_history`` (``~/.local/state/llavamed/chat_history``)."""
    import os

    if os.environ.get("LLAVAMED_HISTORY"):
        return Path(os.environ["LLAVAMED_HISTORY"]).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "llavamed" / "chat_history"


def complete(text: str, line: str) -> list[str]:
    """Completions of ``text`` (the word under the cursor) in ``line``: command names at the start
    of a line, else file paths (directories end with ``/``)."""
    import glob
    import os

    if line.lstrip() == text and text.startswith("/") and text.count("/") == 1:
        return [c for c in COMMANDS if c.startswith(text)]
    pattern = os.path.expanduser(text) + "*"
    out = []
    for m in sorted(glob.glob(pattern)):
        if text.startswith("~"):
            m = "~" + m[len(os.path.expanduser("~")):]
        out.append(m + "/" if os.path.isdir(os.path.expanduser(m)) else m)
    return out


def _setup_readline() -> Any:
    """Line editing, history (Up recalls) and Tab completion when stdin is a terminal.

    Returns:
        The ``readline`` module, or ``None`` (no terminal, or no readline on this platform).
    """
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:  # Windows without pyreadline
        return None
    if "libedit" in (readline.__doc__ or ""):  # macOS's readline is libedit: other syntax
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("set enable-bracketed-paste off")
        readline.parse_and_bind("tab: complete")
    readline.set_completer_delims(" \t\n")
    matches: list[str] = []

    def completer(text: str, state: int) -> Optional[str]:
        if state == 0:
            matches[:] = complete(text, readline.get_line_buffer())
        return matches[state] if state < len(matches) else None

    readline.set_completer(completer)
    readline.set_history_length(1000)
    try:
        readline.read_history_file(history_path())
    except (FileNotFoundError, OSError):
        pass  # no history yet
    return readline


def _save_history(readline: Any) -> None:
    if readline is None:
        return
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError as exc:
        _console.warn(f"could not save the chat history to {path}: {exc.strerror or exc}")


def _open_engine(model: Optional[Path], base: Optional[Path], server: Optional[str],
                 api_key: Optional[str], model_name: Optional[str], device: Optional[str],
                 dtype: Optional[str]) -> Any:
    from llavamed_core.errors import ConfigError

    if (model is None) == (server is None):
        raise ConfigError("give exactly one of --model and --server",
                          "e.g. `llavamed chat IMAGE --model ckpt/tiny`")
    if server:
        from llavamed_core.infer.remote import RemoteEngine

        return RemoteEngine.connect(server, api_key=api_key, model_name=model_name, concurrency=1)
    from llavamed_core.infer import Engine

    if _console.err.is_terminal:  # a spinner for the few seconds the weights take to load
        with _console.err.status(f"Loading {model} …", spinner="dots"):
            return Engine.load(model, device=device, dtype=dtype, base=base)
    return Engine.load(model, device=device, dtype=dtype, base=base)


def _refuse_image_marker(text: Optional[str], where: str) -> None:
    """An ``<image>`` typed into a question: the image is attached with IMAGE, not in the text."""
    from llavamed_core.errors import ConfigError
    from llavamed_core.records import IMAGE_TOKEN

    if text is not None and IMAGE_TOKEN in text:
        hint = ("drop '<image>' and pass the image as the IMAGE argument: llavamed chat IMAGE --prompt \"…\""
                if where == "--prompt" else "drop '<image>'; attach an image with /image PATH")
        raise ConfigError(f"{where} contains '{IMAGE_TOKEN}': the image is not given in the text", hint)


def _repl(session: Any) -> None:
    """The interactive loop: read a line, run a command or stream the answer."""
    _console.info(f"Chatting with {session.engine.model_name}. {HELP_TEXT}")
    if session.image_path:
        _console.info(f"image: {session.image_path}")
    readline = _setup_readline()
    try:
        _loop(session)
    finally:
        _save_history(readline)


def _loop(session: Any) -> None:
    from llavamed_core.errors import LlavamedError
    from llavamed_core.infer.session import find_image_path

    interrupted = False
    while True:
        try:
            line = input("you> ")
        except EOFError:  # Ctrl-D
            sys.stdout.write("\n")
            return
        except KeyboardInterrupt:  # Ctrl-C: clear the line; twice in a row leaves
            sys.stdout.write("\n")
            sys.stdout.flush()
            if interrupted:
                return
            interrupted = True
            _console.info("(Ctrl-C again or Ctrl-D to leave; /help for the commands)")
            continue
        interrupted = False
        line = line.strip()
        if not line:
            continue
        try:
            if line in ("/exit", "/quit"):
                return
            if line in ("/help", "/?"):
                _console.info(HELP_LONG)
                continue
            if line == "/reset":
                session.reset()
                _console.info("conversation and image cleared")
                continue
            if line.startswith("/image"):
                path = line[len("/image"):].strip().strip("'\"")
                if not path:
                    _console.warn("usage: /image PATH")
                    continue
                session.attach_image(path)
                _console.info(f"image attached: {path} (new conversation)")
                continue
            if line.startswith("/save"):
                path = line[len("/save"):].strip()
                if not path:
                    _console.warn("usage: /save FILE")
                    continue
                _console.info(f"saved: {session.save(path)}")
                continue
            if line.startswith("/") and " " not in line and not Path(line).exists():
                _console.warn(f"unknown command {line}. {HELP_TEXT}")
                continue
            found, rest = find_image_path(line)
            if found:
                session.attach_image(found)
                _console.info(f"image attached: {found} (new conversation)")
                if not rest:
                    continue
                line = rest
            _refuse_image_marker(line, "the message")
            if session.image is None and not session.history:
                _console.warn("no image attached: the model answers from the text alone "
                              "(attach one with /image PATH)")
            dropped = session.dropped
            sys.stdout.write("assistant> ")
            sys.stdout.flush()
            stream = session.ask(line)
            try:
                for delta in stream:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                stream.close()
                sys.stdout.write(" [stopped]")
            sys.stdout.write("\n")
            sys.stdout.flush()
            if session.dropped > dropped:
                _console.warn(f"dropped the {session.dropped - dropped} oldest exchange(s) to stay "
                              f"within the context length")
        except LlavamedError as exc:
            # A bad image or an overlong question ends that request, not the conversation.
            _console.print_error(exc.message, exc.hint)


def chat_command(
    image: Annotated[Optional[Path], typer.Argument(help="Image to ask about (optional in a conversation).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Ask this once, print the answer and exit.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Checkpoint (or LoRA adapter) directory to run in this process (default: the configured model, see `llavamed config show`).")] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="Base checkpoint of a LoRA adapter (default: from adapter_config.json).")] = None,
    server: Annotated[Optional[str], typer.Option("--server", help="OpenAI-compatible server URL (llavamed serve, vLLM, hosted) instead of --model.")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LLAVAMED_API_KEY", show_envvar=True, help="API key for --server.")] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Model to request from --server (default: its first model).")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message (the checkpoint's template decides how it is shown).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Answer length cap.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.2,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.")] = None,
    window: WindowOpt = None,
    frame: FrameOpt = None,
    slice_index: SliceOpt = None,
    plane: PlaneOpt = "axial",
    volume: VolumeOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Chat with a model about an image: once with --prompt, else a conversation."""
    from llavamed_core.infer import GenerationParams
    from llavamed_core.infer.session import ChatSession

    _refuse_image_marker(prompt, "--prompt")
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=seed)
    view = image_options(window, frame, slice_index, plane, volume)  # DICOM/NIfTI rendering
    if image is not None:
        from llavamed_core.images import load_image

        load_image(image, view)  # fail before loading the model
    if model is None and server is None:
        from ._config import model as configured_model

        model = configured_model(None, "chat", server=True)  # LLAVAMED_MODEL, llavamed.toml, user file
    engine = _open_engine(model, base, server, api_key, model_name, device, dtype)
    session = ChatSession(engine, params, system=system, image_options=view)
    if image is not None:
        session.attach_image(image)
    if prompt is None:
        _repl(session)
        return
    res = session.answer(prompt)
    out = _console.Output(json_out)
    out.result({"model": engine.model_name, "image": str(image) if image else None,
                "prompt": prompt, "text": res.text, "finish_reason": res.finish_reason,
                "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens})
    out.text(res.text)
