"""Sensors: approvals launch deployments; late outcomes re-label the partitions they change; input
drift launches an off-cadence cycle.

Each is declared the way the Dagster daemon checks it: the approval sensor targets the
``deploy_champion`` job; the late-label sensor targets each domain's ``<domain>_relabel`` job (the dbt
models and ``labels``), so its runs show under that job in the UI; the drift sensor targets each
domain's ``<domain>_cycle`` job (docs/monitoring.md: Input drift).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import date, datetime, timedelta
from itertools import groupby

import dagster as dg

from flywheel_pipeline import approval, registry
from flywheel_pipeline.alerts import Alert, notify
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.defs.jobs import (
    LATE_LABELS_TAG,
    cycle_job_name,
    deploy_champion,
    relabel_job,
    relabel_job_name,
    warehouse_tags,
)
from flywheel_pipeline.defs.partitions import PARTITION_RANGE_END_TAG, range_tags
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.health.drift import DriftReport, domain_drift
from flywheel_pipeline.labeling.late import late_outcome_partitions
from flywheel_pipeline.training.base import split_windows
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
        warehouses = warehouse.warehouses()
        requests, busy = [], []
        for domain in config.domains:
            if not warehouses.exists(domain):
                continue
            since = datetime.fromisoformat(cursors[domain]) if cursors[domain] else None
            try:
                with warehouses.reader(domain) as source:
                    stale, newest = late_outcome_partitions(source, domain, since)
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


# --- input drift -----------------------------------------------------------------------------

DRIFT_TAG = {"flywheel/reason": "drift"}
DRIFT_REASONS_TAG = "flywheel/drift"  # the reasons a drift run was launched: "segment: PSI 0.412 > 0.2; ..."
# A run of the cycle job in one of these states has trained, or will train, on the days it covers.
_COVERING = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.SUCCESS]


def drift_cursors(cursor: str | None) -> dict[str, dict[str, str]]:
    """The drift sensor's cursor: per domain in a drift episode it launched a cycle for, the latest
    day that cycle ends on and the champion it measured against."""
    return json.loads(cursor) if cursor else {}


def drift_request(config: FlywheelConfig, report: DriftReport, champion: str) -> dg.RunRequest:
    """The domain's cycle over its windows (training and held-out) ending on the latest day held,
    tagged with why."""
    domain, latest = report.domain, report.recent_end
    first = max(split_windows(latest, config.domain(domain)).train_start, config.partitions_start)
    return dg.RunRequest(
        run_key=f"drift:{domain}:{latest.isoformat()}:{champion}",
        job_name=cycle_job_name(domain),
        tags={**range_tags(domain, first, latest), **warehouse_tags(domain), **DRIFT_TAG,
              DRIFT_REASONS_TAG: "; ".join(report.reasons)[:1000]},
    )


def covering_cycle(instance: dg.DagsterInstance, domain: str, latest: date) -> str | None:
    """A whole cycle of ``domain`` (queued, running or done) whose days reach ``latest``: it trains
    on the drifted traffic already, so drift launches no other. Its run id, or None."""
    runs = instance.get_runs(dg.RunsFilter(job_name=cycle_job_name(domain), statuses=_COVERING), limit=20)
    for run in runs:
        end = run.tags.get(PARTITION_RANGE_END_TAG, "").split("|")[0]
        trains = run.asset_selection is None or any(key.path[-1] == "candidate_model" for key in run.asset_selection)
        if end and trains and date.fromisoformat(end) >= latest:
            return run.run_id
    return None


def build_drift_sensor(config: FlywheelConfig, cycle_jobs: list) -> dg.SensorDefinition:
    """One sensor over every domain whose automation is not ``off``: drift beyond a threshold
    launches the domain's cycle (``cycle_jobs``: the cycle jobs the Definitions hold, one per
    domain). Running by default when some such domain has ``drift.triggers_cycle``."""
    watched = [domain for domain, settings in config.domains.items() if settings.automation != "off"]
    triggers = any(config.domain(domain).drift.triggers_cycle for domain in watched)

    @dg.sensor(jobs=cycle_jobs, minimum_interval_seconds=config.daemon.late_label_sensor_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING if triggers else dg.DefaultSensorStatus.STOPPED,
               description="Compares each domain's recent traffic (drift.recent_days) with the deployed champion's "
                           "training window: a PSI per serving feature and the share of new items. Beyond "
                           "drift.max_psi or drift.max_new_item_share it launches the domain's cycle over the "
                           "days ending on the latest one held (tag flywheel/reason: drift), once per drift "
                           "episode; domains at automation off or semi (people decide training), or with "
                           "drift.triggers_cycle false, are measured only (docs/monitoring.md).")
    def drift_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource,
                     mlflow: MlflowResource) -> dg.SensorResult:
        cursors = drift_cursors(context.cursor)
        warehouses = warehouse.warehouses()
        client = mlflow.client() if warehouses.home.has_mlflow_store else None  # a reader makes no empty store
        requests, lines = [], []
        for domain in watched:
            settings = config.domain(domain)
            if not warehouses.exists(domain):
                lines.append(f"{domain}: no warehouse yet")
                continue
            champion = registry.alias_version(client, domain, registry.CHAMPION) if client else None
            tags = registry.version_tags(client, domain, champion) if champion else None
            try:
                with warehouses.reader(domain) as source:
                    report = domain_drift(source, settings, domain, champion, tags)
            except WarehouseBusy:
                lines.append(f"{domain}: busy (a run is writing), looking again next tick")
                continue
            if report is None:
                lines.append(f"{domain}: no impressions yet")
                continue
            context.log.info(report.summary())
            shown, latest, episode = registry.shown_champion(champion), report.recent_end, cursors.get(domain)
            if not report.drifted:
                cursors.pop(domain, None)  # the episode, if any, is over
                lines.append(report.summary())
                continue
            if episode is None:  # a new drift episode: said once, where people look
                context.log.info(notify(config, Alert(domain, "drift", report.summary())))
                cursors[domain] = {"day": "", "champion": ""}
            if not settings.drift.triggers_cycle:
                lines.append(f"{report.summary()}; drift.triggers_cycle is off: no cycle launched")
            elif settings.automation == "semi":
                lines.append(f"{report.summary()}; automation semi: people decide training "
                             f"(`flywheel run --domain {domain}`), no cycle launched")
            elif episode and (episode["day"] == latest.isoformat() or episode["champion"] == shown):
                lines.append(f"{report.summary()}; this drift episode already launched a cycle (days ending "
                             f"{episode['day']}, against {episode['champion']})")
            elif run_id := covering_cycle(context.instance, domain, latest):
                lines.append(f"{report.summary()}; cycle run {run_id} already covers {latest}")
            else:
                context.log.warning(f"launching {cycle_job_name(domain)}: {report.summary()}")
                requests.append(drift_request(config, report, shown))
                cursors[domain] = {"day": latest.isoformat(), "champion": shown}
        cursor = json.dumps(cursors, sort_keys=True)
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=cursor)
        return dg.SensorResult(skip_reason="; ".join(lines) or "no domain watched (every automation is off)",
                               cursor=cursor)

    return drift_sensor
