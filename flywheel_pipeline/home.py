"""The local home folder: everything the embedded default keeps lives under one directory.

    <home>/warehouse.duckdb   the warehouse (raw, dbt models, labels, approvals)
    <home>/landing/<domain>/<YYYY-MM-DD>.jsonl   landing batches, one a day per domain
    <home>/dagster/           DAGSTER_HOME (runs, event log, schedules)
    <home>/mlflow/            MLflow tracking store (sqlite) and artifacts
    <home>/simulator/         the simulator's world and hidden truth (never read by the pipeline)
    <home>/flywheel.log       output of the tools commands run (dbt, Dagster's daemon and code server)

The home is $FLYWHEEL_HOME, or ``.flywheel`` beside the project's flywheel.yaml.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flywheel_pipeline.config import CONFIG_ENV, config_path

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


class HomeError(RuntimeError):
    """No home where a command expected one."""


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls) -> Home:
        """$FLYWHEEL_HOME; else ``.flywheel`` beside the project's flywheel.yaml, wherever the
        command runs from."""
        if HOME_ENV in os.environ:
            return cls(Path(os.environ[HOME_ENV]).resolve())
        return cls(config_path().resolve().parent / DEFAULT_HOME)

    @classmethod
    def existing(cls) -> Home:
        """The home a command reads from; refuses, naming FLYWHEEL_HOME, when there is none."""
        home = cls.from_env()
        if not home.warehouse.exists() and not home.landing.exists():
            raise HomeError(f"no flywheel home at {home.root}: run `make demo` (or `flywheel simulate`) "
                            f"first, or set {HOME_ENV} to the home you mean")
        return home

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
    def log(self) -> Path:
        """Where commands send the output of the tools they run (dbt, the daemon, the code server)."""
        return self.root / "flywheel.log"

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
        os.environ.setdefault(CONFIG_ENV, str(config_path().resolve()))
        return self
