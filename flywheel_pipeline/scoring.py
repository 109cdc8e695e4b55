"""What a served model is to flywheel: something that scores candidate items for a request.

Both the simulated product (serving) and validation call models through this one shape, so the
model that validation measured is exactly the model that serves. Registered models are MLflow
pyfuncs whose ``predict`` takes a DataFrame with SERVING_FEATURES and returns one score per row.
"""

from __future__ import annotations

import re
from typing import Protocol

import numpy as np
import pandas as pd

# Known at serving time: the only columns a model may read (point-in-time; no reactions).
SERVING_FEATURES = [
    "domain",
    "user_id",
    "segment",
    "context_features",  # JSON object of name -> number (context.features), "{}" without any
    "is_new_user",
    "input_text",
    "item_id",
    "item_content",
]
# What a serving feature added later means when a caller (or a model logged before it) lacks it.
SERVING_FEATURE_DEFAULTS = {"context_features": "{}"}

_TOKEN = re.compile(r"[a-z0-9']+")


class Scorer(Protocol):
    """Higher score = more likely to be a good item for this request."""

    def predict(self, candidates: pd.DataFrame) -> np.ndarray: ...


def tokens(text: str) -> set[str]:
    return set(_TOKEN.findall(text.lower()))


class LexicalOverlapScorer:
    """The assistant's day-zero policy: Jaccard overlap between the query and the response."""

    version = "baseline"

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        scores = []
        for query, response in zip(candidates["input_text"], candidates["item_content"]):
            q, r = tokens(query), tokens(response)
            scores.append(len(q & r) / len(q | r) if q | r else 0.0)
        return np.asarray(scores, dtype=float)


class UniformScorer:
    """The recommender's day-zero policy: no preference (ties broken by the serving policy)."""

    version = "baseline"

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        return np.zeros(len(candidates), dtype=float)


def baseline_scorer(shape: str) -> Scorer:
    """The policy a domain serves before any champion exists."""
    return LexicalOverlapScorer() if shape == "assistant" else UniformScorer()
