"""The recommendation trainers: P(good | user, item) corrected for position bias.

Users see lower slots less often, so a lower slot's labels under-state how good its item is. The
exploration slice (policy ``explore``: uniformly random slates) holds items independent of their
position, so its good rate by position over the top slot's estimates the examination curve
theta(position). A good impression then counts 1 / theta(position) (inverse propensity, clipped at
``max_ips_weight``) and a bad one 1: the pointwise IPS loss with the negative part clipped at zero.

RecommendationTrainer (the default) fits logistic matrix factorisation beside hashed segment x item
features (training/embeddings.py) to the soft label: P(good) p counts p / theta good and 1 - p bad.
HashedRecommendationTrainer, the default before it, fits hashed features only (user x item
included) to the hard label, both parts multiplied by the label confidence |2 p_good - 1|. Why the
change: docs/validation.md, "The recommender's gap to the oracle".

Position is never a feature: it is unknown when the model ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import polars as pl

from flywheel_pipeline.training.base import HashedLogisticTrainer, context_features, crossed
from flywheel_pipeline.training.embeddings import EmbeddingScorer

SEGMENT_ITEM_COLUMNS = ["segment", "is_new_user", "context_features", "item_id"]
USER_ITEM_COLUMNS = ["user_id", *SEGMENT_ITEM_COLUMNS]


def segment_item_features(rows: pd.DataFrame) -> list[dict[str, float]]:
    """Hashed-feature dicts for (segment, item) rows: item, segment x item, new x item, and each
    numeric context feature alone and x item (at its value)."""
    features = []
    for segment, is_new, numeric, item in zip(
        rows["segment"].tolist(),
        rows["is_new_user"].tolist(),
        rows["context_features"].tolist(),
        rows["item_id"].tolist(),
    ):
        segment = segment if isinstance(segment, str) else "none"
        features.append(
            {
                f"i={item}": 1.0,
                f"s={segment}|i={item}": 1.0,
                f"new={bool(is_new)}|i={item}": 1.0,
                **crossed(context_features(numeric), f"i={item}"),
            }
        )
    return features


def user_item_features(rows: pd.DataFrame) -> list[dict[str, float]]:
    """segment_item_features plus user x item."""
    return [{**row, f"u={user}|i={item}": 1.0} for row, user, item in zip(
        segment_item_features(rows), rows["user_id"].tolist(), rows["item_id"].tolist())]


def examination_curve(rows: pl.DataFrame, min_rows: int, floor: float) -> dict[int, float]:
    """theta(position) from the exploration slice, in [floor, 1]; {} when it is too thin.

    Each slot's mean label is summed exactly (``math.fsum``), whatever order the rows come in: a
    parallel mean's last bit varies from run to run, and the embeddings' fit, which is not convex,
    turns that into a different model from the same rows."""
    explored = rows.filter((pl.col("policy") == "explore") & pl.col("p_good").is_not_null())
    rates = {position: math.fsum(group["p_good"].to_list()) / group.height
             for (position,), group in explored.group_by("position") if group.height >= min_rows}
    top = rates.get(0, 0.0)
    if top <= 0:
        return {}
    return {position: min(1.0, max(floor, rate / top)) for position, rate in rates.items()}


@dataclass(frozen=True)
class HashedRecommendationTrainer(HashedLogisticTrainer):
    """The hashed-feature logistic regression alone (the default before the embeddings)."""

    name: str = "recommendation-ips-hashed-logistic"
    max_ips_weight: float = 10.0
    min_exploration_rows: int = 30  # per position, to estimate its examination
    weighting = "|2 p_good - 1| / theta(position) if good else |2 p_good - 1|"

    featurize = staticmethod(user_item_features)
    key_columns = USER_ITEM_COLUMNS

    def examination(self, rows: pl.DataFrame) -> tuple[pl.Expr, dict[str, float]]:
        """theta(position) as an expression (1 where not estimated), and the curve as metrics."""
        curve = examination_curve(rows, self.min_exploration_rows, 1 / self.max_ips_weight)
        theta = pl.col("position").replace_strict(curve, default=1.0, return_dtype=pl.Float64)
        metrics = {f"examination_position_{p}": theta for p, theta in sorted(curve.items())}
        metrics["examination_estimated"] = float(bool(curve))
        return theta, metrics

    def weigh(self, rows: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, float]]:
        theta, metrics = self.examination(rows)
        weighted = rows.with_columns(
            weight=(2 * pl.col("p_good") - 1).abs()
            * pl.when(pl.col("p_good") >= 0.5).then(1 / theta).otherwise(1.0)
        )
        return weighted, metrics


@dataclass(frozen=True)
class RecommendationTrainer(HashedRecommendationTrainer):
    """The same features plus segment/user x item embeddings (training/embeddings.py), fitted to
    the soft label: an impression of P(good) p counts p / theta(position) good and 1 - p bad (the
    IPS rule above, fractionally), i.e. target (p / theta) / w at weight w = p / theta + 1 - p."""

    name: str = "recommendation-ips-embeddings"
    dim: int = 8
    alpha: float = 1e-5            # L2 strength of the hashed weights
    alpha_embedding: float = 3e-5  # L2 strength of the embeddings
    max_iter: int = 200            # L-BFGS iterations
    weighting = "p_good / theta(position) + 1 - p_good, p_good := its good part's share"

    featurize = staticmethod(segment_item_features)  # the user's part is their embedding
    key_columns = SEGMENT_ITEM_COLUMNS

    def weigh(self, rows: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, float]]:
        theta, metrics = self.examination(rows)
        good, bad = pl.col("p_good") / theta, 1 - pl.col("p_good")
        return rows.with_columns(weight=good + bad, p_good=good / (good + bad)), metrics

    def fit(self, train: pl.DataFrame) -> EmbeddingScorer:
        scorer = EmbeddingScorer(self.featurize, self.key_columns, self.n_features, self.dim,
                                 self.alpha, self.alpha_embedding, self.max_iter)
        return scorer.fit(train)
