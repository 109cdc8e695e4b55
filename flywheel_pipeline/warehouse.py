"""The DuckDB warehouses: connections and the tables flywheel's Python stages own.

Each domain has its own warehouse file (``Home.warehouse(domain)``): DuckDB lets one process write a
file at a time, and one file per domain lets two domains' runs write at once (at most one run per
domain: the run queue's ``flywheel/warehouse`` limit). The approvals of every domain are one signed
chain in ``Home.approvals``, written in short transactions. A home kept before in one shared file is
split once by ``split_shared_warehouse`` (`flywheel warehouse split`).

dbt owns the `staging`, `intermediate` and `marts` schemas; Python stages own `raw` (accumulation),
`labels` (labeling) and `registry` (approvals). Every write is one transaction: a crash leaves the
previous state, never half a partition. The raw event tables hold one row per ``event_id``:
accumulation deduplicates, dbt's tests check it; no index is kept (a warehouse made before keeps its
primary keys, which work the same).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from flywheel_pipeline.home import Home, HomeError

# the raw tables that hold one row per event (raw.impressions: one per impression of an interaction)
RAW_EVENT_TABLES = ("interactions", "signals", "outcomes", "labels")
RAW_DDL = """
CREATE SCHEMA IF NOT EXISTS raw;
CREATE TABLE IF NOT EXISTS raw.interactions (
    event_id VARCHAR NOT NULL, domain VARCHAR NOT NULL, event_date DATE NOT NULL,
    event_ts TIMESTAMP NOT NULL, user_id VARCHAR NOT NULL, session_id VARCHAR NOT NULL,
    interaction_id VARCHAR NOT NULL, model_version VARCHAR NOT NULL, policy VARCHAR NOT NULL,
    consent VARCHAR NOT NULL, input_text VARCHAR NOT NULL, context JSON,
    source_file VARCHAR NOT NULL, source_line BIGINT NOT NULL, ingested_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS raw.impressions (
    event_id VARCHAR NOT NULL, domain VARCHAR NOT NULL, event_date DATE NOT NULL,
    interaction_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL, position INTEGER NOT NULL,
    propensity DOUBLE, content VARCHAR NOT NULL  -- propensity NULL: unknown, the logger's was not logged
);
CREATE TABLE IF NOT EXISTS raw.signals (
    event_id VARCHAR NOT NULL, domain VARCHAR NOT NULL, event_date DATE NOT NULL,
    event_ts TIMESTAMP NOT NULL, user_id VARCHAR NOT NULL, session_id VARCHAR NOT NULL,
    interaction_id VARCHAR NOT NULL, signal_type VARCHAR NOT NULL, item_id VARCHAR,
    value DOUBLE, text VARCHAR,
    source_file VARCHAR NOT NULL, source_line BIGINT NOT NULL, ingested_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS raw.outcomes (
    event_id VARCHAR NOT NULL, domain VARCHAR NOT NULL, event_date DATE NOT NULL,
    event_ts TIMESTAMP NOT NULL, user_id VARCHAR NOT NULL, session_id VARCHAR NOT NULL,
    interaction_id VARCHAR NOT NULL, name VARCHAR NOT NULL, value DOUBLE NOT NULL, item_id VARCHAR,
    source_file VARCHAR NOT NULL, source_line BIGINT NOT NULL, ingested_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS raw.labels (
    event_id VARCHAR NOT NULL, domain VARCHAR NOT NULL, event_date DATE NOT NULL,
    event_ts TIMESTAMP NOT NULL, user_id VARCHAR NOT NULL, session_id VARCHAR NOT NULL,
    interaction_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL, reviewer VARCHAR NOT NULL,
    verdict VARCHAR NOT NULL,
    source_file VARCHAR NOT NULL, source_line BIGINT NOT NULL, ingested_at TIMESTAMP NOT NULL
);
-- How the reviewed impression was chosen (events.SELECTIONS; NULL: the product's own audit), last so
-- that a warehouse made before gets it too.
ALTER TABLE raw.labels ADD COLUMN IF NOT EXISTS selection VARCHAR;
CREATE TABLE IF NOT EXISTS raw.quarantine (
    domain VARCHAR NOT NULL, event_date DATE NOT NULL, source_file VARCHAR NOT NULL,
    source_line BIGINT NOT NULL, event_id VARCHAR, reason VARCHAR NOT NULL, line VARCHAR,
    quarantined_at TIMESTAMP NOT NULL
);
"""

_LOCK_RETRIES = 40
_LOCK_WAIT_SECONDS = 0.25


class WarehouseBusy(RuntimeError):
    """Another process holds the DuckDB file's write lock (a run is writing)."""


@contextmanager
def connect(
    path: Path | str, read_only: bool = False, memory_limit: str | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the warehouse, waiting briefly if another process holds the write lock.

    ``memory_limit`` (e.g. "2GB") bounds DuckDB's memory; larger work spills to disk.
    """
    config = {"memory_limit": memory_limit} if memory_limit else {}
    for attempt in range(_LOCK_RETRIES):
        try:
            con = duckdb.connect(str(path), read_only=read_only, config=config)
            break
        except duckdb.IOException as error:
            if "lock" not in str(error).lower():
                raise
            if attempt == _LOCK_RETRIES - 1:
                raise WarehouseBusy(
                    f"{path} is locked by another process (a run is writing to it); "
                    f"waited {_LOCK_RETRIES * _LOCK_WAIT_SECONDS:.0f}s") from error
            time.sleep(_LOCK_WAIT_SECONDS)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """All-or-nothing: commit on success, roll back on any error."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def ensure_raw_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create the raw tables; a warehouse made before gets what they gained since."""
    con.execute(RAW_DDL)
    _allow_unknown_propensities(con)


def _allow_unknown_propensities(con: duckdb.DuckDBPyConnection) -> None:
    """A warehouse made before kept ``raw.impressions.propensity`` NOT NULL: drop that, once."""
    not_null = con.execute("""SELECT count(*) FROM information_schema.columns
                              WHERE table_catalog = current_database() AND table_schema = 'raw'
                                AND table_name = 'impressions' AND column_name = 'propensity'
                                AND is_nullable = 'NO'""").fetchall()[0][0]
    if not_null:
        con.execute("ALTER TABLE raw.impressions ALTER COLUMN propensity DROP NOT NULL")


# --- splitting a home's shared warehouse into one file per domain ---------------------------------

APPROVAL_SCHEMA = "registry"  # approval.py's tables: they go to Home.approvals, whole


@dataclass(frozen=True)
class SplitReport:
    rows: dict[str, int]  # per domain (and "approvals"), the rows its new file holds
    kept_as: Path  # the shared file, renamed, never deleted


def split_shared_warehouse(home: Home, domains: list[str]) -> SplitReport:
    """Copy the shared warehouse into one file per domain (each table's rows of that domain; tables
    without a domain column whole) and its approval records into ``home.approvals``, then rename
    the shared file aside. Every new file is written beside its place and moved there at the end:
    a split that dies leaves the shared file in use, and running it again starts over."""
    shared = home.shared_warehouse
    if not shared.exists():
        raise HomeError(f"no shared warehouse to split at {shared}")
    home.warehouses.mkdir(parents=True, exist_ok=True)
    with connect(shared, read_only=True) as con:
        found = [d for (d,) in con.execute("SELECT DISTINCT domain FROM raw.interactions").fetchall()] \
            if _tables(con, "raw") else []
    targets = {domain: home.warehouses / f"{domain}.duckdb" for domain in sorted({*domains, *found})}
    targets["approvals"] = home.approvals
    partials = {name: path.with_name(f".{path.name}.split") for name, path in targets.items()}
    rows = {name: _copy_part(shared, partial, None if name == "approvals" else name)
            for name, partial in partials.items()}
    for name, partial in partials.items():
        partial.replace(targets[name])
    kept = shared.with_name(f"{shared.name}.split-{datetime.now(UTC):%Y%m%dT%H%M%S}")
    shared.replace(kept)
    return SplitReport(rows, kept)


def _tables(con: duckdb.DuckDBPyConnection, schema: str | None = None) -> list[tuple[str, str, bool]]:
    """(schema, table, has a domain column) of every base table (of ``schema``)."""
    return con.execute("""
        SELECT table_schema, table_name, bool_or(column_name = 'domain')
        FROM information_schema.columns JOIN information_schema.tables USING (table_catalog, table_schema, table_name)
        WHERE table_type = 'BASE TABLE' AND table_catalog = current_database()
          AND ($schema IS NULL OR table_schema = $schema)
        GROUP BY ALL ORDER BY ALL""", {"schema": schema}).fetchall()


def _copy_part(shared: Path, partial: Path, domain: str | None) -> int:
    """Write ``partial``: the shared file's schemas and the rows of ``domain``, or (None) its
    approvals; returns the rows copied."""
    partial.unlink(missing_ok=True)
    copied = 0
    with connect(partial) as con:
        con.execute(f"ATTACH '{shared}' AS shared (READ_ONLY)")
        [(here,)] = con.execute("SELECT current_database()").fetchall()
        con.execute(f'COPY FROM DATABASE shared TO "{here}" (SCHEMA)')
        with transaction(con):
            schemas = con.execute("SELECT schema_name FROM information_schema.schemata WHERE catalog_name = $here "
                                  "AND schema_name <> 'main'", {"here": here}).fetchall()
            for (schema,) in schemas:
                if (schema == APPROVAL_SCHEMA) != (domain is None):
                    con.execute(f'DROP SCHEMA "{schema}" CASCADE')
            for schema, table, by_domain in _tables(con):
                where = "WHERE domain = $domain" if by_domain and domain else ""
                [(count,)] = con.execute(
                    f'INSERT INTO "{schema}"."{table}" SELECT * FROM shared."{schema}"."{table}" {where}',
                    {"domain": domain} if where else {}).fetchall()
                copied += count
        con.execute("DETACH shared")
        con.execute("CHECKPOINT")
    return copied
