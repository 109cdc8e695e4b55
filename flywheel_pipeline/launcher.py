"""The home's Dagster instance as people's commands use it.

``flywheel run`` and ``flywheel demo`` submit runs the way a launch from the UI does: to the
instance, from the ``flywheel`` code location, with the job's tags; the daemon's run queue starts
them (one run per domain's warehouse at a time) and its sensors react to them. So every run shows
under its job, in the timeline and in each asset's history, and the approval and late-label sensors run in
the real daemon. When no daemon is running for the home (``make ui`` starts one), a command starts
a code server and a daemon of its own for its duration and stops them when its runs are done.

The home's instance launches runs with LocalRunLauncher, so that the daemon's run monitoring
(dagster.yaml, written by ``flywheel_pipeline.home``) marks failed a run whose process died, and
the queue moves on.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import dagster as dg
import psutil
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.tags import GRPC_INFO_TAG

from flywheel_pipeline.defs.ui import LOCATION
from flywheel_pipeline.home import Home

PROJECT_WORKSPACE = Path(__file__).resolve().parent.parent / "workspace.yaml"
BIN = Path(sys.executable).parent
HEARTBEAT_FRESH_SECONDS = 60
START_TIMEOUT_SECONDS = 180
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
PROGRESS_EVENTS = {dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE,
                   dg.DagsterEventType.STEP_SKIPPED, dg.DagsterEventType.ASSET_CHECK_EVALUATION}


LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", socket.gethostname()}


class LocalRunLauncher(dg.DefaultRunLauncher):
    """Dagster's default launcher (each run in a process its code server starts), which can also
    tell run monitoring when that process is gone: killed, out of memory, or the machine restarted
    (with its code server, which would otherwise report it). Code servers on other machines: it
    cannot tell, and says the run's process is running."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        worker = run_worker(self._instance, run.run_id)
        if worker is None or not _launched_here(run):
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no process of this machine to check")
        pid, reported_at = worker
        if _alive(pid, reported_at):
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(WorkerStatus.FAILED, f"the run's process (pid {pid}) is gone: it was "
                                                         "killed, ran out of memory, or the machine restarted")


def run_worker(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """The pid of the process that runs ``run_id``, and when it reported it (on starting)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT,
                                           ascending=False).records
    for record in records:
        entry = record.event_log_entry
        metadata = entry.dagster_event.engine_event_data.metadata
        if entry.step_key is None and "pid" in metadata:
            return int(metadata["pid"].value), entry.timestamp
    return None


def in_progress(instance: dg.DagsterInstance, run_id: str) -> bool:
    """Whether ``run_id`` names a run of the instance that has not finished."""
    run = instance.get_run_by_id(run_id) if run_id else None
    return run is not None and not run.is_finished


def _launched_here(run: dg.DagsterRun) -> bool:
    """Whether the run's code server (which starts its process) runs on this machine."""
    server = json.loads(run.tags.get(GRPC_INFO_TAG, "{}"))
    return "socket" in server or server.get("host") in LOCAL_HOSTS


def _alive(pid: int, reported_at: float) -> bool:
    """Whether process ``pid`` lives and is the one that reported at ``reported_at`` (not a later
    process given the same pid)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= reported_at + 1
    except psutil.NoSuchProcess:
        return False


class LaunchError(RuntimeError):
    """A run could not be submitted, or the daemon could not be started."""


@dataclass(frozen=True)
class Step:
    """One line of a run's progress: a step finished, or a check failed."""

    name: str
    status: str  # succeeded | failed | skipped | check failed
    detail: str = ""


def daemon_running(instance: dg.DagsterInstance) -> bool:
    """Whether a daemon (``make ui``, or a deployment's) heartbeats for this instance."""
    now = time.time()
    return any(now - beat.timestamp < HEARTBEAT_FRESH_SECONDS
               for beat in instance.get_daemon_heartbeats().values())


@dataclass
class Dagster:
    """Submit runs to the instance and follow them."""

    instance: dg.DagsterInstance
    workspace: Path
    log: IO[str] | None

    def submit(self, job: str, tags: dict[str, str] | None = None, run_config: dict | None = None) -> str:
        """Launch ``job`` as the UI's Launchpad would; returns the run id (the run waits in the queue)."""
        run_id = str(uuid.uuid4())
        command = [str(BIN / "dagster"), "job", "launch", "-w", str(self.workspace), "-l", LOCATION, "-j", job,
                   "--run-id", run_id, "--tags", json.dumps(tags or {}),
                   "--config-json", json.dumps(run_config or {})]
        done = subprocess.run(command, check=False, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0 or self.instance.get_run_by_id(run_id) is None:
            raise LaunchError(f"could not launch {job} (exit {done.returncode}); see the log")
        return run_id

    def wait(self, run_id: str, on_step: Callable[[Step], None] = lambda step: None,
             timeout: float = 3600) -> dg.DagsterRun:
        """Follow a run until it finishes, reporting each finished step and failed check."""
        cursor, deadline = None, time.monotonic() + timeout
        while True:
            run = self.instance.get_run_by_id(run_id)
            page = self.instance.get_records_for_run(run_id, cursor=cursor, of_type=PROGRESS_EVENTS)
            cursor = page.cursor
            for record in page.records:
                if (step := _step(record.event_log_entry)) is not None:
                    on_step(step)
            if run.status in FINISHED and not page.has_more:
                return run
            if run.status == dg.DagsterRunStatus.QUEUED and not daemon_running(self.instance):
                raise LaunchError(f"run {run_id} waits in the queue and no Dagster daemon runs for this "
                                  "instance (it stopped?): start one with `make ui`, then it runs")
            if time.monotonic() > deadline:
                raise LaunchError(f"run {run_id} still {run.status.value} after {timeout:.0f}s")
            time.sleep(1)

    def active_runs(self, job: str | None = None) -> list[dg.DagsterRun]:
        """Runs (of ``job``) queued or in progress (e.g. launched by a sensor), newest first."""
        return list(self.instance.get_runs(filters=dg.RunsFilter(job_name=job, statuses=[
            dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
            dg.DagsterRunStatus.STARTED])))

    def wait_for_idle(self, statuses: set[dg.DagsterRunStatus] | None = None, timeout: float = 3600) -> None:
        """Wait until no run (of ``statuses``) is queued or in progress, including any that sensors launch."""
        while runs := [run for run in self.active_runs() if statuses is None or run.status in statuses]:
            for run in runs:
                self.wait(run.run_id, timeout=timeout)


def _step(entry) -> Step | None:
    event = entry.dagster_event
    if event is None:
        return None
    if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
        evaluation = event.event_specific_data
        if evaluation.passed:
            return None
        return Step(f"{evaluation.asset_key.to_user_string()} check {evaluation.check_name}", "check failed",
                    _check_detail(evaluation.metadata))
    status = {dg.DagsterEventType.STEP_SUCCESS: "succeeded", dg.DagsterEventType.STEP_FAILURE: "failed",
              dg.DagsterEventType.STEP_SKIPPED: "skipped"}[event.event_type]
    detail = ""
    if event.event_type == dg.DagsterEventType.STEP_FAILURE:
        detail = op_error(event.step_failure_data.error).splitlines()[0][:200]
    return Step(event.step_key, status, detail)


def op_error(error) -> str:
    """The op's own exception message, not the Dagster error that wraps it."""
    while error is not None and error.cause is not None:
        error = error.cause
    return error.message.strip() if error is not None else ""


def failure(instance: dg.DagsterInstance, run_id: str) -> str:
    """Why a run failed: its first failed step's own error."""
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records:
        if message := op_error(record.event_log_entry.dagster_event.step_failure_data.error):
            return message
    return f"see run {run_id}"


def _check_detail(metadata) -> str:
    for key in ("reasons", "failed", "failures"):
        if key in metadata:
            return f"{key}: {metadata[key].value}"
    return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def grpc_workspace(home: Home, port: int) -> Path:
    """A workspace file that points at one running code server (shared by daemon and launches)."""
    path = home.dagster / "workspace.yaml"
    path.write_text(f"# Written by flywheel for the code server it started on port {port}.\n"
                    f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {port}\n"
                    f"      location_name: {LOCATION}\n")
    return path


def _start(command: list[str], log: IO[str] | None) -> subprocess.Popen:
    # A session of its own: stopping it reaches every process it started.
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=PROJECT_WORKSPACE.parent, env=os.environ.copy())


def _stop(process: subprocess.Popen, grace: float = 20) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_until(ready: Callable[[], bool], what: str, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not ready():
        if any(process.poll() is not None for process in processes):
            raise LaunchError(f"{what} exited while starting; see the log")
        if time.monotonic() > deadline:
            raise LaunchError(f"{what} did not start within {START_TIMEOUT_SECONDS}s; see the log")
        time.sleep(1)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def webserver(workspace: Path, log: IO[str] | None, port: int | None = None) -> Iterator[str]:
    """The Dagster UI (dagster-webserver) on 127.0.0.1 for the instance in $DAGSTER_HOME; yields its URL."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start([str(BIN / "dagster-webserver"), "-w", str(workspace), "-h", "127.0.0.1", "-p", str(port)], log)
    try:
        _wait_until(lambda: _answers(f"{url}/server_info"), "the Dagster webserver", [process])
        yield url
    finally:
        _stop(process)


def _listening(port: int) -> bool:
    """The code server's port accepts connections once its code has loaded."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def _only_command_with_services(home: Home) -> Iterator[None]:
    """Refuse while another command runs a code server and daemon of its own for this home: two
    daemons on one instance would each start queued runs, two of one domain side by side."""
    with (home.dagster / "services.lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise LaunchError(f"another flywheel command ({lock.read()}) runs Dagster for this home; run this "
                              "once it has ended, or start `make ui` to serve both") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()}: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
        lock.flush()
        yield


@contextmanager
def local_dagster(home: Home, log: IO[str] | None) -> Iterator[Dagster]:
    """The home's instance with a daemon: the running one (a person's `make ui`, which serves every
    command at once), or a code server and daemon started for the duration (stopped once every run
    they launched has finished), by one command at a time."""
    instance = dg.DagsterInstance.get()  # creates the instance's storage before other processes touch it
    with _only_command_with_services(home):
        if not daemon_running(instance):
            with _services(instance, home, log) as dagster:
                yield dagster
            return
    yield Dagster(instance, PROJECT_WORKSPACE, log)


@contextmanager
def _services(instance: dg.DagsterInstance, home: Home, log: IO[str] | None) -> Iterator[Dagster]:
    """A code server and a daemon for this instance, until every run they launched has finished."""
    if shutil.which("dagster-daemon", path=str(BIN)) is None:
        raise LaunchError(f"dagster-daemon is not installed in {BIN}")
    port = free_port()
    dagster = Dagster(instance, grpc_workspace(home, port), log)
    with ExitStack() as stack:  # on the way out, in reverse: daemon, its heartbeats, started runs, server
        server = _start([str(BIN / "dagster"), "code-server", "start", "-m", "flywheel_pipeline.definitions",
                         "--location-name", LOCATION, "-h", "127.0.0.1", "-p", str(port)], log)
        stack.callback(_stop, server)
        stack.callback(dagster.wait_for_idle, {dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED})
        _wait_until(lambda: _listening(port), "the Dagster code server", [server])
        daemon = _start([str(BIN / "dagster-daemon"), "run", "-w", str(dagster.workspace)], log)
        stack.callback(instance.wipe_daemon_heartbeats)  # the next command must not take it for running
        stack.callback(_stop, daemon)
        _wait_until(lambda: daemon_running(instance), "the Dagster daemon", [daemon])
        yield dagster
        dagster.wait_for_idle()  # what the command and the sensors launched runs to its end
