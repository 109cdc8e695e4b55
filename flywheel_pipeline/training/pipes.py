"""Fine-tunes on other compute: a trainer whose work runs outside the asset's process, through
Dagster Pipes (flywheel.yaml: ``trainer: {kind: pipes, ...}``; docs/training.md).

The asset's process opens the candidate's MLflow run (params, windows, the training set as a
dataset input) and hands the external trainer, through the Pipes client of the Definitions'
``pipes_trainer`` resource (PipesSubprocessClient here; PipesK8sClient, PipesDatabricksClient or a
client of one's own elsewhere), the training set and where to log: ``extras`` below. The external
trainer fine-tunes, logs its model into that run (a pyfunc that scores SERVING_FEATURES) and
reports back ``model_uri`` and ``metrics`` with ``report_asset_materialization``. The run's
lineage (who launched it, with what command, on which training set, the model's run) is checked
here, and the candidate then goes through the same validation, gate and approval as any other.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import mlflow
import numpy as np
import polars as pl

from flywheel_pipeline.config import PipesTrainerSettings
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import SERVING_FEATURES
from flywheel_pipeline.training.base import DAGSTER_RUN_TAG, Windows, ensure_experiment

WORKER = [sys.executable, "-m", "flywheel_pipeline.training.worker"]  # flywheel's own external trainer
IMPRESSIONS_FILE = "train.parquet"


@dataclass(frozen=True)
class PipesLaunch:
    """A Pipes client and the Dagster context it launches from (the candidate_model asset's)."""

    client: dg.PipesClient
    context: dg.AssetExecutionContext

    @property
    def name(self) -> str:
        return type(self.client).__name__

    def run(self, command: list[str], extras: dict[str, Any]) -> dict[str, Any]:
        """Run ``command`` with ``extras``; the metadata of the materialization it reported."""
        reported = self.client.run(context=self.context, command=command, extras=extras).get_materialize_result()
        return {name: getattr(value, "value", value) for name, value in (reported.metadata or {}).items()}


@dataclass(frozen=True)
class ExternalFit:
    run_id: str
    model_uri: str
    model_id: str
    metrics: dict[str, float]
    lineage: dict[str, str]


def command_of(settings: PipesTrainerSettings) -> list[str]:
    return settings.command or WORKER


def training_set_for(home: Home, domain: str, settings: PipesTrainerSettings, windows: Windows,
                     weighted: pl.DataFrame, run_folder: Path) -> Path:
    """Where the external trainer reads its training set: the weighted impressions, written for it,
    or the domain's SFT or preference export of the same window (the cycle wrote it first)."""
    if settings.training_set == "impressions":
        run_folder.mkdir(parents=True, exist_ok=True)
        path = run_folder / IMPRESSIONS_FILE
        weighted.select([*SERVING_FEATURES, "served_at", "p_good", "weight"]).write_parquet(path)
        return path
    path = home.training_set(domain, settings.training_set, f"{windows.train_start}_{windows.train_end}")
    if not path.is_dir():
        raise FileNotFoundError(f"{domain}: no {settings.training_set} for the window {windows.params()} at {path}: "
                                f"materialize {domain}/{settings.training_set} first (the cycle job does)")
    return path


def digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files in name order."""
    sha = hashlib.sha256()
    for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        sha.update(file.read_bytes())
    return sha.hexdigest()


def train_elsewhere(home: Home, domain: str, shape: str, windows: Windows, settings: PipesTrainerSettings,
                    weighted: pl.DataFrame, params: dict[str, Any], launch: PipesLaunch,
                    dagster_run_id: str | None = None) -> ExternalFit:
    """Open the candidate's MLflow run, launch the external trainer on its training set, and check
    what it reports: a model logged into this run. A failure marks the run FAILED and raises."""
    command = command_of(settings)
    with mlflow.start_run(
        experiment_id=ensure_experiment(home, domain), run_name=f"train-{windows.holdout_end}",
        tags={"flywheel.domain": domain, "flywheel.stage": "training", "flywheel.compute": launch.name,
              **({DAGSTER_RUN_TAG: dagster_run_id} if dagster_run_id else {})},
    ) as run:
        path = training_set_for(home, domain, settings, windows, weighted,
                                home.root / "training" / domain / run.info.run_id)
        lineage = {"training.trainer": f"pipes: {' '.join(command)}", "training.compute": launch.name,
                   "training.training_set": f"{settings.training_set}: {path}",
                   "training.training_set_sha256": digest(path)}
        mlflow.log_params({**params, **lineage, "trainer.kind": "pipes", "trainer.command": " ".join(command),
                           "trainer.training_set": settings.training_set, "trainer.compute": launch.name,
                           **({f"trainer.fits.{k}": v for k, v in settings.fits.model_dump().items()}
                              if settings.command is None else {})})
        mlflow.log_input(mlflow.data.from_pandas(
            weighted.select([*SERVING_FEATURES, "p_good", "weight"]).to_pandas(),
            name=f"{domain}-train-{windows.train_start}-{windows.train_end}", targets="p_good"),
            context="training")
        reported = launch.run(command, {
            "domain": domain, "shape": shape, "training_set": {"kind": settings.training_set, "path": str(path)},
            "trainer": settings.fits.model_dump(), "windows": windows.params(),
            "mlflow": {"tracking_uri": home.mlflow_tracking_uri, "run_id": run.info.run_id},
        })
        model = _reported_model(reported, run.info.run_id, command)
        metrics = {name: float(value) for name, value in (reported.get("metrics") or {}).items()
                   if value is not None}
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, model_id=model.model_id)
    return ExternalFit(run.info.run_id, f"models:/{model.model_id}", model.model_id, metrics, lineage)


def _reported_model(reported: Mapping[str, Any], run_id: str, command: list[str]):
    """The logged model the external trainer reported, when it was logged into ``run_id``."""
    uri = str(reported.get("model_uri") or "")
    if not uri.startswith("models:/"):
        raise RuntimeError(f"the external trainer {command} reported no model (model_uri {uri!r}): it must call "
                           f"report_asset_materialization(metadata={{'model_uri': 'models:/<model_id>', "
                           f"'metrics': ...}}) with the model it logged")
    model = mlflow.MlflowClient().get_logged_model(uri.removeprefix("models:/"))
    if model.source_run_id != run_id:
        raise RuntimeError(f"the external trainer {command} reported {uri}, logged in run {model.source_run_id}, "
                           f"not in the candidate's run {run_id}: log it with mlflow.start_run(run_id=...) "
                           f"from the extras (lineage)")
    return model
