"""The one Definitions object: loadable, and wired as the README's loop says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import date

import dagster as dg
import pytest

from flywheel_pipeline.config import Groups
from flywheel_pipeline.definitions import build_definitions
from flywheel_pipeline.defs.assets import LABELS, model_keys
from flywheel_pipeline.defs.jobs import (
    LATE_LABELS_TAG,
    cycle_job_name,
    relabel_job_name,
    warehouse_tags,
)
from flywheel_pipeline.defs.sensors import relabel_requests
from flywheel_pipeline.defs.transform import (
    DBT_PROJECT_DIR,
    RAW_EVENTS,
    dbt_model_key,
    fct_impressions_key,
)
from flywheel_pipeline.health import TRAPS
from tests.conftest import REPO


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
    assert {s.name for s in defs.sensors} == {"approval_sensor", "late_label_sensor", "drift_sensor", "registry_watch"}
    assert {s.name for s in defs.schedules} == {"assistant_weekly", "recommendation_quarterly", "retention_daily",
                                                 "assistant_monitor_daily", "recommendation_monitor_daily"}


def test_late_labels_relabel_under_each_domains_named_job(home, config):
    """The late-label sensor's runs show under ``<domain>_relabel``: the dbt models and labels, over
    the cycle's partitions, tagged for the run queue like the domain's other runs."""
    defs = build_definitions(config, home)
    sensor = defs.resolve_sensor_def("late_label_sensor")
    assert {target.job_name for target in sensor.targets} == {relabel_job_name(d) for d in config.domains}
    for domain in config.domains:
        job = defs.resolve_job_def(relabel_job_name(domain))
        assets = job.asset_layer.executable_asset_keys
        assert LABELS in assets and fct_impressions_key() in assets and RAW_EVENTS not in assets
        assert job.partitions_def == defs.resolve_job_def(cycle_job_name(domain)).partitions_def
        assert job.tags == {**LATE_LABELS_TAG, **warehouse_tags(domain)}
    (request,) = relabel_requests([("recommendation", date(2026, 11, 2)), ("recommendation", date(2026, 11, 3))],
                                  "cursor")
    assert request.job_name == "recommendation_relabel" and request.asset_selection is None
    assert request.tags["dagster/asset_partition_range_end"] == "2026-11-03|recommendation"


def test_a_domain_with_declared_groups_gets_the_fairness_check(home, config):
    declared = config.domain("recommendation").model_copy(update={"groups": Groups(protected=["s1"])})
    grouped = config.model_copy(update={"domains": {**config.domains, "recommendation": declared}})
    defs = build_definitions(grouped, home)
    dg.Definitions.validate_loadable(defs)
    def checks(domain: str) -> set[str]:
        return {spec.name for spec in defs.resolve_assets_def(model_keys(domain)["flywheel_health"]).check_specs}

    assert checks("recommendation") == {*TRAPS, "fairness"}
    assert checks("assistant") == set(TRAPS)  # no groups declared


@pytest.mark.slow
def test_processes_loading_a_fresh_clone_at_once_each_read_a_whole_manifest(tmp_path):
    """On a fresh clone the suite's workers (or a code server beside the daemon) load the
    definitions at once, and each would parse the dbt project over the others' half-written
    manifest: they take turns, and the later ones find it parsed."""
    project = shutil.copytree(DBT_PROJECT_DIR, tmp_path / "dbt_project", ignore=shutil.ignore_patterns("target"))
    load = ("import json; from dagster_dbt import DbtProject; from flywheel_pipeline.defs.transform import _prepare; "
            f"print(len(json.loads(_prepare(DbtProject(project_dir={str(project)!r})).manifest_path.read_text())))")
    loaders = [subprocess.Popen([sys.executable, "-c", load], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(loader.wait(timeout=300), *loader.communicate()) for loader in loaders]
    assert [code for code, _, _ in results] == [0, 0, 0], [err[-2000:] for _, _, err in results]
    written = (project / "target" / "dbt.log").read_text().count("Wrote artifact WritableManifest")
    assert written == 1  # one parse; the others waited for it and read its manifest
