"""The local home folder: everything the embedded default keeps lives under one directory.

    <home>/warehouse/<domain>.duckdb   a domain's warehouse (raw, dbt models, labels, health): one
                              file per domain, so that domains' runs write at the same time
    <home>/approvals.duckdb   the signed approval records of every domain (registry.approvals)
    <home>/landing/<domain>/<YYYY-MM-DD>.jsonl   landing batches, one a day per domain
    <home>/landing/<domain>/<YYYY-MM-DD>.<source>.jsonl   an importer's batches (docs/importing.md)
    <home>/dagster/           DAGSTER_HOME (runs, event log, schedules)
    <home>/mlflow/            MLflow tracking store (sqlite) and artifacts
    <home>/partitions_start   the earliest day an import landed, when before flywheel.yaml's partitions_start
    <home>/catalogues/<domain>.parquet   the items a domain's policies choose from (docs/importing.md)
    <home>/review/<domain>/   the review queue's files for Label Studio and Argilla (docs/importing.md)
    <home>/datasets/<domain>/<name>/<window>/   exported training sets (Parquet, JSONL, dataset card)
    <home>/reports/<domain>/<as_of>.html   the cycle's health report (and its .json)
    <home>/simulator/         the simulator's world and hidden truth (never read by the pipeline)
    <home>/flywheel.log       output of the tools commands run (dbt, Dagster's daemon and code server)

The home is $FLYWHEEL_HOME, or ``.flywheel`` beside the project's flywheel.yaml.

Under the production profile (flywheel.yaml's ``profile``, or $FLYWHEEL_PROFILE) the Dagster
instance's runs, event log and schedules and MLflow's tracking store and registry live in PostgreSQL
instead, and MLflow's artifacts where ``production.mlflow_artifacts`` says (docs/deploying.md).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from flywheel_pipeline.config import CONFIG_ENV, Deployment, config_path, load_deployment

HOME_ENV = "FLYWHEEL_HOME"
DEFAULT_HOME = ".flywheel"

_DAGSTER_YAML_MARK = "# Written by flywheel"
_DAGSTER_YAML = """\
# Written by flywheel, and rewritten when flywheel's defaults change (delete this line to keep edits).
# Each domain's warehouse is one DuckDB file, which one process writes at a time: at most one run per
# domain (the tag's value) at once; domains run side by side.
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1  # a queued run starts within a second of its turn (Dagster's default: 5)
concurrency:
  runs:
    tag_concurrency_limits:
      - key: flywheel/warehouse
        value:
          applyLimitPerUniqueValue: true
        limit: 1
  # A step in a concurrency pool waits for a free slot: the dbt steps under engine spark take turns
  # (defs/transform.py: DBT_POOL), whichever runs they belong to.
  pools:
    default_limit: 1
# A run whose process died (killed, out of memory, machine restarted) is marked failed and leaves
# the queue: the daemon checks every in-progress run's worker process (docs/operations.md).
run_launcher:
  module: flywheel_pipeline.launcher
  class: LocalRunLauncher
run_monitoring:
  enabled: true
  poll_interval_seconds: 10  # how often the daemon checks in-progress runs
  start_timeout_seconds: 180  # a run whose worker never started fails after this
  cancel_timeout_seconds: 180  # a run that does not stop when terminated is marked canceled
  max_runtime_seconds: 43200  # a run still going after 12 h (alive but stuck) is terminated
  max_resume_run_attempts: 0  # a dead run fails; it is not restarted in a new worker
telemetry:
  enabled: false
"""


_POSTGRES_STORAGE = """\
# The production profile: runs, event log and schedules in PostgreSQL (flywheel.yaml's production).
storage:
  postgres:
    postgres_url:
      env: {env}
"""


def dagster_yaml(deployment: Deployment) -> str:
    """The instance config for the profile: the embedded one keeps Dagster's sqlite default."""
    if deployment.profile == "production":
        return _DAGSTER_YAML + _POSTGRES_STORAGE.format(env=deployment.production.postgres_url_env)
    return _DAGSTER_YAML


def _write_dagster_yaml(path: Path, text: str) -> None:
    """Write the instance config when it is missing or is still flywheel's own (its first line
    says so) and differs; in one step, so that no process reads a part of it."""
    current = path.read_text() if path.exists() else _DAGSTER_YAML_MARK
    if current.startswith(_DAGSTER_YAML_MARK) and current != text:
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(text)
        partial.replace(path)


class HomeError(RuntimeError):
    """No home where a command expected one."""


@dataclass(frozen=True)
class Home:
    root: Path

    @cached_property
    def deployment(self) -> Deployment:
        """The profile (embedded or production) and its settings, from flywheel.yaml."""
        return load_deployment()

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
        if not home.warehouses.exists() and not home.landing.exists():
            raise HomeError(f"no flywheel home at {home.root}: run `make demo` (or `flywheel simulate`) "
                            f"first, or set {HOME_ENV} to the home you mean")
        return home

    @property
    def warehouses(self) -> Path:
        """The folder of the domains' warehouses."""
        return self.root / "warehouse"

    def warehouse(self, domain: str) -> Path:
        """``domain``'s DuckDB warehouse. A home made before domains had their own files is split
        first (`flywheel warehouse split`): it refuses until then."""
        if self.shared_warehouse.exists():
            raise HomeError(f"{self.shared_warehouse} holds every domain's data in one file, from before "
                            f"each domain had its own: run `flywheel warehouse split` once (it keeps the file)")
        return self.warehouses / f"{domain}.duckdb"

    @property
    def shared_warehouse(self) -> Path:
        """The one warehouse file of every domain, as homes kept it before (warehouse.split_shared_warehouse)."""
        return self.root / "warehouse.duckdb"

    @property
    def approvals(self) -> Path:
        """The approval records of every domain: one signed chain (flywheel_pipeline.approval)."""
        return self.root / "approvals.duckdb"

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
        """MLflow's tracking store and registry: every client and command gets it here."""
        if self.deployment.profile == "production":
            return self.deployment.production.mlflow_url()
        return f"sqlite:///{self.mlflow / 'mlflow.db'}"

    def mlflow_client(self):
        """A client of this home's tracking store and registry, named outright: not MLflow's
        process-wide URIs, which code run before in the same process (a Dagster run in process)
        may have pointed at another home."""
        import mlflow

        return mlflow.MlflowClient(self.mlflow_tracking_uri, self.mlflow_tracking_uri)

    @property
    def has_mlflow_store(self) -> bool:
        """Whether MLflow's store is there to read (a reader must not make an empty sqlite one):
        PostgreSQL's under the production profile, checked when the home is activated."""
        return self.deployment.profile == "production" or (self.mlflow / "mlflow.db").exists()

    @property
    def mlflow_artifacts(self) -> Path:
        """The embedded profile's artifacts folder."""
        return self.mlflow / "artifacts"

    @property
    def mlflow_artifact_uri(self) -> str:
        """Where new experiments keep their artifacts: ``production.mlflow_artifacts`` under the
        production profile (a relative path is under the home), else the home's folder."""
        configured = self.deployment.production.mlflow_artifacts
        if self.deployment.profile != "production" or configured is None:
            return self.mlflow_artifacts.as_uri()
        if "://" in configured:
            return configured
        return (self.root / configured).resolve().as_uri()

    @property
    def datasets(self) -> Path:
        """Exported training sets (flywheel_pipeline.training_sets)."""
        return self.root / "datasets"

    def training_set(self, domain: str, name: str, version: str) -> Path:
        """An exported training set's folder: it appears only once whole (training_sets.write)."""
        return self.datasets / domain / name / version

    @property
    def log(self) -> Path:
        """Where commands send the output of the tools they run (dbt, the daemon, the code server)."""
        return self.root / "flywheel.log"

    @property
    def reports(self) -> Path:
        """The health reports: <domain>/<as_of>.html and the .json that renders it again."""
        return self.root / "reports"

    def catalogue(self, domain: str) -> Path:
        """The domain's catalogue as `flywheel import` stored it (flywheel_pipeline/catalogue.py)."""
        return self.root / "catalogues" / f"{domain}.parquet"

    @property
    def simulator(self) -> Path:
        return self.root / "simulator"

    def landing_file(self, domain: str, day: str) -> Path:
        return self.landing / domain / f"{day}.jsonl"

    def ensure(self) -> Home:
        """Create the folders and the Dagster instance config; safe to call repeatedly."""
        for folder in (self.landing, self.warehouses, self.dagster, self.mlflow_artifacts, self.simulator):
            folder.mkdir(parents=True, exist_ok=True)
        _write_dagster_yaml(self.dagster / "dagster.yaml", dagster_yaml(self.deployment))
        return self

    def activate(self) -> Home:
        """Point this process (and the tools it starts) at this home; under the production profile,
        check that PostgreSQL answers first."""
        self.ensure()
        if self.deployment.profile == "production":
            from flywheel_pipeline.deployment import (
                prepare_postgres,  # psycopg2 and MLflow: only here
            )

            prepare_postgres(self.deployment.production)
        os.environ[HOME_ENV] = str(self.root)
        os.environ["DAGSTER_HOME"] = str(self.dagster)
        os.environ["MLFLOW_TRACKING_URI"] = self.mlflow_tracking_uri
        os.environ.setdefault(CONFIG_ENV, str(config_path().resolve()))
        return self


def write_atomically(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a hidden file beside it, synced and renamed into place:
    a reader sees the old file or the new one, never half of one."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as new:
        new.write(data)
        new.flush()
        os.fsync(new.fileno())
    os.replace(new.name, path)
    return path
