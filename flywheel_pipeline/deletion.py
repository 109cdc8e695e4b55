"""Deleting rows from every table of a domain: what a deletion removes, and where it finds it.

A ``Deletion`` names raw events (``where``, SQL over the raw event tables); ``doom`` finds them,
their interactions and the sessions left with none, as temp tables; ``erase`` then deletes from
every table of the warehouse the rows keyed by those events, interactions or sessions, found by
their columns (so a new table, dbt's too, is covered without a change here), and the rows ``also``
names. ``privacy`` builds the two deletions, forgetting a user and retention.

On a domain's DuckDB file the deletion dooms and erases on the file. In the object store (engine
spark) ``plan`` first reads, streaming from the Parquet files, only the columns the conditions
read, on every day: what is doomed, and which days of which tables hold a row to delete. The
deletion then runs one working copy per such day, the latest first, each holding that day's
partitions and the doomed sets, so a deletion's memory is a day's, not the domain's history.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import date

import duckdb
import pyarrow as pa

from flywheel_pipeline import warehouse
from flywheel_pipeline.sources import Scope, StoredPartitions
from flywheel_pipeline.warehouse import RAW_EVENT_TABLES

DOOMED = ("doomed_events", "doomed_interactions", "doomed_sessions")  # doom's temp tables


class DeletionError(RuntimeError):
    """A deletion run on a warehouse that was not opened for it."""


@dataclass(frozen=True)
class Deletion:
    """The raw events matching ``where`` (SQL over the raw event tables' columns, with ``params``),
    what was derived from them (by event id, interaction, session), and the rows ``also`` names (a
    condition for each table that has those columns)."""

    where: str
    params: dict[str, object]
    also: dict[frozenset[str], str]


def doom(con: duckdb.DuckDBPyConnection, deletion: Deletion) -> None:
    """``DOOMED``, the temp tables of what goes: the raw events ``deletion`` matches, their
    interactions, and their sessions of which no other interaction is left."""
    where = deletion.where
    events = " UNION ALL ".join(
        f"SELECT '{table}' AS source, event_id, domain, interaction_id, session_id FROM raw.{table} WHERE {where}"
        for table in RAW_EVENT_TABLES)
    _execute(con, f"CREATE OR REPLACE TEMP TABLE doomed_events AS {events}", deletion.params)
    con.execute("""CREATE OR REPLACE TEMP TABLE doomed_interactions AS
                   SELECT DISTINCT domain, interaction_id FROM doomed_events WHERE source = 'interactions'""")
    _execute(con, f"""CREATE OR REPLACE TEMP TABLE doomed_sessions AS
                      SELECT DISTINCT domain, session_id FROM doomed_events AS doomed
                      WHERE source = 'interactions' AND NOT EXISTS (
                          SELECT 1 FROM raw.interactions AS i
                          WHERE i.domain = doomed.domain AND i.session_id = doomed.session_id AND NOT ({where}))""",
             deletion.params)


def erase(con: duckdb.DuckDBPyConnection, deletion: Deletion) -> dict[str, int]:
    """Delete, from every table of the warehouse but the tombstones, the rows keyed by what ``doom``
    found and those ``deletion.also`` names. Returns rows deleted per table."""
    held = {name for (name,) in con.execute("SELECT table_name FROM duckdb_tables() WHERE temporary").fetchall()}
    if missing := [name for name in DOOMED if name not in held]:
        raise DeletionError(f"nothing is doomed yet ({', '.join(missing)} missing): open the warehouse for the "
                            "deletion (Warehouses.for_deletion), which finds what it removes")
    deleted = {}
    for table, columns in warehouse_tables(con).items():
        if conditions := _conditions(columns, deletion.also):
            [(count,)] = _execute(con, f"DELETE FROM {table} WHERE {_any(conditions)}", deletion.params)
            if count:
                deleted[table] = count
    return deleted


def warehouse_tables(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, str]]:
    """Every base table of the warehouse but the tombstones: its columns and their types."""
    rows = con.execute("""
        SELECT c.table_schema || '.' || c.table_name, map(list(c.column_name), list(c.data_type))
        FROM information_schema.columns AS c
        JOIN information_schema.tables AS t USING (table_catalog, table_schema, table_name)
        WHERE t.table_type = 'BASE TABLE' AND c.table_catalog = current_database()
          AND c.table_schema <> 'privacy'
        GROUP BY 1 ORDER BY 1""").fetchall()
    return {table: dict(columns) for table, columns in rows}


@dataclass(frozen=True)
class DeletionPlan:
    """What a deletion changes in a domain's tables in the object store (``plan``): the doomed sets,
    the days on which a table holds a row it deletes (the latest first), the tables partitioned by
    day, and those kept in one partition per domain (dbt's sessions on Spark) that hold such a row."""

    doomed: dict[str, pa.Table]
    days: tuple[date, ...]
    day_tables: tuple[str, ...]
    whole: tuple[str, ...]

    def scopes(self) -> list[Scope]:
        """One working copy per day, the latest first, the tables kept whole in the first (one
        copy with those alone when no day holds a row). A row refers to an interaction or session
        of its own day or an earlier one, so a deletion stopped between copies still finds, in the
        raw rows of the days not done yet, what the done copies deleted."""
        if not self.days:
            return [Scope(whole=self.whole)]
        return [Scope.on([day], self.day_tables, self.whole if n == 0 else ()) for n, day in enumerate(self.days)]

    def install(self, con: duckdb.DuckDBPyConnection) -> None:
        """The doomed sets into a working copy, as ``doom`` leaves them."""
        for name, rows in self.doomed.items():
            con.register("planned", rows)
            try:
                con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM planned")
            finally:
                con.unregister("planned")


def plan(stored: Mapping[str, StoredPartitions], domain: str, deletion: Deletion,
         memory_limit: str | None = None) -> DeletionPlan:
    """``deletion`` in ``domain``'s ``stored`` tables: ``doom`` run on views of the raw event tables'
    Parquet, then each table's days holding a row to delete; DuckDB (under ``memory_limit``)
    streams the files, reading the columns the conditions name and pushing their filters down, so
    nothing is held whole."""
    stored = {table: partitions for table, partitions in stored.items() if not table.startswith("privacy.")}
    with warehouse.connect(":memory:", memory_limit=memory_limit) as con:
        con.execute("CREATE SCHEMA raw")
        for table in RAW_EVENT_TABLES:
            if partitions := stored.get(f"raw.{table}"):
                _view(con, f"raw.{table}", partitions, domain)
            else:
                con.execute(f"CREATE TABLE raw.{table} (event_id VARCHAR, domain VARCHAR, event_date DATE, "
                            "interaction_id VARCHAR, session_id VARCHAR, user_id VARCHAR)")
        doom(con, deletion)
        days, day_tables, whole = set(), [], []
        for n, (table, partitions) in enumerate(stored.items()):
            conditions = _conditions({*partitions.dataset.schema.names, "domain"}, deletion.also)
            if not conditions:
                continue
            _view(con, f"stored_{n}", partitions, domain)
            found = _execute(con, f"SELECT DISTINCT {partitions.day or 'NULL'} FROM stored_{n} WHERE {_any(conditions)}",
                             deletion.params)
            if partitions.day:
                day_tables.append(table)
                days.update(day for (day,) in found)
            elif found:
                whole.append(table)
        doomed = {name: con.table(name).to_arrow_table() for name in DOOMED}
    return DeletionPlan(doomed, tuple(sorted(days, reverse=True)), tuple(day_tables), tuple(whole))


def _view(con: duckdb.DuckDBPyConnection, name: str, partitions: StoredPartitions, domain: str) -> None:
    """``name``: a view of the domain's Parquet files of a table, with its domain column (which
    the files leave to their folder's name)."""
    files = f"{name.replace('.', '_')}_files"
    con.register(files, partitions.dataset)
    domain_column = "" if "domain" in partitions.dataset.schema.names else ", '" + domain.replace("'", "''") + "' AS domain"
    con.execute(f"CREATE VIEW {name} AS SELECT *{domain_column} FROM {files}")


def _conditions(columns: Collection[str], also: dict[frozenset[str], str]) -> list[str]:
    """When ``erase`` deletes a row of a table with ``columns``: any of these."""
    conditions = [f"{column} IN (SELECT event_id FROM doomed_events)"
                  for column in columns if column == "event_id" or column.endswith("_event_id")]
    if {"domain", "interaction_id"} <= set(columns):
        conditions.append("(domain, interaction_id) IN (SELECT * FROM doomed_interactions)")
    elif {"domain", "session_id"} <= set(columns):
        conditions.append("(domain, session_id) IN (SELECT * FROM doomed_sessions)")
    return conditions + [condition for needed, condition in also.items() if needed <= set(columns)]


def _any(conditions: list[str]) -> str:
    return " OR ".join(f"({condition})" for condition in conditions)


def _execute(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, object]) -> list[tuple]:
    """Run ``sql`` with those of ``params`` it names (DuckDB refuses the others)."""
    return con.execute(sql, {k: v for k, v in params.items() if f"${k}" in sql}).fetchall()
