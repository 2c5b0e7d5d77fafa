"""Percentile bootstrap over questions: a metric's 95 % confidence interval, and a paired difference.

A metric here is a mean of per-question scores (a VQA accuracy or recall, the chat benchmark's
relative score). The bootstrap draws ``n_boot`` resamples of the questions with replacement and
takes the 2.5th and 97.5th percentiles of the resampled means (numpy's ``percentile``, linear
interpolation). The draws are fixed by the seed and the number of questions alone: one matrix
``numpy.random.default_rng(seed).integers(0, n, size=(n_boot, n))``, row i = resample i. Every
estimate starts a fresh generator from the seed, so a figure never depends on which other runs or
metrics are in the table, and two runs on the same questions are resampled identically.

The paired difference B − A resamples *questions* (matched by id beforehand), taking both runs'
scores of each drawn question, so it measures the difference on the same questions; identical runs
give 0 with the interval [0, 0].

The point estimate is the plain mean ``sum(scores) / n`` in question order, the way
``vqa_metrics`` aggregates, so it equals the figure in results.json to the last bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Estimate", "mean_ci", "paired_difference", "resample_means", "LEVEL"]

LEVEL = 0.95
"""Confidence level of every interval."""


@dataclass(frozen=True)
class Estimate:
    """A mean with its percentile-bootstrap interval (``low``/``high`` are ``None`` without resamples).

    Attributes:
        value: the mean over the ``n`` questions (``None`` when ``n`` is 0).
        low: lower bound of the 95 % interval.
        high: upper bound of the 95 % interval.
        n: number of questions.
    """

    value: float | None
    low: float | None
    high: float | None
    n: int

    def scaled(self, factor: float) -> Estimate:
        """The same estimate in other units (fractions → percentage points: ``factor=100``)."""
        f = (lambda v: None if v is None else v * factor)  # noqa: E731
        return Estimate(f(self.value), f(self.low), f(self.high), self.n)

    def to_dict(self, digits: int | None = None) -> dict[str, Any]:
        """``{"value", "ci_low", "ci_high", "n"}``, rounded to ``digits`` when given."""
        r = (lambda v: v if v is None or digits is None else round(v, digits))  # noqa: E731
        return {"value": r(self.value), "ci_low": r(self.low), "ci_high": r(self.high), "n": self.n}


_CHUNK = 1 << 21
"""Draws held in memory at once (16 MiB of indices); rows are drawn in blocks, the same stream."""


def resample_means(scores: Sequence[float], n_boot: int, seed: int) -> Any:
    """The ``n_boot`` resampled means of ``scores`` (a numpy array; see the module notes for the draws).

    The index matrix is drawn a block of rows at a time (numpy's generator yields the same numbers
    in blocks as in one call), so 10,000 resamples of PathVQA's 6,761 questions stay small.
    """
    import numpy as np

    values = np.asarray(scores, dtype=np.float64)
    n = len(values)
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK // max(n, 1))
    parts = [values[rng.integers(0, n, size=(min(rows, n_boot - start), n))].mean(axis=1)
             for start in range(0, n_boot, rows)]
    return np.concatenate(parts)


def _interval(means: Any) -> tuple[float, float]:
    import numpy as np

    tail = (1.0 - LEVEL) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mean_ci(scores: Sequence[float], n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Mean of per-question scores with its 95 % percentile-bootstrap interval.

    Args:
        scores: one score per question.
        n_boot: resamples (0: no interval).
        seed: seed of the draws.

    Returns:
        The :class:`Estimate` (all ``None`` for no scores).
    """
    n = len(scores)
    if n == 0:
        return Estimate(None, None, None, 0)
    value = sum(scores) / n
    if n_boot <= 0:
        return Estimate(value, None, None, n)
    low, high = _interval(resample_means(scores, n_boot, seed))
    return Estimate(value, low, high, n)


def paired_difference(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0) -> Estimate:
    """B − A on the same questions (``a[i]`` and ``b[i]`` score question i), with its 95 % interval.

    The value is mean(B) − mean(A), each mean taken as :func:`mean_ci` takes it, so it is exactly
    the difference of the two figures shown; the interval resamples the per-question differences.

    Raises:
        ValueError: ``a`` and ``b`` differ in length (a programming error: match them by id first).
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores of different lengths: {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return Estimate(None, None, None, 0)
    value = sum(b) / n - sum(a) / n
    if n_boot <= 0:
        return Estimate(value, None, None, n)
    low, high = _interval(resample_means([y - x for x, y in zip(a, b)], n_boot, seed))
    return Estimate(value, low, high, n)
