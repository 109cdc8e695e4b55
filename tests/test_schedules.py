"""Per-domain schedules, evaluated with Dagster's schedule test helpers against a real instance."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import pytest
from croniter import croniter

from flywheel_pipeline.definitions import build_definitions
from flywheel_pipeline.defs.jobs import cycle_job_name
from flywheel_pipeline.defs.partitions import (
    PARTITION_RANGE_END_TAG,
    PARTITION_RANGE_START_TAG,
    partition_key,
)


@pytest.fixture(scope="module")
def defs(tmp_path_factory):
    from flywheel_pipeline.config import load_config
    from flywheel_pipeline.home import Home
    from tests.conftest import REPO

    config = load_config(REPO / "flywheel.yaml")
    return config, build_definitions(config, Home(tmp_path_factory.mktemp("home")))


def ticks_in_2027(schedule: dg.ScheduleDefinition) -> list[datetime]:
    cron = croniter(schedule.cron_schedule, datetime(2027, 1, 1, tzinfo=UTC))
    ticks = []
    while (tick := cron.get_next(datetime)).year == 2027:
        ticks.append(tick)
    return ticks


def evaluate(defs_, name: str, at: datetime) -> dg.RunRequest:
    schedule = defs_.resolve_schedule_def(name)
    # the context enters an instance of its own: left open, it stays Dagster's current defs-state
    # storage after the instance is gone, and a later test's Definitions fail to load
    with dg.instance_for_test() as instance, dg.build_schedule_context(
        instance=instance, scheduled_execution_time=at
    ) as context:
        (request,) = schedule.evaluate_tick(context).run_requests
    return request


def test_each_domain_has_a_schedule_on_its_cadence_targeting_its_cycle_job(defs):
    _, defs_ = defs
    weekly = defs_.resolve_schedule_def("assistant_weekly")
    quarterly = defs_.resolve_schedule_def("recommendation_quarterly")
    assert weekly.job_name == cycle_job_name("assistant")
    assert quarterly.job_name == cycle_job_name("recommendation")
    assert weekly.default_status == dg.DefaultScheduleStatus.STOPPED  # flywheel.yaml daemon.schedules
    assert len(ticks_in_2027(weekly)) == 52 and {t.weekday() for t in ticks_in_2027(weekly)} == {0}
    assert [(t.month, t.day) for t in ticks_in_2027(quarterly)] == [(1, 1), (4, 1), (7, 1), (10, 1)]


def test_weekly_tick_runs_the_past_week_plus_the_lateness_window(defs):
    config, defs_ = defs
    request = evaluate(defs_, "assistant_weekly", datetime(2026, 11, 23, 3, tzinfo=UTC))
    assert config.max_lateness_days == 7
    assert request.tags[PARTITION_RANGE_START_TAG] == partition_key("assistant", datetime(2026, 11, 9).date())
    assert request.tags[PARTITION_RANGE_END_TAG] == partition_key("assistant", datetime(2026, 11, 22).date())
    assert request.run_key == "assistant:2026-11-22"


def test_quarterly_tick_runs_the_whole_past_quarter(defs):
    _, defs_ = defs
    request = evaluate(defs_, "recommendation_quarterly", datetime(2026, 10, 1, 3, tzinfo=UTC))
    # July 1 .. September 30 (92 days) and the 7 lateness days before them
    assert request.tags[PARTITION_RANGE_START_TAG] == partition_key(
        "recommendation", datetime(2026, 6, 24).date())
    assert request.tags[PARTITION_RANGE_END_TAG] == partition_key(
        "recommendation", datetime(2026, 9, 30).date())


def test_every_requested_partition_exists_in_the_job(defs):
    _, defs_ = defs
    request = evaluate(defs_, "assistant_weekly", datetime(2026, 11, 23, 3, tzinfo=UTC))
    partitions = defs_.resolve_job_def(cycle_job_name("assistant")).partitions_def
    keys = partitions.get_partition_keys()
    for tag in (PARTITION_RANGE_START_TAG, PARTITION_RANGE_END_TAG):
        assert request.tags[tag] in keys
