"""The three uses as people run them, through the real Dagster daemon and webserver.

One temporary home, a code server, ``dagster-daemon run`` and ``dagster-webserver``, driven through
the webserver's GraphQL API the way the UI drives it: a person turns the domain's schedule on and
its tick launches the cycle; late outcomes land and the late-label sensor's tick launches the
re-labelling of exactly the days they reach; a person launches approve_candidate and the approval
sensor's tick deploys it. No sensor or schedule tick may fail on the way.

It runs under the production profile (docs/deploying.md): the Dagster instance and MLflow's store
and registry in a throwaway PostgreSQL server (the ``postgres_url`` fixture), which it checks they
really used; without PostgreSQL's binaries it is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg
import mlflow
import psycopg2
import pytest
import yaml

from flywheel_pipeline import registry, simulation
from flywheel_pipeline.config import load_config
from flywheel_pipeline.defs.assets import model_keys
from flywheel_pipeline.defs.jobs import LATE_LABELS_TAG, relabel_job_name
from flywheel_pipeline.defs.partitions import (
    PARTITION_RANGE_END_TAG,
    PARTITION_RANGE_START_TAG,
    range_tags,
)
from flywheel_pipeline.defs.ui import APPROVE_JOB, APPROVE_OP
from flywheel_pipeline.home import Home
from flywheel_pipeline.launcher import LOCATION, Dagster, local_dagster, webserver
from flywheel_pipeline.runs import read_outcome
from flywheel_pipeline.warehouse import connect
from tests.conftest import REPO
from tests.signing import declare, signed, ssh_key

DOMAIN = "assistant"
SCHEDULE = f"{DOMAIN}_cadence"
REPOSITORY = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__"}
MIDNIGHT_MARGIN = timedelta(minutes=5)  # more than the test takes from simulating to the schedule's tick

pytestmark = [pytest.mark.timeout(1500), pytest.mark.postgres, pytest.mark.slow]
ARTIFACTS = "shared-artifacts"  # production.mlflow_artifacts, under the home


def write_config(path, production: bool = False) -> Path:
    """flywheel.yaml with one domain at automation oversight, written by its old name `manual` (a person
    approves, with their SSH key: made beside the file, ``approver_key``), on a per-minute cadence,
    quick sensors; the embedded profile, or the production one."""
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    domain = raw["domains"][DOMAIN]
    domain.update(cadence="* * * * *", lookback_days=4, holdout_days=2, automation="manual")
    domain["gate"].update(min_samples=100, min_ess=20)
    raw["domains"] = {DOMAIN: domain}
    raw["daemon"] = {"schedules": "stopped", "approval_sensor_seconds": 5, "late_label_sensor_seconds": 5}
    if production:
        raw.update(profile="production", production={"mlflow_artifacts": ARTIFACTS})
    approver = domain["approvers"][0]
    key = ssh_key(path.parent / "keys", approver)
    path.write_text(yaml.safe_dump(declare(raw, {approver: key})))
    return key


def approver_key(config_file: Path) -> Path:
    """The SSH key of the approver the flywheel.yaml ``write_config`` wrote declares."""
    return config_file.parent / "keys" / yaml.safe_load(config_file.read_text())["domains"][DOMAIN]["approvers"][0]


class GraphQL:
    """The webserver's GraphQL endpoint, as the UI calls it."""

    def __init__(self, url: str) -> None:
        self.url = f"{url}/graphql"

    def __call__(self, query: str, **variables) -> dict:
        request = urllib.request.Request(self.url, data=json.dumps({"query": query, "variables": variables}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            body = json.loads(response.read())
        assert "errors" not in body, body["errors"]
        return body["data"]


def wait_for(condition, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f}s"
        time.sleep(2)
    return result


def stop_between_ticks(web: GraphQL, selector: dict) -> None:
    """Reset the per-minute schedule to its default, stopped, where no tick is in flight: the daemon
    saves the schedule's state as it ends a tick, over a reset made meanwhile (then the schedule
    went on launching a cycle a minute). Ticks start on the minute and take seconds; checked after."""
    for _ in range(3):
        while not 15 <= datetime.now(UTC).second <= 45:
            time.sleep(1)
        assert web(RESET_SCHEDULE, selector=selector)["resetSchedule"]["scheduleState"]["status"] == "STOPPED"
        time.sleep(5)
        if web(SCHEDULE_STATUS, selector=selector)["scheduleOrError"]["scheduleState"]["status"] == "STOPPED":
            return
    raise AssertionError("the schedule did not stay stopped")


def finished_run(dagster: Dagster, timeout: float, **tags: str) -> dg.DagsterRun:
    """The first run carrying ``tags``, once it has finished."""
    runs = wait_for(lambda: dagster.instance.get_runs(dg.RunsFilter(tags=tags)), f"a run tagged {tags}", timeout)
    return dagster.wait(runs[-1].run_id, timeout=timeout)


SCHEDULE_STATUS = """
query Status($selector: ScheduleSelector!) {
  scheduleOrError(scheduleSelector: $selector) { ... on Schedule { scheduleState { status } } }
}"""
TICKS = """
query Ticks($sensor: SensorSelector!, $schedule: ScheduleSelector!) {
  sensorOrError(sensorSelector: $sensor) { ... on Sensor { sensorState { ticks(limit: 200) { status error { message } } } } }
  scheduleOrError(scheduleSelector: $schedule) {
    ... on Schedule { scheduleState { ticks(limit: 200) { status error { message } } } } }
}"""


def ticks(web: GraphQL, sensor: str) -> dict[str, list[dict]]:
    data = web(TICKS, sensor={**REPOSITORY, "sensorName": sensor},
                       schedule={**REPOSITORY, "scheduleName": SCHEDULE})
    return {sensor: data["sensorOrError"]["sensorState"]["ticks"],
            SCHEDULE: data["scheduleOrError"]["scheduleState"]["ticks"]}


def labelled_days_with_outcomes_after(home: Home, since: datetime) -> set[date]:
    """Labelled days whose interactions got outcomes ingested after ``since`` and after labelling."""
    with connect(home.warehouse(DOMAIN), read_only=True) as con:
        return {day for (day,) in con.execute(f"""
            SELECT DISTINCT i.event_date FROM raw.outcomes o JOIN raw.interactions i USING (domain, interaction_id)
            WHERE o.domain = '{DOMAIN}' AND o.ingested_at > ? AND o.ingested_at > (
                SELECT min(labelled_at) FROM labels.impression_labels l
                WHERE l.domain = i.domain AND l.event_date = i.event_date)""", [since]).fetchall()}


def covered_days(run: dg.DagsterRun) -> set[date]:
    first, last = (date.fromisoformat(run.tags[tag].split("|")[0])
                   for tag in (PARTITION_RANGE_START_TAG, PARTITION_RANGE_END_TAG))
    return {first + timedelta(days=offset) for offset in range((last - first).days + 1)}


def postgres_rows(url: str, query: str, *params) -> list[tuple]:
    with psycopg2.connect(url.replace("+psycopg2", ""), connect_timeout=10) as con, con.cursor() as cursor:
        cursor.execute(query, params)
        return cursor.fetchall()


def yesterday() -> date:
    """The last day of the traffic, yesterday (UTC): the per-minute schedule's tick runs it and the
    lateness days before it. Within MIDNIGHT_MARGIN of midnight it waits for the new day first, so
    the tick falls on the same day as the traffic whenever the test runs."""
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    if midnight - now < MIDNIGHT_MARGIN:
        time.sleep((midnight - now).total_seconds() + 1)
    return datetime.now(UTC).date() - timedelta(days=1)


@pytest.fixture
def deployment(tmp_path, monkeypatch, postgres_url):
    """A home with 14 days of traffic (the last day's batch held back), a code server, the daemon
    and the webserver, all on loopback ports; Dagster's instance and MLflow in PostgreSQL."""
    for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI", "FLYWHEEL_CONFIG", "FLYWHEEL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLYWHEEL_POSTGRES_URL", postgres_url)
    write_config(tmp_path / "flywheel.yaml", production=True)
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(tmp_path / "flywheel.yaml"))
    home = Home(tmp_path / "home")
    monkeypatch.setenv("FLYWHEEL_HOME", str(home.root))
    home.activate()
    config, last = load_config(), yesterday()
    simulation.simulate(home, config, last - timedelta(days=13), 14, seed=5, interactions_per_day=400,
                        domains=[DOMAIN])
    held_back = tmp_path / "held_back.jsonl"
    shutil.move(home.landing_file(DOMAIN, last.isoformat()), held_back)
    with (tmp_path / "services.log").open("a") as log, local_dagster(home, log) as dagster, \
            webserver(dagster.workspace, log) as url:
        yield home, config, dagster, GraphQL(url), held_back, last


START_SCHEDULE = """
mutation Start($selector: ScheduleSelector!) {
  startSchedule(scheduleSelector: $selector) { ... on ScheduleStateResult { scheduleState { status } } }
}"""
RESET_SCHEDULE = """
mutation Reset($selector: ScheduleSelector!) {
  resetSchedule(scheduleSelector: $selector) {
    __typename ... on ScheduleStateResult { scheduleState { status } } ... on PythonError { message }
  }
}"""
LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""


def launch(web: GraphQL, job: str, run_config: dict | None = None, tags: dict | None = None,
           assets: list[list[str]] | None = None) -> str:
    """Launch ``job`` as the Launchpad does."""
    params = {"selector": {**REPOSITORY, "jobName": job,
                           **({"assetSelection": [{"path": path} for path in assets]} if assets else {})},
              "runConfigData": run_config or {},
              "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]}}
    result = web(LAUNCH, params=params)["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def test_schedules_late_label_backfills_and_ui_approval_run_through_the_daemon(deployment):
    home, config, dagster, web, held_back, last = deployment
    # Both URIs: an earlier test in this process may have pointed MLflow's global registry elsewhere.
    client = mlflow.MlflowClient(tracking_uri=home.mlflow_tracking_uri, registry_uri=home.mlflow_tracking_uri)

    # 1. A person turns the schedule on (it ships stopped); its next tick launches the cycle.
    selector = {**REPOSITORY, "scheduleName": SCHEDULE}
    assert web(START_SCHEDULE, selector=selector)["startSchedule"]["scheduleState"]["status"] == "RUNNING"
    launched = wait_for(lambda: dagster.instance.get_runs(dg.RunsFilter(tags={"dagster/schedule_name": SCHEDULE})),
                        "the schedule's first tick", timeout=180)
    # Put the schedule back to its default, stopped: the next minute's tick would launch another cycle.
    wait_for(lambda: [t["status"] for t in ticks(web, "approval_sensor")[SCHEDULE]][:1] == ["SUCCESS"],
             "the schedule's tick to end", timeout=60)
    stop_between_ticks(web, selector)
    cycle = dagster.wait(launched[-1].run_id, timeout=600)
    assert cycle.status == dg.DagsterRunStatus.SUCCESS
    assert covered_days(cycle) == {last - timedelta(days=offset) for offset in range(config.max_lateness_days + 1)}
    outcome = read_outcome(dagster.instance, DOMAIN, cycle)
    assert outcome.gate == "passed" and outcome.version  # oversight domain: registered, waiting for a person
    assert registry.alias_version(client, DOMAIN, registry.CANDIDATE) == outcome.version
    assert registry.alias_version(client, DOMAIN, registry.CHAMPION) is None

    # 2. Yesterday's batch lands late, carrying outcomes of interactions on days already labelled.
    shutil.move(held_back, home.landing_file(DOMAIN, last.isoformat()))
    landed = datetime.now(UTC).replace(tzinfo=None)
    accumulation = dagster.wait(launch(web, f"{DOMAIN}_cycle", tags=range_tags(DOMAIN, last, last),
                                       assets=[["raw_events"]]))
    assert accumulation.status == dg.DagsterRunStatus.SUCCESS
    relabel = finished_run(dagster, 600, **LATE_LABELS_TAG)
    assert relabel.status == dg.DagsterRunStatus.SUCCESS
    assert relabel.tags["dagster/sensor_name"] == "late_label_sensor"
    assert relabel.job_name == relabel_job_name(DOMAIN)  # shown under its own job, not __ASSET_JOB
    dagster.wait_for_idle()
    relabelled = set().union(*(covered_days(run) for run in dagster.instance.get_runs(dg.RunsFilter(tags=LATE_LABELS_TAG))))
    with connect(home.warehouse(DOMAIN), read_only=True) as con:
        reached = {day for (day,) in con.execute(f"""
            SELECT DISTINCT i.event_date FROM raw.outcomes o JOIN raw.interactions i USING (domain, interaction_id)
            WHERE o.domain = '{DOMAIN}' AND o.ingested_at >= ? AND i.event_date < ?""", [landed, last]).fetchall()}
    assert reached and relabelled == reached  # exactly the labelled days the late outcomes reach
    assert labelled_days_with_outcomes_after(home, landed) == set()  # each re-labelled after they landed

    # 3. A person approves the candidate in the Launchpad, with their signature; the approval sensor deploys it.
    signature = signed(home.approvals, client, approver_key(Path(os.environ["FLYWHEEL_CONFIG"])), DOMAIN,
                       outcome.version)
    approval = {"ops": {APPROVE_OP: {"config": {"domain": DOMAIN, "version": outcome.version,
                                                "approver": config.domain(DOMAIN).approvers[0],
                                                "signature": signature}}}}
    assert dagster.wait(launch(web, APPROVE_JOB, approval)).status == dg.DagsterRunStatus.SUCCESS
    deploy = finished_run(dagster, 300, **{"flywheel/version": outcome.version, "flywheel/domain": DOMAIN})
    assert deploy.job_name == "deploy_champion" and deploy.status == dg.DagsterRunStatus.SUCCESS
    assert registry.alias_version(client, DOMAIN, registry.CHAMPION) == outcome.version
    (shown,) = dagster.instance.fetch_observations(model_keys(DOMAIN)["registered_candidate"], limit=1).records
    assert shown.asset_observation.metadata["champion"].value.startswith(f"v{outcome.version} (deployed ")

    # No tick failed, and the runs are the UI's: under their job, from the code location.
    for sensor in ("approval_sensor", "late_label_sensor"):
        for name, history in ticks(web, sensor).items():
            assert history, f"{name} never ticked"
            assert not [t for t in history if t["status"] == "FAILURE"], (name, history)
    for run in (cycle, accumulation, relabel, deploy):
        assert run.remote_job_origin.location_name == LOCATION

    # Everything lived in PostgreSQL: Dagster's runs, event log and schedules, MLflow's registry.
    dagster_db = config.production.postgres_url()
    runs = dict(postgres_rows(dagster_db, "SELECT run_id, status FROM runs"))
    assert {runs[run.run_id] for run in (cycle, accumulation, relabel, deploy)} == {"SUCCESS"}
    assert postgres_rows(dagster_db, "SELECT count(*) FROM event_logs WHERE run_id = %s", cycle.run_id)[0][0] > 100
    assert postgres_rows(dagster_db, "SELECT count(*) FROM job_ticks WHERE type = 'SCHEDULE' AND status = 'SUCCESS' "
                         "AND tick_body LIKE %s", f"%{SCHEDULE}%")[0][0] >= 1
    assert postgres_rows(dagster_db, "SELECT count(*) FROM job_ticks WHERE type = 'SENSOR'")[0][0] > 0
    assert (registry.model_name(DOMAIN), registry.CHAMPION, int(outcome.version)) in postgres_rows(
        home.mlflow_tracking_uri, "SELECT name, alias, version FROM registered_model_aliases")
    deployed = client.get_model_version(registry.model_name(DOMAIN), outcome.version)
    assert client.get_run(deployed.run_id).info.artifact_uri.startswith((home.root / ARTIFACTS).as_uri())
    assert not list(home.dagster.rglob("*.db")) and not (home.mlflow / "mlflow.db").exists()
