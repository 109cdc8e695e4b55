"""The deployed champion, watched each day on its traffic: thin wiring around flywheel_pipeline.monitoring.

    raw_events -> dbt models -> <domain>/champion_monitor (day x domain; checks live_regression,
                                                          live_vs_forecast)

``<domain>_monitor`` (job) accumulates a day's traffic, builds its marts and watches the champion;
``<domain>_monitor_daily`` (schedule) launches it each morning for yesterday, at every automation
level but ``off``. A regression fails ``live_regression`` (from the day it is declared on, for as
long as the deployment serves) and alerts once (flywheel_pipeline/alerts.py);
at ``full`` the monitor also records the rollback's signed approval, which the approval sensor
deploys (deploy_champion: a run, and an observation of registered_candidate).
"""

import math
from datetime import UTC, date, datetime, timedelta

import dagster as dg

from flywheel_pipeline import approval, monitoring, registry
from flywheel_pipeline.alerts import Alert, notify
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.defs.jobs import warehouse_tags
from flywheel_pipeline.defs.partitions import day_domain_partitions, range_tags, run_scope
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.defs.transform import DBT_MODELS, RAW_EVENTS, fct_impressions_key
from flywheel_pipeline.scoring import Scorer

MONITOR = "champion_monitor"
CHECKS = {
    "live_regression": "the deployed champion is no worse on its traffic than the champion it replaced "
                       "(a confidence sequence on champion - previous; at automation full a regression "
                       "rolls it back)",
    "live_vs_forecast": "the deployed champion's live value is not below the interval its validation forecast",
}


def monitor_key(domain: str) -> dg.AssetKey:
    return dg.AssetKey([domain, MONITOR])


def monitor_job_name(domain: str) -> str:
    return f"{domain}_monitor"


def build_monitor_asset(config: FlywheelConfig, domain: str) -> dg.AssetsDefinition:
    partitions = day_domain_partitions(config)
    key = monitor_key(domain)

    @dg.asset(key=key, deps=[fct_impressions_key()], partitions_def=partitions,
              backfill_policy=dg.BackfillPolicy.single_run(), group_name=f"{domain}_monitor",
              kinds={"duckdb", "mlflow"},
              check_specs=[dg.AssetCheckSpec(name, asset=key, description=text) for name, text in CHECKS.items()],
              description=f"{domain}'s deployed champion on the traffic it served since its deployment: its live "
                          f"value against the gate's forecast, and against the previous champion "
                          f"(docs/monitoring.md).")
    def champion_monitor(context: dg.AssetExecutionContext, warehouse: WarehouseResource, mlflow: MlflowResource):
        run_domain, days = run_scope(context, partitions)
        if run_domain != domain:
            raise dg.Failure(f"{key.to_user_string()} watches {domain}, not {run_domain}")
        scorers: dict[str | None, Scorer] = {}  # each version's model, loaded once for the run's days
        looks = [_look(context, warehouse, mlflow, domain, day, scorers) for day in days]
        last = looks[-1]
        yield dg.MaterializeResult(metadata=last["metadata"])
        yield dg.AssetCheckResult(check_name="live_regression", passed=not last["regressed"],
                                  severity=dg.AssetCheckSeverity.ERROR, metadata=last["checks"])
        yield dg.AssetCheckResult(check_name="live_vs_forecast", passed=not last["below_forecast"],
                                  severity=dg.AssetCheckSeverity.WARN, metadata=last["checks"])

    return champion_monitor


def _look(context: dg.AssetExecutionContext, warehouse: WarehouseResource, mlflow: MlflowResource, domain: str,
          day: date, scorers: dict[str | None, Scorer]) -> dict:
    """One day's watch: saved, alerted, and (automation full) the rollback recorded."""
    config, client = warehouse.config(), mlflow.client()
    with warehouse.approvals() as con:
        approval.ensure_tables(con)
        deployments = con.execute("SELECT model_version, previous_version, deployed_at FROM registry.deployments "
                                  "WHERE domain = ? ORDER BY deployed_at DESC", [domain]).fetchall()
    deployed = monitoring.deployed_champion(client, deployments, domain)
    if deployed is None:
        text = f"{domain} {day}: nothing to watch (no deployed version serves: baseline, or restored by hand)"
        context.log.info(text)
        return {"metadata": {"watching": text}, "checks": {"watching": text}, "regressed": False,
                "below_forecast": False}
    for version in (deployed.version, deployed.previous_version):
        if version not in scorers:
            scorers[version] = monitoring.version_scorer(config, domain, version)
    champion, previous = scorers[deployed.version], scorers[deployed.previous_version]
    with warehouse.warehouses().for_days(domain, monitoring.COPY_SCOPE) as (con, elsewhere):
        seen = monitoring.watch(con if elsewhere is None else elsewhere, warehouse.home(), config, domain, deployed,
                                day, champion, previous)
        earlier = monitoring.earlier_flags(con, domain, deployed, day)
        action = _act(config, warehouse, client, seen, earlier)
        monitoring.save_watch(con, seen, action, datetime.now(UTC).replace(tzinfo=None), earlier)
    monitoring.log_to_validation_run(client, seen)
    context.log.info(f"{domain} {day}: {seen.summary()}; {action}")
    checks = {"summary": seen.summary(), "action": action}
    metadata = {**checks, "version": f"v{deployed.version}", "days_watched": seen.days_watched,
                "interactions": seen.n_interactions, "live": _number(seen.live.mean),
                "difference_vs_previous": _number(seen.difference.mean)}
    # a declaration stands for the deployment: the sequence's bound may come back above later
    return {"metadata": metadata, "checks": checks, "regressed": seen.regressed or earlier[0],
            "below_forecast": seen.below_forecast or earlier[1]}


def _act(config: FlywheelConfig, warehouse: WarehouseResource, client, seen: monitoring.Watch,
         earlier: tuple[bool, bool]) -> str:
    """Alert on a regression (once per deployment), and at automation full record the rollback. A
    miss of the forecast warns through its check and the health report's calibration only: the
    gate's off-policy forecasts can run above live values on every deployment (docs/monitoring.md)."""
    domain, done = seen.deployed.domain, []
    was_regressed, was_below = earlier
    if seen.regressed and not was_regressed:
        restored = registry.version_tags(client, domain, seen.deployed.version).get("approval.reason", "")
        if (config.domain(domain).automation == "full" and seen.deployed.previous_version is not None
                and not restored.startswith("rollback:")):  # a rollback is never undone without a person
            with warehouse.approvals() as con:
                record = approval.record_rollback(con, client, config, approval.signing_key(warehouse.home()),
                                                  domain, f"v{seen.deployed.version} regressed live: {seen.summary()}")
            done.append(f"rollback to v{record.model_version} approved by {record.approver} (approval "
                        f"{record.approval_id}); the approval sensor deploys it")
            text = f"v{seen.deployed.version} regressed live and is being rolled back: {seen.summary()}"
        else:
            text = (f"v{seen.deployed.version} regressed live: {seen.summary()}; a person decides: "
                    f"`flywheel rollback --domain {domain}` or the rollback_champion job")
        done.append(notify(config, Alert(domain, "live_regression", text)))
    if seen.regressed or was_regressed:
        return "; ".join(done) or "alerted on an earlier day"
    if seen.below_forecast or was_below:  # a warning in the UI and the calibration, not a page (docs/monitoring.md)
        return "below the gate's forecast (the live_vs_forecast check warns)"
    return "healthy"


def _number(value: float) -> float | str:
    return round(value, 4) if math.isfinite(value) else "undefined"


def monitor_job(domain: str):  # an unresolved asset job, as cycle_job
    return dg.define_asset_job(
        monitor_job_name(domain), selection=dg.AssetSelection.assets(RAW_EVENTS, monitor_key(domain)) | DBT_MODELS,
        tags=warehouse_tags(domain),
        description=f"{domain}: accumulate a day, build its marts, watch the deployed champion on it")


def build_monitor_schedule(config: FlywheelConfig, domain: str) -> dg.ScheduleDefinition:
    """Each morning (05:00 UTC), the monitor over yesterday; nothing at automation off."""

    @dg.schedule(name=f"{domain}_monitor_daily", cron_schedule="0 5 * * *", job_name=monitor_job_name(domain),
                 execution_timezone="UTC", default_status=dg.DefaultScheduleStatus(config.daemon.schedules.upper()),
                 description=f"{domain}: watch the deployed champion on yesterday's traffic")
    def monitor_daily(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        if config.domain(domain).automation == "off":
            return dg.SkipReason(f"{domain} is at automation off: people run its monitor ({monitor_job_name(domain)})")
        day = context.scheduled_execution_time.date() - timedelta(days=1)
        return dg.RunRequest(run_key=f"{domain}:monitor:{day}", tags=range_tags(domain, day, day))

    return monitor_daily
