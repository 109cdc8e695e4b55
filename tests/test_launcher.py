"""A command's launches fail with their cause: a run the code server refuses names the refusal (the
Launchpad's own message), and a code server that cannot start names the error it printed, not "see
the log"."""

from __future__ import annotations

import pytest

from flywheel_pipeline.home import Home
from flywheel_pipeline.launcher import LaunchError, cause, local_dagster
from tests.conftest import REPO

TRACEBACK = """\
2026-12-06 10:00:00 +0000 - dagster - INFO - loading
Traceback (most recent call last):
  File "<string>", line 1, in <module>
dagster._check.functions.CheckError: Invariant failed. Description: partition 2019-01-01 is unknown
  at the partitions definition's start
\x1b[33mWARNING\x1b[0m the server exited
"""


def test_the_cause_is_the_last_exception_line_a_tool_printed():
    assert cause(TRACEBACK) == ("dagster._check.functions.CheckError: Invariant failed. Description: "
                                "partition 2019-01-01 is unknown")
    assert cause("starting\nWARNING the server exited\n") == "WARNING the server exited"
    assert cause("") == "it printed nothing"


@pytest.fixture
def fresh_home(tmp_path, monkeypatch) -> Home:
    """An empty home, active in this process and the services it starts."""
    for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI", "FLYWHEEL_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    return Home(tmp_path / "home").activate()


@pytest.mark.slow
def test_a_refused_launch_names_the_refusal(fresh_home):
    with fresh_home.log.open("a") as log, local_dagster(fresh_home, log) as dagster:
        with pytest.raises(LaunchError, match=r"could not launch approve_candidate: .*"
                                              r"Missing required config entr(y|ies) .*version"):
            dagster.submit("approve_candidate", run_config={
                "ops": {"record_approval": {"config": {"domain": "assistant", "approver": "x"}}}})
        with pytest.raises(LaunchError, match=r"could not launch no_such_job: .*no_such_job"):
            dagster.submit("no_such_job")
        assert not dagster.instance.get_runs(), "a refused launch left a run behind"


@pytest.mark.slow
def test_a_code_server_that_cannot_load_the_definitions_names_their_error(fresh_home, tmp_path,
                                                                           monkeypatch):
    broken = tmp_path / "flywheel.yaml"
    broken.write_text((REPO / "flywheel.yaml").read_text().replace("max_lateness_days: 7",
                                                                   "max_lateness_days: soon"))
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(broken))  # read by the code server, not by this process
    with (fresh_home.log.open("a") as log, local_dagster(fresh_home, log) as dagster,
          pytest.raises(LaunchError) as refused):
        dagster.submit("approve_candidate")
    message = str(refused.value)
    assert message.startswith("could not launch approve_candidate: the code location flywheel did not load: ")
    assert "ConfigError" in message and "max_lateness_days" in message, message
