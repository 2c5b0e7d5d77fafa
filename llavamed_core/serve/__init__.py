"""``llavamed serve``: an OpenAI-compatible chat API with continuous batching, a web chat page, and vLLM.

- :mod:`.config`: :class:`ServeConfig` and its parts (limits, remote-image policy, vLLM launch).
- :mod:`.app`: the FastAPI app (server state, error handlers, middleware) over
  :mod:`.routes` (the API), :mod:`.page` (the web page) and :mod:`.guards` (auth, limits,
  Host/Origin guard, CORS, request log).
- :mod:`.schema` / :mod:`.protocol` / :mod:`.images`: the request schema (pydantic), request
  checking, image decoding, response shapes; :mod:`.choices`: ``n`` > 1.
- :mod:`.scheduler`: continuous batching in front of the engine (a request joins the running batch
  at the next decode step); :mod:`.engine_proc`: the model and that loop in their own process.
- :mod:`.backend`: the typed backend interface; :mod:`.native` / :mod:`.vllm`: the two backends
  (our engine; vLLM's server behind a proxy).
- :mod:`.server`: bind and run under uvicorn.
- ``static/index.html``: the web chat page.

Nothing here is imported by ``llavamed --help``; FastAPI and uvicorn load inside the functions.
"""

from .config import RemoteImagePolicy, ServeConfig, ServeLimits, VllmConfig

__all__ = ["ServeConfig", "ServeLimits", "RemoteImagePolicy", "VllmConfig"]
