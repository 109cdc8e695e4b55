"""Runs that recover: a run whose processes are killed is marked failed and leaves the queue, dbt
dies with its run, MLflow runs a dead run left RUNNING are closed, and a domain runs once at a time.

Each kill is a real SIGKILL of real processes: a `flywheel run` with everything it started (as a
crash, an OOM kill of its container or a reboot would), or the process running dbt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import mlflow
import psutil
import pytest

from flywheel_pipeline import registry, simulation
from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.cli import main
from flywheel_pipeline.config import load_config, parse_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.jobs import cycle_job_name
from flywheel_pipeline.home import Home
from flywheel_pipeline.launcher import (
    HEARTBEAT_FRESH_SECONDS,
    Dagster,
    LaunchError,
    daemon_running,
    in_progress,
    local_dagster,
    run_worker,
)
from flywheel_pipeline.runs import read_outcome, run_cycle
from flywheel_pipeline.training import train_candidate
from flywheel_pipeline.training.base import DAGSTER_RUN_TAG, close_abandoned_runs, ensure_experiment
from flywheel_pipeline.warehouse import connect
from tests.conftest import REPO
from tests.test_daemon import DOMAIN, approver_key, wait_for, write_config
from tests.test_training import (
    AS_OF,
    TEST_CONFIG,
    assistant_impressions,
    fresh_home,
    write_warehouse,
)

LAST = date(2026, 11, 28)  # fixed days, whose simulated traffic (seed 6) gives a candidate that passes its gate
FIRST = LAST - timedelta(days=6)


@pytest.fixture
def simulated(tmp_path, monkeypatch) -> Home:
    """A home with a week of assistant traffic (automation oversight: a person approves; a 5 s
    approval sensor), active in this process and in the commands it starts."""
    for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI", "FLYWHEEL_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    write_config(tmp_path / "flywheel.yaml")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(tmp_path / "flywheel.yaml"))
    home = Home(tmp_path / "home")
    monkeypatch.setenv("FLYWHEEL_HOME", str(home.root))
    home.activate()
    simulation.simulate(home, load_config(), FIRST, 7, seed=6, interactions_per_day=400, domains=[DOMAIN])
    return home


def failed_at(instance: dg.DagsterInstance, run_id: str) -> float:
    [record] = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    return record.event_log_entry.timestamp


def started_at(instance: dg.DagsterInstance, run_id: str) -> float:
    [record] = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_START).records
    return record.event_log_entry.timestamp


@pytest.mark.timeout(1500)
@pytest.mark.slow
def test_a_killed_run_is_marked_failed_and_the_next_deployment_is_not_blocked(simulated, capsys):
    home, config = simulated, load_config()
    instance = dg.DagsterInstance.get()
    # A first cycle registers a candidate for a person to approve.
    first = execute_cycle(build_definitions(config, home), instance, DOMAIN, FIRST, LAST)
    outcome = read_outcome(instance, DOMAIN, instance.get_run_by_id(first.run_id))
    assert first.success and outcome.version, (outcome.gate, outcome.reasons)
    client = mlflow.MlflowClient(tracking_uri=home.mlflow_tracking_uri, registry_uri=home.mlflow_tracking_uri)
    version = outcome.version
    assert registry.alias_version(client, DOMAIN, registry.CANDIDATE) == version

    # `flywheel run` is killed, with its code server, the run's process and its daemon.
    command = subprocess.Popen([sys.executable, "-m", "flywheel_pipeline.cli", "run", "--domain", DOMAIN,
                                "--start", str(FIRST), "--end", str(LAST)], cwd=REPO, env=os.environ.copy())
    job = cycle_job_name(DOMAIN)
    killed_run = wait_for(lambda: instance.get_runs(dg.RunsFilter(job_name=job, statuses=[dg.DagsterRunStatus.STARTED])),
                          "the run to start", timeout=600)[0]
    pid, _ = run_worker(instance, killed_run.run_id)
    started = psutil.Process(command.pid).children(recursive=True)
    assert pid in {process.pid for process in started}
    for group in {os.getpgid(process.pid) for process in started} - {os.getpgrp()}:
        os.killpg(group, signal.SIGKILL)  # the code server's (with the run's process) and the daemon's
    command.kill()
    killed = time.time()
    command.wait()
    psutil.wait_procs(started, timeout=10)
    assert instance.get_run_by_id(killed_run.run_id).status == dg.DagsterRunStatus.STARTED  # no one left to tell
    # A minute passes before the person's next command: the dead daemon's last heartbeats are aged by
    # the minute after which a heartbeat no longer counts (its processes are gone; nothing beats again).
    assert daemon_running(instance)
    for beat in instance.get_daemon_heartbeats().values():
        instance.add_daemon_heartbeat(beat._replace(timestamp=beat.timestamp - HEARTBEAT_FRESH_SECONDS))
    assert not daemon_running(instance)

    # A second run of the domain is refused while the dead one still counts as running.
    with pytest.raises(LaunchError, match=rf"domain {DOMAIN} is already running \(run {killed_run.run_id}"):
        run_cycle(Dagster(instance, home.dagster / "workspace.yaml", None), DOMAIN, FIRST, LAST)

    # The person's next command approves the candidate: its daemon marks the dead run failed, the
    # approval leaves the queue, and the approval sensor deploys it.
    main(["approve", "--domain", DOMAIN, "--approver", config.domain(DOMAIN).approvers[0],
          "--sign-with", str(approver_key(Path(os.environ["FLYWHEEL_CONFIG"])))])
    assert f"{DOMAIN} champion is v{version}" in capsys.readouterr().out
    assert registry.alias_version(client, DOMAIN, registry.CHAMPION) == version
    dead = instance.get_run_by_id(killed_run.run_id)
    assert dead.status == dg.DagsterRunStatus.FAILURE
    [message] = [r.event_log_entry.dagster_event.message for r in instance.get_records_for_run(
        dead.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records]
    assert f"(pid {pid}) is gone" in message
    approval = instance.get_runs(dg.RunsFilter(job_name="approve_candidate"))[0]
    marked, freed = failed_at(instance, dead.run_id) - killed, started_at(instance, approval.run_id) - killed
    print(f"\nkill -9 -> run marked FAILED {marked:.0f}s, -> the queued approval started {freed:.0f}s "
          f"(including the next command's daemon start)", file=sys.__stdout__)
    assert started_at(instance, approval.run_id) > failed_at(instance, dead.run_id)


DBT_PARENT = f"""
from datetime import date
import dagster as dg
from flywheel_pipeline.config import load_config
from flywheel_pipeline.defs.partitions import partition_key
from flywheel_pipeline.defs.transform import build_dbt_assets, dbt_resource
from flywheel_pipeline.home import Home
config = load_config()
dg.materialize([build_dbt_assets(config)], resources={{"dbt": dbt_resource(Home.from_env(), config)}},
               partition_key=partition_key({DOMAIN!r}, date.fromisoformat({FIRST.isoformat()!r})),
               instance=dg.DagsterInstance.ephemeral())
"""


def dbt_build(parent: int) -> psutil.Process | None:
    for child in psutil.Process(parent).children():
        try:
            if "build" in child.cmdline():
                return child
        except psutil.NoSuchProcess:  # e.g. the `dbt --version` dagster-dbt runs first
            pass
    return None


@pytest.mark.slow
def test_dbt_dies_with_the_process_that_runs_it(simulated):
    home, config = simulated, load_config()
    with connect(home.warehouse("assistant")) as con:
        accumulate(con, home, config, DOMAIN, [FIRST + timedelta(days=d) for d in range(7)])
    parent = subprocess.Popen([sys.executable, "-c", DBT_PARENT], cwd=REPO, env=os.environ.copy())
    dbt = wait_for(lambda: dbt_build(parent.pid), "dbt build", timeout=300)
    parent.kill()
    killed = time.monotonic()
    dbt.wait(timeout=10)  # psutil.TimeoutExpired when dbt outlives its parent
    print(f"\ndbt ended {time.monotonic() - killed:.2f}s after its parent was killed", file=sys.__stdout__)
    with duckdb.connect(str(home.warehouse("assistant"))) as con:  # the lock is free, and dbt did not go on building
        assert not con.sql("SELECT * FROM duckdb_tables() WHERE schema_name = 'marts'").fetchall()


def test_mlflow_runs_left_running_by_a_dead_run_are_closed_as_failed(tmp_path):
    home = fresh_home(tmp_path / "home")
    instance = dg.DagsterInstance.local_temp(str(home.dagster))
    live, dead = (instance.add_run(dg.DagsterRun(job_name="assistant_cycle", run_id=str(uuid.uuid4()),
                                                 status=status))
                  for status in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.FAILURE))
    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    experiment = ensure_experiment(home, "assistant")
    left = {name: client.create_run(experiment, tags=tags).info.run_id for name, tags in {
        "live": {DAGSTER_RUN_TAG: live.run_id}, "dead": {DAGSTER_RUN_TAG: dead.run_id},
        "unknown": {DAGSTER_RUN_TAG: str(uuid.uuid4())}, "untagged": {}}.items()}

    closed = close_abandoned_runs(home, "assistant", lambda run_id: in_progress(instance, run_id))

    assert sorted(closed) == sorted(left[name] for name in ("dead", "unknown", "untagged"))
    status = {name: client.get_run(run_id).info.status for name, run_id in left.items()}
    assert status == {"live": "RUNNING", "dead": "FAILED", "unknown": "FAILED", "untagged": "FAILED"}
    # A training run names its Dagster run, so the next start can tell whether it is still alive.
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        write_warehouse(con, assistant_impressions(31, 100))
        result = train_candidate(con, home, parse_config(TEST_CONFIG), "assistant", AS_OF,
                                 dagster_run_id=live.run_id)
    assert client.get_run(result.run_id).data.tags[DAGSTER_RUN_TAG] == live.run_id


SERVICES_HOLDER = """
import sys, time
from pathlib import Path
from flywheel_pipeline.home import Home
from flywheel_pipeline.launcher import _only_command_with_services
with _only_command_with_services(Home(Path(sys.argv[1]))):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_command_is_refused_while_one_runs_dagster_for_the_home(home, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(home.dagster))
    holder = subprocess.Popen([sys.executable, "-c", SERVICES_HOLDER, str(home.root)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LaunchError, match=rf"another flywheel command \(pid {holder.pid}: "), \
                local_dagster(home, None):
            pass
    finally:
        holder.kill()
        holder.wait()
