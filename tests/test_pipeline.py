"""The whole cycle through Dagster, in process, on a real DuckDB file, MLflow store and Dagster
instance in a temporary home: accumulate -> dbt + GX -> label -> fine-tune -> validate -> register
-> approve -> deploy; then late outcomes -> late-label sensor -> relabel of exactly those days."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import dagster as dg
import mlflow
import pytest

from flywheel_pipeline import registry, simulation
from flywheel_pipeline.config import FlywheelConfig, HealthSettings, load_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.assets import LABELS, model_keys
from flywheel_pipeline.defs.jobs import cycle_job_name, relabel_job_name
from flywheel_pipeline.defs.partitions import (
    PARTITION_RANGE_END_TAG,
    PARTITION_RANGE_START_TAG,
    partition_key,
)
from flywheel_pipeline.defs.transform import RAW_EVENTS, dbt_model_keys, fct_impressions_key
from flywheel_pipeline.health import TRAPS
from flywheel_pipeline.home import Home
from flywheel_pipeline.labeling import maturity_cutoff
from flywheel_pipeline.warehouse import connect

pytestmark = pytest.mark.slow  # the assistant cycle (conftest), shared with test_sources and test_training_sets

DOMAIN = "assistant"
DAYS = 24
LAST = datetime.now(UTC).date() - timedelta(days=4)  # leaves room for 3 later days
FIRST = LAST - timedelta(days=DAYS - 1)


def metadata(result, key: dg.AssetKey) -> dict:
    """The metadata of ``key``'s materialization: one per run (a range run reports it per partition)."""
    events = [e for e in result.get_asset_materialization_events() if e.asset_key == key]
    (first, *_) = [{name: value.value for name, value in e.materialization.metadata.items()} for e in events]
    return first


def partition_metadata(result, key: dg.AssetKey) -> dict[str, dict]:
    """Each partition's own metadata for ``key``, by partition key."""
    return {e.partition: {name: value.value for name, value in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events() if e.asset_key == key}


def rows(home: Home, sql: str) -> list[tuple]:
    with connect(home.warehouse(DOMAIN)) as con:
        return con.execute(sql).fetchall()


class Cycle(NamedTuple):
    home: Home
    config: FlywheelConfig
    defs: dg.Definitions
    instance: dg.DagsterInstance
    result: dg.ExecuteInProcessResult


@contextmanager
def simulated_cycle(root: Path, first: date, last: date,
                    before: Callable[[Home], None] = lambda home: None) -> Iterator[Cycle]:
    """One DOMAIN cycle over first..last of simulated traffic (both domains, 2% bad rows) in a new
    home at ``root``, nothing inherited from the environment; ``before`` may add to its landing."""
    from tests.conftest import REPO

    config = load_config(REPO / "flywheel.yaml")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
            patch.delenv(name, raising=False)
        home = Home(root).activate()
        simulation.simulate(home, config, first, (last - first).days + 1, seed=3, interactions_per_day=250,
                            bad_row_share=0.02)
        before(home)
        defs = build_definitions(config, home)
        instance = dg.DagsterInstance.local_temp(str(home.dagster))  # the home's own instance
        result = execute_cycle(defs, instance, DOMAIN, first, last)
        yield Cycle(home, config, defs, instance, result)
        instance.dispose()


@pytest.fixture(scope="module")
def cycle(assistant_cycle):
    """One assistant cycle over 24 simulated days (both domains simulated, 2% bad rows; the training
    sets' events planted in one day: conftest's assistant_cycle)."""
    return assistant_cycle


def test_every_stage_materializes_and_every_check_passes(cycle):
    result = cycle.result
    assert result.success
    materialized = {e.asset_key for e in result.get_asset_materialization_events()}
    assert {RAW_EVENTS, fct_impressions_key(), LABELS, *model_keys(DOMAIN).values()} <= materialized
    evaluations = result.get_asset_check_evaluations()
    assert {e.check_name for e in evaluations} >= {"accumulated_traffic", "filtered_impressions", "gate"}
    assert len([e for e in evaluations if e.asset_key == fct_impressions_key()]) > 10  # dbt tests too
    assert all(e.passed for e in evaluations), [e.check_name for e in evaluations if not e.passed]


def test_counts_reconcile_from_landing_to_labels(cycle):
    home, result = cycle.home, cycle.result
    days = partition_metadata(result, RAW_EVENTS)
    assert len(days) == DAYS  # each (day, domain) partition carries its own figures
    assert all(day["lines_in"] == day["accepted"] + day["quarantined"] and day["reconciles"] for day in days.values())
    assert len({day["lines_in"] for day in days.values()}) > 1
    by_day = dict(rows(home, "SELECT event_date, count(*) FROM raw.quarantine WHERE domain = 'assistant' GROUP BY 1"))
    assert {key: day["quarantined"] for key, day in days.items() if day["quarantined"]} == {
        partition_key(DOMAIN, day): n for day, n in by_day.items()}
    labelled = partition_metadata(result, LABELS)
    assert sum(day["impressions"] for day in labelled.values()) == rows(
        home, f"SELECT count(*) FROM labels.impression_labels WHERE domain = '{DOMAIN}'")[0][0]
    [(impressions, labelled)] = rows(home, f"""
        SELECT (SELECT count(*) FROM marts.fct_impressions WHERE domain = '{DOMAIN}'),
               (SELECT count(*) FROM labels.impression_labels WHERE domain = '{DOMAIN}')""")
    assert impressions == labelled > 0
    instance = cycle.instance
    assert len(instance.get_materialized_partitions(LABELS)) == DAYS
    assert len(instance.get_materialized_partitions(RAW_EVENTS)) == DAYS


def test_the_candidate_is_registered_with_its_lineage_and_the_auto_domain_deploys_it(cycle):
    home, config, defs, instance, result = cycle
    registration = metadata(result, model_keys(DOMAIN)["registered_candidate"])
    assert registration["model"] == registry.model_name(DOMAIN)
    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    version = str(registration["version"])
    tags = client.get_model_version(registry.model_name(DOMAIN), version).tags
    training = metadata(result, model_keys(DOMAIN)["candidate_model"])
    validation = metadata(result, model_keys(DOMAIN)["validation_report"])
    assert tags["training.run_id"] == training["training_run_id"]
    assert tags["validation.run_id"] == validation["validation_run_id"]
    assert tags["training.train_end"] < tags["training.holdout_start"]
    assert {"code_version", "validation.gate", "training.self_consumption_share"} <= set(tags)
    [(label_model,)] = rows(home, "SELECT DISTINCT label_model_version FROM labels.impression_labels")
    assert tags["training.label_model_version"] == label_model
    with connect(home.warehouse(DOMAIN)) as con:  # trained on mature days only, and says so
        assert training["mature_until"] == maturity_cutoff(con, config, DOMAIN, LAST).isoformat()
    assert training["train_end"] <= training["mature_until"]

    # assistant is automation=full: its approval is on record, the sensor deploys it
    context = dg.build_sensor_context(instance=instance, resources={"warehouse": defs.resources["warehouse"]})
    (request,) = defs.resolve_sensor_def("approval_sensor")(context).run_requests
    deploy = defs.resolve_job_def("deploy_champion")
    assert deploy.execute_in_process(run_config=request.run_config, instance=instance).success
    assert registry.alias_version(client, DOMAIN, registry.CHAMPION) == version


def test_rerunning_the_cycle_changes_no_raw_or_label_row(cycle):
    home, _, defs, instance, _ = cycle
    query = f"""SELECT (SELECT count(*) FROM raw.interactions), (SELECT count(*) FROM raw.signals),
                       (SELECT count(*) FROM raw.quarantine),
                       (SELECT sum(hash(interaction_id, item_id, p_good)) FROM labels.impression_labels
                        WHERE domain = '{DOMAIN}')"""
    before = rows(home, query)
    again = execute_cycle(defs, instance, DOMAIN, FIRST, LAST,
                      asset_selection=[RAW_EVENTS, LABELS, *dbt_model_keys()])
    assert again.success
    assert rows(home, query) == before


def requested_days(request: dg.RunRequest) -> set:
    """The (domain, day) partitions one late-label run covers (its partition range tags)."""
    first, last = (request.tags[tag] for tag in (PARTITION_RANGE_START_TAG, PARTITION_RANGE_END_TAG))
    (domain, start), (_, end) = (key.split("|")[::-1] for key in (first, last))
    days = range((date.fromisoformat(end) - date.fromisoformat(start)).days + 1)
    return {(domain, date.fromisoformat(start) + timedelta(days=offset)) for offset in days}


def test_late_outcomes_relabel_exactly_their_labelled_days(cycle):
    home, config, defs, instance, _ = cycle
    late_label_sensor = defs.resolve_sensor_def("late_label_sensor")
    sensor_resources = {"warehouse": defs.resources["warehouse"]}
    context = dg.build_sensor_context(instance=instance, resources=sensor_resources, definitions=defs)
    first_tick = late_label_sensor(context)
    assert not first_tick.run_requests  # nothing arrived after labelling

    # three more days of traffic carry outcomes of interactions from the labelled days
    later = LAST + timedelta(days=1)
    simulation.simulate(home, config, later, 3, seed=3, interactions_per_day=250, domains=[DOMAIN])
    assert execute_cycle(defs, instance, DOMAIN, later, later + timedelta(days=2), asset_selection=[RAW_EVENTS]).success
    expected = {date_ for (date_,) in rows(home, f"""
        SELECT DISTINCT i.event_date FROM raw.outcomes o JOIN raw.interactions i USING (domain, interaction_id)
        WHERE o.domain = '{DOMAIN}' AND i.event_date <= DATE '{LAST}'
          AND o.ingested_at > (SELECT min(labelled_at) FROM labels.impression_labels l
                               WHERE l.domain = i.domain AND l.event_date = i.event_date)""")}
    assert expected  # the simulator's delayed outcomes reach back into labelled days

    context = dg.build_sensor_context(instance=instance, resources=sensor_resources, definitions=defs,
                                      cursor=first_tick.cursor)
    tick = late_label_sensor(context)
    requested = set().union(*(requested_days(request) for request in tick.run_requests))
    assert requested == {(DOMAIN, day) for day in expected}
    assert {request.job_name for request in tick.run_requests} == {relabel_job_name(DOMAIN)}
    job = defs.resolve_job_def(relabel_job_name(DOMAIN))  # the dbt models feeding labels, and labels
    assert {LABELS, fct_impressions_key()} <= job.asset_layer.executable_asset_keys
    assert RAW_EVENTS not in job.asset_layer.executable_asset_keys  # never accumulation

    again = dg.build_sensor_context(instance=instance, resources=sensor_resources, definitions=defs,
                                    cursor=tick.cursor)
    assert not late_label_sensor(again).run_requests  # no storm: the batch was seen

    before = dict(rows(home, f"""SELECT event_date, sum(hash(interaction_id, item_id, p_good))
                                 FROM labels.impression_labels WHERE domain = '{DOMAIN}' GROUP BY ALL"""))
    for request in tick.run_requests:  # what the daemon launches for each request
        run = job.execute_in_process(instance=instance, tags=request.tags, raise_on_error=False)
        assert run.success and run.dagster_run.job_name == relabel_job_name(DOMAIN)
    after = dict(rows(home, f"""SELECT event_date, sum(hash(interaction_id, item_id, p_good))
                                FROM labels.impression_labels WHERE domain = '{DOMAIN}' GROUP BY ALL"""))
    assert {day for day in before if after[day] != before[day]} <= expected
    assert any(after[day] != before[day] for day in expected)
    assert all(after[day] == before[day] for day in before if day not in expected)


def test_the_health_audit_checks_each_trap_writes_its_report_and_a_blocking_flag_stops_registration(cycle):
    home, config, _, instance, result = cycle
    health = model_keys(DOMAIN)["flywheel_health"]
    checks = {e.check_name: e for e in result.get_asset_check_evaluations() if e.asset_key == health}
    assert set(checks) == set(TRAPS) and all(e.passed for e in checks.values())
    assert all(e.severity == dg.AssetCheckSeverity.WARN for e in checks.values())  # none blocks by default
    shown = metadata(result, health)
    report = Path(shown["report"])
    assert shown["flagged"] == "none" and report.exists() and "<svg" in report.read_text()
    assert 0 < shown["exploration_share"] < 1 and "| exposure_bias | healthy |" in shown["verdicts"]
    validation = metadata(result, model_keys(DOMAIN)["validation_report"])
    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    assert [a.path for a in client.list_artifacts(validation["validation_run_id"], "health")] == [
        f"health/{report.name}"]
    assert {trap for (trap,) in rows(home, "SELECT DISTINCT trap FROM health.measures")} == {*TRAPS, "validation"}
    registered = client.get_model_version(registry.model_name(DOMAIN), str(
        metadata(result, model_keys(DOMAIN)["registered_candidate"])["version"]))
    assert registered.tags["health.flagged"] == "none"

    # the same candidate again, under a domain that demands more exploration than the logs hold and
    # makes exposure_bias blocking: the check fails as an error and nothing is registered
    strict = config.model_copy(update={"domains": {**config.domains, DOMAIN: config.domain(DOMAIN).model_copy(
        update={"health": HealthSettings(blocking=["exposure_bias"], min_exploration_share=0.5)})}})
    job = build_definitions(strict, home).resolve_job_def(cycle_job_name(DOMAIN))
    again = job.execute_in_process(instance=instance, raise_on_error=False, tags=result.dagster_run.tags,
                                   asset_selection=[health, model_keys(DOMAIN)["registered_candidate"]])
    blocked = {e.check_name: e for e in again.get_asset_check_evaluations()}
    assert not blocked["exposure_bias"].passed
    assert blocked["exposure_bias"].severity == dg.AssetCheckSeverity.ERROR
    assert "exploration share" in blocked["exposure_bias"].metadata["measured"].value
    assert model_keys(DOMAIN)["registered_candidate"] not in {
        e.asset_key for e in again.get_asset_materialization_events()}
