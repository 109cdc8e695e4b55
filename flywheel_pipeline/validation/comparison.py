"""Candidate against champion on the same held-out evidence: every metric on every slice.

Metrics (candidate, champion, difference, paired bootstrap intervals):
- ``dr`` (primary): doubly robust value of the policy: the mean attraction of its top L, each
  position counted alike (``estimators.Positions.precision``); a top-1 policy's reward rate.
- ``pbm_ips``, ``snips``, ``direct``: position-based IPS, its self-normalised baseline, and the
  reward model alone (the direct method).
- ``ess``: effective sample size of the policy's importance weights.
- ``audit``: the policy's accuracy against the audit sample's human verdicts (gold), examination-
  weighted over positions, self-normalised over reviewed impressions.
- ``weak_label_value``, ``weak_label_auc``: the same against the label model's p_good, and the AUC
  of the scores against the weak labels of shown impressions. Secondary: these are the kind of
  labels the candidate was trained on, and the AUC only sees what the champion chose to show.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl

from flywheel_pipeline.validation import estimators as est
from flywheel_pipeline.validation.evidence import (
    Evidence,
    per_unit_labelled,
    policy_terms,
    slice_masks,
)
from flywheel_pipeline.validation.intervals import (
    BOOTSTRAP_SEED,
    N_BOOTSTRAP,
    MetricComparison,
    bootstrap_counts,
    compare,
)
from flywheel_pipeline.validation.report import SliceResult

PRIMARY_METRIC = "dr"
ROLES = ("candidate", "champion")


def compare_on_holdout(
    evidence: Evidence,
    scores: dict[str, np.ndarray],
    positions: est.Positions,
    rho: np.ndarray,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
) -> list[SliceResult]:
    """``scores``: each role's ("candidate", "champion") score of every candidate row; the
    policy ranks each interaction's candidates by it."""
    units = evidence.options["unit"]
    pi = {role: est.position_probabilities(pl.Series(scores[role]), units, evidence.slate_size)
          for role in ROLES}
    terms = {role: policy_terms(evidence, pi[role], positions, rho) for role in ROLES}
    gold = {role: per_unit_labelled(evidence, pi[role], positions, "verdict") for role in ROLES}
    weak = {role: per_unit_labelled(evidence, pi[role], positions, "p_good") for role in ROLES}
    rng = np.random.default_rng(seed)
    results = []
    for name, mask in slice_masks(evidence.unit_attributes()).items():
        chosen = np.flatnonzero(mask)
        counts = bootstrap_counts(len(chosen), n_resamples, rng)
        metrics = _slice_metrics(terms, gold, weak, positions, chosen, counts)
        metrics["weak_label_auc"] = _weak_label_auc(evidence, scores, chosen, counts)
        reviewed = int((gold["candidate"][1][chosen] > 0).sum())
        results.append(SliceResult(name, len(chosen), metrics, reviewed))
    return results


def _slice_metrics(terms: dict[str, est.PolicyTerms], gold: dict, weak: dict, positions: est.Positions,
                   chosen: np.ndarray, counts: np.ndarray) -> dict[str, MetricComparison]:
    """The off-policy metrics of the ``chosen`` units, resampled by ``counts``."""
    mine = {role: terms[role].take(chosen) for role in ROLES}

    def both(metric: Callable[[str], np.ndarray]) -> MetricComparison:
        return compare(metric("candidate"), metric("champion"))

    def labelled(family: dict, role: str) -> np.ndarray:
        numerator, denominator = family[role]
        return est.ratio(numerator[chosen], denominator[chosen], counts)

    return {
        "dr": both(lambda r: est.dr(mine[r], counts)),
        "pbm_ips": both(lambda r: est.ips(mine[r], counts)),
        "snips": both(lambda r: est.snips(mine[r], counts, positions)),
        "direct": both(lambda r: est.direct_method(mine[r], counts)),
        "ess": both(lambda r: est.effective_sample_size(mine[r].weight, counts)),
        "audit": both(lambda r: labelled(gold, r)),
        "weak_label_value": both(lambda r: labelled(weak, r)),
    }


def _weak_label_auc(evidence: Evidence, scores: dict[str, np.ndarray], chosen: np.ndarray,
                    counts: np.ndarray) -> MetricComparison:
    """AUC of each model's scores against the weak labels of the shown rows of ``chosen`` units,
    each row weighted by its label confidence |2 p_good - 1|."""
    units = evidence.options["unit"].to_numpy()
    p_good = evidence.options["p_good"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    rows = np.flatnonzero(evidence.shown & np.isfinite(p_good) & np.isin(units, chosen))
    column = np.searchsorted(chosen, units[rows])
    confidence = np.abs(2 * p_good[rows] - 1) * counts[:, column]
    good = p_good[rows] >= 0.5
    return compare(*(est.weighted_auc(scores[role][rows], good, confidence) for role in ROLES))
