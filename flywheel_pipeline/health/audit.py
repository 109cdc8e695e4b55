"""The flywheel_health audit over the warehouse, and the history of its measures (health.measures).

The measures' frames (``measures.py``) are read for the candidate's windows: the training and
held-out impressions with their labels and the batch days their interactions and label evidence
were delivered on, the delayed outcomes' claimed and delivered delays, and each user's active days.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import polars as pl

from flywheel_pipeline.batches import batch_day
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.events import CLICK_MATURITY
from flywheel_pipeline.groups import anonymised, declared_segments
from flywheel_pipeline.health import HealthReport, measures
from flywheel_pipeline.monitoring import MONITOR_TABLE
from flywheel_pipeline.sources import Scope
from flywheel_pipeline.training.base import SERVING_TIME_COLUMNS, Windows
from flywheel_pipeline.warehouse import transaction

MEASURES_DDL = """
CREATE SCHEMA IF NOT EXISTS health;
CREATE TABLE IF NOT EXISTS health.measures (
    domain VARCHAR, as_of DATE, champion VARCHAR, candidate_model_uri VARCHAR, trap VARCHAR,
    measure VARCHAR, value DOUBLE, audited_at TIMESTAMP
);
"""
MEASURE_COLUMNS = {
    "domain": pl.String, "as_of": pl.Date, "champion": pl.String, "candidate_model_uri": pl.String,
    "trap": pl.String, "measure": pl.String, "value": pl.Float64, "audited_at": pl.Datetime("us"),
}
MEASURES_TABLE = "health.measures"
# raw tables whose rows are a label's evidence: signals, outcomes, reviews
EVIDENCE_TABLES = ("raw.signals", "raw.outcomes", "raw.labels")


def copy_scope(windows: Windows) -> Scope:
    """What the audit holds in a working copy: what it reads from its training window's first day
    on (later evidence included), and whole the measures it adds to and the monitor's looks the
    report's calibration reads."""
    return Scope.since(windows.train_start, ("raw.interactions", *EVIDENCE_TABLES, "marts.fct_impressions",
                                             "marts.fct_interactions", "labels.impression_labels"),
                       whole=(MEASURES_TABLE, MONITOR_TABLE))


def audit(con: duckdb.DuckDBPyConnection, config: FlywheelConfig, domain: str, windows: Windows,
          mature_until: date | None, champion: str, candidate_model_uri: str) -> HealthReport:
    """One Finding per trap over the candidate's training and held-out windows. A segment is named by
    its ``groups.anonymous`` hash unless the domain declares it (its measures reach health.measures,
    the report and MLflow: no text the product sent)."""
    settings = config.domain(domain)
    health = settings.health
    con.register("delivery_days", _delivery_days(con, domain))
    try:
        rows = _impressions(con, domain, windows.train_start, windows.holdout_end)
        outcomes = _outcomes(con, domain, windows, settings.label_maturity.outcome)
    finally:
        con.unregister("delivery_days")
    rows = rows.with_columns(segment=anonymised(pl.col("segment"), declared_segments(settings.groups)))
    training = rows.filter(pl.col("event_date") <= windows.train_end)
    holdout = rows.filter(pl.col("event_date") >= windows.holdout_start)
    findings = (
        measures.exposure_bias(training, health, settings.shape, served=rows),
        measures.survivorship(training, _activity(con, domain, windows), health),
        measures.label_delay(outcomes, windows, settings),
        measures.leakage(training, holdout, health),
        measures.self_consumption(training, health),
        measures.diversity(rows, health),
        measures.vocal_minority(training, health),
        measures.popularity(training, health),
        measures.engagement(training, health),
    )
    return HealthReport(domain, windows.holdout_end, windows.train_start, windows.train_end,
                        windows.holdout_start, mature_until, champion, candidate_model_uri,
                        findings)


def _delivery_days(con: duckdb.DuckDBPyConnection, domain: str) -> pl.DataFrame:
    """source_file, delivered: the day each of the domain's landing batches was delivered."""
    files = con.sql(
        " UNION ".join(f"SELECT DISTINCT source_file FROM {table} WHERE domain = $domain"
                       for table in ("raw.interactions", *EVIDENCE_TABLES)),
        params={"domain": domain},
    ).fetchall()
    return pl.DataFrame(
        {"source_file": [name for (name,) in files],
         "delivered": [batch_day(Path(name)) for (name,) in files]},
        schema={"source_file": pl.String, "delivered": pl.Date},
    )


def _impressions(
    con: duckdb.DuckDBPyConnection, domain: str, start: date, end: date
) -> pl.DataFrame:
    """Impressions of [start, end]: serving-time columns, p_good, audit_review_value, clicked,
    outcome_value, the number of candidates their interaction logged, and the days
    their interaction and its first label evidence were delivered."""
    columns = ", ".join(f"i.{name}" for name in SERVING_TIME_COLUMNS)
    evidence = " UNION ALL ".join(
        f"SELECT interaction_id, source_file FROM {table} "
        "WHERE domain = $domain AND event_date >= $start"
        for table in EVIDENCE_TABLES)
    return con.sql(
        f"""WITH delivered AS (
                SELECT interaction_id, min(d.delivered) AS interaction_delivered,
                       any_value(json_array_length(context, '$.candidates')) AS candidates
                FROM raw.interactions JOIN delivery_days AS d USING (source_file)
                WHERE domain = $domain AND event_date BETWEEN $start AND $end
                GROUP BY interaction_id),
            evidence AS (
                SELECT interaction_id, min(d.delivered) AS evidence_delivered
                FROM ({evidence}) JOIN delivery_days AS d USING (source_file)
                GROUP BY interaction_id)
            SELECT {columns}, l.p_good, i.audit_review_value, i.clicked, i.outcome_value,
                   delivered.candidates, delivered.interaction_delivered, evidence.evidence_delivered
            FROM marts.fct_impressions AS i
            LEFT JOIN labels.impression_labels AS l
              USING (domain, event_date, interaction_id, item_id)
            LEFT JOIN delivered USING (interaction_id)
            LEFT JOIN evidence USING (interaction_id)
            WHERE i.domain = $domain AND i.event_date BETWEEN $start AND $end""",
        params={"domain": domain, "start": start, "end": end},
    ).pl()


def _outcomes(
    con: duckdb.DuckDBPyConnection, domain: str, windows: Windows, maturity: str
) -> pl.DataFrame:
    """name, event_date, served_at, delay_s, delivered: each outcome (and, for a click-maturity
    domain, each click) of the windows' interactions."""
    clicks = (
        "UNION ALL SELECT interaction_id, 'click' AS name, event_ts, source_file FROM raw.signals"
        " WHERE domain = $domain AND signal_type = 'click' AND event_date >= $start"
        if maturity == CLICK_MATURITY else ""
    )
    return con.sql(
        f"""WITH served AS (
                SELECT DISTINCT interaction_id, event_date, served_at FROM marts.fct_interactions
                WHERE domain = $domain AND event_date BETWEEN $start AND $end),
            reactions AS (
                SELECT interaction_id, name, event_ts, source_file FROM raw.outcomes
                WHERE domain = $domain AND event_date >= $start {clicks})
            SELECT r.name, s.event_date, s.served_at,
                   epoch(r.event_ts) - epoch(s.served_at) AS delay_s, d.delivered
            FROM reactions AS r JOIN served AS s USING (interaction_id)
            JOIN delivery_days AS d USING (source_file)""",
        params={"domain": domain, "start": windows.train_start, "end": windows.holdout_end},
    ).pl()


def _activity(con: duckdb.DuckDBPyConnection, domain: str, windows: Windows) -> pl.DataFrame:
    """user_id, event_date: the days each user interacted, from the training window to as_of."""
    return con.sql(
        """SELECT DISTINCT user_id, event_date FROM marts.fct_interactions
           WHERE domain = $domain AND event_date BETWEEN $start AND $end""",
        params={"domain": domain, "start": windows.train_start, "end": windows.holdout_end},
    ).pl()


def save_measures(con: duckdb.DuckDBPyConnection, report: HealthReport,
                  validation: dict[str, float] | None = None) -> int:
    """Replace the audit's rows of (domain, as_of, candidate) in health.measures (``validation``'s
    under trap ``validation``); returns how many were written. NaN is stored as NULL."""
    audited_at = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    values = [(finding.trap, name, value) for finding in report.findings
              for name, value in finding.measures.items()]
    values += [("validation", name, value) for name, value in (validation or {}).items()]
    rows = [(report.domain, report.as_of, report.champion, report.candidate_model_uri, trap, name,
             None if value is None or math.isnan(value) else float(value), audited_at)
            for trap, name, value in values]
    con.execute(MEASURES_DDL)
    with transaction(con):
        con.execute("DELETE FROM health.measures "
                    "WHERE domain = ? AND as_of = ? AND candidate_model_uri = ?",
                    [report.domain, report.as_of, report.candidate_model_uri])
        if rows:
            con.executemany("INSERT INTO health.measures VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


def measure_history(con: duckdb.DuckDBPyConnection, domain: str) -> pl.DataFrame:
    """Every audit's measures of ``domain``, oldest first (empty before the first audit)."""
    tables = con.sql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'health'")
    if ("measures",) not in tables.fetchall():
        return pl.DataFrame(schema=MEASURE_COLUMNS)
    return con.sql(
        "SELECT * FROM health.measures WHERE domain = $domain "
        "ORDER BY as_of, audited_at, trap, measure",
        params={"domain": domain},
    ).pl()
