"""Sensors: approvals launch deployments; late outcomes re-label the partitions they change.

Both are declared the way the Dagster daemon checks them: the approval sensor targets the
``deploy_champion`` job; the late-label sensor targets each domain's ``<domain>_relabel`` job (the dbt
models and ``labels``), so its runs show under that job in the UI.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import date, datetime, timedelta
from itertools import groupby

import dagster as dg

from flywheel_pipeline import approval
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.defs.jobs import (
    LATE_LABELS_TAG,
    deploy_champion,
    relabel_job,
    relabel_job_name,
    warehouse_tags,
)
from flywheel_pipeline.defs.partitions import range_tags
from flywheel_pipeline.defs.resources import WarehouseResource
from flywheel_pipeline.labeling.late import late_outcome_partitions
from flywheel_pipeline.warehouse import WarehouseBusy


def deployment_requests(records: list[approval.ApprovalRecord]) -> list[dg.RunRequest]:
    """One deployment per approved record; rejections launch nothing."""
    return [
        dg.RunRequest(
            run_key=f"deploy:{record.domain}:v{record.model_version}:approval-{record.approval_id}",
            run_config={"ops": {"deploy_approved": {"config": {"approval_id": record.approval_id}}}},
            tags={"flywheel/domain": record.domain, "flywheel/version": record.model_version},
        )
        for record in records
        if record.decision == "approved"
    ]


def day_ranges(partitions: Iterable[tuple[str, date]]) -> list[tuple[str, date, date]]:
    """(domain, first, last) for each run of consecutive days of one domain."""
    ranges: list[tuple[str, date, date]] = []
    for domain, days in groupby(sorted(set(partitions)), key=lambda partition: partition[0]):
        for day in (day for _, day in days):
            if ranges and ranges[-1][0] == domain and ranges[-1][2] + timedelta(days=1) == day:
                ranges[-1] = (domain, ranges[-1][1], day)
            else:
                ranges.append((domain, day, day))
    return ranges


def relabel_requests(partitions: list[tuple[str, date]], cursor: str) -> list[dg.RunRequest]:
    """One run of the domain's relabel job per run of consecutive days: the dbt models, then
    ``labels``, of exactly those (day, domain) partitions."""
    return [
        dg.RunRequest(
            run_key=f"late-labels:{domain}:{first}..{last}:{cursor}",
            job_name=relabel_job_name(domain),
            tags={**range_tags(domain, first, last), **LATE_LABELS_TAG, **warehouse_tags(domain)},
        )
        for domain, first, last in day_ranges(partitions)
    ]


def domain_cursors(cursor: str | None, domains: Iterable[str]) -> dict[str, str | None]:
    """The late-label sensor's cursor: per domain, the newest ingestion time it has seen. A cursor
    from before domains had their own warehouses (one time for all) applies to each."""
    if cursor and not cursor.startswith("{"):
        return dict.fromkeys(domains, cursor)
    seen = json.loads(cursor) if cursor else {}
    return {domain: seen.get(domain) for domain in domains}


def build_sensors(config: FlywheelConfig) -> list[dg.SensorDefinition]:
    """The approval sensor and the late-label sensor, at the intervals flywheel.yaml sets."""

    @dg.sensor(job=deploy_champion, minimum_interval_seconds=config.daemon.approval_sensor_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Watches registry.approvals; each new approval launches deploy_champion, which "
                           "verifies it again and fails with the reason when it does not hold. A broken "
                           "signature chain fails the tick, naming the record, and launches nothing.")
    def approval_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource) -> dg.SensorResult:
        last_seen = int(context.cursor or 0)
        try:
            with warehouse.approvals() as con:
                approval.verify_chain(con, approval.signing_key(warehouse.home()))  # a broken one fails the tick
                records = approval.decisions_after(con, last_seen)
        except WarehouseBusy as busy:
            return dg.SensorResult(skip_reason=f"{busy}; looking again next tick")
        if not records:
            return dg.SensorResult(skip_reason="no new approval decisions")
        return dg.SensorResult(run_requests=deployment_requests(records), cursor=str(records[-1].approval_id))

    @dg.sensor(jobs=[relabel_job(domain) for domain in config.domains],
               minimum_interval_seconds=config.daemon.late_label_sensor_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="When outcomes or reviews land for interactions in already-labelled partitions, re-labels "
                           "exactly those (day, domain) partitions (after rebuilding the dbt models), once "
                           "per new batch of outcomes. Each domain's warehouse is read in turn; one a run is "
                           "writing is looked at again next tick.")
    def late_label_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource) -> dg.SensorResult:
        cursors = domain_cursors(context.cursor, config.domains)
        home = warehouse.home()
        requests, busy = [], []
        for domain in config.domains:
            if not home.warehouse(domain).exists():
                continue
            since = datetime.fromisoformat(cursors[domain]) if cursors[domain] else None
            try:
                with warehouse.connect(domain, read_only=True) as con:
                    stale, newest = late_outcome_partitions(con, since)
            except WarehouseBusy:
                busy.append(domain)
                continue
            if newest:
                cursors[domain] = newest.isoformat()
            if stale:
                context.log.info(f"late outcomes reached {len(stale)} labelled partitions: {stale}")
                requests += relabel_requests(stale, cursors[domain])
        cursor = json.dumps(cursors, sort_keys=True)
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=cursor)
        waiting = f"; {', '.join(busy)} busy (a run is writing), looking again next tick" if busy else ""
        return dg.SensorResult(skip_reason=f"no late outcomes for labelled partitions{waiting}", cursor=cursor)

    return [approval_sensor, late_label_sensor]
