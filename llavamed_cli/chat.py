"""``llavamed chat``: ask a model about an image, once or in a conversation.

- ``llavamed chat IMAGE --prompt "…"`` answers once: the answer on stdout (``--json``: the record).
- ``llavamed chat [IMAGE]`` opens a conversation: answers stream as they are generated;
  ``/image PATH`` (or a path to an image file typed in a message) attaches an image and starts a
  new conversation about it, ``/reset`` forgets everything, ``/save FILE`` writes the conversation
  as a conversation-format JSON file, ``/exit`` (or Ctrl-D) leaves. Ctrl-C stops an answer.
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
             "/save FILE, /exit. A path to an image file typed in a message attaches it too.")


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
    from llavamed_core.errors import LlavamedError
    from llavamed_core.infer.session import find_image_path

    _console.info(f"Chatting with {session.engine.model_name}. {HELP_TEXT}")
    if session.image_path:
        _console.info(f"image: {session.image_path}")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            sys.stdout.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        try:
            if line in ("/exit", "/quit"):
                return
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
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Checkpoint (or LoRA adapter) directory to run in this process.")] = None,
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
        from llavamed_core.infer.session import load_chat_image

        load_chat_image(image, view)  # fail before loading the model
    engine = _open_engine(model, base, server, api_key, model_name, device, dtype)
    session = ChatSession(engine, params, system=system, image_options=view)
    if image is not None:
        session.attach_image(image)
    if prompt is None:
        _repl(session)
        return
    res = session.answer(prompt)
    if json_out:
        _console.print_json({"model": engine.model_name, "image": str(image) if image else None,
                             "prompt": prompt, "text": res.text, "finish_reason": res.finish_reason,
                             "prompt_tokens": res.prompt_tokens,
                             "completion_tokens": res.completion_tokens})
    else:
        sys.stdout.write(res.text + "\n")
