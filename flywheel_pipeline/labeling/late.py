"""Late labels: outcomes and reviews that arrive after their interaction's partition was labelled."""

from __future__ import annotations

from datetime import date, datetime

import polars as pl

from flywheel_pipeline.sources import INTERACTIONS, LABELS, Readable, as_source

# Raw tables whose rows label an earlier interaction: delayed outcomes and human reviews.
_LATE_SOURCES = ("raw.outcomes", "raw.labels")


def late_outcome_partitions(
    warehouse: Readable, domain: str, since: datetime | None
) -> tuple[list[tuple[str, date]], datetime | None]:
    """``domain``'s labelled (domain, day) partitions whose interactions got outcomes or review
    labels ingested after ``since`` and after the partition was labelled; and the newest such
    ingestion time seen (the cursor). Reads only the columns it compares (a sensor's tick)."""
    source = as_source(warehouse)
    arrived = [rows for table in _LATE_SOURCES
               if (rows := source.read(table, domain, columns=["interaction_id", "ingested_at"])).width]
    labelled = source.read(LABELS, domain, columns=["event_date", "labelled_at"])
    if not arrived or not labelled.width:  # a table not written yet (in a store: none of its rows yet)
        return [], since
    arrivals = pl.concat(arrived)
    if since is not None:
        arrivals = arrivals.filter(pl.col("ingested_at") > since)
    newest = arrivals["ingested_at"].max()
    if newest is None:
        return [], since
    days = source.read(INTERACTIONS, domain, columns=["event_date", "interaction_id"])
    stale = (arrivals.join(days, on="interaction_id").group_by("event_date").agg(arrived_at=pl.col("ingested_at").max())
             .join(labelled.group_by("event_date").agg(pl.col("labelled_at").min()), on="event_date")
             .filter(pl.col("arrived_at") > pl.col("labelled_at")).sort("event_date"))
    return [(domain, day) for day in stale["event_date"]], newest
