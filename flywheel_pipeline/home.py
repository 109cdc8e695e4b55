"""The local home folder: everything the embedded default keeps lives under one directory.

    <home>/warehouse.duckdb   the warehouse (raw, dbt models, labels, approvals)
    <home>/landing/<domain>/<YYYY-MM-DD>.jsonl   landing batches, one a day per domain
    <home>/dagster/           DAGSTER_HOME (runs, event log, schedules)
    <home>/mlflow/            MLflow tracking store (sqlite) and artifacts
    <home>/simulator/         the simulator's world and hidden truth (never read by the pipeline)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "FLYWHEEL_HOME"
DEFAULT_HOME = ".flywheel"

_DAGSTER_YAML = """\
# Written by flywheel: runs share one DuckDB file, so at most one run writes at a time.
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    tag_concurrency_limits:
      - key: flywheel/warehouse
        limit: 1
telemetry:
  enabled: false
"""


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls) -> Home:
        return cls(Path(os.environ.get(HOME_ENV, DEFAULT_HOME)).resolve())

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def dagster(self) -> Path:
        return self.root / "dagster"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow / "artifacts"

    @property
    def simulator(self) -> Path:
        return self.root / "simulator"

    def landing_file(self, domain: str, day: str) -> Path:
        return self.landing / domain / f"{day}.jsonl"

    def ensure(self) -> Home:
        """Create the folders and the Dagster instance config; safe to call repeatedly."""
        for folder in (self.landing, self.dagster, self.mlflow_artifacts, self.simulator):
            folder.mkdir(parents=True, exist_ok=True)
        dagster_yaml = self.dagster / "dagster.yaml"
        if not dagster_yaml.exists():
            dagster_yaml.write_text(_DAGSTER_YAML)
        return self

    def activate(self) -> Home:
        """Point this process (and the tools it starts) at this home."""
        self.ensure()
        os.environ[HOME_ENV] = str(self.root)
        os.environ["DAGSTER_HOME"] = str(self.dagster)
        os.environ["MLFLOW_TRACKING_URI"] = self.mlflow_tracking_uri
        return self
