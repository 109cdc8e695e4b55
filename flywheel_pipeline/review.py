"""The review queue: which impressions people judge, and the files their review tool imports.

Each (day, domain) partition queues up to ``review.daily_budget`` impressions (flywheel.yaml):
- the **audit slice**, ``audit_fraction`` of the budget: the impressions of the day first in a fixed
  pseudo-random order (an md5 of their ids), whatever the label model says, so it is a uniform
  sample of the day's impressions, gold for validation like the product's own ``audit_share``.
  With protected groups and ``groups.min_reviews`` (docs/fairness.md) it is stratified: each
  protected group gets its share of the slice, and at least ``min_reviews`` of its impressions,
  the rest of the traffic what is left; within a stratum it stays uniform, and each row's
  ``design_weight`` (the stratum's impressions per review, over the day's) weighs its verdict
  back in validation's aggregate, so an over-sampled group counts as much as it serves;
- **uncertainty**, the rest: the labelled impressions outside the audit slice whose ``p_good`` is
  nearest 0.5, where a review teaches the label model most (its calibration may use them; validation
  may not: they are no random sample).
An impression already reviewed is never queued again: one the product's audit reviewed stays out,
and a queued one that came back stays in its day's queue as done (it still counts against the
budget), so re-running a partition gives the same queue until reviews or labels change.

``labels.review_queue`` holds the selection; the pending (not yet reviewed) rows of each day are
exported under ``<home>/review/<domain>/``: ``<day>.label-studio.json`` (Label Studio tasks, with
``label-studio-config.xml``, the labeling interface) and ``<day>.argilla.json`` (records for
Argilla's ``dataset.records.log``). The ids each task carries come back in the tool's export, which
``flywheel_pipeline.importers.reviews`` turns into ``label`` events naming the selection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import polars as pl

from flywheel_pipeline.config import Groups, ReviewQueue
from flywheel_pipeline.events import SELECTIONS
from flywheel_pipeline.groups import assign
from flywheel_pipeline.home import write_atomically
from flywheel_pipeline.sources import Scope
from flywheel_pipeline.warehouse import transaction

QUEUE_DDL = """
CREATE SCHEMA IF NOT EXISTS labels;
CREATE TABLE IF NOT EXISTS labels.review_queue (
    domain VARCHAR NOT NULL, event_date DATE NOT NULL, interaction_id VARCHAR NOT NULL,
    item_id VARCHAR NOT NULL, selection VARCHAR NOT NULL, p_good DOUBLE, queued_at TIMESTAMP NOT NULL
);
ALTER TABLE labels.review_queue ADD COLUMN IF NOT EXISTS design_weight DOUBLE DEFAULT 1.0;
"""
AUDIT, UNCERTAINTY = SELECTIONS
AUDIT_ORDER_SALT = "flywheel-review-audit"  # the audit slice's order: md5(salt, domain, ids)
VERDICT_CONTROL = "verdict"  # the Label Studio Choices / Argilla question reviewers answer
# What each task carries so that its review maps back to the impression (task data, record metadata).
TASK_IDS = ["domain", "event_date", "interaction_id", "item_id", "position", "user_id", "session_id",
            "selection", "p_good"]
LABEL_STUDIO_CONFIG = f"""<View>
  <Header value="The query or request context"/>
  <Text name="input" value="$input"/>
  <Header value="What was shown: the response, or the item"/>
  <Text name="content" value="$content"/>
  <Header value="Is it good for this query?"/>
  <Choices name="{VERDICT_CONTROL}" toName="content" choice="single" showInline="true" required="true">
    <Choice value="good"/>
    <Choice value="bad"/>
  </Choices>
</View>
"""


@dataclass(frozen=True)
class QueueReport:
    """What one run queued and wrote."""

    domain: str
    per_day: pl.DataFrame  # event_date, audit, uncertainty, pending
    files: list[Path]

    def day_metadata(self, day: date) -> dict[str, object]:
        rows = self.per_day.filter(pl.col("event_date") == day)
        audit, uncertainty, pending = rows.row(0)[1:] if rows.height else (0, 0, 0)
        return {"queued_audit": audit, "queued_uncertainty": uncertainty, "pending": pending,
                "files": ", ".join(str(path) for path in self.files if path.name.startswith(day.isoformat()))}

    def metadata(self) -> dict[str, object]:
        audit, uncertainty, pending = self.per_day.select(pl.col("audit", "uncertainty", "pending").sum()).row(0)
        return {"domain": self.domain, "queued_audit": audit, "queued_uncertainty": uncertainty, "pending": pending,
                "files": ", ".join(str(path) for path in self.files)}


def review_folder(home_root: Path, domain: str) -> Path:
    return home_root / "review" / domain


def copy_scope(days: list[date]) -> Scope:
    """What a run of ``days`` holds in a working copy: the queue and the days' impressions and
    labels, and the reviews, which land on any later day, whole."""
    return Scope.of(days, ("labels.review_queue", "marts.fct_impressions", "labels.impression_labels"),
                    whole=("raw.labels",))


def queue_for_review(con: duckdb.DuckDBPyConnection, home_root: Path, domain: str, days: list[date],
                     settings: ReviewQueue, now: datetime | None = None, groups: Groups | None = None) -> QueueReport:
    """Select ``domain``'s impressions of ``days`` for review (the audit slice stratified by
    ``groups``' protected ones), replace those partitions of labels.review_queue in one
    transaction, and export each day's pending reviews."""
    now = (now or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None)
    con.execute(QUEUE_DDL)
    impressions = candidates(con, domain, days)
    previous = con.sql("SELECT * FROM labels.review_queue WHERE domain = $domain AND event_date IN $days",
                       params={"domain": domain, "days": days}).pl()
    queue = select(impressions, previous, settings, now, groups)
    with transaction(con):
        con.execute("DELETE FROM labels.review_queue WHERE domain = $domain AND event_date IN $days",
                    {"domain": domain, "days": days})
        con.register("queued_rows", queue.to_arrow())
        try:
            con.execute("INSERT INTO labels.review_queue BY NAME SELECT * FROM queued_rows")
        finally:
            con.unregister("queued_rows")
    pending = queue.join(impressions.filter(~pl.col("reviewed")).drop("p_good"),
                         on=["domain", "event_date", "interaction_id", "item_id"])
    files = export(review_folder(home_root, domain), pending, days)
    per_day = (pl.DataFrame({"event_date": days}, schema={"event_date": pl.Date})
               .join(queue.group_by("event_date").agg(
                   (pl.col("selection") == AUDIT).sum().alias("audit"),
                   (pl.col("selection") == UNCERTAINTY).sum().alias("uncertainty")), on="event_date", how="left")
               .join(pending.group_by("event_date").agg(pl.len().alias("pending")), on="event_date", how="left")
               .fill_null(0).sort("event_date"))
    return QueueReport(domain, per_day, files)


def candidates(con: duckdb.DuckDBPyConnection, domain: str, days: list[date]) -> pl.DataFrame:
    """The days' impressions (marts.fct_impressions) with their p_good, their audit order, whether a
    review of them has landed (raw.labels), and what a reviewer sees."""
    [(has_reviews,)] = con.execute("SELECT count(*) FROM information_schema.tables "
                                   "WHERE table_schema = 'raw' AND table_name = 'labels'").fetchall()
    reviewed = ("SELECT DISTINCT interaction_id, item_id FROM raw.labels WHERE domain = $domain"
                if has_reviews else "SELECT NULL::VARCHAR AS interaction_id, NULL::VARCHAR AS item_id LIMIT 0")
    return con.sql(
        f"""SELECT i.domain, i.event_date, i.interaction_id, i.item_id, i.position, i.user_id, i.session_id, i.segment,
                   coalesce(i.input_text, '') AS input, coalesce(i.item_content, '') AS content, l.p_good,
                   md5(concat_ws(':', '{AUDIT_ORDER_SALT}', i.domain, i.interaction_id, i.item_id)) AS audit_order,
                   r.item_id IS NOT NULL AS reviewed
            FROM marts.fct_impressions AS i
            LEFT JOIN labels.impression_labels AS l USING (domain, event_date, interaction_id, item_id)
            LEFT JOIN ({reviewed}) AS r USING (interaction_id, item_id)
            WHERE i.domain = $domain AND i.event_date IN $days
            ORDER BY i.event_date, audit_order""",
        params={"domain": domain, "days": days},
    ).pl()


def select(impressions: pl.DataFrame, previous: pl.DataFrame, settings: ReviewQueue,
           now: datetime, groups: Groups | None = None) -> pl.DataFrame:
    """Rows of labels.review_queue for the days of ``impressions`` (``candidates``): per day the
    queued impressions already reviewed (done, as they were selected), the audit slice's pending
    ones, and the most uncertain pending ones to fill the budget; a row queued before keeps its
    queued_at."""
    n_audit = round(settings.daily_budget * settings.audit_fraction)
    key = ["domain", "event_date", "interaction_id", "item_id"]
    ranked = audit_slice(impressions, n_audit, groups)
    done = ranked.filter(pl.col("reviewed")).join(previous.select(*key, "selection"), on=key)
    done_uncertain = done.filter(pl.col("selection") == UNCERTAINTY).group_by("event_date").agg(kept=pl.len().cast(pl.Int64))
    uncertain = (
        ranked.filter(~pl.col("in_audit_slice") & ~pl.col("reviewed") & pl.col("p_good").is_not_null())
        .sort("event_date", (pl.col("p_good") - 0.5).abs(), "audit_order")
        .join(done_uncertain, on="event_date", how="left", maintain_order="left")  # the first are the most uncertain
        .filter(pl.int_range(pl.len()).over("event_date")
                < settings.daily_budget - n_audit - pl.col("kept").fill_null(0))
    )
    queued = pl.concat([
        done.select(*key, "selection", "p_good", "design_weight"),
        ranked.filter(pl.col("in_audit_slice") & ~pl.col("reviewed")).select(
            *key, pl.lit(AUDIT).alias("selection"), "p_good", "design_weight"),
        uncertain.select(*key, pl.lit(UNCERTAINTY).alias("selection"), "p_good", pl.lit(1.0).alias("design_weight")),
    ])
    return (queued.join(previous.select(*key, "queued_at"), on=key, how="left")
            .with_columns(pl.col("queued_at").fill_null(pl.lit(now)).cast(pl.Datetime("us")))
            .sort("event_date", "selection", "interaction_id", "item_id"))


def audit_slice(impressions: pl.DataFrame, n_audit: int, groups: Groups | None) -> pl.DataFrame:
    """``impressions`` (in audit order within each day) with ``in_audit_slice`` and ``design_weight``.

    Without protected groups to stratify for, the day's first ``n_audit`` (weight 1). Otherwise each
    protected group is a stratum and the rest of the traffic another: a protected group gets its
    proportional share of ``n_audit`` and at least ``groups.min_reviews`` (all it has, when fewer),
    the rest what is left (the slice grows beyond ``n_audit`` when the minimums need more); each
    stratum's first impressions in audit order are its sample, and ``design_weight`` = (stratum
    impressions / its sample) / (day impressions / ``n_audit``). No slice (``n_audit`` 0), no minimum.
    """
    if not n_audit or groups is None or not groups.protected or not groups.min_reviews:
        return impressions.with_columns(in_audit_slice=pl.int_range(pl.len()).over("event_date") < n_audit,
                                        design_weight=pl.lit(1.0))
    stratum = pl.when(pl.col("group").is_in(groups.protected)).then(pl.col("group")).otherwise(pl.lit(None))
    strata = assign(impressions, groups).with_columns(stratum=stratum)
    protected = pl.col("stratum").is_not_null()
    day_size = pl.len().over("event_date")
    size = pl.len().over("event_date", "stratum")
    proportional = (n_audit * size / day_size).round()
    quota = pl.when(protected).then(pl.max_horizontal(proportional, pl.min_horizontal(size, groups.min_reviews)))
    sized = strata.with_columns(quota=quota.cast(pl.Int64))
    taken = sized.select("event_date", "stratum", "quota").unique().group_by("event_date").agg(
        taken=pl.col("quota").sum())
    sized = sized.join(taken, on="event_date", how="left", maintain_order="left").with_columns(  # in audit order
        quota=pl.col("quota").fill_null(pl.max_horizontal(pl.lit(n_audit) - pl.col("taken").fill_null(0), pl.lit(0))))
    sample = pl.min_horizontal(pl.col("quota"), size)
    return sized.with_columns(
        in_audit_slice=pl.int_range(pl.len()).over("event_date", "stratum") < pl.col("quota"),
        design_weight=pl.when(sample > 0).then((size / sample) / (day_size / n_audit)).otherwise(1.0),
    ).drop("group", "stratum", "quota", "taken")


def export(folder: Path, pending: pl.DataFrame, days: list[date]) -> list[Path]:
    """Write each day's pending reviews for Label Studio and Argilla (replacing the day's files; a
    day with none pending has none), and the Label Studio labeling interface."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [_write_text(folder / "label-studio-config.xml", LABEL_STUDIO_CONFIG)]
    for day in days:
        rows = pending.filter(pl.col("event_date") == day).sort("selection", "interaction_id", "item_id")
        paths = (folder / f"{day.isoformat()}.label-studio.json", folder / f"{day.isoformat()}.argilla.json")
        if rows.is_empty():
            for path in paths:
                path.unlink(missing_ok=True)
            continue
        tasks = [label_studio_task(row) for row in rows.iter_rows(named=True)]
        records = [argilla_record(row) for row in rows.iter_rows(named=True)]
        written += [_write_text(paths[0], json.dumps(tasks, indent=1)),
                    _write_text(paths[1], json.dumps(records, indent=1))]
    return written


def _ids(row: dict) -> dict[str, object]:
    return {name: row[name].isoformat() if isinstance(row[name], date) else row[name] for name in TASK_IDS}


def label_studio_task(row: dict) -> dict[str, object]:
    """One Label Studio task: ``data`` holds what the interface shows ($input, $content) and the ids."""
    return {"data": {"input": row["input"], "content": row["content"], **_ids(row)}}


def argilla_record(row: dict) -> dict[str, object]:
    """One record as Argilla 2.x's ``dataset.records.log`` takes it: keys naming the dataset's fields
    (input, content) and metadata properties (the ids), and ``id``; an empty input and an unknown
    p_good are left out."""
    values = {"input": row["input"] or None, "content": row["content"], **_ids(row)}
    return {"id": f"{row['domain']}:{row['interaction_id']}:{row['item_id']}",
            **{name: value for name, value in values.items() if value is not None}}


def forget_user(home_root: Path, user_id: str) -> int:
    """Take a forgotten user's tasks out of every review file (``flywheel forget``); how many."""
    removed = 0
    for path in sorted((home_root / "review").glob("*/*.*.json")):
        entries = json.loads(path.read_text())
        kept = [entry for entry in entries if entry.get("data", entry).get("user_id") != user_id]
        if len(kept) < len(entries):
            removed += len(entries) - len(kept)
            _write_text(path, json.dumps(kept, indent=1))
    return removed


def expire(home_root: Path, domain: str, cutoff: date) -> list[Path]:
    """Delete the review files of ``domain``'s days before ``cutoff`` (retention)."""
    expired = [path for path in sorted(review_folder(home_root, domain).glob("*.*.json"))
               if path.name[:10] < cutoff.isoformat()]
    for path in expired:
        path.unlink()
    return expired


def _write_text(path: Path, text: str) -> Path:
    return write_atomically(path, text.encode())
