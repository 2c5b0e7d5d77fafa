"""Turn a figure's bytes into a verified JPEG, and check images already on disk.

A figure is written as ``<pair_id>.jpg``, so the bytes must be a JPEG: a JPEG member is decoded
once to prove it is whole and then kept byte for byte; PNG, TIFF, GIF and the rest are decoded and
re-encoded as JPEG (transparency flattened on white, 16-bit and float greyscale stretched to
8 bits). Pillow's decompression-bomb limit stays on: an image claiming more than twice
``PIL.Image.MAX_IMAGE_PIXELS`` pixels is rejected as ``too-large`` before it is decoded.
"""

from __future__ import annotations

import io
import os
import re

from PIL import Image, UnidentifiedImageError

from ..images import as_rgb

__all__ = ["ImageRejected", "to_jpeg", "is_valid_jpeg", "JPEG_FORMATS"]

JPEG_FORMATS = frozenset({"JPEG", "MPO"})
"""Pillow format names whose files are JPEG streams (MPO is a JPEG with extra pictures appended)."""


class ImageRejected(Exception):
    """A figure that cannot become a JPEG.

    Attributes:
        reason: ``too-large`` (decompression-bomb guard) or ``not-an-image`` (does not decode).
        detail: what Pillow said.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError,
                  TypeError, KeyError, MemoryError)


def to_jpeg(data: bytes, quality: int = 95) -> tuple[bytes, str]:
    """Return JPEG bytes for an image file's bytes, decoding it fully once.

    Args:
        data: the image file's bytes.
        quality: JPEG quality used when converting from another format.

    Returns:
        ``(jpeg_bytes, source_format)``; for a JPEG input the bytes are ``data`` unchanged.

    Raises:
        ImageRejected: a decompression bomb (``too-large``) or bytes that do not decode
            (``not-an-image``).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or "unknown"
            im.load()
            if fmt in JPEG_FORMATS:
                return data, fmt
            rgb = as_rgb(im)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too-large", str(exc)) from None
    except _DECODE_ERRORS as exc:
        # Pillow names the in-memory buffer with its address; keep details the same run to run.
        detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))
        raise ImageRejected("not-an-image", f"{type(exc).__name__}: {detail}") from None
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), fmt


def is_valid_jpeg(path: str | os.PathLike) -> bool:
    """True when ``path`` is a JPEG that decodes to the end (at reduced scale, which is fast)."""
    try:
        with Image.open(path) as im:
            if im.format not in JPEG_FORMATS:
                return False
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
        return True
    except Image.DecompressionBombError:
        return False
    except _DECODE_ERRORS:
        return False
