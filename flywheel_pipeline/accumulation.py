"""Accumulation: landing batches -> raw tables, one (day, domain) partition at a time.

Every non-blank landing line is attributed to exactly one day partition: the UTC day of its own
timestamp, or the day of the batch that brought it when the timestamp is unusable (or after the
batch's day, or more than ``max_lateness_days`` before it). A partition's lines are either accepted
into ``raw.interactions/impressions/signals/outcomes/labels`` or quarantined in ``raw.quarantine``
with a reason, so lines in = accepted + quarantined. A domain's landing folder holds the product's
daily batches (``<day>.jsonl``) and the review queue's (``labels/<day>.jsonl``: ``label`` events).
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
        }


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


def _load_lines(con: duckdb.DuckDBPyConnection, home: Home, batches: list[Path]) -> None:
    """Every non-blank line of the batches, with its batch day, file (relative to landing) and number."""
    files = [str(path) for path in batches]
    prefix = str(home.landing) + "/"
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE landing_lines AS
        WITH batches AS (
            SELECT filename, string_split(replace(content, chr(13), ''), chr(10)) AS lines
            FROM read_text(?)
        ), numbered AS (
            SELECT replace(filename, ?, '') AS source_file,
                   CAST(regexp_extract(filename, '(\\d{4}-\\d{2}-\\d{2})\\.jsonl$', 1) AS DATE) AS batch_day,
                   unnest(lines) AS line,
                   unnest(generate_series(1, len(lines))) AS source_line
            FROM batches
        )
        SELECT * FROM numbered WHERE trim(line) <> ''
        """,
        [files, prefix],
    )


def _check_lines(con: duckdb.DuckDBPyConnection, config: FlywheelConfig, domain: str, now: datetime) -> None:
    """Parse each line, give it its first broken rule (or none) and its day partition."""
    skew = timedelta(minutes=events.CLOCK_SKEW_MINUTES)
    reason = events.reason_sql(tuple(config.domains))
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE checked_lines AS
        WITH parsed AS (
            SELECT *, CASE WHEN json_valid(line) THEN line::JSON END AS doc FROM landing_lines
        ), typed AS (
            SELECT *,
                json_extract_string(doc, '$.event_type') AS event_type,
                json_extract_string(doc, '$.event_id') AS event_id,
                CASE WHEN regexp_matches(json_extract_string(doc, '$.timestamp'), '{events.TIMESTAMP_PATTERN}')
                     THEN timezone('UTC', TRY_CAST(json_extract_string(doc, '$.timestamp') AS TIMESTAMPTZ))
                END AS event_ts,
                $domain AS batch_domain,
                least($now::TIMESTAMP, batch_day + INTERVAL 1 DAY) + $skew::INTERVAL AS latest_allowed_ts
            FROM parsed
        ), reasoned AS (
            SELECT *, {reason} AS contract_reason FROM typed
        ), attributed AS (
            SELECT *,
                CASE WHEN event_ts IS NULL OR CAST(event_ts AS DATE) > batch_day THEN batch_day
                     WHEN batch_day - CAST(event_ts AS DATE) > $lateness THEN batch_day
                     ELSE CAST(event_ts AS DATE) END AS event_date,
                coalesce(contract_reason,
                    CASE WHEN batch_day - CAST(event_ts AS DATE) > $lateness THEN 'too_late' END) AS reason
            FROM reasoned
        )
        SELECT * EXCLUDE (contract_reason),
            reason IS NULL AND row_number() OVER (
                PARTITION BY CASE WHEN reason IS NULL THEN event_id END
                ORDER BY batch_day, source_file, source_line) > 1 AS repeated
        FROM attributed
        """,
        {
            "domain": domain,
            "now": now.astimezone(UTC).replace(tzinfo=None),
            "skew": skew,
            "lateness": config.max_lateness_days,
        },
    )


def _mark_duplicates(con: duckdb.DuckDBPyConnection, domain: str, dates: list[date]) -> None:
    """Keep this run's lines; a repeated event id, or one already kept in another partition, is a duplicate."""
    kept_elsewhere = " UNION ALL ".join(
        f"SELECT event_id FROM raw.{table} WHERE NOT (domain = $domain AND event_date IN $dates)"
        for table in _RAW_EVENT_TABLES
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE partition_lines AS
        WITH kept_elsewhere AS ({kept_elsewhere})
        SELECT * EXCLUDE (reason, repeated),
            CASE WHEN reason IS NOT NULL THEN reason
                 WHEN repeated OR event_id IN (SELECT event_id FROM kept_elsewhere) THEN 'duplicate_event_id'
            END AS reason
        FROM checked_lines
        WHERE event_date IN $dates
        """,
        {"domain": domain, "dates": dates},
    )


_INSERTS = {
    "interactions": """
        INSERT INTO raw.interactions
        SELECT event_id, $domain, event_date, event_ts, doc->>'user_id', doc->>'session_id',
               doc->>'interaction_id', doc->>'model_version', doc->>'policy', doc->>'consent',
               doc->>'input', json_extract(doc, '$.context'), source_file, source_line,
               coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'interaction'""",
    "impressions": f"""
        INSERT INTO raw.impressions
        SELECT event_id, $domain, event_date, interaction_id,
               imp.item_id, imp.position, imp.propensity, imp.content
        FROM (
            SELECT event_id, event_date, doc->>'interaction_id' AS interaction_id,
                   unnest(from_json(json_extract(doc, '$.impressions'), '{_IMPRESSION_SCHEMA}')) AS imp
            FROM partition_lines WHERE reason IS NULL AND event_type = 'interaction'
        )""",
    "signals": """
        INSERT INTO raw.signals
        SELECT event_id, $domain, event_date, event_ts, doc->>'user_id', doc->>'session_id',
               doc->>'interaction_id', doc->>'signal_type', doc->>'item_id',
               TRY_CAST(json_extract(doc, '$.value') AS DOUBLE), doc->>'text', source_file, source_line,
               coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'signal'""",
    "outcomes": """
        INSERT INTO raw.outcomes
        SELECT event_id, $domain, event_date, event_ts, doc->>'user_id', doc->>'session_id',
               doc->>'interaction_id', doc->>'name', TRY_CAST(json_extract(doc, '$.value') AS DOUBLE),
               doc->>'item_id', source_file, source_line, coalesce(first_ingested.ingested_at, $now)
        FROM partition_lines LEFT JOIN first_ingested USING (event_id)
        WHERE reason IS NULL AND event_type = 'outcome'""",
    "labels": """
        INSERT INTO raw.labels
        SELECT event_id, $domain, event_date, event_ts, doc->>'user_id', doc->>'session_id',
               doc->>'interaction_id', doc->>'item_id', doc->>'reviewer', doc->>'verdict',
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


def _report(con: duckdb.DuckDBPyConnection, domain: str, dates: list[date], batches: list[Path]) -> AccumulationReport:
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
    batches = batches_for(home, domain, dates, config.max_lateness_days)
    con.execute("CREATE OR REPLACE TEMP TABLE landing_lines (source_file VARCHAR, batch_day DATE, line VARCHAR, source_line BIGINT)")
    if batches:
        _load_lines(con, home, batches)
    _check_lines(con, config, domain, now)
    _mark_duplicates(con, domain, dates)
    privacy.protect_partition_lines(con)  # redaction, forgotten users
    _replace_partitions(con, domain, dates, now)
    report = _report(con, domain, dates, batches)
    if not report.reconciles:
        raise AssertionError(f"accumulation does not reconcile: {report.metadata()}")
    return report
