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
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import dagster as dg
import psutil
from dagster._core.definitions.repository_definition import SINGLETON_REPOSITORY_NAME
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.tags import GRPC_INFO_TAG
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import WorkspaceFileTarget

from flywheel_pipeline.home import Home

PROJECT_WORKSPACE = Path(__file__).resolve().parent.parent / "workspace.yaml"
LOCATION = "flywheel"  # the code location's name: the workspace files' location_name, the code server's
BIN = Path(sys.executable).parent
HEARTBEAT_FRESH_SECONDS = 60
START_TIMEOUT_SECONDS = 180
STOP_GRACE_SECONDS = 8  # a service still running this long after SIGTERM is killed
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what `kill` and service managers send
IN_PROGRESS = {dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
               dg.DagsterRunStatus.CANCELING}
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
PROGRESS_EVENTS = {dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE,
                   dg.DagsterEventType.STEP_SKIPPED, dg.DagsterEventType.ASSET_CHECK_EVALUATION}
RUN_ENDS = {dg.DagsterEventType.RUN_FAILURE, dg.DagsterEventType.RUN_CANCELED}
# The Launchpad's mutation: the run, or why it was refused.
LAUNCH_RUN = """mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename ... on LaunchRunSuccess { run { runId } } ... on Error { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
# A Python exception's last line, `module.SomeError: message`, as tracebacks end.
EXCEPTION_LINE = re.compile(r"^([A-Za-z_]\w*\.)*[A-Z]\w*(Error|Exception|Exit|Failure)\b(:.*)?$")
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")
LOG_TAIL_BYTES = 64 * 1024  # how much of the log's end a failure to start is looked for in
MAX_CAUSE_CHARS = 500


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

    def submit(self, job: str, tags: dict[str, str] | None = None, run_config: dict | None = None,
               assets: Sequence[dg.AssetKey] | None = None) -> str:
        """Launch ``job`` (only ``assets`` of it, with their checks, when given) as the UI's
        Launchpad does; returns the run id (the run waits in the queue). Refused with the launch's
        own error: a bad config, a partition the job does not know."""
        selector = {"repositoryLocationName": LOCATION, "repositoryName": SINGLETON_REPOSITORY_NAME,
                    "jobName": job}
        if assets:
            selector["assetSelection"] = [{"path": key.path} for key in assets]
        params = {"selector": selector, "runConfigData": run_config or {}, "executionMetadata": {
            "tags": [{"key": key, "value": value} for key, value in (tags or {}).items()]}}
        # The UI's GraphQL schema, run in this process (imported here: a second to import).
        from dagster_graphql.cli import execute_query

        with WorkspaceProcessContext(self.instance, WorkspaceFileTarget([str(self.workspace)]),
                                     read_only=False) as workspace:
            # a code server that is down, or could not load the definitions (a bad flywheel.yaml)
            if error := workspace.create_request_context().get_code_location_error(LOCATION):
                raise LaunchError(f"could not launch {job}: the code location {LOCATION} did not "
                                  f"load: {cause(error.to_string())}")
            response = execute_query(workspace, LAUNCH_RUN, {"params": params})
        if errors := response.get("errors"):
            raise LaunchError(f"could not launch {job}: {errors[0]['message']}")
        launched = response["data"]["launchRun"]
        if launched["__typename"] != "LaunchRunSuccess":
            raise LaunchError(f"could not launch {job}: {_refusal(launched)}")
        return launched["run"]["runId"]

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
    """Why a run failed: its first failed step's own error, else the run's own end (its process
    died, it did not start, it was canceled)."""
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records:
        if message := op_error(record.event_log_entry.dagster_event.step_failure_data.error):
            return message
    for record in instance.get_records_for_run(run_id, of_type=RUN_ENDS, ascending=False).records:
        event = record.event_log_entry.dagster_event
        if message := op_error(getattr(event.event_specific_data, "error", None)) or event.message:
            return message
    run = instance.get_run_by_id(run_id)
    status = run.status.value.lower() if run else "unknown to the instance"
    return f"run {run_id} is {status} and no step of it failed"


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


def _stop(*processes: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
    """End the sessions ``_start`` began for ``processes``, all at once: SIGTERM, then SIGKILL to
    whatever of them (their children included) still runs ``grace`` seconds later."""
    members = [member for process in processes for member in _session_members(process)]
    _signal_sessions(processes, signal.SIGTERM)
    if not _ended(members, grace):
        _signal_sessions(processes, signal.SIGKILL)
        _ended(members, grace)
    for process in processes:
        process.wait()


def _ended(members: list[psutil.Process], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for every one of ``members`` to end; whether they have."""
    deadline = time.monotonic() + timeout
    while any(_running(member) for member in members):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _session_members(process: subprocess.Popen) -> list[psutil.Process]:
    """The process and every process it started, as they are now."""
    try:
        leader = psutil.Process(process.pid)
        return [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_sessions(processes: Sequence[subprocess.Popen], signum: int) -> None:
    for process in processes:
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:  # every process of that session has ended
            pass


def _running(member: psutil.Process) -> bool:
    """Whether a process still runs: an ended one waiting to be reaped (a zombie) does not."""
    try:
        return member.is_running() and member.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_until(ready: Callable[[], bool], what: str, processes: list[subprocess.Popen],
                log: IO[str] | None = None) -> None:
    """Wait until ``ready``; refused, with the last error the processes printed to ``log``, when
    one of them exits or they are not ready in time."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not ready():
        if exited := [process for process in processes if process.poll() is not None]:
            raise LaunchError(f"{what} exited while starting (exit {exited[0].returncode}): "
                              f"{printed(log)}")
        if time.monotonic() > deadline:
            raise LaunchError(f"{what} did not start within {START_TIMEOUT_SECONDS}s: "
                              f"{printed(log)}")
        time.sleep(1)


def printed(log: IO[str] | None) -> str:
    """The last error the tools printed to ``log`` (the home's flywheel.log), and where the rest is;
    with --verbose (no log) it is above, in the terminal."""
    if log is None:
        return "its output is above"
    log.flush()
    with open(log.name, "rb") as text:
        text.seek(max(0, text.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
        tail = text.read().decode(errors="replace")
    return f"{cause(tail)} (the rest in {log.name})"


def cause(output: str) -> str:
    """The error a tool printed: the last exception line of its output (``CheckError: Invariant
    failed...``), else its last line."""
    lines = [line.strip() for line in ANSI_CODES.sub("", output).splitlines() if line.strip()]
    errors = [line for line in lines if EXCEPTION_LINE.match(line)]
    found = errors[-1] if errors else lines[-1] if lines else "it printed nothing"
    return found[:MAX_CAUSE_CHARS]


def _refusal(launched: dict) -> str:
    """Why GraphQL refused a launch: the config's errors, or the error's message."""
    if errors := launched.get("errors"):
        return "; ".join(error["message"] for error in errors)
    return launched.get("message", launched["__typename"]).strip()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _webserver_command(workspace: Path, port: int) -> tuple[list[str], str]:
    """dagster-webserver for ``workspace`` on 127.0.0.1:``port``, and the URL it answers on."""
    return ([str(BIN / "dagster-webserver"), "-w", str(workspace), "-h", "127.0.0.1", "-p", str(port)],
            f"http://127.0.0.1:{port}")


@contextmanager
def webserver(workspace: Path, log: IO[str] | None, port: int | None = None) -> Iterator[str]:
    """The Dagster UI (dagster-webserver) on 127.0.0.1 for the instance in $DAGSTER_HOME; yields its URL."""
    command, url = _webserver_command(workspace, port or free_port())
    process = _start(command, log)
    try:
        _wait_until(lambda: _answers(f"{url}/server_info"), "the Dagster webserver", [process], log)
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
    """A code server and a daemon for this instance, until every run they launched has finished
    (when the command fails, until the runs in progress have); Ctrl-C or SIGTERM stops them at
    once."""
    with _stopped_by_signals(), _code_server_and_daemon(instance, home, log) as services:
        dagster = Dagster(instance, services.workspace, log)
        try:
            yield dagster
            dagster.wait_for_idle()  # what the command and the sensors launched runs to its end
        except Exception:  # a stop (KeyboardInterrupt) does not wait
            services.stop_daemon()
            dagster.wait_for_idle({dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED})
            raise


def serve_ui(home: Home, log: IO[str] | None, port: int, on_ready: Callable[[str], None]) -> None:
    """``make ui``: the Dagster UI on ``port``, with a code server and a daemon for the home that
    also serve the commands started beside it, until Ctrl-C or SIGTERM stops them all (runs in
    progress fail with them; queued ones wait for the next daemon)."""
    instance = dg.DagsterInstance.get()
    try:
        with _stopped_by_signals(), ExitStack() as stack:
            with _only_command_with_services(home):
                if daemon_running(instance):
                    raise LaunchError("a Dagster daemon already runs for this home (another "
                                      "`make ui`, or one killed less than a minute ago): use it, "
                                      "or stop it first")
                services = stack.enter_context(_code_server_and_daemon(instance, home, log))
            on_ready(services.start_webserver(port))
            while services.running():
                time.sleep(1)
    except KeyboardInterrupt:
        return
    raise LaunchError(f"a Dagster service exited: {printed(log)}")


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """Within it, the first SIGINT or SIGTERM raises KeyboardInterrupt (later ones are ignored while
    the services stop), whatever they did before: a shell's background job ignores SIGINT, and
    Python ends at SIGTERM without stopping anything. The services started within get both signals
    at their defaults: Dagster's processes handle SIGTERM as they handle SIGINT, and so would ignore
    both had they inherited an ignored SIGINT (``dagster dev`` did, in the background)."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def stop(signum: int, frame: object) -> None:
        _ignore_stop_signals()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _ignore_stop_signals() -> None:
    """A second Ctrl-C or SIGTERM must not cut short the stopping of the services
    (``_stopped_by_signals`` sets them back)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@dataclass
class _Services:
    """Dagster's processes for the home's instance, each in a session of its own: a code server on
    ``port`` and what uses it through ``workspace`` (the daemon, the webserver)."""

    instance: dg.DagsterInstance
    log: IO[str] | None
    port: int
    workspace: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    daemon: subprocess.Popen | None = None

    def start_code_server(self) -> None:
        command = [str(BIN / "dagster"), "code-server", "start", "-m",
                   "flywheel_pipeline.definitions", "--location-name", LOCATION, "-h", "127.0.0.1",
                   "-p", str(self.port)]
        self._start(command, "the Dagster code server", lambda: _listening(self.port))

    def start_daemon(self) -> None:
        if shutil.which("dagster-daemon", path=str(BIN)) is None:
            raise LaunchError(f"dagster-daemon is not installed in {BIN}")
        self.daemon = self._start([str(BIN / "dagster-daemon"), "run", "-w", str(self.workspace)],
                                  "the Dagster daemon", lambda: daemon_running(self.instance))

    def start_webserver(self, port: int) -> str:
        """The Dagster UI on 127.0.0.1:``port``; returns its URL."""
        command, url = _webserver_command(self.workspace, port)
        self._start(command, "the Dagster webserver", lambda: _answers(f"{url}/server_info"))
        return url

    def _start(self, command: list[str], what: str, ready: Callable[[], bool]) -> subprocess.Popen:
        process = _start(command, self.log)
        self.processes.append(process)
        _wait_until(ready, what, [process], self.log)
        return process

    def running(self) -> bool:
        """Whether every process started still runs."""
        return all(process.poll() is None for process in self.processes)

    def stop_daemon(self) -> None:
        """Stop the daemon, so that it launches nothing more; the next command must not take its
        heartbeats for a running daemon."""
        if self.daemon is not None:
            _stop(self.daemon)
        self.instance.wipe_daemon_heartbeats()

    def stop(self) -> None:
        """Stop every process at once; then no daemon looks alive and no run the code server was
        running looks in progress."""
        _ignore_stop_signals()
        _stop(*self.processes)
        self.instance.wipe_daemon_heartbeats()
        _end_runs_of_stopped_server(self.instance, self.port)


@contextmanager
def _code_server_and_daemon(instance: dg.DagsterInstance, home: Home, log: IO[str] | None
                            ) -> Iterator[_Services]:
    """A code server on a free port and a daemon using it, stopped on the way out
    (``_Services.stop``)."""
    port = free_port()
    services = _Services(instance, log, port, grpc_workspace(home, port))
    try:
        services.start_code_server()
        services.start_daemon()
        yield services
    finally:
        services.stop()


def _end_runs_of_stopped_server(instance: dg.DagsterInstance, port: int) -> None:
    """The runs the code server on ``port`` was running ended with it: mark them failed (canceled
    when a person asked to terminate them) rather than leave them in progress."""
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=list(IN_PROGRESS))):
        server = json.loads(run.tags.get(GRPC_INFO_TAG, "{}"))
        if server.get("host") != "127.0.0.1" or server.get("port") != port:
            continue
        if run.status == dg.DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, "its code server was stopped while it was terminated")
        else:
            instance.report_run_failed(run, "the code server running it was stopped before it "
                                            "finished (`make ui`, or the command that started it, "
                                            "ended)")
