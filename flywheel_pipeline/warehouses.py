"""Every domain's warehouse under flywheel.yaml's ``warehouse.engine``: a DuckDB file per domain in
the home (duckdb), or a working copy of the domain's tables in the object store (spark,
object_store.py). The assets (through ``defs.resources.WarehouseResource``), the sensors, the CLI,
``flywheel forget`` and ``flywheel import`` open a domain's warehouse here, so none of them is
bound to one engine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import date

import duckdb

from flywheel_pipeline import warehouse
from flywheel_pipeline.config import WarehouseSettings
from flywheel_pipeline.deletion import Deletion, DeletionPlan, doom, plan
from flywheel_pipeline.home import Home
from flywheel_pipeline.object_store import TOMBSTONES, ObjectStore, working_copy
from flywheel_pipeline.sources import INTERACTIONS, Readable, Scope, Source, StoredPartitions


@dataclass(frozen=True)
class Warehouses:
    home: Home
    store: ObjectStore | None = None  # engine spark's tables; None: a DuckDB file per domain
    memory_limit: str | None = None  # DuckDB's; None: its default

    @classmethod
    def for_settings(cls, home: Home, settings: WarehouseSettings) -> Warehouses:
        store = ObjectStore.from_settings(settings) if settings.engine == "spark" else None
        return cls(home, store, settings.memory_limit)

    def exists(self, domain: str) -> bool:
        """Whether ``domain`` has a warehouse yet: its DuckDB file, or a partition in the store."""
        if self.store is None:
            return self.home.warehouse(domain).exists()
        return bool(self.store.tables(domain))

    def interaction_days(self, domain: str) -> frozenset[date]:
        """The days of ``domain``'s accumulated interactions (under spark, its partition folders).
        Raises WarehouseBusy while a run writes its DuckDB file."""
        if self.store is not None:
            return self.store.days(INTERACTIONS, domain)
        if not self.exists(domain):
            return frozenset()
        with warehouse.connect(self.home.warehouse(domain), read_only=True) as con:
            try:
                rows = con.execute("SELECT DISTINCT event_date FROM raw.interactions WHERE domain = ?",
                                   [domain]).fetchall()
            except duckdb.CatalogException:  # a warehouse without raw tables yet
                return frozenset()
        return frozenset(day for (day,) in rows)

    def row_counts(self, domain: str, schemas: tuple[str, ...] = ("raw", "marts", "labels")) -> dict[str, int]:
        """The rows of each of ``domain``'s tables in ``schemas``, by name (under spark, from the
        Parquet footers: no rows are read)."""
        if self.store is not None:
            source = self.store.source()
            return {table: source.count(table, domain) for table in sorted(self.store.tables(domain))
                    if table.split(".")[0] in schemas}
        with warehouse.connect(self.home.warehouse(domain), read_only=True) as con:
            tables = [table for (table,) in con.execute(
                "SELECT table_schema || '.' || table_name FROM information_schema.tables "
                "WHERE table_schema IN (SELECT unnest($schemas)) ORDER BY 1", {"schemas": list(schemas)}).fetchall()]
            return {table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in tables}

    def where(self, domain: str) -> str:
        """Where ``domain``'s tables are, in words."""
        if self.store is None:
            return str(self.home.warehouse(domain))
        return f"{self.store.root} (domain={domain} partitions)"

    @contextmanager
    def reader(self, domain: str) -> Iterator[Readable]:
        """``domain``'s tables to read a few columns or days of (``sources.Source``), as a sensor's
        tick does: the store's Parquet read directly, or the DuckDB file read-only; no working copy."""
        if self.store is not None:
            yield self.store.source()
            return
        with warehouse.connect(self.home.warehouse(domain), read_only=True, memory_limit=self.memory_limit) as con:
            yield con

    @contextmanager
    def connect(self, domain: str, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """``domain``'s warehouse (under spark a working copy writing back the Python stages' tables)."""
        if self.store is not None:
            with working_copy(self.store, domain, read_only=read_only, memory_limit=self.memory_limit) as con:
                yield con
            return
        with warehouse.connect(self.home.warehouse(domain), read_only=read_only,
                               memory_limit=self.memory_limit) as con:
            yield con

    @contextmanager
    def for_days(self, domain: str, scope: Scope,
                 read_only: bool = False) -> Iterator[tuple[duckdb.DuckDBPyConnection, Source | None]]:
        """``domain``'s warehouse for a run that reads or writes ``scope``'s partitions, and where
        that run reads the rest of the domain: under spark a working copy of the scope alone and the
        store's Parquet; a DuckDB file holds both (None: read the connection)."""
        if self.store is None:
            with self.connect(domain, read_only=read_only) as con:
                yield con, None
            return
        with working_copy(self.store, domain, read_only=read_only, memory_limit=self.memory_limit,
                          scope=scope) as con:
            yield con, self.store.source()

    def for_deletion(self, domain: str, deletion: Deletion) -> Iterator[AbstractContextManager[duckdb.DuckDBPyConnection]]:
        """``domain``'s warehouse for a deletion that must reach every table, dbt's too, opened one
        or more times in turn, each holding what ``deletion`` dooms: the DuckDB file once; under
        spark a working copy per day the deletion changes (``deletion.plan``, found from the
        columns it reads), the latest first, each writing back every partition it changed."""
        if self.store is None:
            yield self._doomed_file(domain, deletion)
            return
        source = self.store.source()
        stored = {table: partitions for table in self.store.tables(domain)
                  if (partitions := source.partitions(table, domain))}
        planned = plan(stored, domain, deletion, self.memory_limit)
        # each copy reads its day's files as the plan found them; the tombstones, which the first
        # copy of a forget rewrites, are listed again by each
        found = {table: partitions for table, partitions in stored.items() if table != TOMBSTONES}
        for scope in planned.scopes():
            yield self._doomed_copy(domain, scope, planned, found)

    @contextmanager
    def _doomed_file(self, domain: str, deletion: Deletion) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.connect(domain) as con:
            warehouse.ensure_raw_tables(con)
            doom(con, deletion)
            yield con

    @contextmanager
    def _doomed_copy(self, domain: str, scope: Scope, planned: DeletionPlan,
                     found: dict[str, StoredPartitions]) -> Iterator[duckdb.DuckDBPyConnection]:
        with working_copy(self.store, domain, memory_limit=self.memory_limit, every_table=True, scope=scope,
                          found=found) as con:
            planned.install(con)
            yield con
