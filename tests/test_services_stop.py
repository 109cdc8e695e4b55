"""Services stop when asked. `make ui`, and a command that starts a code server and a daemon of its
own (`flywheel run` when no daemon runs), started the way that made `dagster dev` ignore both
signals (`... &` in a script: a background job of a non-interactive shell ignores SIGINT), end every
process they started within 15 s of SIGTERM or SIGINT to their process group, and leave no daemon
looking alive; the runs a stopped code server was running do not stay in progress.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import psutil
import pytest
from dagster._core.storage.tags import GRPC_INFO_TAG

from flywheel_pipeline.launcher import (
    _answers,
    _end_runs_of_stopped_server,
    _running,
    daemon_running,
    free_port,
)
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # starts Dagster's services, tens of seconds each

STOPPED_WITHIN_SECONDS = 15
START_TIMEOUT_SECONDS = 240
# What `flywheel run` does while no daemon runs (launcher.local_dagster), until it is stopped.
COMMAND_WITH_SERVICES = """
import time
from flywheel_pipeline.home import Home
from flywheel_pipeline.launcher import local_dagster
with local_dagster(Home.from_env().activate(), None):
    print("services started", flush=True)
    time.sleep(600)
"""


@contextmanager
def in_background(command: str, home: Path, output: Path) -> Iterator[subprocess.Popen]:
    """``command &`` in a script of its own session, with ``home`` as FLYWHEEL_HOME; whatever of it
    is left at the end is killed."""
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    with output.open("w") as log:
        shell = subprocess.Popen(["sh", "-c", f"{command} & wait"], cwd=REPO, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    leader = psutil.Process(shell.pid)
    try:
        yield shell
    finally:
        for process in still_running([leader, *leader.children(recursive=True)]):
            process.kill()
        shell.wait()


def wait_until(ready: Callable[[], bool], shell: subprocess.Popen, output: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not ready():
        printed = output.read_text()[-3000:]
        assert shell.poll() is None, f"it exited while starting:\n{printed}"
        assert time.monotonic() < deadline, f"not started in {START_TIMEOUT_SECONDS}s:\n{printed}"
        time.sleep(1)


def still_running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` that have not ended (a zombie has)."""
    return [process for process in processes if _running(process)]


def described(processes: list[psutil.Process]) -> list[str]:
    descriptions = []
    for process in processes:
        try:
            descriptions.append(f"{process.pid} {' '.join(process.cmdline())[:150]}")
        except psutil.Error:
            descriptions.append(str(process.pid))
    return descriptions


def assert_all_stop(shell: subprocess.Popen, signum: signal.Signals, home: Path) -> None:
    """Send ``signum`` to the group of ``shell``, whose daemon heartbeats for ``home``: every
    process it started ends within 15 s, and the daemon's heartbeats with it."""
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        assert daemon_running(instance), "started, but no daemon heartbeats"
        leader = psutil.Process(shell.pid)
        started = [leader, *leader.children(recursive=True)]
        # the shell, the command, the code server (and its gRPC server), the daemon
        assert len(started) >= 5, described(started)
        os.killpg(shell.pid, signum)
        sent = time.monotonic()
        while still_running(started) and time.monotonic() - sent < STOPPED_WITHIN_SECONDS:
            time.sleep(0.2)
        left = still_running(started)
        assert not left, f"{signum.name}, {STOPPED_WITHIN_SECONDS}s later: {described(left)}"
        assert not daemon_running(instance), "the stopped daemon's heartbeats look alive"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_make_ui_stops_every_process_it_started_on_a_signal(tmp_path, signum):
    home, port, output = tmp_path / "home", free_port(), tmp_path / "make-ui.log"
    # --old-file: the venv is the one running these tests, whatever its timestamps say.
    make_ui = f"make --old-file=.venv/.installed ui UI_PORT={port}"
    with in_background(make_ui, home, output) as shell:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/server_info"), shell, output)
        assert_all_stop(shell, signum, home)
    assert "stopped the Dagster UI" in output.read_text()


def test_a_command_stops_the_code_server_and_daemon_it_started_on_sigterm(tmp_path):
    home, output = tmp_path / "home", tmp_path / "command.log"
    command = f"{sys.executable} -c '{COMMAND_WITH_SERVICES}'"
    with in_background(command, home, output) as shell:
        wait_until(lambda: "services started" in output.read_text(), shell, output)
        assert_all_stop(shell, signal.SIGTERM, home)


def test_a_stopped_code_servers_runs_do_not_stay_in_progress():
    with dg.DagsterInstance.ephemeral() as instance:
        def run(status: dg.DagsterRunStatus, port: int) -> str:
            server = json.dumps({"host": "127.0.0.1", "port": port})
            return instance.add_run(dg.DagsterRun(job_name="cycle", status=status,
                                                  tags={GRPC_INFO_TAG: server})).run_id

        started = run(dg.DagsterRunStatus.STARTED, 4001)
        terminating = run(dg.DagsterRunStatus.CANCELING, 4001)
        of_another_server = run(dg.DagsterRunStatus.STARTED, 4002)

        _end_runs_of_stopped_server(instance, 4001)

        status = {run_id: instance.get_run_by_id(run_id).status
                  for run_id in (started, terminating, of_another_server)}
        assert status == {started: dg.DagsterRunStatus.FAILURE,
                          terminating: dg.DagsterRunStatus.CANCELED,
                          of_another_server: dg.DagsterRunStatus.STARTED}
