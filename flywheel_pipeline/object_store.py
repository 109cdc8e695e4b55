"""The distributed warehouse (``warehouse.engine: spark``): partitioned Parquet tables in an object store.

Every table is a folder under ``warehouse.root`` laid out as Spark keeps its tables,
``<schema>.db/<table>/domain=<d>/event_date=<day>/`` (``health.measures`` by ``as_of``). dbt builds
staging, intermediate and marts on Spark into the same root (its ``spark.sql.warehouse.dir``); the
Python stages read through ``sources.ParquetSource`` and write through ``sources.ParquetSink``.

A run of a Python stage works on a copy of its domain: ``working_copy`` loads the domain's tables
(raw, marts, labels, health) from the store into an in-memory DuckDB, hands the stage that
connection, the same SQL and polars it runs on a domain's DuckDB file, and afterwards writes back
exactly the (table, day) partitions whose rows changed, one object each. Runs of a domain's
different days change different partitions, so they can run at once (as Kubernetes run pods would).
Nothing is written when the stage fails; each partition is replaced whole, but a run's partitions are
not one transaction: a crash while writing them back leaves some new and some old, until the run is
repeated (its partitions are rewritten from the same input).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from urllib.parse import urlsplit

import duckdb
import pyarrow.fs as pafs

from flywheel_pipeline import warehouse
from flywheel_pipeline.config import WarehouseSettings
from flywheel_pipeline.sources import ParquetSink, ParquetSource, day_column, table_folder

# What the Python stages write (each partitioned by domain and a day), in the order a copy loads them.
STAGE_TABLES = ("raw.interactions", "raw.impressions", "raw.signals", "raw.outcomes", "raw.labels",
                "raw.quarantine", "labels.label_matrix", "labels.impression_labels", "labels.review_queue",
                "health.measures")
# What dbt builds on Spark that the Python stages read.
DBT_TABLES = ("marts.fct_impressions", "marts.fct_interactions", "marts.rpt_quality_filter")
SPARK_TABLES_ENV = "FLYWHEEL_SPARK_TABLES"  # the tables dbt's on-run-start registers (dbt_project/macros)


@dataclass(frozen=True)
class ObjectStore:
    """Where the tables are: ``root`` as the Python stages reach it, ``spark_root`` as Spark does."""

    root: str
    spark_root: str
    filesystem: pafs.FileSystem

    @classmethod
    def from_settings(cls, settings: WarehouseSettings) -> ObjectStore:
        parts = urlsplit(settings.root)
        if parts.scheme == "s3":
            endpoint = urlsplit(settings.endpoint_url) if settings.endpoint_url else None
            filesystem = pafs.S3FileSystem(endpoint_override=endpoint.netloc if endpoint else None,
                                           scheme=endpoint.scheme if endpoint else "https",
                                           allow_bucket_creation=False)
            root = f"{parts.netloc}{parts.path}".rstrip("/")
            spark_root = settings.spark_root or f"s3a://{root}"
        else:
            filesystem, root = pafs.LocalFileSystem(), parts.path.rstrip("/") if parts.scheme else settings.root
            spark_root = settings.spark_root or root
        return cls(root=root, spark_root=spark_root.rstrip("/"), filesystem=filesystem)

    def source(self) -> ParquetSource:
        return ParquetSource(self.root, self.filesystem)

    def sink(self) -> ParquetSink:
        return ParquetSink(self.root, self.filesystem)

    def spark_tables(self) -> str:
        """The tables under the root as JSON for dbt's on-run-start (``register_tables``): each one
        with a partition folder, by name and location as Spark names it."""
        tables = []
        for schema in self._folders(self.root, ".db"):
            for name in self._folders(f"{self.root}/{schema}", ""):
                table = f"{schema.removesuffix('.db')}.{name}"
                if any("=" in part for part in self._folders(table_folder(self.root, table), "")):
                    tables.append({"name": table, "location": table_folder(self.spark_root, table)})
        return json.dumps(tables)

    def _folders(self, folder: str, suffix: str) -> list[str]:
        if self.filesystem.get_file_info(folder).type != pafs.FileType.Directory:
            return []
        return sorted(info.base_name for info in self.filesystem.get_file_info(pafs.FileSelector(folder))
                      if info.type == pafs.FileType.Directory and info.base_name.endswith(suffix)
                      and not info.base_name.startswith((".", "_")))


@contextmanager
def working_copy(store: ObjectStore, domain: str, read_only: bool = False,
                 memory_limit: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB holding ``domain``'s tables from ``store``; unless ``read_only``, the
    partitions of STAGE_TABLES it changed are written back when the block ends without an error."""
    source = store.source()
    with warehouse.connect(":memory:", memory_limit=memory_limit) as con:
        warehouse.ensure_raw_tables(con)
        for table in (*STAGE_TABLES, *DBT_TABLES):
            rows = source.read(table, domain)
            if rows.width:
                _load(con, table, rows)
        before = {table: _digests(con, table) for table in STAGE_TABLES}
        yield con
        if read_only:
            return
        sink = store.sink()
        for table in STAGE_TABLES:
            after = _digests(con, table)
            for day in sorted(day for day in before[table].keys() | after.keys()
                              if before[table].get(day) != after.get(day)):
                rows = con.execute(f"SELECT * FROM {table} WHERE domain = ? AND {day_column(table)} = ?",
                                   [domain, day]).to_arrow_table()
                sink.replace_partition(table, domain, day, rows)


def _load(con: duckdb.DuckDBPyConnection, table: str, rows) -> None:
    schema = table.split(".")[0]
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    con.register("stored_rows", rows.to_arrow())
    try:
        exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = ? "
                             "AND table_name = ?", table.split(".")).fetchall()[0][0]
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM stored_rows" if exists
                    else f"CREATE TABLE {table} AS SELECT * FROM stored_rows")
    finally:
        con.unregister("stored_rows")


def _digests(con: duckdb.DuckDBPyConnection, table: str) -> dict[date, tuple[int, int]]:
    """Each day partition's row count and an order-free digest of its rows."""
    schema, name = table.split(".")
    if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                       [schema, name]).fetchall()[0][0]:
        return {}
    day = day_column(table)
    return {row[0]: (row[1], row[2]) for row in con.execute(
        f"SELECT {day}, count(*), bit_xor(hash(t)) FROM {table} AS t GROUP BY 1").fetchall()}
