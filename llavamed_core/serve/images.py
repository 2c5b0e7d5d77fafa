"""Turn the ``image_url`` of a chat message into a checked RGB image, or a 400 that says why.

Data URLs (``data:image/png;base64,...``) are decoded here; ``http(s)`` URLs are fetched only
when the server allows remote images, from allow-listed hosts, with a timeout and a size cap
(redirects are followed by hand so every hop is checked against the allowlist).

:func:`open_image` is the one place image bytes become pixels. Width, height, aspect ratio and
pixel count are checked from the image header (Pillow's lazy open) before any pixel is decoded or
resized, so a small file that claims a huge or extremely thin image (a 16,777,216×1 PNG is 16 kB
on the wire but needs ~51 GB once resized) is refused at once with a 400 naming the limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from typing import Any
from urllib.parse import urljoin, urlsplit

from .api_errors import APIError, bad_request
from .config import RemoteImagePolicy, ServeLimits

__all__ = ["decode_data_url", "open_image", "check_image_size", "fetch_remote_image", "to_data_url",
           "is_remote_url", "open_medical_image", "is_medical", "png_data_url", "MEDICAL_MEDIA_TYPES"]


def is_remote_url(url: str) -> bool:
    """Whether ``url`` is an ``http(s)`` URL (as opposed to a data URL)."""
    return url[:8].lower().startswith(("http://", "https://"))


def decode_data_url(url: str, param: str, limits: ServeLimits) -> tuple[bytes, str]:
    """The bytes and media type of a base64 data URL.

    Args:
        url: ``data:<media type>;base64,<data>``.
        param: the request field, for the error message.
        limits: the size cap.

    Returns:
        ``(bytes, media_type)``.

    Raises:
        APIError: 400 when the URL is not a base64 image data URL, the base64 is invalid or the
            data is over the size cap.
    """
    if not url[:5].lower() == "data:":
        raise bad_request(f"{param}: expected a data URL (data:image/...;base64,...) or an "
                          f"http(s) URL, got {url[:30]!r}", param, "invalid_image_url")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request(f"{param}: the data URL has no ',' before its data", param, "invalid_image_url")
    parts = [p.strip().lower() for p in header.split(";")]
    media_type = parts[0] or "image/*"
    if "base64" not in parts[1:]:
        raise bad_request(f"{param}: only base64 data URLs are accepted (data:image/png;base64,...)",
                          param, "invalid_image_url")
    if media_type in MEDICAL_MEDIA_TYPES:  # DICOM/NIfTI; rendering options ride along as parameters
        media_type = ";".join([media_type] + [p for p in parts[1:] if "=" in p])
    elif not media_type.startswith("image/"):
        raise bad_request(f"{param}: the data URL's media type is {media_type!r}, not an image",
                          param, "invalid_image")
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise bad_request(f"{param}: the image is about {len(payload) * 3 // 4:,} bytes, over this "
                          f"server's limit of {limits.max_image_bytes:,}", param, "image_too_large")
    compact = "".join(payload.split())
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the image data is not valid base64", param,
                          "invalid_base64") from None
    if not data:
        raise bad_request(f"{param}: the image data is empty", param, "invalid_image")
    return data, media_type


def open_image(data: bytes, param: str, limits: ServeLimits, media_type: str = "") -> Any:
    """Decode image bytes into an RGB ``PIL.Image``, checking its size from the header first.

    This is the one function that turns a request's image bytes into pixels (data URLs and
    remote images alike); other formats plug in here.

    16-bit and float greyscale images (common for medical scans) are scaled to 0–255 by their
    own range rather than clipped.

    Raises:
        APIError: 400 when the bytes are not an image, are corrupt, or the image is over a size
            limit (checked before decoding).
    """
    if len(data) > limits.max_image_bytes:
        raise bad_request(f"{param}: the image is {len(data):,} bytes, over this server's limit of "
                          f"{limits.max_image_bytes:,}", param, "image_too_large")
    if _medical_kind(data, media_type) != "image":
        return open_medical_image(data, param, limits, media_type)
    img = _open_lazily(data, param)
    check_image_size(img.width, img.height, param, limits)
    return _decode(img, param)


MEDICAL_MEDIA_TYPES = ("application/dicom", "application/x-nifti", "application/nifti",
                       "application/gzip", "application/x-gzip", "application/octet-stream")
"""Data URL media types that may hold a DICOM or NIfTI file (what browsers give .dcm, .nii and
.nii.gz files); the bytes decide. Parameters ``window=lung``, ``window-center=-600;window-width=1500``,
``frame=N``, ``slice=N``, ``plane=coronal``, ``volume=N`` choose the rendering."""


def _medical_kind(data: bytes, media_type: str) -> str:
    from ..images import image_kind

    return image_kind(data[:1024], "upload.dcm" if media_type.startswith("application/dicom") else "")


def is_medical(data: bytes, media_type: str) -> bool:
    """Whether image bytes are a DICOM or NIfTI file (rendered by :func:`open_medical_image`)."""
    return bool(data) and _medical_kind(data, media_type) != "image"


def png_data_url(image: Any) -> str:
    """A ``data:image/png`` URL of a decoded image (what the model sees, for another server)."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return to_data_url(buf.getvalue(), "image/png")


def open_medical_image(data: bytes, param: str, limits: ServeLimits, media_type: str = "") -> Any:
    """Render a DICOM or NIfTI upload exactly as ``llavamed data view`` does (RGB ``PIL.Image``).

    Raises:
        APIError: 400 with the loader's one-line reason (no pixel data, truncated, 4-D without
            ``volume=N``, a compressed syntax without a decoder, a bad parameter, too many pixels).
    """
    from ..errors import LlavamedError
    from ..images import ImageOptions, load_image

    params = dict(p.split("=", 1) for p in media_type.split(";")[1:] if "=" in p)
    try:
        window = params.get("window")
        if "window-center" in params or "window-width" in params:
            window = f"{params.get('window-center', '')},{params.get('window-width', '')}"
        options = ImageOptions(window=window, frame=_int_param(params, "frame"),
                               slice_index=_int_param(params, "slice"),
                               plane=params.get("plane", "axial"), volume=_int_param(params, "volume"))
    except (LlavamedError, ValueError) as exc:
        raise bad_request(f"{param}: bad data URL parameter ({getattr(exc, 'message', exc)})", param,
                          "invalid_image_url") from None
    try:
        img = load_image(data, options, name=param, max_pixels=limits.max_image_pixels)
    except LlavamedError as exc:
        hint = f"; {exc.hint}" if exc.hint else ""
        raise bad_request(f"{exc.message}{hint}", param, "invalid_image") from None
    check_image_size(img.width, img.height, param, limits)
    return img


def _int_param(params: dict, key: str) -> int | None:
    if key not in params:
        return None
    try:
        return int(params[key])
    except ValueError:
        raise ValueError(f"{key}={params[key]!r} is not a whole number") from None


def image_pixels(data: bytes, param: str) -> int:
    """Width × height of an image, from its header only (nothing is decoded).

    Raises:
        APIError: 400 when the bytes are not an image or the header is corrupt.
    """
    img = _open_lazily(data, param)
    return img.width * img.height


def _open_lazily(data: bytes, param: str) -> Any:
    """Pillow's lazy open: the header is read (format, mode, size), no pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise bad_request(f"{param}: the image has too many pixels to be opened safely", param,
                          "image_too_large") from None
    except UnidentifiedImageError:
        raise bad_request(f"{param}: the data is not an image in a format the server can read "
                          f"(PNG, JPEG, TIFF, BMP, GIF, WebP, ...)", param, "invalid_image") from None
    except (OSError, ValueError, SyntaxError):
        raise bad_request(f"{param}: the image header is corrupt", param, "invalid_image") from None


def check_image_size(width: int, height: int, param: str, limits: ServeLimits) -> None:
    """Refuse an image by its header size: no side over ``max_image_side``, no aspect ratio over
    ``max_image_aspect``, no more than ``max_image_pixels`` pixels.

    Raises:
        APIError: 400 ``image_too_large`` / ``image_aspect_ratio`` / ``invalid_image`` (empty).
    """
    if width < 1 or height < 1:
        raise bad_request(f"{param}: the image is empty ({width}x{height} pixels)", param, "invalid_image")
    if max(width, height) > limits.max_image_side:
        raise bad_request(f"{param}: the image is {width}x{height} pixels, over this server's limit "
                          f"of {limits.max_image_side:,} pixels per side (--max-image-side); "
                          f"downscale it first", param, "image_too_large")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_image_aspect:
        raise bad_request(f"{param}: the image is {width}x{height} pixels, an aspect ratio of "
                          f"{ratio:,.0f}:1, over this server's limit of {limits.max_image_aspect:g}:1 "
                          f"(--max-image-aspect); crop or pad it first", param, "image_aspect_ratio")
    if width * height > limits.max_image_pixels:
        raise bad_request(f"{param}: the image has {width}x{height} = {width * height:,} pixels, "
                          f"over this server's limit of {limits.max_image_pixels:,} pixels "
                          f"(--max-image-pixels); downscale it first", param, "image_too_large")


def _decode(img: Any, param: str) -> Any:
    """Decode a lazily opened image's pixels (its size already checked) into RGB."""
    try:
        img.load()
        from ..images import as_rgb

        return as_rgb(img)
    except Exception as exc:  # Pillow's decoders raise many types on corrupt data; all mean "bad image"
        raise bad_request(f"{param}: the image could not be decoded ({type(exc).__name__}: "
                          f"truncated or corrupt)", param, "invalid_image") from None


async def fetch_remote_image(url: str, param: str, policy: RemoteImagePolicy, limits: ServeLimits,
                             client: Any) -> tuple[bytes, str]:
    """Download an ``http(s)`` image under the remote-image policy.

    Args:
        url: the image URL.
        param: the request field, for error messages.
        policy: whether remote images are allowed, from which hosts, and the timeout.
        limits: the size cap.
        client: an ``httpx.AsyncClient``.

    Returns:
        ``(bytes, media_type)``.

    Raises:
        APIError: 400 when remote images are off, the host is not allowed, the download fails,
            times out, is not 200, or is over the size cap.
    """
    import httpx

    if not policy.allow:
        raise bad_request(f"{param}: this server does not fetch remote image URLs; send the image "
                          f"inline as a base64 data URL (data:image/png;base64,...)", param,
                          "remote_image_not_allowed")
    try:
        async with asyncio.timeout(policy.timeout_s):
            for _hop in range(policy.max_redirects + 1):
                host = urlsplit(url).hostname or ""
                if urlsplit(url).scheme.lower() not in ("http", "https"):
                    raise bad_request(f"{param}: only http(s) image URLs may be fetched", param,
                                      "remote_image_not_allowed")
                if not policy.host_allowed(host):
                    raise bad_request(f"{param}: host {host!r} is not in this server's allowed "
                                      f"domains for remote images", param, "remote_image_not_allowed")
                async with client.stream("GET", url, follow_redirects=False) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        url = urljoin(url, resp.headers["location"])
                        continue
                    if resp.status_code != 200:
                        raise bad_request(f"{param}: fetching the image answered HTTP "
                                          f"{resp.status_code}", param, "remote_image_failed")
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
                        raise _remote_too_large(param, int(declared), limits)
                    chunks, size = [], 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > limits.max_image_bytes:
                            raise _remote_too_large(param, size, limits)
                        chunks.append(chunk)
                    media_type = resp.headers.get("content-type", "image/*").split(";")[0].strip()
                    return b"".join(chunks), media_type
            raise bad_request(f"{param}: more than {policy.max_redirects} redirects", param,
                              "remote_image_failed")
    except TimeoutError:
        raise bad_request(f"{param}: fetching the image took longer than {policy.timeout_s:g} s",
                          param, "remote_image_timeout") from None
    except httpx.HTTPError as exc:
        raise bad_request(f"{param}: the image could not be fetched ({type(exc).__name__})", param,
                          "remote_image_failed") from None


def _remote_too_large(param: str, size: int, limits: ServeLimits) -> APIError:
    return bad_request(f"{param}: the remote image is over {min(size, limits.max_image_bytes + 1):,} "
                       f"bytes, over this server's limit of {limits.max_image_bytes:,}", param,
                       "image_too_large")


def to_data_url(data: bytes, media_type: str) -> str:
    """A base64 data URL for image bytes."""
    if not media_type.startswith("image/") or media_type == "image/*":
        media_type = "image/png"
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"
