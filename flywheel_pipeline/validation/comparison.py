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
- ``replay``: only where the logger's propensities are unknown (every importance-weighted metric
  is then undefined): the reward of the shown items weighted by how likely the policy was to show
  them there; biased unless the logger chose uniformly at random, like ``direct`` (the reward
  model's guess for what was never shown).

Models score the candidate rows a chunk of units at a time (``Evidence.chunks``); only per-unit
sums are kept, so memory stays bounded however many candidates a catalogue gives each unit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from flywheel_pipeline.scoring import SERVING_FEATURES, Scorer
from flywheel_pipeline.validation import estimators as est
from flywheel_pipeline.validation.evidence import (
    Evidence,
    Options,
    RewardModel,
    per_unit_labelled,
    per_unit_replay,
    policy_terms,
    slice_masks,
)
from flywheel_pipeline.validation.intervals import (
    BOOTSTRAP_SEED,
    N_BOOTSTRAP,
    block_rows,
    bootstrap_blocks,
    compare,
)
from flywheel_pipeline.validation.report import SliceResult

PRIMARY_METRIC = "dr"
ROLES = ("candidate", "champion")
SAME_CHOICE_TOLERANCE = 1e-9  # slot probabilities closer than this are the same choice


@dataclass
class RoleSums:
    """One policy's per-unit sums over every chunk, and its scores of the shown rows."""

    terms: est.PolicyTerms
    gold: tuple[np.ndarray, np.ndarray]
    weak: tuple[np.ndarray, np.ndarray]
    replay: tuple[np.ndarray, np.ndarray]
    shown_scores: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def zeros(cls, n: int) -> RoleSums:
        pair = (np.zeros(n), np.zeros(n))
        return cls(est.PolicyTerms(*(np.zeros(n) for _ in range(4))), pair, pair, pair)

    def add(self, terms: est.PolicyTerms, gold: tuple, weak: tuple, replay: tuple) -> None:
        self.terms = est.PolicyTerms(*(a + b for a, b in zip(_fields(self.terms), _fields(terms))))
        self.gold, self.weak, self.replay = (tuple(a + b for a, b in zip(mine, new)) for mine, new in
                                             ((self.gold, gold), (self.weak, weak), (self.replay, replay)))


@dataclass
class Scored:
    """Both policies' sums over the held-out evidence, and what tells them apart: the largest
    difference in a slot probability (0: they choose the same on every context), and the shown
    rows' units and weak labels (for the AUC)."""

    roles: dict[str, RoleSums]
    largest_difference: float = 0.0
    shown_units: list[np.ndarray] = field(default_factory=list)
    shown_p_good: list[np.ndarray] = field(default_factory=list)

    @property
    def same_choices(self) -> bool:
        return self.largest_difference <= SAME_CHOICE_TOLERANCE

    @property
    def no_overlap(self) -> bool:
        """The candidate's importance weights are 0 on every shown row: the logger never showed
        what the candidate would."""
        return float(np.nansum(self.roles["candidate"].terms.weight)) == 0.0


def _fields(terms: est.PolicyTerms) -> tuple[np.ndarray, ...]:
    return terms.ips, terms.weight, terms.direct, terms.residual


@dataclass(frozen=True)
class Routing:
    """Both roles' models served the evidence side by side (a holdback, docs/monitoring.md): per
    unit, the share of requests routed to the champion role's model at the time (0: none were)
    and whether it served that unit; each served epsilon-greedy with ``exploration``.

    Each unit's logger is then the routing's mixture, and its propensity of a shown item is
    (1 - share) mu_candidate + share mu_champion, the served role's as logged and the other's as
    its model gives it: the balanced estimator of Agarwal, Basu, Schnabel & Joachims (2017,
    "Effective evaluation using logged bandit feedback from multiple loggers", KDD), with the
    routing's own shares. What either role would show then has the support of the requests it
    served, and the two values are compared on the same units."""

    share: np.ndarray  # (units,)
    held_back: np.ndarray  # (units,) bool: the champion role served the unit
    exploration: float

    def mixed(self, options: Options, scores: dict[str, np.ndarray], slate_size: int) -> Options:
        """``options`` with each row's logger probabilities as the routing's mixture."""
        units = options.frame["unit"]
        share, held = self.share[units.to_numpy()][:, None], self.held_back[units.to_numpy()][:, None]
        other = {role: est.policy_probabilities(scores[role], units, slate_size, "epsilon_greedy", self.exploration)
                 for role in ROLES}
        mu = np.where(held, share * options.mu + (1 - share) * other["candidate"],
                      (1 - share) * options.mu + share * other["champion"])
        return Options(options.frame, mu, options.slots)


def score_holdout(evidence: Evidence, models: dict[str, Scorer], positions: est.Positions, rho: RewardModel,
                  ranking: str = "top_k", epsilon: float = 0.1, routing: Routing | None = None) -> Scored:
    """Score every candidate row with each model, a chunk of units at a time, and keep per-unit sums
    (``routing``: the two served side by side)."""
    n = evidence.n_units
    scored = Scored({role: RoleSums.zeros(n) for role in ROLES})
    for options in evidence.chunks():
        features = options.frame.select(SERVING_FEATURES).to_pandas()
        scores = {role: np.asarray(models[role].predict(features), dtype=float) for role in ROLES}
        if routing is not None:
            options = routing.mixed(options, scores, evidence.slate_size)
        rho_hat = rho.predict(options)
        shown = options.shown
        pi = {}
        for role in ROLES:
            pi[role] = est.policy_probabilities(scores[role], options.frame["unit"], evidence.slate_size, ranking,
                                                epsilon)
            sums = scored.roles[role]
            sums.add(policy_terms(options, pi[role], positions, rho_hat, n),
                     per_unit_labelled(options, pi[role], positions, "verdict", n),
                     per_unit_labelled(options, pi[role], positions, "p_good", n),
                     per_unit_replay(options, pi[role], n))
            sums.shown_scores.append((scores[role] if scores[role].ndim == 1 else pi[role] @ positions.value)[shown])
        scored.largest_difference = max(scored.largest_difference, _largest_difference(options, pi))
        scored.shown_units.append(options.frame["unit"].to_numpy()[shown])
        scored.shown_p_good.append(options.frame["p_good"].cast(pl.Float64).fill_null(np.nan).to_numpy()[shown])
    return scored


def _largest_difference(options: Options, pi: dict[str, np.ndarray]) -> float:
    """The largest difference between the two policies' probabilities of a judged slot."""
    difference = np.abs(pi["candidate"] - pi["champion"])
    if options.slots is not None:
        difference = difference * options.slots
    return float(difference.max()) if difference.size else 0.0


def compare_on_holdout(
    evidence: Evidence,
    scored: Scored,
    positions: est.Positions,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
) -> list[SliceResult]:
    """Every metric of both policies on every slice, with paired bootstrap intervals."""
    roles = scored.roles
    shown_units = np.concatenate(scored.shown_units) if scored.shown_units else np.zeros(0, int)
    p_good = np.concatenate(scored.shown_p_good) if scored.shown_p_good else np.zeros(0)
    shown_scores = {role: np.concatenate(roles[role].shown_scores) if roles[role].shown_scores else np.zeros(0)
                    for role in ROLES}
    rng = np.random.default_rng(seed)
    results = []
    for name, mask in slice_masks(evidence.unit_attributes()).items():
        chosen = np.flatnonzero(mask)
        auc = WeakLabelAuc.of(shown_units, p_good, shown_scores, chosen)
        values: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for counts in bootstrap_blocks(len(chosen), n_resamples, rng, block_rows(max(len(chosen), auc.rows))):
            block = _slice_values(roles, positions, chosen, counts, evidence.propensities_known)
            block["weak_label_auc"] = auc(counts)
            for metric, pair in block.items():
                values.setdefault(metric, []).append(pair)
        metrics = {metric: compare(*(np.concatenate(role) for role in zip(*pairs, strict=True)))
                   for metric, pairs in values.items()}
        reviewed = int((roles["candidate"].gold[1][chosen] > 0).sum())
        results.append(SliceResult(name, len(chosen), metrics, reviewed))
    return results


def _slice_values(roles: dict[str, RoleSums], positions: est.Positions, chosen: np.ndarray,
                  counts: np.ndarray, propensities_known: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The off-policy metrics of the ``chosen`` units, candidate's and champion's, on each
    resample of a block of ``counts`` (a row each)."""
    mine = {role: roles[role].terms.take(chosen) for role in ROLES}

    def both(metric: Callable[[str], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return metric("candidate"), metric("champion")

    def ratio(pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return est.ratio(pair[0][chosen], pair[1][chosen], counts)

    metrics = {
        "dr": both(lambda r: est.dr(mine[r], counts)),
        "pbm_ips": both(lambda r: est.ips(mine[r], counts)),
        "snips": both(lambda r: est.snips(mine[r], counts, positions)),
        "direct": both(lambda r: est.direct_method(mine[r], counts)),
        "ess": both(lambda r: est.effective_sample_size(mine[r].weight, counts)),
        "audit": both(lambda r: ratio(roles[r].gold)),
        "weak_label_value": both(lambda r: ratio(roles[r].weak)),
    }
    if not propensities_known:
        metrics["replay"] = both(lambda r: ratio(roles[r].replay))
    return metrics


@dataclass(frozen=True)
class WeakLabelAuc:
    """AUC of each model's scores against the weak labels of the shown rows of a slice's units,
    each row weighted by its label confidence |2 p_good - 1| times its unit's count in a resample;
    the rows sorted by each model's score once, for every block of resamples."""

    by_role: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # scores, good, column, confidence
    rows: int

    @classmethod
    def of(cls, units: np.ndarray, p_good: np.ndarray, scores: dict[str, np.ndarray],
           chosen: np.ndarray) -> WeakLabelAuc:
        rows = np.flatnonzero(np.isfinite(p_good) & np.isin(units, chosen))
        column = np.searchsorted(chosen, units[rows])  # the row's unit among the chosen
        confidence, good = np.abs(2 * p_good[rows] - 1), p_good[rows] >= 0.5
        by_role = {}
        for role in ROLES:
            order = np.argsort(scores[role][rows], kind="stable")
            by_role[role] = (scores[role][rows][order], good[order], column[order], confidence[order])
        return cls(by_role, len(rows))

    def __call__(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate's and champion's AUC on each resample of ``counts`` (a row each)."""
        candidate, champion = (est.weighted_auc(scores, good, confidence * counts[:, column])
                               for scores, good, column, confidence in (self.by_role[role] for role in ROLES))
        return candidate, champion
