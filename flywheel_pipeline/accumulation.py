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
    file: str  # relative to the landing folder
    day: date  # the day it was delivered, its name


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


def _read_batch(con: duckdb.DuckDBPyConnection, path: Path, max_line_bytes: int) -> None:
    """The batch's non-blank lines into ``batch_lines`` (source_line, line, read_reason).

    DuckDB's CSV reader streams the file with one column per line: a line longer than
    ``max_line_bytes`` or not UTF-8 comes back as its line number, a reason and a prefix, never
    whole; a leading BOM is dropped; a gzip'd batch is read as gzip whatever its name.
    """
    with path.open("rb") as batch:
        compression = "gzip" if batch.read(2) == _GZIP_MAGIC else "none"
    con.execute("DROP TABLE IF EXISTS landing_rejects")
    con.execute("DROP TABLE IF EXISTS landing_reject_scans")
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE batch_read AS
        SELECT line FROM read_csv($path, columns = {{'line': 'VARCHAR'}}, header = false, auto_detect = false,
            delim = {_NO_DELIMITER}, quote = '', escape = '', strict_mode = false,
            max_line_size = $max_line_bytes, compression = $compression, store_rejects = true,
            rejects_table = 'landing_rejects', rejects_scan = 'landing_reject_scans')
        """,
        {"path": str(path), "max_line_bytes": max_line_bytes, "compression": compression},
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE batch_lines AS
        WITH rejected AS (
            SELECT line AS source_line, any_value(csv_line) AS line, any_value(error_type) AS error_type
            FROM landing_rejects GROUP BY 1
        ), shifts AS (  -- the lines read after a rejected one move down one number for each
            SELECT read_before, max(rejected_so_far) AS rejected_so_far
            FROM (SELECT source_line - row_number() OVER (ORDER BY source_line) AS read_before,
                         row_number() OVER (ORDER BY source_line) AS rejected_so_far FROM rejected)
            GROUP BY 1
        ), read AS (
            SELECT rowid + 1 AS nth, line FROM batch_read  -- rowid follows the file: insertion order is kept
        )
        SELECT nth + coalesce(rejected_so_far, 0) AS source_line, line, NULL AS read_reason
        FROM read ASOF LEFT JOIN shifts ON read.nth > shifts.read_before
        WHERE trim(line) <> ''
        UNION ALL
        SELECT source_line, left(line, {QUARANTINED_PREFIX_CHARS}),
            CASE error_type WHEN 'INVALID ENCODING' THEN 'invalid_utf8'
                            WHEN 'LINE SIZE OVER MAXIMUM' THEN 'line_too_long'
                            ELSE 'unreadable_line' END
        FROM rejected
        """
    )


def _check_batch(con: duckdb.DuckDBPyConnection, config: FlywheelConfig, domain: str, batch: _Batch,
                 now: datetime) -> None:
    """Parse each line of ``batch_lines`` once, give it its first broken rule (or none) and its day
    partition, into ``checked_lines``."""
    skew = timedelta(minutes=events.CLOCK_SKEW_MINUTES)
    reason = events.reason_sql(tuple(config.domains))
    con.execute(
        f"""
        INSERT INTO checked_lines BY NAME
        WITH parsed AS (
            SELECT *, CASE WHEN read_reason IS NULL THEN TRY_CAST(line AS JSON) END AS doc FROM batch_lines
        ), fielded AS (
            SELECT *, {events.fields_sql("doc")} AS fields FROM parsed
        ), typed AS (
            SELECT *,
                json_extract_string(fields.event_type, '$') AS event_type,
                json_extract_string(fields.event_id, '$') AS event_id,
                CASE WHEN regexp_matches(json_extract_string(fields.timestamp, '$'), '{events.TIMESTAMP_PATTERN}')
                     THEN timezone('UTC', TRY_CAST(json_extract_string(fields.timestamp, '$') AS TIMESTAMPTZ))
                END AS event_ts,
                $domain AS batch_domain,
                least($now::TIMESTAMP, $batch_day + INTERVAL 1 DAY) + $skew::INTERVAL AS latest_allowed_ts
            FROM fielded
        ), reasoned AS (
            SELECT *, {reason} AS contract_reason FROM typed
        )
        SELECT $file AS source_file, $batch_day AS batch_day, source_line, line, fields, event_type, event_id,
            event_ts, hash(fields) AS content,
            CASE WHEN event_ts IS NULL OR CAST(event_ts AS DATE) > $batch_day THEN $batch_day
                 WHEN $batch_day - CAST(event_ts AS DATE) > $lateness THEN $batch_day
                 ELSE CAST(event_ts AS DATE) END AS event_date,
            coalesce(read_reason,
                     CASE WHEN $batch_day > CAST($now::TIMESTAMP + $skew::INTERVAL AS DATE) THEN 'future_batch' END,
                     contract_reason,
                     CASE WHEN $batch_day - CAST(event_ts AS DATE) > $lateness THEN 'too_late' END) AS reason
        FROM reasoned
        """,
        {
            "file": batch.file,
            "batch_day": batch.day,
            "domain": domain,
            "now": now.astimezone(UTC).replace(tzinfo=None),
            "skew": skew,
            "lateness": config.max_lateness_days,
        },
    )


def _quarantine_batch(con: duckdb.DuckDBPyConnection, batch: _Batch, reason: str) -> None:
    """Every line of ``batch_lines`` quarantined with ``reason`` in the batch's day partition."""
    con.execute(
        f"""
        INSERT INTO checked_lines BY NAME
        SELECT $file AS source_file, $batch_day AS batch_day, source_line,
               left(line, {QUARANTINED_PREFIX_CHARS}) AS line, $batch_day AS event_date, $reason AS reason
        FROM batch_lines
        """,
        {"file": batch.file, "batch_day": batch.day, "reason": reason},
    )


def _read_batches(con: duckdb.DuckDBPyConnection, home: Home, config: FlywheelConfig, domain: str,
                  batches: list[Path], now: datetime) -> dict[str, str]:
    """Every line of every batch into ``checked_lines``, one batch at a time: a batch that cannot be
    read is quarantined as one row (line 0, saying why), one that runs out of memory while checked
    line by line, and the others still land. Returns those batches' problems, each naming its file."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE checked_lines ({_CHECKED_COLUMNS})")
    problems = {}
    for path in batches:
        batch = _Batch(str(path.relative_to(home.landing)), date.fromisoformat(path.stem))
        try:
            _read_batch(con, path, config.landing.max_line_bytes)
        except duckdb.Error as error:
            problems[batch.file] = _problem(batch, "cannot be read", error)
            con.execute("CREATE OR REPLACE TEMP TABLE batch_lines AS SELECT 0::BIGINT AS source_line, ? AS line",
                        [problems[batch.file]])
            _quarantine_batch(con, batch, "unreadable_file")
            continue
        try:
            _check_batch(con, config, domain, batch, now)
        except duckdb.OutOfMemoryException as error:
            problems[batch.file] = _problem(batch, "ran out of memory while checked, its lines are quarantined", error)
            _quarantine_batch(con, batch, "out_of_memory")
    return problems


def _problem(batch: _Batch, what: str, error: duckdb.Error) -> str:
    """``assistant/2026-11-02.jsonl cannot be read: <DuckDB's first line>``, with what to do about memory."""
    advice = (" (raise warehouse.memory_limit or lower landing.max_line_bytes)"
              if isinstance(error, duckdb.OutOfMemoryException) else "")
    return f"{batch.file} {what}{advice}: {str(error).strip().splitlines()[0]}"


def _mark_duplicates(con: duckdb.DuckDBPyConnection, domain: str, dates: list[date]) -> None:
    """Keep this run's partitions' lines; an event id seen before in the batches read (in batch, file,
    line order) is a duplicate, a ``conflicting_duplicate`` when its content differs from the first
    copy's; one already kept in another partition is a duplicate too."""
    kept_elsewhere = " UNION ALL ".join(
        f"SELECT event_id FROM raw.{table} WHERE NOT (domain = $domain AND event_date IN $dates)"
        for table in _RAW_EVENT_TABLES
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE partition_lines AS
        WITH kept_elsewhere AS ({kept_elsewhere}), copies AS (
            SELECT *,
                row_number() OVER first_copy > 1 AS repeated,
                content <> first_value(content) OVER first_copy AS conflicting
            FROM checked_lines
            WINDOW first_copy AS (PARTITION BY CASE WHEN reason IS NULL THEN event_id END
                                  ORDER BY batch_day, source_file, source_line)
        )
        SELECT * EXCLUDE (reason, repeated, conflicting, content),
            CASE WHEN reason IS NOT NULL THEN reason
                 WHEN repeated AND conflicting THEN 'conflicting_duplicate'
                 WHEN repeated OR event_id IN (SELECT event_id FROM kept_elsewhere) THEN 'duplicate_event_id'
            END AS reason
        FROM copies
        WHERE event_date IN $dates
        """,
        {"domain": domain, "dates": dates},
    )


_INSERTS = {
    "interactions": """
        INSERT INTO raw.interactions
        SELECT event_id, $domain, event_date, event_ts, fields.user_id->>'$', fields.session_id->>'$',
               fields.interaction_id->>'$', fields.model_version->>'$', fields.policy->>'$', fields.consent->>'$',
               fields.input->>'$', fields.context, source_file, source_line,
               coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'interaction'""",
    "impressions": f"""
        INSERT INTO raw.impressions
        SELECT event_id, $domain, event_date, interaction_id,
               imp.item_id, imp.position, imp.propensity, imp.content
        FROM (
            SELECT event_id, event_date, fields.interaction_id->>'$' AS interaction_id,
                   unnest(from_json(fields.impressions, '{_IMPRESSION_SCHEMA}')) AS imp
            FROM partition_lines WHERE reason IS NULL AND event_type = 'interaction'
        )""",
    "signals": """
        INSERT INTO raw.signals
        SELECT event_id, $domain, event_date, event_ts, fields.user_id->>'$', fields.session_id->>'$',
               fields.interaction_id->>'$', fields.signal_type->>'$', fields.item_id->>'$',
               TRY_CAST(fields.value AS DOUBLE), fields.text->>'$', source_file, source_line,
               coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'signal'""",
    "outcomes": """
        INSERT INTO raw.outcomes
        SELECT event_id, $domain, event_date, event_ts, fields.user_id->>'$', fields.session_id->>'$',
               fields.interaction_id->>'$', fields.name->>'$', TRY_CAST(fields.value AS DOUBLE),
               fields.item_id->>'$', source_file, source_line, coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'outcome'""",
    "labels": """
        INSERT INTO raw.labels
        SELECT event_id, $domain, event_date, event_ts, fields.user_id->>'$', fields.session_id->>'$',
               fields.interaction_id->>'$', fields.item_id->>'$', fields.reviewer->>'$', fields.verdict->>'$',
               source_file, source_line, coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'label'""",
    "quarantine": """
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
