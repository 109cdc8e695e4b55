"""The one Definitions object: loadable, and wired as the README's loop says."""

from __future__ import annotations

import dagster as dg

from flywheel_pipeline.definitions import build_definitions
from flywheel_pipeline.defs.assets import LABELS, model_keys
from flywheel_pipeline.defs.transform import (
    RAW_EVENTS,
    dbt_model_key,
    fct_impressions_key,
)
from flywheel_pipeline.health import TRAPS


def test_definitions_load_and_wire_every_domains_chain(home, config):
    defs = build_definitions(config, home)
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()

    assert fct_impressions_key() in graph.get(LABELS).parent_keys
    for model in ("stg_interactions", "stg_impressions", "stg_signals", "stg_outcomes"):
        assert graph.get(dbt_model_key(model)).parent_keys == {RAW_EVENTS}
    for domain in config.domains:
        keys = model_keys(domain)
        assert graph.get(keys["candidate_model"]).parent_keys == {LABELS}
        assert graph.get(keys["flywheel_health"]).parent_keys == {keys["candidate_model"], keys["validation_report"]}
        assert graph.get(keys["registered_candidate"]).parent_keys == {
            keys["candidate_model"], keys["validation_report"], keys["flywheel_health"]}
        assert defs.resolve_job_def(f"{domain}_cycle").partitions_def is not None

    blocking = {spec.name for checks in defs.asset_checks for spec in checks.check_specs if spec.blocking}
    assert {"accumulated_traffic", "filtered_impressions"} <= blocking
    assert not blocking & set(TRAPS)  # the health checks warn unless a domain's health.blocking names them
    assert {s.name for s in defs.sensors} == {"approval_sensor", "late_label_sensor"}
    assert {s.name for s in defs.schedules} == {"assistant_weekly", "recommendation_quarterly", "retention_daily"}
