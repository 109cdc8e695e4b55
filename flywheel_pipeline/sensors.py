"""Sensors: approvals launch deployments; late outcomes backfill the labels they change."""

from __future__ import annotations

from datetime import date, datetime

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.events import AssetKeyPartitionKey

from flywheel_pipeline import approval
from flywheel_pipeline.assets import LABELS
from flywheel_pipeline.jobs import deploy_champion
from flywheel_pipeline.labeling.late import late_outcome_partitions
from flywheel_pipeline.partitions import partition_key
from flywheel_pipeline.resources import WarehouseResource


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


@dg.sensor(job=deploy_champion, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Watches registry.approvals; each new approval deploys its version as champion.")
def approval_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource) -> dg.SensorResult:
    last_seen = int(context.cursor or 0)
    with warehouse.connect() as con:
        records = approval.decisions_after(con, last_seen)
    if not records:
        return dg.SensorResult(skip_reason="no new approval decisions")
    return dg.SensorResult(run_requests=deployment_requests(records), cursor=str(records[-1].approval_id))


LATE_LABELS_TAG = {"flywheel/reason": "late-labels"}


def relabel_request(partitions: list[tuple[str, date]], asset_graph, upstream: list[dg.AssetKey]) -> dg.RunRequest:
    """A backfill of the labels of exactly ``partitions``, after refreshing ``upstream`` (the dbt marts)."""
    wanted = {AssetKeyPartitionKey(LABELS, partition_key(domain, day)) for domain, day in partitions}
    wanted |= {AssetKeyPartitionKey(key, None) for key in upstream}
    # Dagster's sensor daemon turns a RunRequest carrying an asset-graph subset into an asset backfill
    # (the same path its automation sensors take), so it shows on the UI's Backfills page.
    return dg.RunRequest.for_asset_graph_subset(
        AssetGraphSubset.from_asset_partition_set(wanted, asset_graph), tags=LATE_LABELS_TAG)


@dg.sensor(minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.RUNNING,
           description="When outcomes land for interactions in already-labelled partitions, backfills the "
                       "labels of exactly those (day, domain) partitions, once per new batch of outcomes.")
def late_label_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource) -> dg.SensorResult:
    since = datetime.fromisoformat(context.cursor) if context.cursor else None
    with warehouse.connect() as con:
        stale, newest = late_outcome_partitions(con, since)
    cursor = newest.isoformat() if newest else context.cursor
    if not stale:
        return dg.SensorResult(skip_reason="no late outcomes for labelled partitions", cursor=cursor)
    context.log.info(f"late outcomes reached {len(stale)} labelled partitions: {stale}")
    asset_graph = context.repository_def.asset_graph
    upstream = sorted(asset_graph.get(LABELS).parent_keys)
    return dg.SensorResult(run_requests=[relabel_request(stale, asset_graph, upstream)], cursor=cursor)
