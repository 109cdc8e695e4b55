"""Where the Python stages read their input and write their tables: one narrow interface.

Labeling, training and validation read a domain's rows of a few tables (``marts.fct_impressions``,
``labels.impression_labels``, ``raw.interactions``), a range of days at a time, through a
``Source``, and do the rest in polars. ``DuckDBSource`` reads a domain's DuckDB warehouse;
``ParquetSource`` Parquet files laid out as Spark keeps partitioned tables, on a disk or in an
object store::

    <root>/<schema>.db/<table>/domain=<domain>/event_date=<YYYY-MM-DD>/*.parquet

``ParquetSink`` writes that layout one (table, domain, day) partition at a time, atomically (the
distributed profile: flywheel_pipeline/object_store.py). Another engine is another Source: no stage
changes. The stages take a Source or, for short, a connection to a domain's warehouse (read as a
DuckDBSource); labeling writes its labels to the warehouse's connection."""

from __future__ import annotations

import functools
import operator
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Protocol

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# The tables the stages read, each partitioned by (domain, event_date).
IMPRESSIONS = "marts.fct_impressions"  # dbt's filtered impressions with their signals and outcomes
LABELS = "labels.impression_labels"  # labeling's p_good per impression
INTERACTIONS = "raw.interactions"  # accumulation's interactions (their logged candidates)
REVIEW_QUEUE = "labels.review_queue"  # the review queue's selections, with their design weights
IMPRESSION_KEY = ["domain", "event_date", "interaction_id", "item_id"]  # an impression's row in each table
DAY_COLUMNS = {"health.measures": "as_of"}  # a table's day partition when it is not event_date
PARTITION_FILE = "part-0.parquet"  # the one object a ParquetSink writes per partition


class Source(Protocol):
    def read(self, table: str, domain: str, first: date | None = None, last: date | None = None,
             columns: Sequence[str] | None = None) -> pl.DataFrame:
        """``domain``'s rows of ``table`` (``schema.name``) with ``event_date`` in first..last (every
        day where a bound is None), the ``columns`` named (all when None); empty, with no columns,
        when the table does not exist yet."""
        ...


@dataclass(frozen=True)
class Scope:
    """What a stage's run holds in a working copy of its domain (``object_store.working_copy``): the
    partitions of days ``first`` to ``last`` (None: every later day), or of the ``days`` named, of
    ``tables`` (those it writes, and those it reads for those days only), and ``whole`` tables
    entire. It reads any other table through a Source."""

    tables: tuple[str, ...] = ()
    whole: tuple[str, ...] = ()
    first: date | None = None
    last: date | None = None
    days: frozenset[date] | None = None  # these days only, in place of first..last

    def __post_init__(self) -> None:
        if self.tables and self.first is None and self.days is None:
            raise ValueError("a scope that holds days of tables needs its first day")

    @classmethod
    def of(cls, days: Sequence[date], tables: Sequence[str], whole: Sequence[str] = ()) -> Scope:
        """The days from the first of ``days`` to the last (those between too)."""
        if not days:
            raise ValueError("a scope needs at least one day")
        return cls(tuple(tables), tuple(whole), min(days), max(days))

    @classmethod
    def between(cls, first: date, last: date, tables: Sequence[str], whole: Sequence[str] = ()) -> Scope:
        return cls(tuple(tables), tuple(whole), first, last)

    @classmethod
    def since(cls, first: date, tables: Sequence[str], whole: Sequence[str] = ()) -> Scope:
        return cls(tuple(tables), tuple(whole), first)

    @classmethod
    def on(cls, days: Collection[date], tables: Sequence[str], whole: Sequence[str] = ()) -> Scope:
        """Those ``days`` alone, however far apart (none: the tables' partitions are not held)."""
        return cls(tuple(tables), tuple(whole), days=frozenset(days))

    def holds(self, day: date | None) -> bool:
        """Whether ``day``'s partitions are in the copy (None, a table's one partition per domain: no)."""
        if day is None or self.days is not None:
            return day in (self.days or ())
        return self.first is not None and self.first <= day and (self.last is None or day <= self.last)

    def __str__(self) -> str:
        if self.days is not None:
            return ", ".join(map(str, sorted(self.days))) or "no days"
        return str(self.first) if self.first == self.last else f"{self.first}..{self.last or ''}"


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
    """Partitioned Parquet under ``root``, laid out as Spark keeps its tables
    (``<schema>.db/<table>/domain=<d>/<day column>=<day>/*.parquet``), on a local disk (a path) or
    in an object store (``filesystem``: a pyarrow FileSystem such as ``S3FileSystem``, ``root``
    then ``bucket/prefix``)."""

    def __init__(self, root: Path | str, filesystem: pafs.FileSystem | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.filesystem = filesystem or pafs.LocalFileSystem()

    def read(self, table: str, domain: str, first: date | None = None, last: date | None = None,
             columns: Sequence[str] | None = None) -> pl.DataFrame:
        """As Source.read; a table kept in one partition per domain (no day folders, such as dbt's
        sessions) is read whole, ``first`` and ``last`` then ignored."""
        stored = self.partitions(table, domain)
        return stored.read(domain, first, last, columns) if stored else pl.DataFrame()

    def count(self, table: str, domain: str) -> int:
        """How many rows ``domain``'s partitions of ``table`` hold, from the files' footers."""
        return stored.dataset.count_rows() if (stored := self.partitions(table, domain)) else 0

    def partitions(self, table: str, domain: str) -> StoredPartitions | None:
        """``domain``'s stored partitions of ``table``, found once (one listing of its folder);
        None when the domain has no rows there."""
        folder = f"{table_folder(self.root, table)}/domain={domain}"
        if self.filesystem.get_file_info(folder).type != pafs.FileType.Directory:
            return None
        day = next((info.base_name.split("=")[0] for info in self.filesystem.get_file_info(pafs.FileSelector(folder))
                    if info.type == pafs.FileType.Directory and "=" in info.base_name), None)
        partitioning = ds.partitioning(pa.schema([(day, pa.date32())]), flavor="hive") if day else None
        dataset = ds.dataset(folder, filesystem=self.filesystem, format="parquet", partitioning=partitioning)
        return StoredPartitions(dataset, day) if dataset.files else None


@dataclass(frozen=True)
class StoredPartitions:
    """One domain's stored partitions of a table: their files, and the column their ``<column>=<day>``
    folders split them by (None when the files lie in the domain's folder itself, as dbt's sessions)."""

    dataset: ds.Dataset
    day: str | None

    @property
    def schema(self) -> pa.Schema:
        """The types they are stored in (as their writer, Spark or a ParquetSink, wrote them),
        without the day column."""
        return pa.schema([field for field in self.dataset.schema if field.name != self.day])

    def read(self, domain: str, first: date | None = None, last: date | None = None,
             columns: Sequence[str] | None = None, days: Collection[date] | None = None) -> pl.DataFrame:
        """Their rows (as ``ParquetSource.read``; with ``days``, of those days only), with the domain's column."""
        day = self.day
        bounds = [ds.field(day) >= first if day and first else None, ds.field(day) <= last if day and last else None,
                  ds.field(day).isin(sorted(days)) if day and days is not None else None]
        wanted = [name for name in (columns or self.dataset.schema.names) if name != "domain"]
        rows = pl.from_arrow(self.dataset.to_table(columns=wanted, filter=_all(bounds)))
        rows = _as_duckdb_types(rows.with_columns(pl.lit(domain, pl.String).alias("domain")))
        leading = ["domain", day] if day else ["domain"]
        return rows.select(columns or [*leading, *(name for name in wanted if name not in leading)])


class ParquetSink:
    """Writes a ParquetSource's layout one (table, domain, day) partition at a time: the partition's
    rows become one object, ``part-0.parquet``, written aside under a hidden name and moved into
    place, and whatever else the partition held goes. Readers see the old partition or the new one,
    never half of one; runs of a domain's different days never touch each other's partitions."""

    def __init__(self, root: Path | str, filesystem: pafs.FileSystem | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.filesystem = filesystem or pafs.LocalFileSystem()

    def replace_partition(self, table: str, domain: str, day: date | None, rows: pa.Table,
                          schema: pa.Schema | None = None) -> None:
        """Make ``rows`` (``table``'s rows of ``domain`` on ``day``; with ``day`` None, a table kept
        in one partition per domain) that partition, its columns in ``schema``'s types when given
        (the table's stored ones); no rows removes it."""
        day_name = day_column(table)
        folder = f"{table_folder(self.root, table)}/domain={domain}"
        folder += f"/{day_name}={day.isoformat()}" if day else ""
        old = self._files(folder)
        if rows.num_rows:
            partition = ("domain", day_name) if day else ("domain",)
            rows = rows.drop_columns([name for name in partition if name in rows.column_names])
            if schema is not None:
                rows = rows.select(schema.names).cast(schema)
            target = f"{folder}/{PARTITION_FILE}"
            staged = f"{folder}/.{PARTITION_FILE}.{uuid.uuid4().hex}"  # readers skip hidden names
            self.filesystem.create_dir(folder, recursive=True)
            pq.write_table(_for_parquet(rows), staged, filesystem=self.filesystem)
            self.filesystem.move(staged, target)
            old = [path for path in old if path != target]
        for path in old:
            self.filesystem.delete_file(path)
        if not rows.num_rows and day and self.filesystem.get_file_info(folder).type == pafs.FileType.Directory:
            self.filesystem.delete_dir(folder)

    def _files(self, folder: str) -> list[str]:
        if self.filesystem.get_file_info(folder).type != pafs.FileType.Directory:
            return []
        return [info.path for info in self.filesystem.get_file_info(pafs.FileSelector(folder))
                if info.type == pafs.FileType.File]


def table_folder(root: str, table: str) -> str:
    """Where ``table`` (schema.name) lives under ``root``: Spark's ``<schema>.db/<name>``."""
    schema, name = table.split(".")
    return f"{root}/{schema}.db/{name}"


def day_column(table: str) -> str:
    """The column ``table`` is partitioned by beside ``domain``."""
    return DAY_COLUMNS.get(table, "event_date")


def _all(conditions: Sequence[ds.Expression | None]) -> ds.Expression | None:
    present = [condition for condition in conditions if condition is not None]
    return functools.reduce(operator.and_, present) if present else None


def _as_duckdb_types(rows: pl.DataFrame) -> pl.DataFrame:
    """What Spark's or another writer's Parquet types read as in DuckDB: timestamps naive UTC
    microseconds (Spark writes INT96 or UTC-adjusted ones), decimals as doubles, binary as text
    (DuckDB writes a JSON column as binary)."""
    zoned = [name for name, kind in rows.schema.items() if isinstance(kind, pl.Datetime) and kind.time_zone]
    return rows.with_columns(
        pl.col(zoned).dt.convert_time_zone("UTC").dt.replace_time_zone(None),
    ).with_columns(pl.col(pl.Datetime).dt.cast_time_unit("us"), pl.col(pl.Decimal).cast(pl.Float64),
                   pl.col(pl.Binary).cast(pl.String))


def _for_parquet(rows: pa.Table) -> pa.Table:
    """Timestamps written as UTC instants in microseconds (Parquet's isAdjustedToUTC), which Spark
    reads as its TIMESTAMP type; DuckDB's are naive UTC, and Spark's own (INT96) read as nanoseconds,
    which Spark cannot read back."""
    fields = [f.with_type(pa.timestamp("us", "UTC")) if pa.types.is_timestamp(f.type) else f for f in rows.schema]
    return rows.cast(pa.schema(fields))


Readable = Source | duckdb.DuckDBPyConnection  # a connection to a domain's warehouse reads as DuckDBSource


def as_source(readable: Readable) -> Source:
    return DuckDBSource(readable) if isinstance(readable, duckdb.DuckDBPyConnection) else readable


def export_parquet(con: duckdb.DuckDBPyConnection, tables: Sequence[str], root: Path) -> None:
    """Write ``tables`` of a DuckDB warehouse as a ParquetSource reads them (tests, and a start for
    moving a warehouse to another engine)."""
    for table in tables:
        folder = Path(table_folder(str(root), table))
        folder.parent.mkdir(parents=True, exist_ok=True)
        con.execute(f"COPY {table} TO '{folder}' (FORMAT parquet, PARTITION_BY (domain, {day_column(table)}), "
                    "OVERWRITE_OR_IGNORE)")
