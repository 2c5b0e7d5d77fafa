"""The web chat page at ``GET /`` (``static/index.html``, a client of the same API) and its
Content-Security-Policy: its own inline script and style by hash, nothing fetched from elsewhere."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

__all__ = ["page_router", "content_security_policy"]


def content_security_policy(page: str) -> str:
    """The Content-Security-Policy of the web page: its own inline script and style (by hash),
    images from data/blob URLs, requests to this server only; no frames, forms, plugins."""
    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                        for b in bodies)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            f"img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            f"frame-ancestors 'none'")


def page_router() -> APIRouter:
    """``GET /`` (the page, with its security headers) and ``GET /favicon.ico`` (204)."""
    router = APIRouter()
    page = resources.files("llavamed_core.serve").joinpath("static/index.html").read_text("utf-8")
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": content_security_policy(page),
               "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
               "Referrer-Policy": "no-referrer"}

    @router.get("/")
    async def index() -> Any:
        return HTMLResponse(page, headers=headers)

    @router.get("/favicon.ico")
    async def favicon() -> Any:
        return Response(status_code=204)

    return router
