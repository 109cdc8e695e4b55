"""Late labels: outcomes and reviews that arrive after their interaction's partition was labelled."""

from __future__ import annotations

from datetime import date, datetime

import duckdb

# Raw tables whose rows label an earlier interaction: delayed outcomes and human reviews.
_LATE_SOURCES = ("outcomes", "labels")


def late_outcome_partitions(
    con: duckdb.DuckDBPyConnection, since: datetime | None
) -> tuple[list[tuple[str, date]], datetime | None]:
    """Labelled (domain, day) partitions whose interactions got outcomes or review labels ingested
    after ``since`` and after the partition was labelled; and the newest such ingestion time seen
    (the cursor)."""
    if not _has_labels(con):
        return [], since
    arrivals = " UNION ALL ".join(
        f"SELECT domain, interaction_id, ingested_at FROM raw.{table}" for table in _LATE_SOURCES
    )
    newest = con.execute(
        f"SELECT max(ingested_at) FROM ({arrivals}) WHERE ingested_at > coalesce(?, TIMESTAMP '1970-01-01')",
        [since],
    ).fetchone()[0]
    if newest is None:
        return [], since
    stale = con.execute(
        f"""
        WITH arrived AS (
            SELECT i.domain, i.event_date, max(o.ingested_at) AS arrived_at
            FROM ({arrivals}) o JOIN raw.interactions i USING (domain, interaction_id)
            WHERE o.ingested_at > coalesce(?, TIMESTAMP '1970-01-01') AND o.ingested_at <= ?
            GROUP BY ALL
        ), labelled AS (
            SELECT domain, event_date, min(labelled_at) AS labelled_at
            FROM labels.impression_labels GROUP BY ALL
        )
        SELECT domain, event_date FROM arrived JOIN labelled USING (domain, event_date)
        WHERE arrived_at > labelled_at ORDER BY domain, event_date
        """,
        [since, newest],
    ).fetchall()
    return [(domain, day) for domain, day in stale], newest


def _has_labels(con: duckdb.DuckDBPyConnection) -> bool:
    tables = [("labels", "impression_labels")] + [("raw", table) for table in _LATE_SOURCES]
    return con.execute(
        f"""SELECT count(*) FROM information_schema.tables
           WHERE (table_schema, table_name) IN ({", ".join(f"('{s}', '{t}')" for s, t in tables)})"""
    ).fetchone()[0] == len(tables)
