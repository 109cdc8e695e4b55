"""Where the Python stages read their input: one narrow interface over the warehouse's tables.

Labeling, training and validation read a domain's rows of a few tables (``marts.fct_impressions``,
``labels.impression_labels``, ``raw.interactions``), a range of days at a time, through a
``Source``, and do the rest in polars. ``DuckDBSource`` reads a domain's DuckDB warehouse;
``ParquetSource`` a folder of Parquet files laid out as Spark and other engines write partitioned
tables::

    <root>/<schema>.<table>/domain=<domain>/event_date=<YYYY-MM-DD>/*.parquet

Another engine is another Source: no stage changes. The stages take a Source or, for short, a
connection to a domain's warehouse (read as a DuckDBSource); labeling writes its labels to the
warehouse's connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Protocol

import duckdb
import polars as pl

# The tables the stages read, each partitioned by (domain, event_date).
IMPRESSIONS = "marts.fct_impressions"  # dbt's filtered impressions with their signals and outcomes
LABELS = "labels.impression_labels"  # labeling's p_good per impression
INTERACTIONS = "raw.interactions"  # accumulation's interactions (their logged candidates)
REVIEW_QUEUE = "labels.review_queue"  # the review queue's selections, with their design weights
IMPRESSION_KEY = ["domain", "event_date", "interaction_id", "item_id"]  # an impression's row in each table


class Source(Protocol):
    def read(self, table: str, domain: str, first: date | None = None, last: date | None = None,
             columns: Sequence[str] | None = None) -> pl.DataFrame:
        """``domain``'s rows of ``table`` (``schema.name``) with ``event_date`` in first..last (every
        day where a bound is None), the ``columns`` named (all when None); empty, with no columns,
        when the table does not exist yet."""
        ...


class DuckDBSource:
    """A domain's DuckDB warehouse, through an open connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con

    def read(self, table: str, domain: str, first: date | None = None, last: date | None = None,
             columns: Sequence[str] | None = None) -> pl.DataFrame:
        schema, name = table.split(".")
        exists = self.con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = ? "
                                  "AND table_name = ?", [schema, name]).fetchall()[0][0]
        if not exists:
            return pl.DataFrame()
        selected = ", ".join(f'"{column}"' for column in columns) if columns else "*"
        return self.con.sql(
            f"""SELECT {selected} FROM {table} WHERE domain = $domain
                AND event_date BETWEEN coalesce($first, DATE '0001-01-01') AND coalesce($last, DATE '9999-12-31')""",
            params={"domain": domain, "first": first, "last": last},
        ).pl()


class ParquetSource:
    """Partitioned Parquet under ``root`` (``<schema>.<table>/domain=<d>/event_date=<day>/``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, table: str, domain: str, first: date | None = None, last: date | None = None,
             columns: Sequence[str] | None = None) -> pl.DataFrame:
        folder = self.root / table / f"domain={domain}"
        if not folder.exists():
            return pl.DataFrame()
        rows = pl.scan_parquet(folder / "**" / "*.parquet", hive_partitioning=True,
                               hive_schema={"domain": pl.String, "event_date": pl.Date})
        if first is not None:
            rows = rows.filter(pl.col("event_date") >= first)
        if last is not None:
            rows = rows.filter(pl.col("event_date") <= last)
        rows = rows.select(columns or rows.collect_schema().names())
        # DuckDB writes a JSON column as binary: read it back as text, as Spark writes it.
        return rows.with_columns(pl.col(pl.Binary).cast(pl.String)).collect()


Readable = Source | duckdb.DuckDBPyConnection  # a connection to a domain's warehouse reads as DuckDBSource


def as_source(readable: Readable) -> Source:
    return DuckDBSource(readable) if isinstance(readable, duckdb.DuckDBPyConnection) else readable


def export_parquet(con: duckdb.DuckDBPyConnection, tables: Sequence[str], root: Path) -> None:
    """Write ``tables`` of a DuckDB warehouse as a ParquetSource reads them (tests, and a start for
    moving a warehouse to another engine)."""
    for table in tables:
        con.execute(f"COPY {table} TO '{root / table}' (FORMAT parquet, PARTITION_BY (domain, event_date), "
                    "OVERWRITE_OR_IGNORE)")
