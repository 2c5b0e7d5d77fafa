"""Evaluation: VQA answer generation and metrics, LLM-judged chat scores, summaries.

Import the submodules directly (``llavamed_core.eval.vqa_metrics``, ...); this package file stays
light so that importing one part does not pull in the others' dependencies.
"""
