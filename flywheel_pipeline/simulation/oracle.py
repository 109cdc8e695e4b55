"""What the loop could reach: the oracle, and a logged model's true accuracy (scoring code only).

The oracle is the domain's own trainer fitted on the hidden truth of the same training
impressions a candidate was fitted on: the accuracy perfect labels would have given, so the gap
between a champion and it is what labeling and the gate leave on the table.
"""

from __future__ import annotations

import mlflow
import polars as pl

from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.home import Home
from flywheel_pipeline.simulation import true_accuracy, true_labels
from flywheel_pipeline.training import trainer_for
from flywheel_pipeline.training.base import Trainer, Windows, impressions
from flywheel_pipeline.warehouses import Warehouses


def with_truth(rows: pl.DataFrame, truth: pl.DataFrame) -> pl.DataFrame:
    """``rows`` (impressions) labelled with their hidden ``truth`` (``true_labels``), in their order:
    a join's own order varies from run to run, and so would a fit on them."""
    rows = rows.drop("p_good", "label").join(truth, on=["interaction_id", "item_id"], maintain_order="left")
    return rows.with_columns(p_good=pl.col("good").cast(pl.Float64), label=pl.col("good")).drop("good")


def oracle_accuracy(home: Home, config: FlywheelConfig, domain: str, windows: Windows,
                    trainer: Trainer | None = None) -> float:
    """True accuracy of ``trainer`` (default: the domain's) fitted on the truth of ``windows``'
    training days."""
    with Warehouses.for_settings(home, config.warehouse).reader(domain) as source:
        rows = impressions(source, domain, windows.train_start, windows.train_end)
    rows = with_truth(rows, true_labels(home, domain).unique(["interaction_id", "item_id"]))
    trainer = trainer or trainer_for(config.domain(domain))
    weighted, _ = trainer.weigh(rows)
    return true_accuracy(home, config, domain, trainer.fit(weighted))


def model_true_accuracy(home: Home, config: FlywheelConfig, domain: str, model_uri: str) -> float:
    """True accuracy of a logged model (e.g. the candidate_model asset's ``model_uri``)."""
    mlflow.set_tracking_uri(home.mlflow_tracking_uri)
    return true_accuracy(home, config, domain, mlflow.pyfunc.load_model(model_uri))
