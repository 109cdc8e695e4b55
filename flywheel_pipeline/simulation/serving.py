"""How the product serves: the given model ranks candidates, epsilon-greedy picks what is shown.

Every shown item carries its exact propensity under the logging policy: the probability that
this item appears at this position, mixing the champion's ranking (ties broken at random) with
the uniformly random exploration slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import polars as pl

from flywheel_pipeline.scoring import SERVING_FEATURES, Scorer
from flywheel_pipeline.simulation.world import Stream, Traffic, World


@dataclass(frozen=True)
class Policy:
    """What serves a domain: the model, the version it logs, and the exploration share."""

    scorer: Scorer
    model_version: str
    exploration_share: float


@dataclass(frozen=True)
class Served:
    """What each interaction showed, and how likely the logging policy was to show it."""

    slate: np.ndarray       # (n, slate size): candidate column shown at each position
    propensity: np.ndarray  # (n, slate size)
    policy: np.ndarray      # (n,): "explore" (served at random) or "champion"


@dataclass(frozen=True)
class DayLog:
    """What one simulated day produced: the product's events and each impression's hidden truth."""

    events: list[dict]
    truth: pl.DataFrame  # interaction_id, item_id, good (+ hidden columns of the shape)


class Product(Protocol):
    """A domain shape's simulated product (assistant, recommendation)."""

    def serve_day(self, traffic: Traffic, policy: Policy,
                  rng: dict[Stream, np.random.Generator]) -> DayLog: ...

    def accuracy(self, world: World, scorer: Scorer) -> float: ...


def candidate_frame(domain: str, user_id: np.ndarray, segment: np.ndarray | None,
                    is_new_user: np.ndarray, input_text: np.ndarray, item_id: np.ndarray,
                    item_content: np.ndarray) -> pd.DataFrame:
    """SERVING_FEATURES, one row per (request, candidate): request-major, (n, k) items."""
    k = item_id.shape[1]
    return pd.DataFrame({
        "domain": domain,
        "user_id": np.repeat(user_id, k),
        "segment": None if segment is None else np.repeat(segment, k),
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
    return Served(slate, _propensity(scores, slate, exploration_share),
                  np.where(explore, "explore", "champion").astype(object))


def impressions(item_id: np.ndarray, content: np.ndarray,
                propensity: np.ndarray) -> list[list[dict]]:
    """Each interaction's impressions in the contract's shape, from (n, slate size) arrays."""
    return [
        [{"item_id": item, "position": k, "propensity": p, "content": text}
         for k, (item, text, p) in enumerate(zip(*row))]
        for row in zip(item_id.tolist(), content.tolist(), np.round(propensity, 6).tolist())
    ]


def _propensity(scores: np.ndarray, slate: np.ndarray, exploration_share: float) -> np.ndarray:
    """P(item at its position) = (1-eps) * P(champion puts it there) + eps / k.

    The champion puts an item tied with ``ties - 1`` others, below ``above`` better ones, at each
    position in [above, above + ties) with probability 1 / ties.
    """
    k = scores.shape[1]
    shown = np.take_along_axis(scores, slate, axis=1)[:, :, None]
    above = (scores[:, None, :] > shown).sum(axis=2)
    ties = (scores[:, None, :] == shown).sum(axis=2)
    position = np.arange(slate.shape[1])
    champion = ((above <= position) & (position < above + ties)) / ties
    return (1 - exploration_share) * champion + exploration_share / k
