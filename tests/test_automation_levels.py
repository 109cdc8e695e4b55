"""The four automation levels (docs/operations.md: who does what): what each level's cadence
schedule launches, evaluated against a real instance, and the names flywheel.yaml used before the
levels. No cycle runs: the schedules are evaluated, not their runs."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import dagster as dg
import pytest
import yaml

from flywheel_pipeline import runs
from flywheel_pipeline.config import AUTOMATION_LEVELS, ConfigError, load_config, parse_config
from flywheel_pipeline.definitions import build_definitions
from flywheel_pipeline.defs.assets import LABELS, model_keys
from flywheel_pipeline.defs.jobs import accumulation_assets, cycle_job_name
from flywheel_pipeline.defs.partitions import range_tags
from flywheel_pipeline.defs.schedules import SCHEDULED
from flywheel_pipeline.defs.transform import RAW_EVENTS, dbt_model_keys
from flywheel_pipeline.home import Home
from tests.conftest import REPO

RAW = yaml.safe_load((REPO / "flywheel.yaml").read_text())
TICK = datetime(2026, 11, 23, 3, tzinfo=UTC)  # a Monday: assistant's weekly tick
SCHEDULE = "assistant_weekly"


def raw_at(level: str, domain: str = "assistant") -> dict:
    raw = copy.deepcopy(RAW)
    raw["domains"][domain]["automation"] = level
    return raw


def evaluate(level: str, tmp_path) -> tuple[dg.ScheduleDefinition, dg.RunRequest | None, str | None]:
    """The definitions' assistant schedule at ``level``, evaluated on ``TICK``: the schedule, its
    one run request (None when it skipped) and its skip message."""
    defs = build_definitions(parse_config(raw_at(level)), Home(tmp_path / "home"))
    schedule = defs.resolve_schedule_def(SCHEDULE)
    # as tests/test_schedules.py: the context's instance is closed with it
    with dg.instance_for_test() as instance, dg.build_schedule_context(
        instance=instance, scheduled_execution_time=TICK
    ) as context:
        result = schedule.evaluate_tick(context)
    requests = result.run_requests or []
    assert len(requests) <= 1
    return schedule, (requests[0] if requests else None), result.skip_message


def test_every_level_says_what_its_schedule_launches():
    assert set(SCHEDULED) == set(AUTOMATION_LEVELS) == {"off", "semi", "oversight", "full"}


def test_off_launches_nothing_and_says_people_run_the_cycles(tmp_path):
    schedule, request, skipped = evaluate("off", tmp_path)
    assert request is None
    assert "assistant is at automation off" in skipped
    assert "flywheel run --domain assistant" in skipped
    assert "automation off" in schedule.description


def test_semi_launches_accumulate_filter_label_only(tmp_path):
    schedule, request, skipped = evaluate("semi", tmp_path)
    assert skipped is None
    selected = set(request.asset_selection)
    # the selection `flywheel run --only accumulate` submits, shared rather than repeated
    assert runs.accumulation_assets is accumulation_assets
    assert selected == set(accumulation_assets())
    assert {RAW_EVENTS, LABELS, *dbt_model_keys()} == selected
    assert not selected & set(model_keys("assistant").values())  # no training, validation, registration
    # the same run key and tags as a whole cycle's tick (the same days): only the selection differs
    _, whole, _ = evaluate("oversight", tmp_path / "oversight")
    assert (request.run_key, request.tags) == (whole.run_key, whole.tags)
    assert "people launch training" in schedule.description


def test_semi_selection_is_a_subset_of_the_cycle_job_that_the_outcome_reads_as_accumulation(tmp_path):
    defs = build_definitions(parse_config(raw_at("semi")), Home(tmp_path / "home"))
    job = defs.resolve_job_def(cycle_job_name("assistant"))
    subset = job.get_subset(asset_selection=set(accumulation_assets()))
    assert set(subset.asset_layer.selected_asset_keys) == set(accumulation_assets())
    # so runs.read_outcome reads such a run back as `--only accumulate` (no candidate_model in it)
    assert model_keys("assistant")["candidate_model"] not in subset.asset_layer.selected_asset_keys


@pytest.mark.parametrize("level", ["oversight", "full"])
def test_oversight_and_full_launch_the_whole_cycle(level, tmp_path):
    schedule, request, skipped = evaluate(level, tmp_path)
    assert skipped is None
    assert request.asset_selection is None  # the whole <domain>_cycle job
    assert request.run_key == "assistant:2026-11-22"
    assert request.tags.items() >= range_tags("assistant", TICK.date().replace(day=9),
                                              TICK.date().replace(day=22)).items()
    assert schedule.job_name == cycle_job_name("assistant")
    assert "fine-tune, validate, register" in schedule.description


def test_the_level_is_per_domain(tmp_path):
    raw = raw_at("off", "recommendation")
    defs = build_definitions(parse_config(raw), Home(tmp_path / "home"))
    with dg.instance_for_test() as instance, dg.build_schedule_context(
        instance=instance, scheduled_execution_time=datetime(2026, 10, 1, 3, tzinfo=UTC)
    ) as context:
        off = defs.resolve_schedule_def("recommendation_quarterly").evaluate_tick(context)
        full = defs.resolve_schedule_def("assistant_weekly").evaluate_tick(context)
    assert not off.run_requests and "recommendation is at automation off" in off.skip_message
    (request,) = full.run_requests
    assert request.asset_selection is None


@pytest.mark.parametrize(("written", "read"), [("manual", "oversight"), ("auto", "full"),
                                              *[(level, level) for level in AUTOMATION_LEVELS]])
def test_written_names_load_as_levels(written, read, tmp_path):
    raw = raw_at(written, "recommendation")
    path = tmp_path / "flywheel.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).domain("recommendation").automation == read


def test_a_legacy_manual_domain_without_approvers_is_refused_as_oversight():
    raw = raw_at("manual", "recommendation")
    raw["domains"]["recommendation"]["approvers"] = []
    with pytest.raises(ConfigError, match="a domain at automation 'oversight' needs at least one approver"):
        parse_config(raw)


@pytest.mark.parametrize("level", ["off", "semi"])
def test_levels_below_full_need_an_approver(level):
    raw = raw_at(level, "recommendation")
    raw["domains"]["recommendation"]["approvers"] = []
    with pytest.raises(ConfigError, match=f"a domain at automation '{level}' needs at least one approver"):
        parse_config(raw)


def test_a_legacy_auto_domain_may_have_no_approver():
    raw = raw_at("auto", "assistant")
    raw["domains"]["assistant"]["approvers"] = []
    assert parse_config(raw).domain("assistant").automation == "full"
