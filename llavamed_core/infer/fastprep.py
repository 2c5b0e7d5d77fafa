"""Request preparation without the processor's generic machinery, exact or not at all.

``LlavaProcessor(text=..., images=...)`` spends most of its time on what does not depend on the
request: merging keyword defaults, validating arguments, inferring channel layouts, converting
the image to numpy and back to PIL for the resize, building ``BatchEncoding`` objects. For a
served request (one prompt, a few images) that overhead is several times the arithmetic, and
it runs in the API process for every request. :class:`FastPrep` does the same steps directly,
for the two image processors our checkpoints use:

- ``CLIPImageProcessorPil``: resize the shortest edge, centre-crop, rescale, normalise;
- ``LlavaImageProcessorPil`` with ``do_pad`` (LLaVA-Med v1.5): pad to a square with the mean
  colour first.

Each step uses the same arithmetic as transformers' PIL backend: PIL's resize, then rescale
(float64, then float32) and normalise (float32), tabulated once per channel and byte value. The
prompt is tokenised by the same Rust tokenizer the processor calls, and each image placeholder's
id is then repeated (an added token is split off before normalising and pre-tokenising, so this
equals tokenising the expanded text, without a pass over hundreds of copies). So the result is
meant to be equal, bit for bit, and that is checked rather than assumed: :func:`fast_prep`
builds a :class:`FastPrep` only after it reproduces the processor exactly on probe requests
(several image shapes, zero to two images, text around the placeholders); any other processor,
any difference or any error gives ``None`` and the processor is used. A request the fast path
does not cover (an image that is not plain RGB, a tokenizer whose truncation or padding is
set) goes to the processor too.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["FastPrep", "fast_prep"]

log = logging.getLogger("llavamed.infer")

_HANDLED = ("CLIPImageProcessorPil", "LlavaImageProcessorPil")


class FastPrep:
    """Pixel values and prompt ids of a request, as the processor computes them (see the module).

    Build it with :func:`fast_prep`, which checks it against the processor first.

    Args:
        processor: the checkpoint's ``LlavaProcessor``.
        image_tokens: how many tokens one image expands to.
    """

    def __init__(self, processor: Any, image_tokens: int):
        import numpy as np

        ip = processor.image_processor
        if type(ip).__name__ not in _HANDLED:
            raise ValueError(f"image processor {type(ip).__name__} is not one the fast path reproduces")
        if not (ip.do_convert_rgb and ip.do_resize and ip.do_center_crop and ip.do_rescale
                and ip.do_normalize):
            raise ValueError("the fast path reproduces convert, resize, crop, rescale and normalise only")
        size, crop = ip.size, ip.crop_size
        if not size.get("shortest_edge") or size.get("longest_edge") or size.get("height"):
            raise ValueError(f"resize to {dict(size)}: only a shortest edge is reproduced")
        if getattr(ip, "reducing_gap", None):
            raise ValueError("a reducing gap is not reproduced")
        self._pad = bool(getattr(ip, "do_pad", False))
        if self._pad and type(ip).__name__ != "LlavaImageProcessorPil":
            raise ValueError("padding is reproduced for the Llava processor's pad-to-square only")
        self._short = int(size["shortest_edge"])
        self._crop = (int(crop["height"]), int(crop["width"]))
        self._resample = ip.resample
        mean = np.asarray(ip.image_mean, dtype=np.float32)
        std = np.asarray(ip.image_std, dtype=np.float32)
        # Rescale and normalise map each channel's 256 byte values to fixed floats: computed once
        # here with the processor's arithmetic (float64 rescale, float32 normalise), then looked up.
        levels = np.arange(256, dtype=np.uint8)[:, None].repeat(len(mean), axis=1)
        scaled = (levels.astype(np.float64) * float(ip.rescale_factor)).astype(np.float32)
        self._lut = np.ascontiguousarray(((scaled - mean) / std).T)  # [channel, byte value]
        self._fill = tuple(int(x * 255) for x in ip.image_mean)
        self._token = getattr(processor, "image_token", "<image>")
        self._token_id = processor.tokenizer.convert_tokens_to_ids(self._token)
        if self._token not in processor.tokenizer.get_added_vocab():
            raise ValueError(f"the image placeholder {self._token!r} is not an added token")
        self._expanded_ids = [self._token_id] * int(image_tokens)

    # ------------------------------------------------------------------ images
    def pixel_values(self, images: list[Any]) -> Any:
        """``[n, 3, H, W]`` float32 pixel values of PIL images, or ``None`` when one is not plain
        RGB (the processor's colour conversion is then used)."""
        import numpy as np
        import torch

        if any(getattr(im, "mode", None) != "RGB" for im in images):
            return None
        return torch.from_numpy(np.stack([self._one(im) for im in images]))

    def _one(self, image: Any) -> Any:
        import numpy as np
        from PIL import Image

        w, h = image.size
        if self._pad and w != h:
            side = max(w, h)
            square = Image.new("RGB", (side, side), self._fill)
            square.paste(image, ((side - w) // 2, (side - h) // 2))
            image, w, h = square, side, side
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self._short, int(self._short * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        arr = np.asarray(image.resize((new_w, new_h), resample=self._resample))
        ch, cw = self._crop
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        if top < 0 or left < 0:  # smaller than the crop: the processor pads; not reproduced
            raise _NotCovered()
        arr = arr[top:top + ch, left:left + cw]
        return np.stack([self._lut[c].take(arr[:, :, c]) for c in range(arr.shape[2])])

    # ------------------------------------------------------------------ text
    def input_ids(self, prompt: str, tokenizer: Any) -> list[int] | None:
        """The prompt's ids with each image placeholder expanded, or ``None`` when ``tokenizer``
        is not a plain Rust-backed one (no truncation, no padding, special tokens kept whole)."""
        rust = getattr(tokenizer, "_tokenizer", None)
        if rust is None or not hasattr(rust, "encode_batch"):
            return None
        if rust.truncation is not None or rust.padding is not None or \
                getattr(rust, "encode_special_tokens", False) != bool(getattr(tokenizer, "split_special_tokens", False)):
            return None
        ids = rust.encode_batch([prompt], add_special_tokens=False, is_pretokenized=False)[0].ids
        if self._token_id not in ids:
            return ids
        # The placeholder is an added token, split off before anything else runs: expanding its
        # id equals tokenising the expanded text (which costs a pass over hundreds of copies).
        out: list[int] = []
        for i in ids:
            if i == self._token_id:
                out.extend(self._expanded_ids)
            else:
                out.append(i)
        return out

    def prepare(self, prompt: str, images: list[Any], tokenizer: Any) -> tuple[list[int], dict] | None:
        """``(input_ids, tensors)`` as the processor makes them, or ``None`` when this request is
        not covered (use the processor)."""
        ids = self.input_ids(prompt, tokenizer)
        if ids is None:
            return None
        if not images:
            return ids, {}
        try:
            pixels = self.pixel_values(images)
        except _NotCovered:
            return None
        if pixels is None:
            return None
        return ids, {"pixel_values": pixels}


class _NotCovered(Exception):
    """A request the fast path does not reproduce."""


def fast_prep(processor: Any, image_tokens: int) -> FastPrep | None:
    """A :class:`FastPrep` for ``processor`` if it reproduces the processor exactly on probe
    requests, else ``None`` (with the reason logged at debug level)."""
    try:
        fast = FastPrep(processor, image_tokens)
        _check(fast, processor)
    except Exception as exc:  # any difference or failure: the processor it is
        log.debug("fast request preparation is off: %s", exc)
        return None
    return fast


def _check(fast: FastPrep, processor: Any) -> None:
    """Raise unless ``fast`` gives what ``processor`` gives on the probe requests."""
    import copy

    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)

    def noise(w: int, h: int) -> Any:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")

    side = max(fast._crop)
    images = [noise(w, h) for w, h in ((side, side), (2 * side + 7, side + 3), (side + 1, 3 * side),
                                       (64, 48), (333, 500))]
    token = fast._token
    proc = copy.deepcopy(processor)  # the probe must not change the caller's tokenizer state
    texts = [("plain text, no image: ünïcödé 42", []),
             (f"{token}\nWhat is shown? ", images[:1]),
             (f"Compare {token} with{token}and say which is larger.", images[1:3]),
             (f"{token}", images[3:4]),
             (f" {token} trailing spaces  ", images[4:5])]
    for text, ims in texts:
        want = proc(text=[text], images=ims or None, return_tensors="pt", add_special_tokens=False)
        got = fast.prepare(text, ims, proc.tokenizer)
        if got is None:
            raise ValueError("a probe request was not covered")
        ids, tensors = got
        if ids != want["input_ids"][0].tolist():
            raise ValueError(f"prompt ids differ from the processor's on {text!r}")
        if ims and not torch.equal(tensors["pixel_values"], want["pixel_values"]):
            diff = (tensors["pixel_values"] - want["pixel_values"]).abs().max().item()
            raise ValueError(f"pixel values differ from the processor's (by up to {diff:g})")
