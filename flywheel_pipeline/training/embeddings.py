"""Logistic matrix factorisation beside hashed features: what the recommender is fitted as.

P(good | user, item) = sigmoid(b + x.w + (s_segment + p_user) . q_item): x the hashed features of
the row (the item, segment x item, numeric context x item, ...), q_item an item embedding shared by
every user, s_segment a segment embedding and p_user the user's own deviation from it. A user seen
a few times gets a taste from the items they liked and disliked, and an item seen by a few users
of a segment borrows from the others through the shared space; an unknown user (or item) scores
by the rest (p = 0, q = 0).

Fitted by L-BFGS (scipy) on the weighted cross-entropy against the soft label ``p_good`` (the
trainer's ``weight``) with an L2 penalty per block; the embeddings start small and random from a
fixed seed, so the same rows give the same model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import polars as pl
from scipy import optimize, sparse
from scipy.special import expit
from threadpoolctl import threadpool_limits

from flywheel_pipeline.training.base import Featurize, HashedLogisticScorer

INIT_SCALE = 0.1  # sd of the embeddings' random start


def _index(values: pd.Series, known: pd.Index) -> np.ndarray:
    """Each value's row in ``known``; unknown values get the last row (zeros); null is "none"."""
    positions = known.get_indexer(values.fillna("none").astype(str))
    return np.where(positions < 0, len(known), positions)


@dataclass
class EmbeddingScorer:
    """Hashed linear features plus segment/user x item embeddings (module docstring)."""

    featurize: Featurize
    key_columns: list[str]
    n_features: int
    dim: int
    alpha_linear: float
    alpha_embedding: float
    max_iter: int
    seed: int = 0
    columns: np.ndarray | None = None
    weights: np.ndarray | None = None
    bias: float = 0.0
    items: pd.Index = field(default_factory=lambda: pd.Index([]))
    users: pd.Index = field(default_factory=lambda: pd.Index([]))
    segments: pd.Index = field(default_factory=lambda: pd.Index([]))
    item_vectors: np.ndarray | None = None     # (items + 1, dim); the last row: unknown
    user_vectors: np.ndarray | None = None     # (users + 1, dim)
    segment_vectors: np.ndarray | None = None  # (segments + 1, dim)

    def _hashed(self, rows: pd.DataFrame) -> sparse.csr_matrix:
        return HashedLogisticScorer(self.featurize, self.key_columns, self.n_features).hashed(rows)

    def _codes(self, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (_index(rows["item_id"], self.items), _index(rows["user_id"], self.users),
                _index(rows["segment"], self.segments))

    def fit(self, train: pl.DataFrame) -> EmbeddingScorer:
        frame = train.to_pandas()
        good = frame["p_good"].to_numpy(dtype=float)  # the target: soft
        if (good >= 0.5).all() or not (good >= 0.5).any():
            raise ValueError("training labels hold one class only")
        hashed = self._hashed(frame)
        self.columns = np.unique(hashed.indices)
        features = hashed[:, self.columns].tocsr()
        self.items, self.users, self.segments = (
            pd.Index(pd.unique(frame[name].fillna("none").astype(str)))
            for name in ("item_id", "user_id", "segment"))
        item, user, segment = self._codes(frame)
        sizes = (features.shape[1], len(self.items), len(self.users), len(self.segments))
        weight = frame["weight"].to_numpy(dtype=float)
        n_parameters = 1 + sizes[0] + self.dim * sum(sizes[1:])
        start = np.random.default_rng(self.seed).normal(0, INIT_SCALE, n_parameters)
        start[: 1 + sizes[0]] = 0.0  # the bias and the hashed weights start at zero
        objective = _Objective(features, item, user, segment, good, weight / weight.sum(), sizes,
                               self.dim, self.alpha_linear, self.alpha_embedding)
        with threadpool_limits(1):  # L-BFGS's small BLAS calls only lose to threads when shared
            solution = optimize.minimize(objective, start, jac=True, method="L-BFGS-B",
                                         options={"maxiter": self.max_iter})
        bias, weights, q, p, s = objective.unpack(solution.x)
        zero = np.zeros((1, self.dim))
        self.bias, self.weights = float(bias), weights
        self.item_vectors, self.user_vectors, self.segment_vectors = (
            np.vstack([m, zero]) for m in (q, p, s))
        return self

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        """P(good) for each candidate row."""
        if candidates.empty:
            return np.zeros(0)
        linear = self._hashed(candidates)[:, self.columns] @ self.weights
        item, user, segment = self._codes(candidates)
        taste = self.segment_vectors[segment] + self.user_vectors[user]
        return expit(self.bias + linear + np.einsum("nd,nd->n", taste, self.item_vectors[item]))


@dataclass
class _Objective:
    """Weighted log loss + L2 and its gradient, over the flat parameter vector
    [bias, linear weights, item vectors, user vectors, segment vectors]; each row's item, user
    and segment as codes (== the block's size: none)."""

    features: sparse.csr_matrix
    item: np.ndarray
    user: np.ndarray
    segment: np.ndarray
    good: np.ndarray
    weight: np.ndarray  # sums to 1
    sizes: tuple[int, int, int, int]
    dim: int
    alpha_linear: float
    alpha_embedding: float

    def unpack(self, theta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n_linear, *n_embedded = self.sizes
        parts, at = [theta[0], theta[1:1 + n_linear]], 1 + n_linear
        for n in n_embedded:
            parts.append(theta[at:at + n * self.dim].reshape(n, self.dim))
            at += n * self.dim
        return tuple(parts)

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        bias, weights, q, p, s = self.unpack(theta)
        zero = np.zeros((1, self.dim))
        q_rows = np.vstack([q, zero])[self.item]
        taste_rows = np.vstack([p, zero])[self.user] + np.vstack([s, zero])[self.segment]
        z = bias + self.features @ weights + np.einsum("nd,nd->n", taste_rows, q_rows)
        loss = float(self.weight @ (np.logaddexp(0, z) - self.good * z))
        loss += 0.5 * self.alpha_linear * float(weights @ weights)
        loss += 0.5 * self.alpha_embedding * sum(float((m * m).sum()) for m in (q, p, s))
        residual = self.weight * (expit(z) - self.good)
        toward_taste = residual[:, None] * taste_rows
        toward_item = residual[:, None] * q_rows
        gradient = [
            np.array([residual.sum()]),
            self.features.T @ residual + self.alpha_linear * weights,
            (_scatter(self.item, toward_taste, len(q)) + self.alpha_embedding * q).ravel(),
            (_scatter(self.user, toward_item, len(p)) + self.alpha_embedding * p).ravel(),
            (_scatter(self.segment, toward_item, len(s)) + self.alpha_embedding * s).ravel(),
        ]
        return loss, np.concatenate(gradient)


def _scatter(codes: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """(size, dim): the sum of ``values``' rows per code (code == size: dropped)."""
    return np.stack([np.bincount(codes, weights=column, minlength=size + 1)[:size]
                     for column in values.T], axis=1)
