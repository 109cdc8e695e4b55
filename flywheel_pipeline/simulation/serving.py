"""How the product serves: the given model ranks candidates, epsilon-greedy picks what is shown.

Every shown item carries its exact propensity under the logging policy: the probability that
this item appears at this position, mixing the champion's ranking (ties broken at random) with
the uniformly random exploration slice. Every candidate the policy ranked is logged too, with its
probability of appearing at each position of the slate (what off-policy evaluation of a new
ranking needs; docs/events.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Protocol

import numpy as np
import pandas as pd
import polars as pl

from flywheel_pipeline.scoring import SERVING_FEATURES, Scorer
from flywheel_pipeline.simulation.world import DAY_S, Stream, Traffic, World


@dataclass(frozen=True)
class Audit:
    """The human review queue: a random share of interactions, every shown item judged by one of
    ``reviewers`` people, wrong ``reviewer_error`` of the time, ``delay_days`` (uniform) later."""

    share: float = 0.02
    reviewer_error: float = 0.05
    delay_days: tuple[float, float] = (0.5, 2.0)
    reviewers: int = 4

    def reviewed(self, u: np.ndarray) -> np.ndarray:
        """Which interactions go to review, from one uniform draw each."""
        return u < self.share

    def reviewer(self, u: float) -> str:
        """Who reviews it, from the same draw (uniform on [0, share) when reviewed)."""
        return f"reviewer_{min(int(u / self.share * self.reviewers), self.reviewers - 1)}"

    def delay_s(self, u: float) -> int:
        low, high = self.delay_days
        return int(DAY_S * (low + (high - low) * u))


@dataclass(frozen=True)
class Holdback:
    """The version a new champion replaced, still serving a random ``share`` of requests while the
    monitor compares the two (docs/monitoring.md)."""

    scorer: Scorer
    model_version: str
    share: float


@dataclass(frozen=True)
class Policy:
    """What serves a domain: the model, the version it logs, the exploration share, the audit
    sample routed to human review, the traps the product commits with their strengths
    (simulation/traps.py), and the holdback, if any."""

    scorer: Scorer
    model_version: str
    exploration_share: float
    audit: Audit = Audit()
    traps: Mapping[str, float] = field(default_factory=dict)
    holdback: Holdback | None = None

    def score(self, candidates: pd.DataFrame, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(interactions, k) scores and each interaction's model version: the champion's, or the
        holdback's for the requests routed to it (one uniform draw each, independent of the request)."""
        scores = score(self.scorer, candidates, k)
        versions = np.full(len(scores), self.model_version, dtype=object)
        if self.holdback is None:
            return scores, versions
        routed = rng.random(len(scores)) < self.holdback.share
        scores = np.where(routed[:, None], score(self.holdback.scorer, candidates, k), scores)
        return scores, np.where(routed, self.holdback.model_version, versions)


@dataclass(frozen=True)
class Served:
    """What each interaction showed, and how likely the logging policy was to show it."""

    slate: np.ndarray       # (n, slate size): candidate column shown at each position
    propensity: np.ndarray  # (n, slate size)
    policy: np.ndarray      # (n,): "explore" (served at random) or "champion"
    candidate_propensity: np.ndarray  # (n, candidates, slate size): P(candidate at position)


@dataclass(frozen=True)
class DayLog:
    """What one simulated day produced: the product's events and each impression's hidden truth."""

    events: list[dict]
    truth: pl.DataFrame  # interaction_id, item_id, good (+ hidden columns of the shape)


class Product(Protocol):
    """A domain shape's simulated product (assistant, recommendation)."""

    def serve_day(self, traffic: Traffic, policy: Policy,
                  rng: dict[Stream, np.random.Generator]) -> DayLog: ...

    def accuracy(self, world: World, scorer: Scorer, day: date | None = None,
                 segment: str | None = None) -> float: ...


def candidate_frame(domain: str, user_id: np.ndarray, segment: np.ndarray | None,
                    is_new_user: np.ndarray, input_text: np.ndarray, item_id: np.ndarray,
                    item_content: np.ndarray) -> pd.DataFrame:
    """SERVING_FEATURES, one row per (request, candidate): request-major, (n, k) items."""
    k = item_id.shape[1]
    return pd.DataFrame({
        "domain": domain,
        "user_id": np.repeat(user_id, k),
        "segment": None if segment is None else np.repeat(segment, k),
        "context_features": "{}",
        "is_new_user": np.repeat(is_new_user, k),
        "input_text": np.repeat(input_text, k),
        "item_id": item_id.ravel(),
        "item_content": item_content.ravel(),
    }, columns=SERVING_FEATURES)


def score(scorer: Scorer, candidates: pd.DataFrame, k: int) -> np.ndarray:
    """The scorer's scores reshaped to (interactions, k); one batched call."""
    scores = np.asarray(scorer.predict(candidates), dtype=float)
    if scores.shape != (len(candidates),):
        raise ValueError(f"scorer returned shape {scores.shape} for {len(candidates)} candidates")
    if not np.isfinite(scores).all():
        raise ValueError("scorer returned non-finite scores")
    return scores.reshape(-1, k)


def serve(scores: np.ndarray, size: int, exploration_share: float,
          rng: np.random.Generator) -> Served:
    """Show ``size`` of each row's candidates: the top by score, or a random slate if exploring."""
    n, k = scores.shape
    champion = np.lexsort((rng.random((n, k)), -scores), axis=-1)
    random_order = np.argsort(rng.random((n, k)), axis=-1)
    explore = rng.random(n) < exploration_share
    slate = np.where(explore[:, None], random_order, champion)[:, :size]
    every = position_propensities(scores, size, exploration_share)
    shown = np.take_along_axis(every, slate[:, :, None], axis=1)  # (n, size, size)
    return Served(slate, np.diagonal(shown, axis1=1, axis2=2),
                  np.where(explore, "explore", "champion").astype(object), every)


def impressions(item_id: np.ndarray, content: np.ndarray,
                propensity: np.ndarray) -> list[list[dict]]:
    """Each interaction's impressions in the contract's shape, from (n, slate size) arrays."""
    return [
        [{"item_id": item, "position": k, "propensity": p, "content": text}
         for k, (item, text, p) in enumerate(zip(*row))]
        for row in zip(item_id.tolist(), content.tolist(), np.round(propensity, 6).tolist())
    ]


def position_propensities(scores: np.ndarray, size: int, exploration_share: float) -> np.ndarray:
    """(n, k, size): P(candidate at position) = (1-eps) * P(champion puts it there) + eps / k.

    The champion puts a candidate tied with ``ties - 1`` others, below ``above`` better ones, at
    each position in [above, above + ties) with probability 1 / ties.
    """
    k = scores.shape[1]
    above = (scores[:, None, :] > scores[:, :, None]).sum(axis=2)[:, :, None]
    ties = (scores[:, None, :] == scores[:, :, None]).sum(axis=2)[:, :, None]
    position = np.arange(size)[None, None, :]
    champion = ((above <= position) & (position < above + ties)) / ties
    return (1 - exploration_share) * champion + exploration_share / k


def logged_candidates(item_id: np.ndarray, content: np.ndarray,
                      propensity: np.ndarray) -> list[list[dict]]:
    """Each interaction's ranked candidates for ``context.candidates``: (n, k) ids and content,
    (n, k, size) propensities."""
    return [
        [{"item_id": item, "content": text, "propensities": p}
         for item, text, p in zip(*row)]
        for row in zip(item_id.tolist(), content.tolist(), np.round(propensity, 6).tolist())
    ]
