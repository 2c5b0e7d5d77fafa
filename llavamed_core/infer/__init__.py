"""The one generation engine (batched, streaming, stop strings) used by chat, serve, eval and demo.

:mod:`.engine` runs a checkpoint in this process; :mod:`.remote` speaks the OpenAI-compatible
chat API to a server (``llavamed serve``, vLLM, a hosted model) with the same interface.
"""

from .engine import ChatRequest, Engine, GenerationParams, GenerationResult, is_adapter_dir, request_images

__all__ = ["ChatRequest", "Engine", "GenerationParams", "GenerationResult", "is_adapter_dir",
           "request_images"]
