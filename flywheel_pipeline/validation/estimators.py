"""Off-policy estimators of a ranking policy's value from logged slates, and the weak-label AUC.

The logs hold, per interaction, the candidates the logger ranked, the logger's probability of
showing each candidate at each position (mu), the items it did show with their reward, and, for
any new policy pi, the probability pi puts each candidate at each position. An assistant
interaction is a slate of one (one position, examination 1), so every estimator below reduces to
its familiar top-1 form there.

Click model (position-based, PBM; Craswell et al. 2008, "An experimental comparison of click
position-bias models", WSDM): the reward of item a shown at position k has mean
theta_k * rho(x, a), an examination probability that depends on the position only times an
attraction that depends on the item only. The value measured weighs the policy's positions by
v_j: V(pi) = E_x sum_j v_j sum_a pi(a at j | x) rho(x, a). With v_j = 1/L (``Positions``'s
default) it is the mean attraction of the policy's top L, position-blind like precision@L; with
v = theta it would be the expected clicks per slate, which rewards the order within the top L.

- ``pbm_weight``: w(a) = sum_j v_j pi(a at j) / sum_j theta_j mu(a at j). IPS with this weight
  on every shown (item, position) is unbiased for V(pi) under the PBM whenever mu covers pi:
  E[sum_shown w r] = sum_a sum_k mu(a at k) theta_k rho(a) w(a) = sum_a rho(a) sum_j v_j pi(a at j)
  (Joachims, Swaminathan & Schnabel 2017, "Unbiased learning-to-rank with biased feedback",
  WSDM; Li, Kiseleva & de Rijke 2018, "Offline evaluation of ranking policies with click models",
  KDD).
- ``snips``: the same sum divided by its control variate sum_k theta_k w (expected value
  sum_j v_j), self-normalised (Swaminathan & Joachims 2015, "The self-normalized estimator for
  counterfactual learning", NeurIPS): consistent, biased in small samples, kept as the baseline
  it always was.
- ``dr``: doubly robust (Dudik, Langford & Li 2011, "Doubly robust policy evaluation and
  learning", ICML): a reward model rho_hat as the direct method, plus PBM-IPS on its residuals.
  Unbiased under the PBM for any rho_hat fitted on other data (cross-fitting), and of lower
  variance the better rho_hat is.
- ``effective_sample_size``: (sum W)^2 / sum W^2 of the per-interaction weights: how many
  on-policy samples the estimate is worth (Kish 1965).

Every estimator takes ``counts`` (B, n): how often each interaction is in each bootstrap resample
(row 0 all ones: the sample itself), and returns one value per resample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl


def position_probabilities(scores: pl.Series, units: pl.Series, slate_size: int) -> np.ndarray:
    """pi(row at position j) for j < slate_size: a deterministic ranking by descending score
    within each unit (interaction), tied scores splitting their positions evenly (random
    tie-break)."""
    frame = pl.DataFrame({"unit": units, "score": scores})
    placed = frame.select(
        above=(pl.col("score").rank("min", descending=True).over("unit") - 1).cast(pl.Float64),
        ties=pl.len().over("unit", "score").cast(pl.Float64),
    )
    above, ties = placed["above"].to_numpy()[:, None], placed["ties"].to_numpy()[:, None]
    position = np.arange(slate_size)[None, :]
    return ((above <= position) & (position < above + ties)) / ties


def policy_probabilities(scores: np.ndarray, units: pl.Series, slate_size: int, ranking: str = "top_k",
                         epsilon: float = 0.1) -> np.ndarray:
    """pi(row at position j) of a model as it would serve (flywheel.yaml ``serving``): its scores
    ranked (``top_k``), or that ranking mixed with a uniformly random slate of the unit's
    candidates with probability ``epsilon`` (``epsilon_greedy``); a model whose ``predict``
    returns a matrix (rows, >= slate_size) gives its own slot probabilities (a stochastic policy,
    e.g. Thompson sampling's)."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim == 2:
        return _given(scores, units, slate_size)
    ranked = position_probabilities(pl.Series(scores), units, slate_size)
    if ranking == "top_k":
        return ranked
    sizes = units.to_frame("unit").select(pl.len().over("unit")).to_series().to_numpy()[:, None]
    uniform = (np.arange(slate_size)[None, :] < sizes) / sizes
    return (1 - epsilon) * ranked + epsilon * uniform


def _given(probabilities: np.ndarray, units: pl.Series, slate_size: int) -> np.ndarray:
    """A model's own slot probabilities, checked: each in [0, 1], each slot's summing to at most 1
    over a unit's candidates."""
    if probabilities.shape[1] < slate_size:
        raise ValueError(f"the model gives slot probabilities for {probabilities.shape[1]} positions; the "
                         f"held-out slates have {slate_size}")
    pi = probabilities[:, :slate_size]
    frame = pl.DataFrame(pi, schema=[str(j) for j in range(slate_size)]).with_columns(unit=units)
    totals = frame.group_by("unit").agg(pl.all().sum()).drop("unit").to_numpy()
    if not np.isfinite(pi).all() or (pi < 0).any() or (pi > 1).any() or (totals > 1 + 1e-6).any():
        raise ValueError("a model's slot probabilities must lie in [0, 1] and sum to at most 1 per slot "
                         "over an interaction's candidates")
    return pi


def examination_curve(positions: np.ndarray, rewards: np.ndarray, slate_size: int,
                      min_rows: int = 30) -> np.ndarray:
    """theta_k / theta_0 from slates served uniformly at random (the exploration slice): there an
    item's position is independent of the item, so the mean reward at position k is
    theta_k * mean attraction. Positions with fewer than ``min_rows`` rows, or a top position
    without reward, give theta = 1 (no position effect assumed)."""
    theta = np.ones(slate_size)
    top = rewards[positions == 0]
    if len(top) < min_rows or top.mean() <= 0:
        return theta
    for k in range(1, slate_size):
        at_k = rewards[positions == k]
        if len(at_k) >= min_rows:
            theta[k] = float(np.clip(at_k.mean() / top.mean(), 1e-3, 1.0))
    return theta


@dataclass(frozen=True)
class Positions:
    """How positions enter an estimate: ``examination`` theta_k (the click model's, from the
    exploration slice) and ``value`` v_j (how much the policy's position j counts)."""

    examination: np.ndarray
    value: np.ndarray

    @classmethod
    def precision(cls, examination: np.ndarray) -> Positions:
        """Every position of the top L counts 1/L: the value is the mean attraction of the
        policy's top L, what precision@L measures."""
        size = len(examination)
        return cls(np.asarray(examination, dtype=float), np.full(size, 1 / size))


def pbm_weight(pi: np.ndarray, mu: np.ndarray, positions: Positions) -> np.ndarray:
    """w(a) = sum_j v_j pi(a at j) / sum_j theta_j mu(a at j), one per candidate row (n, L)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pi @ positions.value) / (mu @ positions.examination)


@dataclass(frozen=True)
class PolicyTerms:
    """Per-interaction sums the estimators average, for one target policy.

    ``ips``: sum over shown rows of w r; ``weight``: sum of theta_k w (mean sum_j v_j under mu);
    ``direct``: the reward model's value of the policy, sum over candidates of
    rho_hat sum_j v_j pi(at j); ``residual``: sum over shown rows of w (r - theta_k rho_hat).
    """

    ips: np.ndarray
    weight: np.ndarray
    direct: np.ndarray
    residual: np.ndarray

    def take(self, units: np.ndarray) -> PolicyTerms:
        return PolicyTerms(self.ips[units], self.weight[units], self.direct[units],
                           self.residual[units])


def _mean(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts @ values / counts.sum(axis=1)


def ips(terms: PolicyTerms, counts: np.ndarray) -> np.ndarray:
    return _mean(counts, terms.ips)


def snips(terms: PolicyTerms, counts: np.ndarray, positions: Positions) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ terms.ips) / (counts @ terms.weight) * positions.value.sum()


def dr(terms: PolicyTerms, counts: np.ndarray) -> np.ndarray:
    return _mean(counts, terms.direct + terms.residual)


def direct_method(terms: PolicyTerms, counts: np.ndarray) -> np.ndarray:
    return _mean(counts, terms.direct)


def effective_sample_size(weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(sum W)^2 / sum W^2 over the interactions of each resample."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ weights) ** 2 / (counts @ weights**2)


def ratio(numerator: np.ndarray, denominator: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """sum numerator / sum denominator over each resample: a self-normalised weighted mean."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ numerator) / (counts @ denominator)


def weighted_auc(scores: np.ndarray, good: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC for each row of ``weights`` (B, n); tied scores count half. NaN without both classes."""
    order = np.argsort(scores, kind="stable")
    scores, good, weights = scores[order], good[order].astype(bool), weights[:, order]
    if len(scores) == 0:
        return np.full(weights.shape[0], np.nan)
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
    positive = np.add.reduceat(weights * good, starts, axis=1)
    negative = np.add.reduceat(weights * ~good, starts, axis=1)
    negative_below = np.cumsum(negative, axis=1) - negative
    pairs = positive.sum(axis=1) * negative.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(
            pairs > 0, (positive * (negative_below + 0.5 * negative)).sum(axis=1) / pairs, np.nan
        )
