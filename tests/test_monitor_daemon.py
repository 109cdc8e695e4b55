"""After a bad deployment, through the real Dagster daemon: at automation full the monitor rolls the
champion back without a person; at oversight it alerts (a webhook received by a local server) and
nothing moves until a person decides.

The situation is built, not drawn: the simulator's ``stale_holdout`` scenario (a fad during the 10
days before the second cycle, gone after them) makes the second cycle's candidate, fitted and held
out inside the fad, pass its gate and then lose live to the champion it replaced, by construction
(benchmarks/monitor.py measures the same on more seeds).
"""

from __future__ import annotations

import shutil
import time
from datetime import timedelta
from pathlib import Path

import dagster as dg
import mlflow
import pytest
import yaml

from benchmarks.monitor import DOMAIN, Loop
from flywheel_pipeline import registry
from flywheel_pipeline.cli import main
from flywheel_pipeline.defs.monitor import monitor_job_name
from flywheel_pipeline.defs.partitions import range_tags
from flywheel_pipeline.home import Home
from flywheel_pipeline.launcher import local_dagster
from flywheel_pipeline.warehouse import connect

pytestmark = [pytest.mark.slow, pytest.mark.monitor_daemon, pytest.mark.timeout(1500)]
WATCH_DAYS = 8
SEED = 1
WEBHOOK_ENV = "FLYWHEEL_TEST_WEBHOOK"


@pytest.fixture(scope="module")
def bad_deployment(tmp_path_factory):
    """A home at automation full where v2 (deployed after v1) is truly worse than v1 on the
    WATCH_DAYS served since; and a copy of it, before any monitor ran, set to oversight."""
    root = tmp_path_factory.mktemp("monitor-full")
    with pytest.MonkeyPatch.context() as patch:
        loop = simulated(patch, root, "stale_holdout")
        first = loop.event - timedelta(days=20)
        loop.serve(first, 10)
        v1 = loop.cycle(first, first + timedelta(days=9))
        loop.serve(first + timedelta(days=10), 10)
        v2 = loop.cycle(first + timedelta(days=10 - loop.config.max_lateness_days), loop.event - timedelta(days=1))
        assert v1 and v2 and v2 != v1, "both cycles pass and deploy"
        assert loop.true_value(v2, loop.event) < loop.true_value(v1, loop.event) - 0.02  # the built situation
        loop.serve(loop.event, WATCH_DAYS)
        loop.instance.dispose()
    configure(root, drift={"triggers_cycle": False})  # no drift cycle: the monitor alone acts
    oversight = tmp_path_factory.mktemp("monitor-oversight") / "project"
    shutil.copytree(root, oversight)
    configure(oversight, automation="oversight", alerts={"webhook_url_env": WEBHOOK_ENV})
    return {"full": root, "oversight": oversight, "v1": v1, "v2": v2, "days": (loop.event, loop.event + timedelta(days=WATCH_DAYS - 1))}


def simulated(patch: pytest.MonkeyPatch, root: Path, scenario: str) -> Loop:
    """The benchmark's simulated project under ``root``; the variables its home sets are recorded
    in ``patch`` first, so they are undone after."""
    for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        patch.setenv(name, "")
    patch.setenv("FLYWHEEL_CONFIG", str(root / "flywheel.yaml"))
    return Loop(root, SEED, scenario=scenario)


def configure(root: Path, alerts: dict | None = None, **domain: object) -> None:
    """Change the project's flywheel.yaml: the domain's settings, and the alerts."""
    raw = yaml.safe_load((root / "flywheel.yaml").read_text())
    raw["domains"][DOMAIN].update(domain)
    if alerts:
        raw["alerts"] = alerts
    (root / "flywheel.yaml").write_text(yaml.safe_dump(raw))


def services(root: Path, patch: pytest.MonkeyPatch):
    """The project at ``root`` as a deployment runs it: its home active, a code server and the daemon."""
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        patch.delenv(name, raising=False)
    patch.setenv("FLYWHEEL_CONFIG", str(root / "flywheel.yaml"))
    patch.setenv("FLYWHEEL_HOME", str(root / "home"))
    home = Home(root / "home").activate()
    return home, local_dagster(home, (root / "services.log").open("a"))


def client_of(home: Home) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=home.mlflow_tracking_uri, registry_uri=home.mlflow_tracking_uri)


def check_results(instance: dg.DagsterInstance, run_id: str) -> dict[str, bool]:
    return {e.check_name: e.passed for e in (record.event_log_entry.dagster_event.event_specific_data
                                             for record in instance.get_records_for_run(
                                                 run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records)}


def test_at_full_a_live_regression_is_rolled_back_without_a_person(bad_deployment, capsys):
    first, last = bad_deployment["days"]
    with pytest.MonkeyPatch.context() as patch:
        home, started = services(bad_deployment["full"], patch)
        with started as dagster:
            dagster.wait(dagster.submit(monitor_job_name(DOMAIN), tags=range_tags(DOMAIN, first, last)))
            deploy = wait_for_run(dagster.instance, "deploy_champion")
            assert deploy.status == dg.DagsterRunStatus.SUCCESS
            assert deploy.tags["dagster/sensor_name"] == "approval_sensor"  # no person launched it
        client = client_of(home)
        assert registry.alias_version(client, DOMAIN, registry.CHAMPION) == bad_deployment["v1"]
        tags = registry.version_tags(client, DOMAIN, bad_deployment["v1"])
        assert tags["approval.approver"] == "flywheel:auto" and tags["approval.reason"].startswith(
            f"rollback: v{bad_deployment['v2']} regressed live")
        with connect(home.warehouse(DOMAIN), read_only=True) as con:  # the day v2 was found regressed, kept
            [(declared,)] = con.execute("SELECT min(event_date) FILTER (regressed) FROM health.champion_monitor "
                                        "WHERE version = ?", [bad_deployment["v2"]]).fetchall()
        assert first <= declared <= last
        main(["status"])
        shown = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
        assert f"champion=v{bad_deployment['v1']}" in shown and f"previous=v{bad_deployment['v2']}" in shown
        assert f"flywheel:auto: rollback: v{bad_deployment['v2']} regressed live" in shown


def test_at_oversight_the_same_regression_alerts_and_nothing_moves(bad_deployment, webhook):
    first, last = bad_deployment["days"]
    url, received = webhook
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(WEBHOOK_ENV, url)
        home, started = services(bad_deployment["oversight"], patch)
        with started as dagster:
            run = dagster.wait(dagster.submit(monitor_job_name(DOMAIN), tags=range_tags(DOMAIN, first, last)))
            assert check_results(dagster.instance, run.run_id)["live_regression"] is False
            dagster.wait_for_idle()
            assert not dagster.instance.get_runs(dg.RunsFilter(job_name="deploy_champion"))  # nothing deployed
    kinds = [message["kind"] for message in received]
    assert "live_regression" in kinds and kinds.count("live_regression") == 1  # once per deployment
    text = next(m["text"] for m in received if m["kind"] == "live_regression")
    assert f"v{bad_deployment['v2']} regressed live" in text and "a person decides" in text
    assert registry.alias_version(client_of(home), DOMAIN, registry.CHAMPION) == bad_deployment["v2"]


def test_new_items_drift_launches_an_off_cadence_cycle_through_the_sensor(tmp_path):
    """The simulator's new_items scenario: from the day on a quarter of the candidates are items the
    training window never showed; once those days are in the warehouse, the daemon's drift sensor
    launches the domain's cycle, tagged as drift's, without a schedule or a person."""
    with pytest.MonkeyPatch.context() as patch:
        loop = simulated(patch, tmp_path, "new_items")
        first = loop.event - timedelta(days=10)
        loop.serve(first, 13)  # 10 days as before, 3 with new items
        last = first + timedelta(days=12)
        job = loop.defs.resolve_job_def(monitor_job_name(DOMAIN))  # accumulate + marts, nothing to watch yet
        assert job.execute_in_process(instance=loop.instance, tags=range_tags(DOMAIN, first, last)).success
        loop.instance.dispose()
        raw = yaml.safe_load((tmp_path / "flywheel.yaml").read_text())
        raw["daemon"] = {"late_label_sensor_seconds": 5, "approval_sensor_seconds": 5}
        (tmp_path / "flywheel.yaml").write_text(yaml.safe_dump(raw))
        _, started = services(tmp_path, patch)
        with started as dagster:
            drift_cycle = wait_for_run(dagster.instance, f"{DOMAIN}_cycle", timeout=300, finished=False)
            # the launch is the sensor's part (a cycle's own run is tests/test_pipeline.py's): stop it
            dagster.instance.run_coordinator.cancel_run(drift_cycle.run_id)
        assert drift_cycle.tags["dagster/sensor_name"] == "drift_sensor"
        assert drift_cycle.tags["flywheel/reason"] == "drift" and "new items" in drift_cycle.tags["flywheel/drift"]


def wait_for_run(instance: dg.DagsterInstance, job: str, timeout: float = 180, finished: bool = True) -> dg.DagsterRun:
    """The latest run of ``job`` once it exists (and, with ``finished``, has finished): a sensor
    launches it within its interval."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = instance.get_runs(dg.RunsFilter(job_name=job))
        if runs and (runs[0].is_finished or not finished):
            return runs[0]
        time.sleep(2)
    raise AssertionError(f"no {'finished ' if finished else ''}{job} run within {timeout:.0f}s")
