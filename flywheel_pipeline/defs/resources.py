"""Dagster resources: the warehouses (a DuckDB file per domain in the home folder, or partitioned tables
in an object store under the spark engine) and the MLflow store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb

from flywheel_pipeline import warehouse
from flywheel_pipeline.config import FlywheelConfig, WarehouseSettings, config_path, load_config
from flywheel_pipeline.home import Home
from flywheel_pipeline.object_store import ObjectStore
from flywheel_pipeline.warehouses import Warehouses


class WarehouseResource(dg.ConfigurableResource):
    """The home folder, its domains' warehouses (``warehouses.Warehouses``: a DuckDB file, or under
    ``engine: spark`` a working copy of the domain's tables in the object store; the stages get a
    DuckDB connection either way) and the approval records."""

    home_path: str
    config_path: str | None = None
    memory_limit: str | None = None  # flywheel.yaml's warehouse.memory_limit; None: DuckDB's default
    engine: str = "duckdb"  # flywheel.yaml's warehouse settings (config.WarehouseSettings)
    root: str | None = None
    spark_root: str | None = None
    endpoint_url: str | None = None

    @classmethod
    def for_config(cls, home: Home, config: FlywheelConfig) -> WarehouseResource:
        settings = config.warehouse
        return cls(home_path=str(home.root), config_path=str(config_path()), memory_limit=settings.memory_limit,
                   engine=settings.engine, root=settings.root, spark_root=settings.spark_root,
                   endpoint_url=settings.endpoint_url)

    def object_store(self) -> ObjectStore | None:
        """The spark engine's tables; None under duckdb."""
        if self.engine != "spark":
            return None
        return ObjectStore.from_settings(WarehouseSettings(
            engine="spark", root=self.root, spark_root=self.spark_root, endpoint_url=self.endpoint_url))

    def home(self) -> Home:
        return Home(Path(self.home_path).resolve()).ensure()

    def config(self) -> FlywheelConfig:
        return load_config(self.config_path)

    def warehouses(self) -> Warehouses:
        return Warehouses(self.home(), self.object_store(), self.memory_limit)

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
