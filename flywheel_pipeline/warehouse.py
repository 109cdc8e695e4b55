"""The DuckDB warehouse: connections and the tables flywheel's Python stages own.

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
from pathlib import Path

import duckdb

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
    propensity DOUBLE NOT NULL, content VARCHAR NOT NULL
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
    con.execute(RAW_DDL)
