"""The distributed warehouse (``warehouse.engine: spark``): partitioned Parquet tables in an object store.

Every table is a folder under ``warehouse.root`` laid out as Spark keeps its tables,
``<schema>.db/<table>/domain=<d>/event_date=<day>/`` (``health.measures`` by ``as_of``). dbt builds
staging, intermediate and marts on Spark into the same root (its ``spark.sql.warehouse.dir``); the
Python stages read through ``sources.ParquetSource`` and write through ``sources.ParquetSink``.

A run of a Python stage works on a copy of its domain: ``working_copy`` loads the domain's tables
(raw, marts, labels, health, the forgotten users) from the store into an in-memory DuckDB, hands
the stage that connection, the same SQL and polars it runs on a domain's DuckDB file, and
afterwards writes back exactly the (table, day) partitions whose rows changed, one object each.
Each stage's run (accumulation, labels, the review queue, the training-set export, the health
audit, the champion monitor) loads only its ``Scope``: the partitions of its days of the tables it
names, and reads anything else from the store directly; a change outside those partitions is
refused, so the copy never writes back a partition it did not hold whole. Deleting a user or an
expired day must reach every table, dbt's too: its copies (``every_table``), one per day it
changes (``deletion.plan``), hold every table's partitions of their day and write them back, dbt's
in the types Spark stored them in. Runs of a domain's
different days change different partitions, so they can run at once (as Kubernetes run pods would).
Nothing is written when the stage fails; each partition is replaced whole, but a run's partitions are
not one transaction: a crash while writing them back leaves some new and some old, until the run is
repeated (its partitions are rewritten from the same input).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs

from flywheel_pipeline import privacy, warehouse
from flywheel_pipeline.config import WarehouseSettings
from flywheel_pipeline.sources import (
    ParquetSink,
    ParquetSource,
    Scope,
    StoredPartitions,
    day_column,
    table_folder,
)

# What the Python stages write (each partitioned by domain and a day), in the order a copy loads them.
STAGE_TABLES = ("raw.interactions", "raw.impressions", "raw.signals", "raw.outcomes", "raw.labels",
                "raw.quarantine", "labels.label_matrix", "labels.impression_labels", "labels.review_queue",
                "health.measures", "health.champion_monitor")
# A user forgotten in a domain (privacy.forget_user), one partition per domain: accumulation keeps them out.
TOMBSTONES = "privacy.forgotten_users"
# What dbt builds on Spark that the Python stages read.
DBT_TABLES = ("marts.fct_impressions", "marts.fct_interactions", "marts.rpt_quality_filter")
SPARK_TABLES_ENV = "FLYWHEEL_SPARK_TABLES"  # the tables dbt's on-run-start registers (dbt_project/macros)


class OutOfScope(RuntimeError):
    """A run changed a partition its working copy did not hold (``Scope``); nothing was written back."""


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

    def tables(self, domain: str | None = None) -> list[str]:
        """Every table under the root (``schema.name``) that holds a partition folder, or with
        ``domain`` a folder of that domain's partitions."""
        holds = (lambda part: part == f"domain={domain}") if domain else (lambda part: "=" in part)
        return [f"{schema.removesuffix('.db')}.{name}"
                for schema in self._folders(self.root, ".db") for name in self._folders(f"{self.root}/{schema}", "")
                if any(holds(part) for part in self._folders(f"{self.root}/{schema}/{name}", ""))]

    def days(self, table: str, domain: str) -> frozenset[date]:
        """The days of ``domain``'s partitions of ``table`` (its ``<column>=<day>`` folders)."""
        folder = f"{table_folder(self.root, table)}/domain={domain}"
        return frozenset(date.fromisoformat(name.split("=")[1]) for name in self._folders(folder, "") if "=" in name)

    def spark_tables(self) -> str:
        """The tables under the root as JSON for dbt's on-run-start (``register_tables``), by name
        and location as Spark names it."""
        return json.dumps([{"name": table, "location": table_folder(self.spark_root, table)} for table in self.tables()])

    def _folders(self, folder: str, suffix: str) -> list[str]:
        if self.filesystem.get_file_info(folder).type != pafs.FileType.Directory:
            return []
        return sorted(info.base_name for info in self.filesystem.get_file_info(pafs.FileSelector(folder))
                      if info.type == pafs.FileType.Directory and info.base_name.endswith(suffix)
                      and not info.base_name.startswith((".", "_")))


@contextmanager
def working_copy(store: ObjectStore, domain: str, read_only: bool = False, memory_limit: str | None = None,
                 every_table: bool = False, scope: Scope | None = None,
                 found: Mapping[str, StoredPartitions] | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB holding ``domain``'s tables from ``store`` (with ``scope``, only what it
    names); unless ``read_only``, the partitions it changed are written back when the block ends
    without an error: those of the Python stages' tables, or with ``every_table`` those of every
    table it holds. Raises OutOfScope, writing nothing, when a scoped run changed a partition
    outside its days. Tables in ``found`` are read from those partitions, not listed again (a
    deletion's copies, one a day: their day's files, which no earlier copy rewrote)."""
    source = store.source()
    loaded = _loaded_tables(scope)
    written = loaded if every_table else tuple(table for table in loaded if table in (*STAGE_TABLES, TOMBSTONES))
    # the raw tables last: a deletion killed while writing back is found again by its raw rows
    # (a user's sessions, by their interactions), so running it again finishes the derived tables
    written = sorted(written, key=lambda table: table.startswith("raw."))
    with warehouse.connect(":memory:", memory_limit=memory_limit) as con:
        _create_stage_tables(con, scope)
        stored: dict[str, StoredPartitions] = {}  # each loaded table's partitions as found in the store
        for table in loaded:
            if partitions := (found or {}).get(table) or source.partitions(table, domain):
                _load(con, table, partitions.read(domain, **_days_held(scope, table)))
                stored[table] = partitions

        def split(table: str) -> str | None:  # a table the stage creates: split as sources.day_column says
            return stored[table].day if table in stored else _day(con, table)

        before = {table: _digests(con, table, split(table)) for table in written}
        yield con
        if read_only:
            return
        changes = {table: _changed(before[table], _digests(con, table, split(table))) for table in written}
        _refuse_out_of_scope(changes, scope)
        sink = store.sink()
        for table, changed in changes.items():
            # dbt's in the types Spark stored them in
            types = stored[table].schema if table in stored and table not in STAGE_TABLES else None
            for day in changed:
                sink.replace_partition(table, domain, day, _partition(con, table, domain, split(table), day), types)


def _loaded_tables(scope: Scope | None) -> tuple[str, ...]:
    """The tables a working copy loads, in order: the scope's and the tombstones; without a scope,
    the stages', the tombstones and the marts they read."""
    if scope is not None:
        return (*scope.tables, *scope.whole, TOMBSTONES)
    return (*STAGE_TABLES, TOMBSTONES, *DBT_TABLES)


def _create_stage_tables(con: duckdb.DuckDBPyConnection, scope: Scope | None) -> None:
    """The raw and privacy tables, as a domain's DuckDB file has them; a scoped copy drops the raw
    tables it does not hold, so a run that reads one by mistake fails instead of reading it empty."""
    warehouse.ensure_raw_tables(con)
    privacy.ensure_privacy_tables(con)
    if scope is not None:
        held = {*scope.tables, *scope.whole}
        for table in STAGE_TABLES:
            if table.startswith("raw.") and table not in held:
                con.execute(f"DROP TABLE {table}")


def _days_held(scope: Scope | None, table: str) -> dict[str, object]:
    """Which days of ``table`` a copy holds, as ``StoredPartitions.read`` takes them (none: every day)."""
    if scope is None or table not in scope.tables:
        return {}
    return {"days": scope.days} if scope.days is not None else {"first": scope.first, "last": scope.last}


def _changed(before: dict[date | None, tuple[int, int]], after: dict[date | None, tuple[int, int]]) -> list[date | None]:
    """The partitions whose count or digest differ, in day order."""
    return sorted((day for day in before.keys() | after.keys() if before.get(day) != after.get(day)), key=str)


def _refuse_out_of_scope(changes: dict[str, list[date | None]], scope: Scope | None) -> None:
    """Raise OutOfScope when a scoped copy changed a partition of one of its day-scoped tables
    outside its days: writing it back would replace rows the copy never loaded."""
    for table in scope.tables if scope else ():
        if outside := [day for day in changes.get(table, ()) if not scope.holds(day)]:
            raise OutOfScope(f"{table}: a run scoped to {scope} changed its "
                             f"{', '.join(map(str, outside))} partition(s), which its working copy does not "
                             f"hold; nothing was written back")


def _load(con: duckdb.DuckDBPyConnection, table: str, rows) -> None:
    """``rows`` into ``table``, created as they are when it does not exist; a table without a domain
    column (the tombstones) holds the one domain's rows without it."""
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {table.split('.')[0]}")
    columns = _columns(con, table)
    if columns and "domain" not in columns:
        rows = rows.drop("domain")
    con.register("stored_rows", rows.to_arrow())
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM stored_rows" if columns
                    else f"CREATE TABLE {table} AS SELECT * FROM stored_rows")
    finally:
        con.unregister("stored_rows")


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    """``table``'s columns; none when it does not exist (the relation's: a tenth of the time
    information_schema takes, which a copy a day asks for every table twice)."""
    try:
        return con.table(table).columns
    except duckdb.CatalogException:
        return []


def _day(con: duckdb.DuckDBPyConnection, table: str) -> str | None:
    """The column a new table's partitions are split by beside the domain (``sources.day_column``),
    None when it has no such column (a partition per domain)."""
    return column if (column := day_column(table)) in _columns(con, table) else None


def _digests(con: duckdb.DuckDBPyConnection, table: str, day: str | None) -> dict[date | None, tuple[int, int]]:
    """Each partition's row count and an order-free digest of its rows, by ``day`` (None: the
    table's one partition for the domain)."""
    if not _columns(con, table):
        return {}
    return {row[0]: (row[1], row[2]) for row in con.execute(
        f"SELECT {day or 'NULL'}, count(*), bit_xor(hash(t)) FROM {table} AS t GROUP BY 1").fetchall()}


def _partition(con: duckdb.DuckDBPyConnection, table: str, domain: str, column: str | None,
               day: date | None) -> pa.Table:
    """``table``'s rows of ``domain`` whose ``column`` is ``day`` (every row when ``column`` is None)."""
    if column is None:
        return con.sql(f"SELECT * FROM {table}").to_arrow_table()
    return con.sql(f"SELECT * FROM {table} WHERE domain = $domain AND {column} = $day",
                   params={"domain": domain, "day": day}).to_arrow_table()
