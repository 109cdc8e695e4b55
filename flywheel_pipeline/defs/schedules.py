"""One schedule per domain, on the cadence flywheel.yaml gives it; one daily retention schedule.

Each tick launches the domain's cycle job as one run over the days since the previous tick, plus
``max_lateness_days`` before them so late-delivered events reach their own day. What of the cycle a
tick launches is the domain's automation level (docs/operations.md: who does what): at ``off``
nothing (people run its cycles), at ``semi`` accumulate -> filter -> label only (the selection of
`flywheel run --only accumulate`: people launch training), at ``oversight`` and ``full`` the whole
cycle. Schedules start in the status ``daemon.schedules`` in flywheel.yaml gives them: ``stopped``
by default, so a UI left open on a laptop never launches cycles; a deployment turns each one on (UI
> Automation, or ``dagster schedule start``) or sets ``running``.
"""

from datetime import date, datetime, timedelta

import dagster as dg
from croniter import croniter

from flywheel_pipeline.config import DomainConfig, FlywheelConfig
from flywheel_pipeline.defs.jobs import (
    accumulation_assets,
    cycle_job_name,
    delete_expired,
    enforce_retention,
    warehouse_tags,
)
from flywheel_pipeline.defs.partitions import range_tags


def period_days(domain_config: DomainConfig, tick: date) -> int:
    """Days since the cron's tick before ``tick``'s day (7 for weekly, 90 to 92 for quarterly)."""
    previous = croniter(domain_config.cron, datetime(tick.year, tick.month, tick.day)).get_prev(datetime)
    return max(1, (tick - previous.date()).days)


def cycle_days(config: FlywheelConfig, domain: str, tick: date) -> tuple[date, date]:
    """The first and last day a tick on ``tick`` runs: the completed days since the last tick."""
    last = tick - timedelta(days=1)
    first = last - timedelta(days=period_days(config.domain(domain), tick) + config.max_lateness_days - 1)
    return max(first, config.partitions_start), last


# What a domain's cadence schedule launches at each automation level (oversight and full: the whole
# cycle); what people do beside it is docs/operations.md's "Automation levels: who does what".
SCHEDULED = {
    "off": "nothing: people run its cycles",
    "semi": "accumulate, filter, label: people launch training",
    "oversight": "accumulate, filter, label, fine-tune, validate, register",
    "full": "accumulate, filter, label, fine-tune, validate, register",
}


def off_reason(domain: str) -> str:
    """Why an ``off`` domain's tick launches nothing, and what people do instead."""
    return (f"{domain} is at automation off: its schedule launches nothing; people run its cycles "
            f"(`flywheel run --domain {domain}`, or the {cycle_job_name(domain)} job's Launchpad) and "
            f"approve its deployments")


def build_schedule(config: FlywheelConfig, domain: str) -> dg.ScheduleDefinition:
    domain_config = config.domain(domain)
    level = domain_config.automation

    @dg.schedule(name=f"{domain}_{domain_config.cadence}" if domain_config.cadence.isalpha() else f"{domain}_cadence",
                 cron_schedule=domain_config.cron, job_name=cycle_job_name(domain),
                 execution_timezone="UTC", default_status=dg.DefaultScheduleStatus(config.daemon.schedules.upper()),
                 description=f"{domain}: {SCHEDULED[level]} ({domain_config.cadence}; automation {level})")
    def cadence(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        if level == "off":
            return dg.SkipReason(off_reason(domain))
        tick = context.scheduled_execution_time.date()
        first, last = cycle_days(config, domain, tick)
        return dg.RunRequest(run_key=f"{domain}:{last.isoformat()}", tags=range_tags(domain, first, last),
                             asset_selection=accumulation_assets() if level == "semi" else None)

    return cadence


def build_retention_schedule(config: FlywheelConfig) -> dg.ScheduleDefinition:
    """Every day at 04:00 UTC (after the cadence ticks), delete what is past its retention_days."""

    @dg.schedule(name="retention_daily", cron_schedule="0 4 * * *", job=enforce_retention,
                 execution_timezone="UTC", default_status=dg.DefaultScheduleStatus(config.daemon.schedules.upper()),
                 description="delete events older than each domain's retention_days (rows and landing "
                             "batches): one run per domain")
    def retention(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
        day = context.scheduled_execution_time.date().isoformat()
        return [dg.RunRequest(run_key=f"retention:{domain}:{day}", tags=warehouse_tags(domain),
                              run_config={"ops": {delete_expired.name: {"config": {"domain": domain, "today": day}}}})
                for domain in config.domains]

    return retention
