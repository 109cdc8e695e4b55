"""Dagster resources: the warehouses (a DuckDB file per domain in the home folder) and the MLflow store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb

from flywheel_pipeline import warehouse
from flywheel_pipeline.config import FlywheelConfig, load_config
from flywheel_pipeline.home import Home


class WarehouseResource(dg.ConfigurableResource):
    """The home folder, its domains' DuckDB warehouses and the approval records."""

    home_path: str
    config_path: str | None = None
    memory_limit: str | None = None  # flywheel.yaml's warehouse.memory_limit; None: DuckDB's default

    def home(self) -> Home:
        return Home(Path(self.home_path).resolve()).ensure()

    def config(self) -> FlywheelConfig:
        return load_config(self.config_path)

    @contextmanager
    def connect(self, domain: str, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """``domain``'s warehouse."""
        with warehouse.connect(self.home().warehouse(domain), read_only=read_only,
                               memory_limit=self.memory_limit) as con:
            yield con

    @contextmanager
    def approvals(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """The approval records of every domain (short transactions: every domain's runs share it)."""
        with warehouse.connect(self.home().approvals, read_only=read_only) as con:
            yield con


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking + registry: the home's sqlite store, or PostgreSQL under the production
    profile (``Home.mlflow_tracking_uri``)."""

    home_path: str

    def client(self):
        import mlflow

        uri = Home(Path(self.home_path).resolve()).ensure().mlflow_tracking_uri
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        return mlflow.MlflowClient(uri, uri)
