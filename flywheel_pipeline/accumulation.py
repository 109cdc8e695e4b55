"""Accumulation: landing batches -> raw tables, one (day, domain) partition at a time.

Every non-blank landing line is attributed to exactly one day partition: the UTC day of its own
timestamp, or the day of the batch that brought it when the timestamp is unusable (or after the
batch's day, or more than ``max_lateness_days`` before it). A partition's lines are either accepted
into ``raw.interactions/impressions/signals/outcomes/labels`` or quarantined in ``raw.quarantine``
with a reason, so lines in = accepted + quarantined. A domain's landing folder holds the product's
daily batches (``<day>.jsonl``) and the review queue's (``labels/<day>.jsonl``: ``label`` events).
Batches are read and checked one at a time: a line too long or not UTF-8, or a batch that cannot be
read, is quarantined and the other batches still land (docs/events.md: Delivery).
A run replaces its partitions in one transaction:
re-running is idempotent (an event keeps the time it was first ingested, which the late-label
sensor relies on), and a crash leaves the previous state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb

from flywheel_pipeline import events, privacy
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.home import Home
from flywheel_pipeline.warehouse import ensure_raw_tables, transaction

_BATCH_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})\.jsonl$")
LABEL_BATCHES = "labels"  # the review queue's batches: <domain>/labels/<day>.jsonl
_RAW_EVENT_TABLES = ("interactions", "signals", "outcomes", "labels")
_IMPRESSION_SCHEMA = '[{"item_id": "VARCHAR", "position": "INTEGER", "propensity": "DOUBLE", "content": "VARCHAR"}]'
_GZIP_MAGIC = b"\x1f\x8b"
_NO_DELIMITER = "chr(0) || chr(1) || chr(0) || chr(1)"  # never in JSON text: a line is one column
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
            "batch_problems": self._problems(),
        }

    def _problems(self) -> str:
        return "; ".join(self.batch_problems.values()) or "none"


def batches_for(home: Home, domain: str, dates: list[date], max_lateness_days: int) -> list[Path]:
    """Landing batches that may carry events of ``dates``: delivered that day up to the lateness
    limit, the product's and the review queue's."""
    first, last = min(dates), max(dates) + timedelta(days=max_lateness_days)
    found = []
    for folder in (home.landing / domain, home.landing / domain / LABEL_BATCHES):
        for path in sorted(folder.glob("*.jsonl")) if folder.exists() else []:
            match = _BATCH_NAME.match(path.name)
            if match and first <= date.fromisoformat(match.group(1)) <= last:
                found.append(path)
    return found


def _batch(home: Home, path: Path) -> _Batch:
    with path.open("rb") as batch:
        compression = "gzip" if batch.read(2) == _GZIP_MAGIC else "none"
    return _Batch(path, str(path.relative_to(home.landing)), date.fromisoformat(path.stem), compression)


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
        con.execute(
            f"""INSERT INTO line_index SELECT filename, row_number() OVER (), coalesce(trim(line), '') = ''
                FROM {_lines_sql(con)}""",
            params,
        )
        con.execute(
            """INSERT INTO line_rejects
               SELECT s.file_path, r.line, any_value(r.csv_line), any_value(r.error_type)
               FROM landing_rejects AS r JOIN landing_reject_scans AS s USING (scan_id, file_id) GROUP BY 1, 2"""
        )


def _scan_fields(con: duckdb.DuckDBPyConnection, batches: list[_Batch], max_line_bytes: int) -> None:
    """The contract fields of every non-blank line (NULL where it does not parse as an object) into
    ``typed_rows`` (file, n: its place in the scan, fields), with DuckDB's JSON reader."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE typed_rows (file VARCHAR, n BIGINT, fields {events.FIELDS_TYPE})")
    for params in _by_compression(batches, max_line_bytes):
        con.execute(
            f"""INSERT INTO typed_rows
                SELECT filename, row_number() OVER (), {events.fields_of_columns()}
                FROM read_json($paths, format = 'newline_delimited', columns = {events.JSON_COLUMNS},
                               ignore_errors = true, filename = true, compression = $compression,
                               maximum_object_size = $max_line_bytes + 1)""",
            params,
        )


def _gaps_sql(lines: str) -> str:
    """For a scan that skipped ``lines`` (file, source_line): the rows read after ``read_before`` rows
    of a file move down ``so_far`` line numbers (join the n-th row with ASOF ... nth > read_before)."""
    return f"""SELECT file, read_before, max(so_far) AS so_far
        FROM (SELECT file, source_line - row_number() OVER w AS read_before, row_number() OVER w AS so_far
              FROM {lines} WINDOW w AS (PARTITION BY file ORDER BY source_line))
        GROUP BY 1, 2"""


def _number_lines(con: duckdb.DuckDBPyConnection) -> None:
    """Give every scanned row its 1-based line number in its file (``typed_lines``: file, source_line,
    fields), counting blank and rejected lines. The CSV scan skips a rejected line, the JSON scan a
    blank one; a file whose two scans disagree on its lines is ``misread`` (all its lines are then
    checked from their text)."""
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE numbered_lines AS
        WITH firsts AS (SELECT file, min(n) AS first_n FROM line_index GROUP BY 1),
        shifts AS ({_gaps_sql("line_rejects")}), read AS (
            SELECT file, n - first_n + 1 AS nth, blank FROM line_index JOIN firsts USING (file)
        )
        SELECT read.file, nth + coalesce(so_far, 0) AS source_line, blank
        FROM read ASOF LEFT JOIN shifts ON read.file = shifts.file AND read.nth > shifts.read_before
        """
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE typed_lines AS
        WITH firsts AS (SELECT file, min(n) AS first_n, count(*) AS rows FROM typed_rows GROUP BY 1),
        gaps AS ({_gaps_sql("numbered_lines WHERE blank")}), files AS (
            SELECT file, count(*) FILTER (NOT blank) + (SELECT count(*) FROM line_rejects AS r WHERE r.file = l.file)
                         AS lines FROM numbered_lines AS l GROUP BY 1
        ), read AS (
            SELECT file, n - first_n + 1 AS nth, fields, rows FROM typed_rows JOIN firsts USING (file)
        )
        SELECT read.file, nth + coalesce(so_far, 0) AS source_line, fields,
               rows IS DISTINCT FROM lines AS misread
        FROM read ASOF LEFT JOIN gaps ON read.file = gaps.file AND read.nth > gaps.read_before
        LEFT JOIN files ON files.file = read.file
        """
    )


def _landing_files(con: duckdb.DuckDBPyConnection, batches: list[_Batch]) -> None:
    """``landing_files``: each batch's path, its name relative to the landing folder and its day."""
    con.execute("CREATE OR REPLACE TEMP TABLE landing_files (path VARCHAR, source_file VARCHAR, batch_day DATE)")
    con.execute("INSERT INTO landing_files SELECT unnest($paths), unnest($files), unnest($days)",
                {"paths": [str(b.path) for b in batches], "files": [b.file for b in batches],
                 "days": [b.day for b in batches]})


def _checked_sql(config: FlywheelConfig, lines: str, whole_line: bool) -> str:
    """SELECT the ``checked_lines`` of ``lines`` (file, batch_day, source_line, line, fields and, for a
    ``whole_line`` check, doc, read_reason): each line's first broken rule (or none) and its day."""
    reason = events.reason_sql(tuple(config.domains), whole_line)
    read_reason = "read_reason" if whole_line else "NULL"
    return f"""
        WITH typed AS (
            SELECT *, {events.impressions_sql()} AS imps,
                {events.text_sql('fields.event_type')} AS event_type,
                {events.text_sql('fields.event_id')} AS event_id,
                CASE WHEN regexp_matches({events.text_sql('fields.timestamp')}, '{events.TIMESTAMP_PATTERN}')
                     THEN timezone('UTC', TRY_CAST({events.text_sql('fields.timestamp')} AS TIMESTAMPTZ))
                END AS event_ts,
                $domain AS batch_domain,
                least($now::TIMESTAMP, batch_day + INTERVAL 1 DAY) + $skew::INTERVAL AS latest_allowed_ts
            FROM {lines}
        ), reasoned AS (
            SELECT *, {reason} AS contract_reason FROM typed
        )
        SELECT source_file, batch_day, source_line, line, fields, event_type, event_id,
            event_ts, hash(fields) AS content,
            CASE WHEN event_ts IS NULL OR CAST(event_ts AS DATE) > batch_day THEN batch_day
                 WHEN batch_day - CAST(event_ts AS DATE) > $lateness THEN batch_day
                 ELSE CAST(event_ts AS DATE) END AS event_date,
            coalesce({read_reason},
                     CASE WHEN batch_day > CAST($now::TIMESTAMP + $skew::INTERVAL AS DATE) THEN 'future_batch' END,
                     contract_reason,
                     CASE WHEN batch_day - CAST(event_ts AS DATE) > $lateness THEN 'too_late' END) AS reason
        FROM reasoned"""


def _check_params(config: FlywheelConfig, domain: str, now: datetime) -> dict[str, object]:
    return {"domain": domain, "now": now.astimezone(UTC).replace(tzinfo=None),
            "skew": timedelta(minutes=events.CLOCK_SKEW_MINUTES), "lateness": config.max_lateness_days}


def _fetch_lines(con: duckdb.DuckDBPyConnection, batches: list[_Batch], max_line_bytes: int,
                 wanted: str) -> None:
    """The text of the lines ``wanted`` names (a query of file, source_line) into ``text_lines``:
    one more streaming CSV scan, keeping only those lines."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE wanted_lines AS {wanted}")
    files = {row[0] for row in con.execute("SELECT DISTINCT file FROM wanted_lines").fetchall()}
    for params in _by_compression([b for b in batches if str(b.path) in files], max_line_bytes):
        con.execute(
            f"""INSERT INTO text_lines
                WITH read AS (SELECT filename AS file, row_number() OVER () AS n, line FROM {_lines_sql(con)}),
                firsts AS (SELECT file, min(n) AS first_n FROM read GROUP BY 1),
                shifts AS ({_gaps_sql("line_rejects")}), numbered AS (
                    SELECT file, n - first_n + 1 AS nth, line FROM read JOIN firsts USING (file)
                )
                SELECT numbered.file, nth + coalesce(so_far, 0) AS source_line, line
                FROM numbered ASOF LEFT JOIN shifts ON numbered.file = shifts.file AND numbered.nth > shifts.read_before
                SEMI JOIN wanted_lines AS w ON w.file = numbered.file AND w.source_line = nth + coalesce(so_far, 0)""",
            params,
        )


def _check_batches(con: duckdb.DuckDBPyConnection, config: FlywheelConfig, domain: str,
                   batches: list[_Batch], now: datetime) -> None:
    """Every line of ``batches`` into ``checked_lines``, in one pass over them all: the contract
    checked on the fields DuckDB's JSON reader typed; the few lines that break it, do not parse,
    could not be read or may be duplicates are read again as text and checked whole, so the
    quarantine keeps their text and exact reason."""
    max_line_bytes = config.landing.max_line_bytes
    _scan_lines(con, batches, max_line_bytes)
    _scan_fields(con, batches, max_line_bytes)
    _number_lines(con)
    _landing_files(con, batches)
    params = _check_params(config, domain, now)
    typed = """(SELECT f.source_file, f.batch_day, t.source_line, NULL::VARCHAR AS line, t.fields
                FROM typed_lines AS t JOIN landing_files AS f ON f.path = t.file
                WHERE NOT t.misread AND (t.file, t.source_line) NOT IN (SELECT file, source_line FROM line_rejects))"""
    con.execute(f"CREATE OR REPLACE TEMP TABLE fast_lines AS {_checked_sql(config, typed, whole_line=False)}", params)
    _fetch_lines(con, batches, max_line_bytes, """
        SELECT f.path AS file, l.source_line FROM fast_lines AS l JOIN landing_files AS f USING (source_file)
        WHERE l.reason IS NOT NULL
           OR l.event_id IN (SELECT event_id FROM fast_lines GROUP BY 1 HAVING count(*) > 1)
        UNION ALL
        SELECT DISTINCT file, source_line FROM numbered_lines
        WHERE NOT blank AND file IN (SELECT file FROM typed_lines WHERE misread)""")
    whole = f"""(SELECT f.source_file, f.batch_day, t.source_line, t.line, doc, {events.fields_sql('doc')} AS fields,
                        NULL AS read_reason
                 FROM (SELECT *, TRY_CAST(line AS JSON) AS doc FROM text_lines) AS t
                 JOIN landing_files AS f ON f.path = t.file
                 WHERE trim(t.line) <> '')"""
    con.execute(
        """INSERT INTO checked_lines BY NAME
           SELECT * FROM fast_lines ANTI JOIN
               (SELECT f.source_file, t.source_line FROM text_lines AS t JOIN landing_files AS f ON f.path = t.file) AS t
               USING (source_file, source_line)
           WHERE reason IS NULL"""
    )
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
    _landing_files(con, [batch])
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


def _read_batches(con: duckdb.DuckDBPyConnection, home: Home, config: FlywheelConfig, domain: str,
                  paths: list[Path], now: datetime) -> dict[str, str]:
    """Every line of every batch into ``checked_lines``, all batches in one pass; when that pass
    fails, one batch at a time: a batch that cannot be read is quarantined as one row (line 0, saying
    why), one that runs out of memory line by line, and the others still land. Returns those
    batches' problems, each naming its file."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE checked_lines ({_CHECKED_COLUMNS})")
    batches = [_batch(home, path) for path in paths]
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
        except duckdb.OutOfMemoryException as error:
            problems[batch.file] = _problem(batch, "ran out of memory while checked, its lines are quarantined", error)
            _quarantine_batch(con, config, batch, "out_of_memory")
        except duckdb.Error as error:
            problems[batch.file] = _problem(batch, "cannot be read", error)
            _quarantine_unreadable(con, batch, problems[batch.file])
    return problems


def _problem(batch: _Batch, what: str, error: duckdb.Error) -> str:
    """``assistant/2026-11-02.jsonl cannot be read: <DuckDB's first line>``, with what to do about memory."""
    advice = (" (raise warehouse.memory_limit or lower landing.max_line_bytes)"
              if isinstance(error, duckdb.OutOfMemoryException) else "")
    return f"{batch.file} {what}{advice}: {str(error).strip().splitlines()[0]}"


def _mark_duplicates(con: duckdb.DuckDBPyConnection, domain: str, dates: list[date]) -> None:
    """Keep this run's partitions' lines; an event id seen before in the batches read (in batch, file,
    line order) is a duplicate, a ``conflicting_duplicate`` when its content differs from the first
    copy's; one already kept in another partition is a duplicate too. Only the repeated ids are
    ordered, so the lines are never sorted."""
    kept_elsewhere = " UNION ALL ".join(
        f"SELECT event_id FROM raw.{table} WHERE NOT (domain = $domain AND event_date IN $dates)"
        for table in _RAW_EVENT_TABLES
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE partition_lines AS
        WITH repeated_ids AS (
            SELECT event_id FROM checked_lines WHERE reason IS NULL GROUP BY 1 HAVING count(*) > 1
        ), repeats AS (
            SELECT source_file, source_line,
                CASE WHEN content <> first_value(content) OVER first_copy THEN 'conflicting_duplicate'
                     ELSE 'duplicate_event_id' END AS repeat_reason,
                row_number() OVER first_copy AS nth
            FROM checked_lines SEMI JOIN repeated_ids USING (event_id)
            WHERE reason IS NULL
            WINDOW first_copy AS (PARTITION BY event_id ORDER BY batch_day, source_file, source_line)
        ), kept_elsewhere AS ({kept_elsewhere})
        SELECT checked_lines.* EXCLUDE (reason, content),
            CASE WHEN reason IS NOT NULL THEN reason
                 WHEN nth > 1 THEN repeat_reason
                 WHEN event_id IN (SELECT event_id FROM kept_elsewhere) THEN 'duplicate_event_id'
            END AS reason
        FROM checked_lines LEFT JOIN repeats USING (source_file, source_line)
        WHERE event_date IN $dates
        """,
        {"domain": domain, "dates": dates},
    )


def _text(name: str) -> str:
    return events.text_sql(f"fields.{name}")


_INSERTS = {
    "interactions": f"""
        INSERT INTO raw.interactions
        SELECT event_id, $domain, event_date, event_ts, {_text('user_id')}, {_text('session_id')},
               {_text('interaction_id')}, {_text('model_version')}, {_text('policy')}, {_text('consent')},
               {_text('input')}, fields.context, source_file, source_line,
               coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'interaction'""",
    "impressions": f"""
        INSERT INTO raw.impressions
        SELECT event_id, $domain, event_date, interaction_id,
               imp.item_id, imp.position, imp.propensity, imp.content
        FROM (
            SELECT event_id, event_date, {_text('interaction_id')} AS interaction_id,
                   unnest(from_json(fields.impressions, '{_IMPRESSION_SCHEMA}')) AS imp
            FROM partition_lines WHERE reason IS NULL AND event_type = 'interaction'
        )""",
    "signals": f"""
        INSERT INTO raw.signals
        SELECT event_id, $domain, event_date, event_ts, {_text('user_id')}, {_text('session_id')},
               {_text('interaction_id')}, {_text('signal_type')}, {_text('item_id')},
               TRY_CAST(fields.value AS DOUBLE), {_text('text')}, source_file, source_line,
               coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'signal'""",
    "outcomes": f"""
        INSERT INTO raw.outcomes
        SELECT event_id, $domain, event_date, event_ts, {_text('user_id')}, {_text('session_id')},
               {_text('interaction_id')}, {_text('name')}, TRY_CAST(fields.value AS DOUBLE),
               {_text('item_id')}, source_file, source_line, coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'outcome'""",
    "labels": f"""
        INSERT INTO raw.labels
        SELECT event_id, $domain, event_date, event_ts, {_text('user_id')}, {_text('session_id')},
               {_text('interaction_id')}, {_text('item_id')}, {_text('reviewer')}, {_text('verdict')},
               source_file, source_line, coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'label'""",
    "quarantine": f"""
        INSERT INTO raw.quarantine
        SELECT $domain, event_date, source_file, source_line, event_id, reason, line, $now
        FROM partition_lines WHERE reason IS NOT NULL""",
}


def _replace_partitions(con: duckdb.DuckDBPyConnection, domain: str, dates: list[date], now: datetime) -> None:
    """Swap the partitions' rows for this run's, all or nothing; an event keeps its first ingestion time."""
    stamp = {"domain": domain, "now": now.astimezone(UTC).replace(tzinfo=None)}
    first_ingested = " UNION ALL ".join(
        f"SELECT event_id, ingested_at FROM raw.{table} WHERE domain = $domain AND event_date IN $dates"
        for table in _RAW_EVENT_TABLES
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE first_ingested AS {first_ingested}", {"domain": domain, "dates": dates})
    with transaction(con):
        for table in (*_RAW_EVENT_TABLES, "impressions", "quarantine"):
            con.execute(f"DELETE FROM raw.{table} WHERE domain = $domain AND event_date IN $dates",
                        {"domain": domain, "dates": dates})
        for table, sql in _INSERTS.items():
            params = {k: v for k, v in stamp.items() if f"${k}" in sql}
            con.execute(sql, params)


def _report(con: duckdb.DuckDBPyConnection, domain: str, dates: list[date], batches: list[Path],
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
        batches_read=[path.name for path in batches],
        lines_in=counts[0],
        accepted=dict(zip(_RAW_EVENT_TABLES, counts[1:5])),
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
) -> AccumulationReport:
    """Rebuild the (day, domain) partitions ``dates`` of the raw tables from the landing batches."""
    config.domain(domain)
    if not dates:
        raise ValueError("accumulate needs at least one day")
    now = now or datetime.now(UTC)
    ensure_raw_tables(con)
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET preserve_insertion_order = true")  # a batch's rows keep its line order
    batches = batches_for(home, domain, dates, config.max_lateness_days)
    problems = _read_batches(con, home, config, domain, batches, now)
    _mark_duplicates(con, domain, dates)
    privacy.protect_partition_lines(con)  # redaction, forgotten users
    _replace_partitions(con, domain, dates, now)
    report = _report(con, domain, dates, batches, problems)
    if not report.reconciles:
        raise AssertionError(f"accumulation does not reconcile: {report.metadata()}")
    return report
