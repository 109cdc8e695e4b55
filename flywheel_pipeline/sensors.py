"""Sensors: approvals launch deployments."""

from __future__ import annotations

import dagster as dg

from flywheel_pipeline import approval
from flywheel_pipeline.jobs import deploy_champion
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
