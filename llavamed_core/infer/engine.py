"""The one generation engine behind ``chat``, ``serve``, ``eval vqa`` and ``demo`` (DESIGN.md contract 3).

:class:`Engine` loads a checkpoint (or a LoRA adapter directory with its base), renders prompts
with the checkpoint's own chat template (never chosen from the model's name), and generates with
a manual decode loop over a KV cache:

- requests are sorted by prompt length and cut into batches, left-padded, so padding stays small;
- every row keeps its own sampling parameters (greedy when ``temperature == 0``; else temperature,
  top-p and a per-row seeded generator), its own stop strings, EOS and ``max_new_tokens``;
- text is streamed per row as tokens arrive (``on_delta``); a row can be cancelled
  (``should_stop``), and finished rows leave the batch (the cache drops them);
- position ids follow the attention mask, so a left-padded row computes exactly what it would
  alone: batched greedy output equals one-at-a-time greedy output;
- :meth:`Engine.prepare` renders, tokenises and image-processes a request in any thread (on its
  own copy of the processor), so a server can do that work outside the generation thread; a
  :class:`Preparer` does the same without the model (a server whose model runs in another process);
- :meth:`Engine.running_batch` is the same loop with requests joining between steps
  (:mod:`.batch`, for the server), and every row may carry vLLM's frequency, presence and
  repetition penalties (:mod:`.penalties`).

Use::

    engine = Engine.load("ckpt/tiny")
    req = ChatRequest([{"role": "user", "content": [{"type": "image", "image": img},
                                                    {"type": "text", "text": "Is there a lesion?"}]}])
    print(engine.generate([req])[0].text)
    for delta in engine.stream(req):
        print(delta, end="")
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, ModelError
from ..progress import ProgressCallback, emit
from .detok import TextAssembler

__all__ = ["GenerationParams", "ChatRequest", "GenerationResult", "Engine", "Preparer", "is_adapter_dir",
           "request_images", "PreparedPrompt"]

log = logging.getLogger("llavamed.infer")
_UNSET = object()
_SEED_MIN, _SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what torch.Generator.manual_seed accepts


@dataclass
class GenerationParams:
    """How to generate one answer.

    Attributes:
        max_new_tokens: most tokens to generate (also capped by the context length).
        temperature: 0 means greedy decoding; above 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
        stop: extra stop strings; the checkpoint's ``generation_config.stop_strings`` and EOS
            always stop too. A stop string is cut from the returned text.
        seed: seed of this request's sampler (``None``: a fresh random seed).
        frequency_penalty: subtracted from a token's logit once per time the answer holds it
            (vLLM's and OpenAI's meaning; 0 = off; -2 to 2).
        presence_penalty: subtracted once from the logit of every token the answer holds
            (0 = off; -2 to 2).
        repetition_penalty: divides the positive and multiplies the negative logits of tokens
            in the prompt or the answer (vLLM's meaning; 1 = off; above 0).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclass
class PreparedPrompt:
    """A request rendered, tokenised and image-processed ahead of generation (:meth:`Engine.prepare`).

    Attributes:
        input_ids: the prompt's token ids, each image placeholder expanded to the image's tokens,
            unpadded.
        tensors: the processor's other outputs for this request (``pixel_values``, on the CPU).
    """

    input_ids: list[int]
    tensors: dict = field(default_factory=dict)


@dataclass
class ChatRequest:
    """One conversation to answer.

    Attributes:
        messages: transformers chat messages; ``content`` is a string or a list of parts
            ``{"type": "text", "text": ...}`` and ``{"type": "image", "image": PIL.Image.Image}``.
        params: generation parameters.
        prepared: the request already prepared by :meth:`Engine.prepare`; :meth:`Engine.generate`
            then neither renders, tokenises nor processes images for it (and ignores the images
            in ``messages``).
    """

    messages: list[dict]
    params: GenerationParams = field(default_factory=GenerationParams)
    prepared: PreparedPrompt | None = None


@dataclass
class GenerationResult:
    """The answer to one request.

    Attributes:
        text: generated text, stripped, without the stop string or EOS.
        finish_reason: ``"stop"`` (EOS or a stop string), ``"length"`` (max_new_tokens or the
            context length) or ``"cancelled"`` (``should_stop`` said so).
        prompt_tokens: tokens in the prompt, image tokens included.
        completion_tokens: tokens generated (the stopping EOS not counted).
        token_ids: the generated ids when the caller detokenises (``text`` is then empty).
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] | None = None
    """The answer's token ids, from a row that leaves detokenising to its caller (else ``None``)."""


def request_stops(params: GenerationParams, checkpoint_stops: list[str]) -> list[str]:
    """A request's stop strings: its own, then the checkpoint's (empty ones dropped)."""
    return [s for s in list(params.stop) + list(checkpoint_stops) if s]


def request_images(messages: list[dict]) -> list[Any]:
    """The PIL images of a conversation's image parts, in order (converted to RGB).

    Raises:
        DataError: an image part without a PIL image.
    """
    images = []
    for mi, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            for pi, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image":
                    img = part.get("image")
                    if img is None or not hasattr(img, "convert"):
                        raise DataError(f"messages[{mi}].content[{pi}]: an image part needs a PIL "
                                        f"image under 'image'")
                    images.append(img if img.mode == "RGB" else img.convert("RGB"))
    return images


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages with the PIL objects removed from image parts (templates only need the type)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [{"type": "image"} if isinstance(p, dict) and p.get("type") == "image" else p
                       for p in content]
        out.append({**m, "content": content if content is not None else ""})
    return out


def _resolve_base(base: Path | None) -> Path | None:
    """An adapter's base as a local directory: a path, or a Hub id fetched (``None`` if neither)."""
    from ..model.hub import parse_hub_id, resolve_model

    if base is None or base.is_dir() or parse_hub_id(str(base)) is None:
        return base
    return resolve_model(base, "--base")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a PEFT adapter directory (has ``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


@dataclass
class _Row:
    """Decoding state of one request inside a batch."""

    index: Any
    """The caller's key of the request (its index in ``generate``, a job in the server)."""
    prompt_tokens: int
    max_new: int
    temperature: float
    top_p: float
    stops: list[str]
    generator: Any
    request: Any = None
    """The ``ChatRequest``."""
    prompt_ids: list[int] = field(default_factory=list)
    penalties: Any = None
    """A :class:`~.penalties.RowPenalties` when the request has penalties (made at the first pick)."""
    streaming: bool = True
    """Whether the row's text is streamed (``on_delta``) as it grows."""
    ids_only: bool = False
    """Whether the row produces token ids only (deltas and result), detokenised by the caller."""
    ids: list[int] = field(default_factory=list)
    asm: Any = None
    """The :class:`~.detok.TextAssembler` of the row's answer (over ``ids``)."""
    finish: str | None = None


class Preparer:
    """Renders, tokenises and image-processes requests for an engine, without its model.

    The :class:`Engine` is a preparer with a model; a server whose model runs in another process
    prepares requests with a plain preparer built from the engine's processor.

    Args:
        processor: the checkpoint's ``LlavaProcessor``.
        context_length: the most tokens (prompt + answer) the model takes.
    """

    def __init__(self, processor: Any, context_length: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.context_length = int(context_length)
        self._image_tokens = self._count_image_tokens()
        self._lock = threading.RLock()
        self._prep_lock = threading.Lock()
        self._prep_template: Any = None  # a processor copy no thread encodes with; copied per thread
        self._prep_local = threading.local()
        self._fast: Any = _UNSET
        self._image_token_id = self.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))

    # ------------------------------------------------------------------ prompts
    def _count_image_tokens(self) -> int:
        """How many tokens one image expands to (measured with the processor on a blank image)."""
        from PIL import Image

        size = self.processor.image_processor.crop_size or self.processor.image_processor.size or {}
        side = int(size.get("height") or size.get("shortest_edge") or 32)
        img = Image.new("RGB", (side, side))
        token = getattr(self.processor, "image_token", "<image>")
        enc = self.processor(text=[token], images=[img], return_tensors="pt", add_special_tokens=False)
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        return int((enc["input_ids"][0] == token_id).sum())

    def render_prompt(self, messages: list[dict]) -> str:
        """The prompt text of a conversation, from the checkpoint's chat template."""
        try:
            return self.processor.apply_chat_template(_template_messages(messages),
                                                      add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja errors (template raise_exception, bad roles) are varied
            raise DataError(f"the chat template could not render the messages ({exc})",
                            "check the roles and content parts of the messages") from None

    def count_tokens(self, request: ChatRequest) -> int:
        """Prompt tokens of a request, image tokens included."""
        prompt = self.render_prompt(request.messages)
        n_img = len(request_images(request.messages))
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return len(ids) + n_img * (self._image_tokens - 1)

    def prepare(self, request: ChatRequest) -> PreparedPrompt:
        """Render, tokenise and image-process one request, ready for :meth:`generate`.

        Thread-safe and independent of generation: each calling thread uses its own copy of the
        processor, so a server can prepare requests (the costly image resize included) while the
        model generates for others. Set the result as ``request.prepared``.

        Raises:
            ConfigError: bad parameters, or a prompt that leaves no room in the context length.
            DataError: messages the template cannot render, an image part without an image, or
                image placeholders in the text that do not match the images.
        """
        self._check_params(request.params, 0)
        return self._prepare_with(self._thread_processor(), request)

    def _thread_processor(self) -> Any:
        proc = getattr(self._prep_local, "processor", None)
        if proc is None:
            template = self._template()
            with self._prep_lock:
                proc = self._prep_local.processor = copy.deepcopy(template)
        return proc

    def _template(self) -> Any:
        """A copy of the processor that no thread encodes with (copied per preparing thread)."""
        if self._prep_template is None:
            with self._lock:  # the generating thread mutates self.processor's tokenizer
                if self._prep_template is None:
                    self._prep_template = copy.deepcopy(self.processor)
        return self._prep_template

    def _prepare_with(self, proc: Any, request: ChatRequest) -> PreparedPrompt:
        try:
            prompt = proc.apply_chat_template(_template_messages(request.messages),
                                              add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja errors are varied
            raise DataError(f"the chat template could not render the messages ({exc})",
                            "check the roles and content parts of the messages") from None
        images = request_images(request.messages)
        fast = self._fast_prep()
        got = None
        if fast is not None:
            try:
                got = fast.prepare(prompt, images, proc.tokenizer)
            except Exception:  # an image it cannot handle: the processor decides (and words the error)
                log.debug("fast preparation failed; using the processor", exc_info=True)
        if got is not None:
            ids, tensors = got
        else:
            try:
                enc = proc(text=[prompt], images=images or None, return_tensors="pt",
                           add_special_tokens=False)
            except (ValueError, TypeError, OSError) as exc:
                raise DataError(f"the processor could not encode the request ({exc})",
                                "attach images as image parts, not as placeholders in the text") from None
            ids = enc["input_ids"][0].tolist()
            tensors = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        found = ids.count(self._image_token_id)
        if found != len(images) * self._image_tokens:
            raise DataError(f"the prompt holds {found} image tokens for {len(images)} image(s) "
                            f"({self._image_tokens} each): the text contains the image placeholder",
                            "attach images as image parts, not as placeholders in the text")
        if len(ids) >= self.context_length:
            raise ConfigError(f"the prompt has {len(ids)} tokens, the context length is "
                              f"{self.context_length}", "shorten the conversation")
        return PreparedPrompt(input_ids=ids, tensors=tensors)

    def _fast_prep(self) -> Any:
        """The :class:`~.fastprep.FastPrep` of this processor (built and checked once), or ``None``
        when it does not reproduce the processor exactly."""
        if self._fast is _UNSET:
            template = self._template()  # not self.processor, whose tokenizer generation mutates
            with self._prep_lock:
                if self._fast is _UNSET:
                    from .fastprep import fast_prep

                    self._fast = fast_prep(template, self._image_tokens)
        return self._fast

    @staticmethod
    def _check_params(p: GenerationParams, i: int) -> None:
        if p.max_new_tokens < 1:
            raise ConfigError(f"request {i}: max_new_tokens must be at least 1, got {p.max_new_tokens}")
        if not math.isfinite(p.temperature) or p.temperature < 0:
            raise ConfigError(f"request {i}: temperature must be a finite number >= 0, got {p.temperature}")
        if not 0 < p.top_p <= 1:
            raise ConfigError(f"request {i}: top_p must be in (0, 1], got {p.top_p}")
        if p.seed is not None and not _SEED_MIN <= p.seed <= _SEED_MAX:
            raise ConfigError(f"request {i}: seed must be between -2**63 and 2**64-1, got {p.seed}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(p, name)
            if not (math.isfinite(v) and -2.0 <= v <= 2.0):
                raise ConfigError(f"request {i}: {name} must be between -2 and 2, got {v}")
        if not (math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0):
            raise ConfigError(f"request {i}: repetition_penalty must be a finite number > 0, "
                              f"got {p.repetition_penalty}")



class Engine(Preparer):
    """A loaded checkpoint that answers chat requests (batched, streaming, with stop strings).

    Build it with :meth:`load`. :meth:`generate`, :meth:`stream` and :meth:`count_tokens` may be
    called from several threads: a lock makes one :meth:`generate` call (or one whole stream)
    use the model at a time. To decode many requests together, pass them to one
    :meth:`generate` call.

    Attributes:
        model: the ``LlavaForConditionalGeneration`` in eval mode.
        processor: its ``LlavaProcessor`` (tokenizer, image processor, chat template).
        model_name: a display name (the checkpoint folder's name).
        context_length: the most tokens (prompt + answer) the text model takes.
        device: the torch device the model is on.
        stop_strings: stop strings from the checkpoint's generation config.
        eos_token_ids: token ids that end an answer.
    """

    def __init__(self, model: Any, processor: Any, model_name: str = "model",
                 path: str | os.PathLike | None = None):
        from ..model.checkpoint import use_shape_free_sdpa
        from ..model.compat import stop_settings

        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
            else model.config.text_config
        super().__init__(processor, int(getattr(text_cfg, "max_position_embeddings", 2048) or 2048))
        self.model = model
        self.model_name = model_name
        self.path = Path(path) if path is not None else None
        self.device = str(next(model.parameters()).device)
        self.dtype = next(model.parameters()).dtype
        use_shape_free_sdpa(self.device)  # decode shapes change every step: no per-shape builds
        gen = getattr(model, "generation_config", None)
        # llavamed_stop_strings (stop_strings in older checkpoints); their tokens, also in
        # eos_token_id for other runtimes, stay stop strings here (cut from the text, counted).
        self.stop_strings, stop_ids = stop_settings(gen)
        eos = set()
        for src in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple)):
                eos.update(int(x) for x in src)
        self.eos_token_ids = (eos - stop_ids) or eos
        self.pad_token_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                             else next(iter(eos), 0))
        if getattr(processor, "chat_template", None) is None and \
                getattr(self.tokenizer, "chat_template", None) is None:
            raise ModelError(f"{path or model_name}: the checkpoint has no chat template",
                             "checkpoints written by llavamed carry one; convert others with "
                             "`llavamed weights convert`")
        # transformers 5.24 renamed ``past_key_values`` to ``cache``; a PEFT wrapper hides it.
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters \
            else "past_key_values"

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None, dtype: str | None = None,
             attn_implementation: str | None = None, base: str | os.PathLike | None = None) -> "Engine":
        """Load a checkpoint directory, or a LoRA adapter directory merged into its base.

        Args:
            path: a Llava checkpoint directory, or a PEFT adapter directory
                (``adapter_config.json``); either may be a Hub id ``org/name[@revision]``.
            device: ``cpu``, ``cuda``, ``cuda:1`` (default: CUDA when present, else CPU).
            dtype: ``float32``, ``bfloat16``, ``float16`` (default: bf16 on CUDA, fp32 on CPU).
            attn_implementation: attention kernel (default: flash-attn on CUDA when it imports,
                else sdpa).
            base: the base checkpoint of an adapter (default: the adapter's
                ``base_model_name_or_path``).

        Raises:
            ModelError: not a checkpoint, or an adapter whose base cannot be found.
        """
        from ..model import load_checkpoint
        from ..model.hub import model_display_name, resolve_model

        name, path = model_display_name(path), resolve_model(path, "--model")  # a dir or org/name@rev
        if not is_adapter_dir(path):
            model, processor = load_checkpoint(path, device=device, dtype=dtype,
                                               attn_implementation=attn_implementation)
            return cls(model, processor, model_name=name, path=path)
        try:
            cfg = json.loads((path / "adapter_config.json").read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path / 'adapter_config.json'}: not valid JSON ({exc.msg})") from None
        base_path = Path(base) if base is not None else (
            Path(cfg["base_model_name_or_path"]) if cfg.get("base_model_name_or_path") else None)
        base_path = _resolve_base(base_path)
        if base_path is None or not base_path.is_dir():
            raise ModelError(f"{path}: LoRA adapter whose base model "
                             f"'{base_path or '(not recorded)'}' is not a local directory",
                             "pass the base checkpoint with --base DIR")
        model, processor = load_checkpoint(base_path, device=device, dtype=dtype,
                                           attn_implementation=attn_implementation)
        from ..model.merge_lora import merge_adapter

        model = merge_adapter(model, path)  # PEFT's merge; an adapter that fits only in part is refused
        if (path / "tokenizer_config.json").exists() or (path / "chat_template.jinja").exists():
            from transformers import AutoProcessor

            try:
                processor = AutoProcessor.from_pretrained(path)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"{path}: could not load the adapter's processor "
                                 f"({str(exc).splitlines()[0]})") from None
        return cls(model.eval(), processor, model_name=name, path=path)

    # ------------------------------------------------------------------ generation
    def generate(self, requests: list[ChatRequest], batch_size: int = 16,
                 on_delta: Callable[[int, str], None] | None = None,
                 should_stop: Callable[[int], bool] | None = None,
                 progress: ProgressCallback | None = None,
                 on_result: Callable[[int, GenerationResult], None] | None = None,
                 detokenize: bool = True,
                 ) -> list[GenerationResult]:
        """Answer requests in length-sorted, left-padded batches.

        Args:
            requests: the conversations.
            batch_size: most requests per forward pass.
            on_delta: called with ``(index in requests, new text)`` as tokens arrive.
            should_stop: called with the request index each step; ``True`` cancels that request
                (its result has ``finish_reason="cancelled"`` and the text so far).
            progress: receives ``generate`` events (requests done / total).
            on_result: called with ``(index, result)`` as soon as a request finishes (for writing
                answers while the run goes on).
            detokenize: ``False``: token ids only — ``on_delta`` gets lists of new ids, results
                carry ``token_ids`` and no text, stop strings are left to the caller.

        Returns:
            One result per request, in the order of ``requests``.

        Raises:
            ConfigError: a prompt that leaves no room in the context length, or bad parameters.
            DataError: messages the template cannot render, or an image part without an image.
        """
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size}: must be at least 1")
        sizes = [(i, self._checked_length(req, i)) for i, req in enumerate(requests)]
        order = [i for i, _n in sorted(sizes, key=lambda p: p[1])]
        results: list[GenerationResult | None] = [None] * len(requests)
        done = 0
        emit(progress, "generate", 0, len(requests), "answer")
        with self._lock:
            for start in range(0, len(order), batch_size):
                chunk = [(i, requests[i]) for i in order[start:start + batch_size]]
                for finished in self._decode(chunk, on_delta, should_stop, detokenize):
                    for idx, res in finished:
                        results[idx] = res
                        done += 1
                        if on_result is not None:
                            on_result(idx, res)
                        emit(progress, "generate", done, len(requests), "answer")
        emit(progress, "generate", done, len(requests), "answer", finished=True)
        return [r for r in results if r is not None]

    def stream(self, request: ChatRequest) -> Iterator[str]:
        """Text deltas of one request as tokens arrive; closing the iterator cancels it."""
        deltas: list[str] = []
        cancelled = threading.Event()
        self._checked_length(request, 0)
        with self._lock:
            gen = self._decode([(0, request)], lambda _i, d: deltas.append(d),
                               lambda _i: cancelled.is_set())
            try:
                for _ in gen:
                    while deltas:
                        yield deltas.pop(0)
                while deltas:
                    yield deltas.pop(0)
            finally:
                cancelled.set()
                gen.close()

    def running_batch(self, on_delta: Callable[[Any, str], None] | None = None,
                      should_stop: Callable[[Any], bool] | None = None,
                      streams: Callable[[Any], bool] | None = None, detokenize: bool = True) -> Any:
        """An empty :class:`~.batch.RunningBatch` on this engine: requests join it between decode
        steps (``admit``) and leave it when they finish (iteration-level batching, for a server).
        The caller runs it from one thread and holds no other generation at the same time.
        ``streams(key)`` says whether a request wants ``on_delta`` (default: all do);
        ``detokenize=False`` makes its rows produce token ids only (see :meth:`generate`)."""
        from .batch import RunningBatch

        return RunningBatch(self, on_delta, should_stop, streams, detokenize)

    # ------------------------------------------------------------------ internals
    def _decode(self, items: list[tuple[Any, ChatRequest]],
                on_delta: Callable[[Any, str], None] | None,
                should_stop: Callable[[Any], bool] | None,
                detokenize: bool = True,
                ) -> Iterator[list[tuple[Any, GenerationResult]]]:
        """Decode requests together; after the prefill and every step, yields the ``(key, result)``
        pairs of the rows that finished in it (often none), so callers can stream between steps."""
        batch = self.running_batch(on_delta, should_stop, detokenize=detokenize)
        yield batch.admit(items)
        while batch.rows:
            yield batch.step()

    def _checked_length(self, request: ChatRequest, i: int) -> int:
        """A request's prompt tokens, after checking its parameters and that it fits the context.

        Raises:
            ConfigError: bad parameters, or a prompt that leaves no room in the context length.
            DataError: messages the template cannot render, or an image part without an image.
        """
        self._check_params(request.params, i)
        if request.prepared is not None:
            n = len(request.prepared.input_ids)
        else:
            prompt = self.render_prompt(request.messages)
            images = request_images(request.messages)
            n = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + \
                len(images) * (self._image_tokens - 1)
        if n >= self.context_length:
            raise ConfigError(f"request {i}: the prompt has {n} tokens, the context length is "
                              f"{self.context_length}", "shorten the conversation")
        return n

    def _encode(self, prompts: list[str], images: list[Any]) -> dict:
        self.tokenizer.padding_side = "left"
        enc = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt",
                             add_special_tokens=False)
        return {k: v.to(self.device) for k, v in enc.items()}

    def _collate(self, prepared: list[PreparedPrompt]) -> dict:
        """Left-pad prepared prompts into one batch, as the processor's own padding does."""
        import torch

        width = max(len(p.input_ids) for p in prepared)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.pad_token_id
        input_ids = torch.full((len(prepared), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(prepared), width), dtype=torch.long)
        for b, p in enumerate(prepared):
            input_ids[b, width - len(p.input_ids):] = torch.tensor(p.input_ids, dtype=torch.long)
            mask[b, width - len(p.input_ids):] = 1
        enc = {"input_ids": input_ids, "attention_mask": mask}
        for key in dict.fromkeys(k for p in prepared for k in p.tensors):
            enc[key] = torch.cat([p.tensors[key] for p in prepared if key in p.tensors])
        return {k: v.to(self.device) for k, v in enc.items()}

    def _batch_inputs(self, requests: list[ChatRequest]) -> dict:
        """The left-padded model inputs of requests: each prepared (ahead, as a server does, or
        here) and collated; the processor's batched call only when there is no exact fast path."""
        if any(r.prepared is not None for r in requests) or self._fast_prep() is not None:
            return self._collate([r.prepared if r.prepared is not None
                                  else self._prepare_with(self.processor, r) for r in requests])
        return self._encode([self.render_prompt(r.messages) for r in requests],
                            [img for r in requests for img in request_images(r.messages)])

    def _new_row(self, key: Any, request: ChatRequest, prompt_ids: list[int]) -> _Row:
        """The decoding state of a request whose prompt is ``prompt_ids``."""
        import torch

        p = request.params
        gen = None
        if p.temperature > 0:
            gen = torch.Generator(device=self.device)
            if p.seed is None:
                gen.seed()
            else:
                gen.manual_seed(int(p.seed))
        n = len(prompt_ids)
        row = _Row(index=key, prompt_tokens=n,
                   max_new=max(1, min(p.max_new_tokens, self.context_length - n)),
                   temperature=float(p.temperature), top_p=float(p.top_p),
                   stops=request_stops(p, self.stop_strings), generator=gen,
                   request=request, prompt_ids=prompt_ids)
        row.asm = TextAssembler(self.tokenizer, row.stops, row.ids)
        return row

    def _pick(self, logits: Any, rows: list[_Row]) -> Any:
        """Next token per row: penalties first (vLLM's order), then argmax for greedy rows and a
        seeded draw for sampled rows."""
        import torch

        from .penalties import RowPenalties, penalties_active

        penalised = False
        for b, row in enumerate(rows):
            p = row.request.params if row.request is not None else None
            if p is None or not penalties_active(p.repetition_penalty, p.frequency_penalty,
                                                 p.presence_penalty):
                continue
            if row.penalties is None:
                row.penalties = RowPenalties(logits.shape[-1], row.prompt_ids, p.repetition_penalty,
                                             p.frequency_penalty, p.presence_penalty, logits.device)
                for t in row.ids:
                    row.penalties.add(t)
            if not penalised:
                logits, penalised = logits.clone(), True
            logits[b] = row.penalties.apply(logits[b])
        tokens = logits.argmax(dim=-1)
        for b, row in enumerate(rows):
            if row.temperature <= 0 or row.finish is not None:
                continue
            probs = torch.softmax(logits[b] / row.temperature, dim=-1)
            if row.top_p < 1.0:
                sp, si = probs.sort(descending=True)
                cum = sp.cumsum(0)
                drop = cum - sp > row.top_p  # keep tokens until the mass reaches top_p
                sp = sp.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter(0, si, sp)
            tokens[b] = torch.multinomial(probs, 1, generator=row.generator)[0]
        return tokens

    def _advance(self, row: _Row, token: int, on_delta: Callable[[Any, Any], None] | None,
                 should_stop: Callable[[Any], bool] | None) -> None:
        """Add one token to a row, then decide whether the row is finished; stream new text.

        The text grows incrementally (:class:`~.detok.TextAssembler`), so a step costs the same at
        token 5 and at token 500; the final text is decoded whole once, in :meth:`_result`. A row
        that neither streams nor has stop strings skips the incremental text: nothing reads it.
        An ``ids_only`` row streams its new token ids instead and leaves text and stop strings to
        its caller (the API process of a server).
        """
        if should_stop is not None and should_stop(row.index):
            row.finish = "cancelled"
            return
        if token in self.eos_token_ids:
            row.finish = "stop"
            return
        row.ids.append(token)
        if row.penalties is not None:
            row.penalties.add(token)
        if row.ids_only:
            if on_delta is not None:
                on_delta(row.index, [token])
        elif (on_delta is not None or row.stops) and row.asm.update():  # else nothing reads the text yet
            row.finish = "stop"
        if row.finish is None and len(row.ids) >= row.max_new:
            row.finish = "length"
        if row.finish is None and on_delta is not None and not row.ids_only:
            delta = row.asm.take_delta()
            if delta:
                on_delta(row.index, delta)

    def _result(self, row: _Row, on_delta: Callable[[Any, Any], None] | None) -> GenerationResult:
        """Finish a row: decode its whole text once, stream what was held back, build its result."""
        if row.ids_only:
            return GenerationResult(text="", finish_reason=row.finish or "length",
                                    prompt_tokens=row.prompt_tokens, completion_tokens=len(row.ids),
                                    token_ids=list(row.ids))
        final, rest = row.asm.finish()
        if on_delta is not None and rest:
            on_delta(row.index, rest)
        return GenerationResult(text=final, finish_reason=row.finish or "length",
                                prompt_tokens=row.prompt_tokens, completion_tokens=len(row.ids))
