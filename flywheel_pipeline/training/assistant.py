"""The assistant trainer: P(good | query, response) from the probabilistic labels.

Hard labels (p_good >= 0.5) weighted by the label's confidence |2 p_good - 1|, on hashed features:
query-token x response-token crosses (generalise across paraphrases), query-token x response id,
the normalised query x response id (memorise what worked for a known query), the response id, the
lexical overlap the day-zero policy used, and each numeric context feature alone and x response id.
The training window holds the traffic of earlier champions and the exploration slice alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import polars as pl

from flywheel_pipeline.scoring import tokens
from flywheel_pipeline.training.base import HashedLogisticTrainer, context_features, crossed

QUERY_RESPONSE_COLUMNS = ["input_text", "context_features", "item_id", "item_content"]


def response_features(rows: pd.DataFrame) -> list[dict[str, float]]:
    """Hashed-feature dicts for (query, response) rows."""
    features = []
    for query, numeric, response_id, response in zip(
        rows["input_text"].tolist(), rows["context_features"].tolist(), rows["item_id"].tolist(),
        rows["item_content"].tolist()
    ):
        query_tokens, response_tokens = tokens(query), tokens(response)
        union = query_tokens | response_tokens
        row = {
            f"r={response_id}": 1.0,
            f"q={' '.join(sorted(query_tokens))}|r={response_id}": 1.0,
            "overlap": len(query_tokens & response_tokens) / len(union) if union else 0.0,
            **crossed(context_features(numeric), f"r={response_id}"),
        }
        for q in query_tokens:
            row[f"qt={q}|r={response_id}"] = 1.0
            row.update({f"qt={q}|rt={r}": 1.0 for r in response_tokens})
        features.append(row)
    return features


@dataclass(frozen=True)
class AssistantTrainer(HashedLogisticTrainer):
    name: str = "assistant-hashed-logistic"
    weighting = "|2 p_good - 1|"

    featurize = staticmethod(response_features)
    key_columns = QUERY_RESPONSE_COLUMNS

    def weigh(self, rows: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, float]]:
        weighted = rows.with_columns(weight=(2 * pl.col("p_good") - 1).abs())
        return weighted, {"mean_label_confidence": float(weighted["weight"].mean())}
