"""Paired bootstrap intervals, one-sided p-values and the sample size a decision would need.

Interactions are resampled (seeded); candidate, champion and their difference are measured on the
same resamples, so the difference's interval is paired (Efron & Tibshirani 1993, "An Introduction
to the Bootstrap", ch. 13: percentile intervals).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

N_BOOTSTRAP = 400
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.90  # two-sided; each bound is a one-sided test at 5%
RESAMPLE_CELLS = 8_000_000  # (resample, row) cells of counts held at once: about 64 MB an array


@dataclass(frozen=True)
class MetricComparison:
    """Candidate, champion and candidate - champion, each with a bootstrap interval; ``se`` is the
    bootstrap standard error of the difference."""

    candidate: float
    champion: float
    difference: float
    candidate_ci: tuple[float, float]
    champion_ci: tuple[float, float]
    difference_ci: tuple[float, float]
    difference_se: float = float("nan")


def bootstrap_counts(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Row 0: the sample itself (all ones); rows 1..n_resamples: resampling with replacement."""
    return np.vstack(list(bootstrap_blocks(n, n_resamples, rng, n_resamples + 1)))


def bootstrap_blocks(n: int, n_resamples: int, rng: np.random.Generator, rows: int) -> Iterator[np.ndarray]:
    """The rows of ``bootstrap_counts`` (the same ones from the same ``rng``), at most ``rows`` at
    a time: estimators applied block by block hold (rows, n) counts, not (n_resamples + 1, n)."""
    if n == 0:
        yield np.zeros((n_resamples + 1, 0))
        return
    drawn, rows = 0, max(rows, 2)
    while drawn == 0 or drawn < n_resamples:
        size = min(rows - (drawn == 0), n_resamples - drawn)
        block = rng.multinomial(n, np.full(n, 1 / n), size=size).astype(float)
        yield np.vstack([np.ones((1, n)), block]) if drawn == 0 else block
        drawn += max(size, 1)


def block_rows(width: int) -> int:
    """Resamples per block when each holds ``width`` cells (``RESAMPLE_CELLS`` in all)."""
    return max(2, RESAMPLE_CELLS // max(width, 1))


def interval(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of the resamples (rows 1..), NaN when none is defined."""
    resamples = values[1:]
    if np.isnan(resamples).all():
        return (math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(resamples, [tail, 100 - tail])
    return (float(low), float(high))


def compare(candidate: np.ndarray, champion: np.ndarray) -> MetricComparison:
    """Point estimates from row 0, percentile intervals from the resamples."""
    difference = candidate - champion
    resampled = difference[1:]
    se = float(np.nanstd(resampled, ddof=1)) if np.isfinite(resampled).sum() > 1 else math.nan
    return MetricComparison(
        float(candidate[0]),
        float(champion[0]),
        float(difference[0]),
        interval(candidate),
        interval(champion),
        interval(difference),
        se,
    )


def p_below(comparison: MetricComparison, bound: float) -> float:
    """One-sided p-value of "the true difference is at least ``bound``" (normal approximation with
    the bootstrap standard error): small when the difference is clearly below ``bound``."""
    d, se = comparison.difference, comparison.difference_se
    if not (np.isfinite(d) and np.isfinite(se)) or se <= 0:
        return 1.0
    return NormalDist().cdf((d - bound) / se)


def samples_needed(n: int, comparison: MetricComparison, threshold: float) -> int | None:
    """Held-out samples beyond ``n`` for the interval to clear ``threshold`` at the same point
    estimate (the interval narrows as 1/sqrt(n)); None when the estimate sits on the threshold."""
    low, high = comparison.difference_ci
    d = comparison.difference
    gap = abs(d - threshold)
    if not (np.isfinite(low) and np.isfinite(high)) or gap == 0 or n == 0:
        return None
    reach = d - low if d > threshold else high - d  # the interval's side facing the threshold
    return max(1, math.ceil(n * (reach / gap) ** 2) - n)
