"""Great Expectations gates: the suites, and a failing one blocking the assets downstream of it."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import dagster as dg
import polars as pl
import pytest

from flywheel_pipeline import quality, simulation
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.assets import LABELS
from flywheel_pipeline.defs.transform import RAW_EVENTS, dbt_model_keys, fct_impressions_key

DAY = date(2026, 11, 2)


def traffic(n: int, explore_every: int) -> pl.DataFrame:
    return pl.DataFrame({
        "event_id": [f"e{i}" for i in range(n)],
        "event_date": [datetime(2026, 11, 2)] * n,
        "policy": ["explore" if explore_every and i % explore_every == 0 else "champion" for i in range(n)],
        "consent": ["granted"] * n,
        "input_text": ["How do I reset my password?"] * n,
    }).with_columns(is_exploration=(pl.col("policy") == "explore").cast(pl.Int32))


def test_accumulated_traffic_passes_with_its_exploration_slice(config):
    suite = quality.raw_interactions_suite(config.domain("recommendation"), DAY, DAY)
    result = quality.run_suite("ok", traffic(200, explore_every=10), suite)
    assert result.success, result.failures
    assert result.n_rows == 200 and result.evaluated == len(suite)


def test_a_vanished_exploration_slice_and_a_day_outside_the_run_are_named(config):
    frame = traffic(200, explore_every=0).with_columns(
        event_date=pl.when(pl.col("event_id") == "e0").then(datetime(2026, 11, 9))
        .otherwise(pl.col("event_date")))
    result = quality.run_suite("bad", frame, quality.raw_interactions_suite(config.domain("recommendation"), DAY, DAY))
    assert not result.success
    assert any(f.startswith("expect_column_mean_to_be_between(is_exploration): observed 0") for f in result.failures)
    assert any(f.startswith("expect_column_values_to_be_between(event_date): observed 1 unexpected")
               for f in result.failures)
    assert result.metadata()["failed"] == 2


def test_filtered_impressions_catch_duplicates_and_impossible_propensities():
    frame = pl.DataFrame({
        "domain": ["assistant"] * 3, "interaction_id": ["i1", "i1", "i2"], "item_id": ["r1", "r1", "r2"],
        "position": [0, 0, 0], "propensity": [0.9, 0.9, 0.0], "policy": ["champion"] * 3,
        "input_text": ["hello there"] * 3,
    })
    result = quality.run_suite("impressions", frame, quality.filtered_impressions_suite())
    failed = {f.split(":")[0] for f in result.failures}
    assert failed == {"expect_compound_columns_to_be_unique(['domain', 'interaction_id', 'item_id'])",
                      "expect_column_values_to_be_between(propensity)"}


@pytest.fixture
def logs_without_exploration(home, config, monkeypatch):
    """Three days of assistant traffic whose logging lost the exploration slice the config promises."""
    for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    home.activate()
    assistant = config.domain("assistant").model_copy(update={"exploration_share": 0.0})
    no_exploration = config.model_copy(update={"domains": {**config.domains, "assistant": assistant}})
    last = datetime.now(UTC).date() - timedelta(days=1)
    simulation.simulate(home, no_exploration, last - timedelta(days=2), 3, seed=5,
                        interactions_per_day=150, domains=["assistant"])
    return home, last


def test_a_failing_expectation_blocks_everything_downstream(logs_without_exploration, config):
    home, last = logs_without_exploration
    defs = build_definitions(config, home)
    with dg.instance_for_test() as instance:
        result = execute_cycle(defs, instance, "assistant", last - timedelta(days=2), last)
        assert not result.success
        (check,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "accumulated_traffic"]
        assert not check.passed
        assert "is_exploration" in check.metadata["failures"].value
        materialized = {e.asset_key for e in result.get_asset_materialization_events()}
        assert materialized == {RAW_EVENTS}  # accepted into raw, and nothing past the gate
        assert not {fct_impressions_key(), LABELS, *dbt_model_keys()} & materialized
