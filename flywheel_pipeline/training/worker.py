"""flywheel's own external trainer: fits one of training.TRAINERS out of the asset's process.

    python -m flywheel_pipeline.training.worker     (launched by a Dagster Pipes client)

What the pipes trainer launches when flywheel.yaml gives no ``command``: it reads the weighted
impressions the asset wrote (``extras["training_set"]``), fits the trainer ``extras["trainer"]``
names with the same internal check as in process, logs the model into the candidate's MLflow run
(``extras["mlflow"]``) and reports its ``model_uri`` and ``metrics`` back through Pipes. On a
GPU pod or another machine it needs flywheel (and, for the transformer, its extra) installed, the
training set readable and the MLflow tracking server reachable (docs/training.md).
"""

from __future__ import annotations

import math

import mlflow
import polars as pl
from dagster_pipes import open_dagster_pipes
from pydantic import TypeAdapter

from flywheel_pipeline.config import InProcessSettings
from flywheel_pipeline.training import TRAINERS
from flywheel_pipeline.training.base import fit_with_internal_check, log_model

FITS = TypeAdapter(InProcessSettings)


def main() -> None:
    with open_dagster_pipes() as pipes:
        extras = pipes.extras
        settings = FITS.validate_python(extras["trainer"])
        trainer = TRAINERS[extras["shape"]][settings.kind](settings)
        weighted = pl.read_parquet(extras["training_set"]["path"])
        pipes.log.info(f"fitting {trainer.name} on {weighted.height} weighted impressions")
        scorer, metrics = fit_with_internal_check(trainer, weighted)
        mlflow.set_tracking_uri(extras["mlflow"]["tracking_uri"])
        with mlflow.start_run(run_id=extras["mlflow"]["run_id"]):
            mlflow.log_params({f"trainer.{k}": v for k, v in trainer.params().items()})
            info = log_model(extras["domain"], trainer, scorer, weighted.to_pandas())
        pipes.report_asset_materialization(metadata={
            "model_uri": info.model_uri,
            "metrics": {"type": "json", "raw_value": {name: None if math.isnan(value) else value
                                                      for name, value in metrics.items()}},
        })


if __name__ == "__main__":
    main()
