"""Instruction-data generation: the prompt and its few-shot examples, generation through the LLM
client (``instruct gen``), and post-processing into training conversations (``instruct post``)."""

from .generate import GenConfig, GenResult, generate_instructions
from .postprocess import PostConfig, PostStats, postprocess_generations
from .prompt import DEFAULT_PROMPT_FILE, load_prompt

__all__ = ["GenConfig", "GenResult", "generate_instructions", "PostConfig", "PostStats",
           "postprocess_generations", "DEFAULT_PROMPT_FILE", "load_prompt"]
