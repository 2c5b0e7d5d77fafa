"""OpenAI-style API errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Every failure the server answers goes through :class:`APIError`, so clients (the ``openai``
package, curl, the web page) always get the same shape and never a stack trace. Status codes:

- 400 ``invalid_request_error``: the body is not JSON, a field that would change the answer is
  not implemented (``unsupported_parameter``: ``tools``, ``logprobs``, ...), ``n`` is over the
  cap (``n_too_large``), an image cannot be used (bad base64, not an image, too many pixels, a
  side too long, too thin, too many images, remote URL refused), the text holds the image
  placeholder, the prompt does not fit; a CORS preflight from an origin not allowed
  (``cors_not_allowed``).
- 401 ``authentication_error``: missing or wrong Bearer token.
- 403 ``permission_error`` / ``host_not_allowed`` or ``origin_not_allowed``: without an API key,
  a ``Host`` or browser ``Origin`` outside the allowlist (DNS-rebinding and cross-site defence).
- 404 ``invalid_request_error`` / ``model_not_found``: unknown model or route.
- 408 ``invalid_request_error`` / ``request_timeout``: the body did not arrive in time.
- 413 ``invalid_request_error`` / ``request_too_large``: the body is over the size cap.
- 415 ``invalid_request_error`` / ``unsupported_media_type``: the body is not sent as
  ``application/json``.
- 422 ``invalid_request_error``: the JSON does not match the schema (:mod:`.schema`: wrong
  type, missing field, empty ``messages``, value out of range, unknown role or part type).
- 429 ``rate_limit_error`` / ``queue_full``: the batch queue is full; retry later.
- 500 ``server_error``: a bug or engine failure (details in the server log only).
- 503 ``server_error`` / ``model_loading``: the model is still loading (or the backend is down).
"""

from __future__ import annotations

__all__ = ["APIError", "bad_request", "error_body"]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The JSON body of an OpenAI-style error."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON.

    Args:
        status: HTTP status code.
        message: one line for the client (never internals or secrets).
        type_: OpenAI error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, as a dotted path (``messages[0].content[1].image_url``).
        code: a short machine-readable code (``invalid_image``, ``queue_full``, ...).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body to send."""
        return error_body(self.message, self.type, self.param, self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, "invalid_request_error", param, code)

