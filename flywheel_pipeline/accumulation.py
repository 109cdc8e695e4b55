"""Accumulation: landing batches -> raw tables, one (day, domain) partition at a time.

Every non-blank landing line is attributed to exactly one day partition: the UTC day of its own
timestamp, or the day of the batch that brought it when the timestamp is unusable (or after the
batch's day, or more than ``max_lateness_days`` before it). A partition's lines are either accepted
into ``raw.interactions/impressions/signals/outcomes/labels`` or quarantined in ``raw.quarantine``
with a reason, so lines in = accepted + quarantined. A domain's landing folder holds the product's
daily batches (``<day>.jsonl``), the review queue's (``labels/<day>.jsonl``: ``label`` events) and
importers' (``<day>.<source>.jsonl``, docs/importing.md), all read alike.
A run's batches are read together, each in a few streaming scans over them all (no loop over
batches or lines): DuckDB's JSON reader types every line's contract fields, checked as one SQL
expression; a CSV scan numbers the lines; only the few lines that break the contract, do not parse
or may be duplicates are read again as text and checked whole, so the quarantine keeps their text
and exact reason. A line too long or not UTF-8 is quarantined; when the run's scan fails, batches are
read one at a time, so one that cannot be read is quarantined and the others still land
(docs/events.md: Delivery). A run replaces its partitions in one transaction:
re-running is idempotent (an event keeps the time it was first ingested, which the late-label
sensor relies on), and a crash leaves the previous state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl

from flywheel_pipeline import events, privacy
from flywheel_pipeline.batches import GZIP_MAGIC, batch_day, batches_for
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.events import field_text
from flywheel_pipeline.home import Home
from flywheel_pipeline.sources import Scope, Source
from flywheel_pipeline.warehouse import RAW_EVENT_TABLES, ensure_raw_tables, transaction

_RAW_TABLES = tuple(f"raw.{table}" for table in ("interactions", "impressions", "signals", "outcomes", "labels",
                                                 "quarantine"))
_IMPRESSION_SCHEMA = '[{"item_id": "VARCHAR", "position": "INTEGER", "propensity": "DOUBLE", "content": "VARCHAR"}]'
_NO_DELIMITER = "chr(0) || chr(1) || chr(0) || chr(1)"  # never in JSON text: a line is one column
_ORDER_KEEPING_CHECKS: set[str] = set()  # check statements whose plan was seen to keep the scan's order
QUARANTINED_PREFIX_CHARS = 1000  # of a line that could not be read or checked: enough to find it
_CHECKED_COLUMNS = f"""source_file VARCHAR, batch_day DATE, source_line BIGINT, line VARCHAR,
    fields {events.FIELDS_TYPE}, event_type VARCHAR, event_id VARCHAR, event_ts TIMESTAMP, content UBIGINT,
    event_date DATE, reason VARCHAR"""


@dataclass(frozen=True)
class _Batch:
    path: Path
    file: str  # relative to the landing folder
    day: date  # the day it was delivered, its name
    compression: str  # "gzip" or "none", from its first bytes whatever its name


@dataclass(frozen=True)
class DayCounts:
    lines_in: int = 0
    accepted: int = 0
    impressions: int = 0
    quarantined: int = 0
    reasons: str = ""


@dataclass
class AccumulationReport:
    """What one accumulation run read, accepted and quarantined."""

    domain: str
    dates: list[date]
    batches_read: list[str]
    lines_in: int
    accepted: dict[str, int]
    impressions: int
    quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    days: dict[date, DayCounts] = field(default_factory=dict)
    batch_problems: dict[str, str] = field(default_factory=dict)  # file -> why it was quarantined whole
    # events and quarantined lines whose rows this run wrote: all of them into empty partitions; on a
    # rerun only those that changed, came or went (the others' rows stay as they were)
    written: int = 0

    @property
    def reconciles(self) -> bool:
        return self.lines_in == sum(self.accepted.values()) + self.quarantined

    def day_metadata(self, day: date) -> dict[str, object]:
        """One (day, domain) partition's own figures (lines are attributed to the day of their event)."""
        counts = self.days.get(day, DayCounts())
        return {
            "lines_in": counts.lines_in,
            "accepted": counts.accepted,
            "impressions": counts.impressions,
            "quarantined": counts.quarantined,
            "reconciles": counts.lines_in == counts.accepted + counts.quarantined,
            "quarantine_reasons": counts.reasons or "none",
            "run": f"{self.domain} {min(self.dates)}..{max(self.dates)}: {self.lines_in} lines from "
                   f"{len(self.batches_read)} batches",
            "batch_problems": self._problems(),
        }

    def metadata(self) -> dict[str, object]:
        return {
            "domain": self.domain,
            "days": f"{min(self.dates)}..{max(self.dates)}",
            "batches_read": len(self.batches_read),
            "lines_in": self.lines_in,
            "accepted": sum(self.accepted.values()),
            **{f"accepted_{table}": count for table, count in self.accepted.items()},
            "impressions": self.impressions,
            "quarantined": self.quarantined,
            "reconciles": self.reconciles,
            "quarantine_reasons": ", ".join(f"{r}: {n}" for r, n in sorted(self.reasons.items())) or "none",
            "written": self.written,
            "batch_problems": self._problems(),
        }

    def _problems(self) -> str:
        return "; ".join(self.batch_problems.values()) or "none"


def _batch(home: Home, path: Path) -> _Batch:
    """The batch at ``path``; its first two bytes tell its compression."""
    with path.open("rb") as batch:
        compression = "gzip" if batch.read(2) == GZIP_MAGIC else "none"
    return _Batch(path, str(path.relative_to(home.landing)), batch_day(path), compression)


def _lines_sql(con: duckdb.DuckDBPyConnection) -> str:
    """The batches ``$paths`` (all of compression ``$compression``) one row per line: DuckDB's CSV
    reader, one column; a line longer than ``$max_line_bytes`` or not UTF-8 is left out, never read
    whole, and noted in ``landing_rejects`` (``landing_reject_scans`` names its file); a leading BOM
    is dropped."""
    con.execute("DROP TABLE IF EXISTS landing_rejects")
    con.execute("DROP TABLE IF EXISTS landing_reject_scans")
    return f"""read_csv($paths, columns = {{'line': 'VARCHAR'}}, header = false, auto_detect = false,
        delim = {_NO_DELIMITER}, quote = '', escape = '', strict_mode = false, max_line_size = $max_line_bytes,
        compression = $compression, filename = true, store_rejects = true, rejects_table = 'landing_rejects',
        rejects_scan = 'landing_reject_scans')"""


def _by_compression(batches: list[_Batch], max_line_bytes: int) -> list[dict[str, object]]:
    """Query parameters reading ``batches``, one set per compression."""
    return [{"paths": [str(b.path) for b in batches if b.compression == compression],
             "compression": compression, "max_line_bytes": max_line_bytes}
            for compression in sorted({batch.compression for batch in batches})]


def _scan_lines(con: duckdb.DuckDBPyConnection, batches: list[_Batch], max_line_bytes: int) -> None:
    """The batches' line structure, streamed, not kept: ``line_index`` (file, n: the line's place in
    the scan, blank) and ``line_rejects`` (file, source_line, line, error_type: too long, not UTF-8)."""
    con.execute("CREATE OR REPLACE TEMP TABLE line_index (file VARCHAR, n BIGINT, blank BOOLEAN)")
    con.execute("CREATE OR REPLACE TEMP TABLE line_rejects "
                "(file VARCHAR, source_line BIGINT, line VARCHAR, error_type VARCHAR)")
    con.execute("CREATE OR REPLACE TEMP TABLE text_lines (file VARCHAR, source_line BIGINT, line VARCHAR)")
    for params in _by_compression(batches, max_line_bytes):
        con.execute(f"INSERT INTO line_index SELECT filename, NULL, coalesce(trim(line), '') = '' FROM {_lines_sql(con)}",
                    params)
        # n from 1, as _fetch_lines numbers the scan again; from the rowid: the insert keeps the scan's order
        # (preserve_insertion_order) and runs in parallel, which row_number() OVER () would not let it
        con.execute("UPDATE line_index SET n = rowid - (SELECT min(rowid) - 1 FROM line_index WHERE n IS NULL) "
                    "WHERE n IS NULL")
        con.execute(
            """INSERT INTO line_rejects
               SELECT s.file_path, r.line, any_value(r.csv_line), any_value(r.error_type)
               FROM landing_rejects AS r JOIN landing_reject_scans AS s USING (scan_id, file_id) GROUP BY 1, 2"""
        )


def _check_fields(con: duckdb.DuckDBPyConnection, config: FlywheelConfig, batches: list[_Batch],
                  params: dict[str, object]) -> None:
    """Every non-blank line into ``checked_lines``, in one streaming statement: its contract fields
    (NULL where it does not parse as an object) read by DuckDB's JSON reader and checked, in the
    scan's order (``_number_fields`` turns a row's rowid, its place in the scan, into its line number)."""
    by_path = {str(batch.path): batch for batch in batches}
    for read in _by_compression(batches, config.landing.max_line_bytes):
        # each row's file and day looked up by position, not joined: a join would not keep the scan's order
        named = {"files": [by_path[path].file for path in read["paths"]], "days": [by_path[path].day for path in read["paths"]]}
        typed = f"""(SELECT $files[batch] AS source_file, $days[batch] AS batch_day, NULL::BIGINT AS source_line,
                            NULL::VARCHAR AS line, fields
                     FROM (SELECT list_position($paths, filename) AS batch, {events.fields_of_columns()} AS fields
                           FROM read_json($paths, format = 'newline_delimited', columns = {events.JSON_COLUMNS},
                                          ignore_errors = true, filename = true, compression = $compression,
                                          maximum_object_size = $max_line_bytes + 1)))"""
        insert = f"INSERT INTO checked_lines BY NAME {_checked_sql(config, typed, whole_line=False)}"
        _keeps_scan_order(con, insert, {**params, **read, **named})
        con.execute(insert, {**params, **read, **named})


def _keeps_scan_order(con: duckdb.DuckDBPyConnection, statement: str, params: dict[str, object]) -> None:
    """Refuse a check whose plan could reorder the scan's rows (a join: DuckDB plans a long IN list as
    one), whose rowids then would not be the lines' order. Planned once per statement and process:
    the statement is the configuration's rules, the batches only its parameters."""
    if statement in _ORDER_KEEPING_CHECKS:
        return
    plan = "".join(text for _, text in con.execute(f"EXPLAIN {statement}", params).fetchall())
    if "_JOIN" in plan or "Join Type" in plan or "CROSS_PRODUCT" in plan:
        raise AssertionError("the landing check's plan joins, so its rows would not keep the lines' order: "
                             "express the rule without IN lists or subqueries (events._one_of)")
    _ORDER_KEEPING_CHECKS.add(statement)


def _files_sql(rows: str, skipped: str) -> str:
    """Per file of a scan's ``rows`` (file, n: place in the scan): its first row's n, and where the
    scan skipped ``skipped`` lines (file, source_line) as ``skips``: the n-th row of the file is line
    ``n + (number of skips below n)`` (``_line_number_sql``)."""
    return f"""
        WITH firsts AS (SELECT file, min(n) AS first_n, count(*) AS rows FROM {rows} GROUP BY 1),
        skips AS (
            SELECT file, list(source_line - nth ORDER BY source_line) AS skips
            FROM (SELECT file, source_line, row_number() OVER (PARTITION BY file ORDER BY source_line) AS nth
                  FROM {skipped})
            GROUP BY 1
        )
        SELECT file, first_n, rows, coalesce(skips, []) AS skips FROM firsts LEFT JOIN skips USING (file)"""


def _line_number_sql(n: str = "n") -> str:
    """The 1-based line number of scanned row ``n`` joined with its file's ``_files_sql`` row."""
    nth = f"({n} - first_n + 1)"
    return f"{nth} + len(list_filter(skips, lambda skip: skip < {nth}))"


def _number_lines(con: duckdb.DuckDBPyConnection) -> None:
    """Number the CSV scan's lines, which skips a rejected one: ``csv_files`` (``_files_sql``) and
    ``numbered_lines`` (file, source_line, n: its place in the scan, blank)."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE csv_files AS {_files_sql('line_index', 'line_rejects')}")
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE numbered_lines AS
            SELECT file, {_line_number_sql()} AS source_line, n, blank FROM line_index JOIN csv_files USING (file)"""
    )


def _number_fields(con: duckdb.DuckDBPyConnection) -> None:
    """Number the JSON scan's rows in ``checked_lines`` (those not numbered yet: a run that reads its
    batches one at a time numbers each one's), which skips a blank line: ``json_files`` (``_files_sql``,
    and ``misread``: the two scans disagree on the file's lines, so its rows are dropped and all its
    lines checked from their text)."""
    scanned = """(SELECT l.path AS file, c.rowid AS n FROM checked_lines AS c JOIN landing_files AS l USING (source_file)
                  WHERE c.source_line IS NULL)"""
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE json_files AS
            WITH lines AS (
                SELECT file, count(*) FILTER (NOT blank) AS lines FROM numbered_lines GROUP BY 1
                UNION ALL SELECT file, count(*) FROM line_rejects GROUP BY 1
            )
            SELECT json.*, l.source_file,
                   rows IS DISTINCT FROM (SELECT sum(lines) FROM lines WHERE lines.file = json.file) AS misread
            FROM ({_files_sql(scanned, 'numbered_lines WHERE blank')}) AS json JOIN landing_files AS l ON l.path = json.file"""
    )
    con.execute("""DELETE FROM checked_lines WHERE source_line IS NULL
                   AND source_file IN (SELECT source_file FROM json_files WHERE misread)""")
    con.execute(f"""UPDATE checked_lines SET source_line = {_line_number_sql('checked_lines.rowid')} FROM json_files
                    WHERE checked_lines.source_line IS NULL
                      AND json_files.source_file = checked_lines.source_file""")


def _landing_files(con: duckdb.DuckDBPyConnection, batches: list[_Batch]) -> None:
    """``landing_files``: each batch's path, its name relative to the landing folder and its day."""
    con.execute("CREATE OR REPLACE TEMP TABLE landing_files (path VARCHAR, source_file VARCHAR, batch_day DATE)")
    con.execute("INSERT INTO landing_files SELECT unnest($paths), unnest($files), unnest($days)",
                {"paths": [str(b.path) for b in batches], "files": [b.file for b in batches],
                 "days": [b.day for b in batches]})


def _checked_sql(config: FlywheelConfig, lines: str, whole_line: bool) -> str:
    """SELECT the ``checked_lines`` of ``lines`` (source_file, batch_day, source_line, line, fields
    and, for a ``whole_line`` check, doc): each line's first broken rule (or none) and its day."""
    reason = events.reason_sql(tuple(config.domains), whole_line)
    return f"""
        WITH imps AS (
            SELECT *, {events.impressions_sql()} AS imps FROM {lines}
        ), typed AS (
            SELECT *, {events.impression_ids_sql()} AS imp_ids, {events.impression_kinds_sql()},
                {events.plain_ids_sql()} AS plain_ids,
                {events.text_sql('fields.event_type')} AS event_type,
                {events.text_sql('fields.event_id')} AS event_id,
                CASE WHEN regexp_matches({events.text_sql('fields.timestamp')}, '{events.TIMESTAMP_PATTERN}')
                     THEN timezone('UTC', TRY_CAST({events.text_sql('fields.timestamp')} AS TIMESTAMPTZ))
                END AS event_ts,
                $domain AS batch_domain,
                least($now::TIMESTAMP, batch_day + INTERVAL 1 DAY) + $skew::INTERVAL AS latest_allowed_ts
            FROM imps
        ), reasoned AS (
            SELECT *, {reason} AS contract_reason FROM typed
        )
        SELECT source_file, batch_day, source_line, line, fields, event_type, event_id,
            event_ts, hash(fields) AS content,
            CASE WHEN event_ts IS NULL OR CAST(event_ts AS DATE) > batch_day THEN batch_day
                 WHEN batch_day - CAST(event_ts AS DATE) > $lateness THEN batch_day
                 ELSE CAST(event_ts AS DATE) END AS event_date,
            coalesce(CASE WHEN batch_day > CAST($now::TIMESTAMP + $skew::INTERVAL AS DATE) THEN 'future_batch' END,
                     contract_reason,
                     CASE WHEN batch_day - CAST(event_ts AS DATE) > $lateness THEN 'too_late' END) AS reason
        FROM reasoned"""


def _check_params(config: FlywheelConfig, domain: str, now: datetime) -> dict[str, object]:
    return {"domain": domain, "now": now.astimezone(UTC).replace(tzinfo=None),
            "skew": timedelta(minutes=events.CLOCK_SKEW_MINUTES), "lateness": config.max_lateness_days}


def _fetch_lines(con: duckdb.DuckDBPyConnection, batches: list[_Batch], max_line_bytes: int,
                 wanted: str) -> None:
    """The text of the lines ``wanted`` names (a query of file, source_line) into ``text_lines``:
    one more streaming CSV scan of the batches ``_scan_lines`` read, keeping only those lines. The
    scan is matched row for row (a positional join) with ``line_index``, the same scan's rows in
    its order, flagged where wanted: no row numbering, and no join, of the lines' text."""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE wanted_lines AS
                    SELECT file, source_line, n FROM numbered_lines SEMI JOIN ({wanted}) USING (file, source_line)""")
    for params in _by_compression(batches, max_line_bytes):  # the files of _scan_lines, in its order
        con.execute("""CREATE OR REPLACE TEMP TABLE scan_flags AS
                       SELECT w.file, w.source_line FROM line_index AS l LEFT JOIN wanted_lines AS w USING (file, n)
                       WHERE l.file IN (SELECT unnest($paths)) ORDER BY l.rowid""", {"paths": params["paths"]})
        con.execute(f"""CREATE OR REPLACE TEMP TABLE fetched AS
                        SELECT s.filename, f.file, f.source_line, s.line
                        FROM {_lines_sql(con)} AS s POSITIONAL JOIN scan_flags AS f WHERE f.source_line IS NOT NULL""",
                    params)
        if con.execute("SELECT count(*) FROM fetched WHERE filename IS DISTINCT FROM file").fetchone()[0]:
            raise AssertionError("the landing batches changed while they were read: their lines no longer line up")
        con.execute("INSERT INTO text_lines SELECT file, source_line, line FROM fetched")


def _check_batches(con: duckdb.DuckDBPyConnection, config: FlywheelConfig, domain: str,
                   batches: list[_Batch], now: datetime) -> None:
    """Every line of ``batches`` into ``checked_lines``, in one pass over them all: the contract
    checked on the fields DuckDB's JSON reader typed; the few lines that break it, do not parse,
    could not be read or may be duplicates are read again as text and checked whole, so the
    quarantine keeps their text and exact reason."""
    max_line_bytes = config.landing.max_line_bytes
    _scan_lines(con, batches, max_line_bytes)
    _number_lines(con)
    params = _check_params(config, domain, now)
    _check_fields(con, config, batches, params)
    _number_fields(con)
    _fetch_lines(con, batches, max_line_bytes, """
        SELECT f.path AS file, c.source_line FROM checked_lines AS c JOIN landing_files AS f USING (source_file)
        WHERE c.reason IS NOT NULL
           OR c.event_id IN (SELECT event_id FROM checked_lines GROUP BY 1 HAVING count(*) > 1)
        UNION
        SELECT file, source_line FROM numbered_lines
        WHERE NOT blank AND file IN (SELECT file FROM json_files WHERE misread)""")
    con.execute(
        """DELETE FROM checked_lines WHERE (source_file, source_line) IN (
               SELECT f.source_file, r.source_line FROM (SELECT file, source_line FROM text_lines
                                                         UNION ALL SELECT file, source_line FROM line_rejects) AS r
               JOIN landing_files AS f ON f.path = r.file)"""
    )
    whole = f"""(SELECT f.source_file, f.batch_day, t.source_line, t.line, doc,
                        {events.fields_sql('doc')} AS fields
                 FROM (SELECT *, TRY_CAST(line AS JSON) AS doc FROM text_lines) AS t
                 JOIN landing_files AS f ON f.path = t.file
                 WHERE trim(t.line) <> '')"""
    con.execute(f"INSERT INTO checked_lines BY NAME {_checked_sql(config, whole, whole_line=True)}", params)
    _quarantine_rejects(con, None)


def _quarantine_rejects(con: duckdb.DuckDBPyConnection, reason: str | None) -> None:
    """The lines the CSV scan rejected into ``checked_lines``, each with its prefix and why (or ``reason``)."""
    con.execute(
        f"""INSERT INTO checked_lines BY NAME
            SELECT f.source_file, f.batch_day, r.source_line, left(r.line, {QUARANTINED_PREFIX_CHARS}) AS line,
                f.batch_day AS event_date,
                coalesce($reason, CASE r.error_type WHEN 'INVALID ENCODING' THEN 'invalid_utf8'
                                                    WHEN 'LINE SIZE OVER MAXIMUM' THEN 'line_too_long'
                                                    ELSE 'unreadable_line' END) AS reason
            FROM line_rejects AS r JOIN landing_files AS f ON f.path = r.file""",
        {"reason": reason},
    )


def _quarantine_batch(con: duckdb.DuckDBPyConnection, config: FlywheelConfig, batch: _Batch, reason: str) -> None:
    """Every line of the batch quarantined with ``reason``, each with its prefix."""
    _scan_lines(con, [batch], config.landing.max_line_bytes)
    _number_lines(con)
    _fetch_lines(con, [batch], config.landing.max_line_bytes, "SELECT file, source_line FROM numbered_lines WHERE NOT blank")
    con.execute(
        f"""INSERT INTO checked_lines BY NAME
            SELECT f.source_file, f.batch_day, t.source_line, left(t.line, {QUARANTINED_PREFIX_CHARS}) AS line,
                   f.batch_day AS event_date, $reason AS reason
            FROM text_lines AS t JOIN landing_files AS f ON f.path = t.file""",
        {"reason": reason},
    )
    _quarantine_rejects(con, reason)


def _quarantine_unreadable(con: duckdb.DuckDBPyConnection, batch: _Batch, why: str) -> None:
    """The batch quarantined as one row, line 0, saying ``why``."""
    con.execute("""INSERT INTO checked_lines BY NAME
                   SELECT $file AS source_file, $batch_day AS batch_day, 0 AS source_line, $why AS line,
                          $batch_day AS event_date, 'unreadable_file' AS reason""",
                {"file": batch.file, "batch_day": batch.day, "why": why})


def _read_batches(con: duckdb.DuckDBPyConnection, config: FlywheelConfig, domain: str,
                  batches: list[_Batch], now: datetime) -> dict[str, str]:
    """Every line of every batch into ``checked_lines``, all batches in one pass; when that pass
    fails, one batch at a time: a batch that cannot be read is quarantined as one row (line 0, saying
    why), one that runs out of memory line by line, and the others still land. Returns those
    batches' problems, each naming its file."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE checked_lines ({_CHECKED_COLUMNS})")
    _landing_files(con, batches)
    if not batches:
        return {}
    try:
        _check_batches(con, config, domain, batches, now)
        return {}
    except duckdb.Error:
        con.execute("DELETE FROM checked_lines")
    problems = {}
    for batch in batches:
        try:
            _check_batches(con, config, domain, [batch], now)
        except duckdb.Error as error:
            con.execute("DELETE FROM checked_lines WHERE source_file = $file", {"file": batch.file})
            out_of_memory = isinstance(error, duckdb.OutOfMemoryException)
            what = "ran out of memory while checked, its lines are quarantined" if out_of_memory else "cannot be read"
            problems[batch.file] = _problem(batch, what, error)
            if out_of_memory:
                _quarantine_batch(con, config, batch, "out_of_memory")
            else:
                _quarantine_unreadable(con, batch, problems[batch.file])
    return problems


def _problem(batch: _Batch, what: str, error: duckdb.Error) -> str:
    """``assistant/2026-11-02.jsonl cannot be read: <DuckDB's first line>``, with what to do about memory."""
    advice = (" (raise warehouse.memory_limit or lower landing.max_line_bytes)"
              if isinstance(error, duckdb.OutOfMemoryException) else "")
    return f"{batch.file} {what}{advice}: {str(error).strip().splitlines()[0]}"


def copy_scope(dates: list[date]) -> Scope:
    """What a run of ``dates`` holds in a working copy: those days of every raw table (the event ids
    kept on other days it reads through ``accumulate``'s ``elsewhere``)."""
    return Scope.of(dates, _RAW_TABLES)


def _mark_duplicates(con: duckdb.DuckDBPyConnection, domain: str, dates: list[date], elsewhere: Source | None,
                     horizon_days: int | None) -> None:
    """Keep this run's partitions' lines (``partition_lines``); among the lines that pass the contract
    (a copy that fails it was quarantined for that, and never beats one that passes), an event id
    read more than once is a ``duplicate_event_id`` after its first copy (in batch, file, line order)
    when every copy holds the same content, and ``conflicting_duplicate``, every copy of it, when they
    differ: which one is right cannot be told, so none is kept and all wait in the quarantine for
    review. One already kept in another partition (read from ``elsewhere``, default ``con``'s raw
    tables), on any day or within ``horizon_days`` of ``dates``, is a duplicate too. Only the
    repeated ids are ordered, and only the duplicates rewritten."""
    con.execute("DELETE FROM checked_lines WHERE event_date NOT IN $dates", {"dates": dates})
    con.execute(
        """
        UPDATE checked_lines SET reason = repeats.reason FROM (
            SELECT source_file, source_line, reason FROM (
                SELECT source_file, source_line,
                    CASE WHEN min(content) OVER copies <> max(content) OVER copies THEN 'conflicting_duplicate'
                         WHEN row_number() OVER first_copy > 1 THEN 'duplicate_event_id' END AS reason
                FROM checked_lines
                WHERE reason IS NULL AND event_id IN (
                    SELECT event_id FROM checked_lines WHERE reason IS NULL GROUP BY 1 HAVING count(*) > 1)
                WINDOW copies AS (PARTITION BY event_id),
                       first_copy AS (PARTITION BY event_id ORDER BY batch_day, source_file, source_line)
            ) WHERE reason IS NOT NULL
        ) AS repeats
        WHERE checked_lines.source_file = repeats.source_file AND checked_lines.source_line = repeats.source_line
        """
    )
    first, last = _horizon(dates, horizon_days)
    if elsewhere is None:
        kept_elsewhere = " UNION ALL ".join(
            f"SELECT event_id FROM raw.{table} WHERE domain = $domain AND event_date NOT IN $dates "
            "AND event_date BETWEEN coalesce($first, DATE '0001-01-01') AND coalesce($last, DATE '9999-12-31')"
            for table in RAW_EVENT_TABLES
        )
        params = {"domain": domain, "dates": dates, "first": first, "last": last}
    else:
        con.register("kept_elsewhere", _event_ids_elsewhere(elsewhere, domain, dates, first, last).to_arrow())
        kept_elsewhere, params = "SELECT event_id FROM kept_elsewhere", {}
    con.execute(f"UPDATE checked_lines SET reason = 'duplicate_event_id' "
                f"WHERE reason IS NULL AND event_id IN ({kept_elsewhere})", params)
    if elsewhere is not None:
        con.unregister("kept_elsewhere")
    con.execute("DROP TABLE IF EXISTS partition_lines")
    con.execute("ALTER TABLE checked_lines RENAME TO partition_lines")


def _horizon(dates: list[date], horizon_days: int | None) -> tuple[date | None, date | None]:
    """The first and last day whose kept events a run of ``dates`` checks its ids against (None: unbounded)."""
    if horizon_days is None:
        return None, None
    return min(dates) - timedelta(days=horizon_days), max(dates) + timedelta(days=horizon_days)


def _event_ids_elsewhere(source: Source, domain: str, dates: list[date], first: date | None,
                         last: date | None) -> pl.DataFrame:
    """The event ids ``source`` keeps in ``domain``'s raw event tables on days first..last (None:
    unbounded) outside ``dates``."""
    ids = [rows.filter(~pl.col("event_date").is_in(dates)).select("event_id")
           for table in RAW_EVENT_TABLES
           if (rows := source.read(f"raw.{table}", domain, first, last, ["event_id", "event_date"])).width]
    return pl.concat(ids) if ids else pl.DataFrame(schema={"event_id": pl.String})


def _keep_quarantined_text(con: duckdb.DuckDBPyConnection, config: FlywheelConfig, batches: list[_Batch],
                           problems: dict[str, str]) -> None:
    """Lines quarantined after the check without their text (a duplicate of an event kept in another
    partition, of a line the JSON reader could not read) get it: one more scan, only when needed."""
    missing = """SELECT l.path AS file, p.source_line FROM partition_lines AS p JOIN landing_files AS l USING (source_file)
                 WHERE p.reason IS NOT NULL AND p.line IS NULL AND p.event_id IS NOT NULL"""
    if not con.execute(f"SELECT count(*) FROM ({missing})").fetchone()[0]:
        return
    readable = [batch for batch in batches if batch.file not in problems]
    _scan_lines(con, readable, config.landing.max_line_bytes)
    _number_lines(con)
    _fetch_lines(con, readable, config.landing.max_line_bytes, missing)
    con.execute(
        """UPDATE partition_lines SET line = t.line FROM text_lines AS t JOIN landing_files AS l ON l.path = t.file
           WHERE partition_lines.source_file = l.source_file AND partition_lines.source_line = t.source_line"""
    )


_ROWS = {  # each raw table's rows of the run's partitions, from partition_lines
    "interactions": f"""
        SELECT event_id, $domain, event_date, event_ts, {field_text('user_id')}, {field_text('session_id')},
               {field_text('interaction_id')}, {field_text('model_version')}, {field_text('policy')}, {field_text('consent')},
               {privacy.redacted_sql('input', field_text('input'), 'may_hold')}, {privacy.redacted_sql('context', 'fields.context', 'may_hold')},
               source_file, source_line, coalesce(first_ingested.ingested_at, $now)
        FROM (SELECT *, may_hold_pii(concat_ws(' ', fields.input, fields.context)) AS may_hold FROM partition_lines
              WHERE reason IS NULL AND event_type = 'interaction') LEFT JOIN first_ingested USING (event_id)""",
    "impressions": f"""
        SELECT event_id, $domain, event_date, interaction_id,
               imp.item_id, imp.position, imp.propensity, imp.content
        FROM (
            SELECT event_id, event_date, {field_text('interaction_id')} AS interaction_id,
                   unnest(CASE WHEN may_hold_pii(CAST(fields.impressions AS VARCHAR))
                               THEN list_transform(from_json(fields.impressions, '{_IMPRESSION_SCHEMA}'), lambda imp:
                                   struct_update(imp, content := {privacy.redacted_sql('content', 'imp.content', 'true')}))
                               ELSE from_json(fields.impressions, '{_IMPRESSION_SCHEMA}') END) AS imp
            FROM partition_lines WHERE reason IS NULL AND event_type = 'interaction'
        )""",
    "signals": f"""
        SELECT event_id, $domain, event_date, event_ts, {field_text('user_id')}, {field_text('session_id')},
               {field_text('interaction_id')}, {field_text('signal_type')}, {field_text('item_id')},
               TRY_CAST(fields.value AS DOUBLE), {privacy.redacted_sql('text', field_text('text'), 'may_hold_pii(CAST(fields.text AS VARCHAR))')}, source_file, source_line,
               coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'signal'""",
    "outcomes": f"""
        SELECT event_id, $domain, event_date, event_ts, {field_text('user_id')}, {field_text('session_id')},
               {field_text('interaction_id')}, {field_text('name')}, TRY_CAST(fields.value AS DOUBLE),
               {field_text('item_id')}, source_file, source_line, coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'outcome'""",
    "labels": f"""
        SELECT event_id, $domain, event_date, event_ts, {field_text('user_id')}, {field_text('session_id')},
               {field_text('interaction_id')}, {field_text('item_id')}, {field_text('reviewer')}, {field_text('verdict')},
               source_file, source_line, coalesce(first_ingested.ingested_at, $now), {field_text('selection')}
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'label'""",
    "quarantine": """
        SELECT $domain, event_date, source_file, source_line, event_id, reason, line, $now
        FROM partition_lines WHERE reason IS NOT NULL""",
}


# what names one event's rows in each raw table (a quarantined line's: its file and line)
_KEYS = {**{table: "event_id" for table in (*RAW_EVENT_TABLES, "impressions")}, "quarantine": "source_file, source_line"}
# a row as compared between runs: whole, but for when a line was quarantined, which an unchanged one keeps
_ROW_HASH = {**{table: "hash(t)" for table in _KEYS},
             "quarantine": "hash(t.domain, t.event_date, t.source_file, t.source_line, t.event_id, t.reason, t.line)"}


def _partition_sql(table: str) -> str:
    """The rows of ``table`` in the run's partitions; an importer's rejected records in the quarantine
    (source_file: the imported file's absolute path) are not accumulation's, and stay."""
    ours = " AND starts_with(source_file, $domain || '/')" if table == "quarantine" else ""
    return f"domain = $domain AND event_date IN $dates{ours}"


def _replace_partitions(con: duckdb.DuckDBPyConnection, domain: str, dates: list[date], now: datetime) -> int:
    """Make the partitions hold this run's rows, all or nothing. Empty partitions get them written
    straight in; otherwise the rows of an event (of a quarantined line) that are unchanged stay,
    and only those of events that changed, came or went are deleted and written. An event keeps its
    first ingestion time, so a rerun over the same batches changes no row. Returns how many events
    (and quarantined lines) had their rows written."""
    stamp = {"domain": domain, "now": now.astimezone(UTC).replace(tzinfo=None)}
    partitions = {"domain": domain, "dates": dates}
    first_ingested = " UNION ALL ".join(
        f"SELECT event_id, ingested_at FROM raw.{table} WHERE domain = $domain AND event_date IN $dates"
        for table in RAW_EVENT_TABLES
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE first_ingested AS {first_ingested}", partitions)
    held = " + ".join(f"(SELECT count(*) FROM raw.{table} WHERE {_partition_sql(table)})" for table in _ROWS)
    [(rows_held,)] = con.execute(f"SELECT {held}", partitions).fetchall()
    if not rows_held:
        with transaction(con):
            for table, sql in _ROWS.items():
                con.execute(f"INSERT INTO raw.{table} {sql}", {k: v for k, v in stamp.items() if f"${k}" in sql})
        return con.execute("SELECT count(*) FROM partition_lines").fetchall()[0][0]
    # staged before the transaction: DuckDB 2.0 finds no groups in a temp table filled inside one
    for table, sql in _ROWS.items():
        _stage_changes(con, table, sql, {k: v for k, v in stamp.items() if f"${k}" in sql}, partitions)
    with transaction(con):
        for table, key in _KEYS.items():
            con.execute(f"DELETE FROM raw.{table} WHERE {_partition_sql(table)} "
                        f"AND ({key}) IN (SELECT {key} FROM changed_{table})", partitions)
            con.execute(f"INSERT INTO raw.{table} SELECT * FROM new_{table} WHERE ({key}) IN (SELECT {key} FROM changed_{table})")
    changed = " UNION ".join(f"SELECT {key if key == 'event_id' else 'source_file || source_line'} FROM changed_{table}"
                             for table, key in _KEYS.items())
    return con.execute(f"SELECT count(*) FROM ({changed})").fetchall()[0][0]


def _stage_changes(con: duckdb.DuckDBPyConnection, table: str, rows: str, params: dict[str, object],
                   partitions: dict[str, object]) -> None:
    """``new_<table>``: the run's ``rows`` of ``table``; ``changed_<table>``: the events (``_KEYS``)
    whose rows there differ from those the table holds (``_ROW_HASH``), or that came or went."""
    key, row = _KEYS[table], _ROW_HASH[table]
    con.execute(f"CREATE OR REPLACE TEMP TABLE new_{table} AS SELECT * FROM raw.{table} LIMIT 0")
    con.execute(f"INSERT INTO new_{table} {rows}", params)
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE changed_{table} AS
            WITH held AS (SELECT {key}, list_sort(list({row})) AS rows FROM raw.{table} AS t
                          WHERE {_partition_sql(table)} GROUP BY ALL),
                 run AS (SELECT {key}, list_sort(list({row})) AS rows FROM new_{table} AS t GROUP BY ALL)
            SELECT {key} FROM held FULL JOIN run USING ({key}) WHERE held.rows IS DISTINCT FROM run.rows""",
        partitions,
    )


def _report(con: duckdb.DuckDBPyConnection, domain: str, dates: list[date], batches: list[_Batch],
            problems: dict[str, str]) -> AccumulationReport:
    counts = con.execute(
        """SELECT count(*) AS lines_in,
                  count(*) FILTER (reason IS NULL AND event_type = 'interaction'),
                  count(*) FILTER (reason IS NULL AND event_type = 'signal'),
                  count(*) FILTER (reason IS NULL AND event_type = 'outcome'),
                  count(*) FILTER (reason IS NULL AND event_type = 'label'),
                  count(*) FILTER (reason IS NOT NULL)
           FROM partition_lines"""
    ).fetchone()
    reasons = dict(con.execute(
        "SELECT reason, count(*) FROM partition_lines WHERE reason IS NOT NULL GROUP BY 1"
    ).fetchall())
    impressions = con.execute(
        "SELECT count(*) FROM raw.impressions WHERE domain = $domain AND event_date IN $dates",
        {"domain": domain, "dates": dates},
    ).fetchone()[0]
    return AccumulationReport(
        domain=domain,
        dates=dates,
        batches_read=[batch.path.name for batch in batches],
        lines_in=counts[0],
        accepted=dict(zip(RAW_EVENT_TABLES, counts[1:5])),
        impressions=impressions,
        quarantined=counts[5],
        reasons=reasons,
        days=_day_counts(con, domain, dates),
        batch_problems=problems,
    )


def _day_counts(con: duckdb.DuckDBPyConnection, domain: str, dates: list[date]) -> dict[date, DayCounts]:
    rows = con.execute(
        """WITH lines AS (
               SELECT event_date, count(*) AS lines_in, count(*) FILTER (reason IS NULL) AS accepted,
                      count(*) FILTER (reason IS NOT NULL) AS quarantined
               FROM partition_lines GROUP BY 1
           ), reasons AS (
               SELECT event_date, string_agg(reason || ': ' || n, ', ' ORDER BY reason) AS reasons
               FROM (SELECT event_date, reason, count(*) AS n FROM partition_lines
                     WHERE reason IS NOT NULL GROUP BY 1, 2)
               GROUP BY 1
           ), impressions AS (
               SELECT event_date, count(*) AS impressions FROM raw.impressions
               WHERE domain = $domain AND event_date IN $dates GROUP BY 1
           )
           SELECT event_date, lines_in, accepted, coalesce(impressions, 0), quarantined, coalesce(reasons, '')
           FROM lines LEFT JOIN impressions USING (event_date) LEFT JOIN reasons USING (event_date)""",
        {"domain": domain, "dates": dates},
    ).fetchall()
    return {day: DayCounts(*counts) for day, *counts in rows}


def accumulate(
    con: duckdb.DuckDBPyConnection,
    home: Home,
    config: FlywheelConfig,
    domain: str,
    dates: list[date],
    now: datetime | None = None,
    elsewhere: Source | None = None,
) -> AccumulationReport:
    """Rebuild the (day, domain) partitions ``dates`` of the raw tables from the landing batches;
    the domain's other partitions, where a duplicate may already be kept, are read from
    ``elsewhere`` when ``con`` holds only those days (a scoped working copy)."""
    config.domain(domain)
    if not dates:
        raise ValueError("accumulate needs at least one day")
    now = now or datetime.now(UTC)
    ensure_raw_tables(con)
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET preserve_insertion_order = true")  # a batch's rows keep its line order
    batches = [_batch(home, path) for path in batches_for(home, domain, dates, config.max_lateness_days)]
    privacy.install_redaction(con)  # the contract's id rules look for personal data (unsafe_id:<field>)
    problems = _read_batches(con, config, domain, batches, now)
    _mark_duplicates(con, domain, dates, elsewhere, config.landing.duplicate_horizon_days)
    _keep_quarantined_text(con, config, batches, problems)
    privacy.protect_partition_lines(con)  # redaction, forgotten users
    written = _replace_partitions(con, domain, dates, now)
    report = _report(con, domain, dates, batches, problems)
    report.written = written
    if not report.reconciles:
        raise AssertionError(f"accumulation does not reconcile: {report.metadata()}")
    return report
