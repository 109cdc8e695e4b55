"""Shared fixtures: a temporary home folder and the repository's flywheel.yaml."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from flywheel_pipeline.config import FlywheelConfig, load_config
from flywheel_pipeline.home import Home

REPO = Path(__file__).resolve().parent.parent

# `make test` runs the suite on two xdist workers (--dist loadgroup): each module is one group, so
# its module-scoped fixtures are built once, and modules sharing a session fixture are one group.
# Groups are handed out in this order, the longest first, so that both workers finish together.
SHARED_FIXTURE_GROUPS = {"test_pipeline": "assistant_cycle", "test_sources": "assistant_cycle",
                         "test_training_sets": "assistant_cycle",
                         "test_daemon": "postgres", "test_profile": "postgres"}
LONGEST_FIRST = ["test_monitor_daemon", "postgres", "test_spark_cycle", "test_recovery", "test_transformer_trainer",
                 "assistant_cycle",
                 "test_pipes_trainer", "test_incremental", "test_importers",
                 "test_privacy", "test_signals", "test_services_stop", "test_review", "test_bulk",
                 "test_warehouse", "test_validation", "test_action_space"]


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups to schedule by
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def group(item: pytest.Item) -> str:
        module = item.module.__name__.rpartition(".")[2]
        return SHARED_FIXTURE_GROUPS.get(module, module)

    def rank(item: pytest.Item) -> int:
        name = group(item)
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    items.sort(key=rank)  # stable: within a group, the module's own order


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home").ensure()


@pytest.fixture
def config() -> FlywheelConfig:
    return load_config(REPO / "flywheel.yaml")


@pytest.fixture(scope="session")
def assistant_cycle(tmp_path_factory):
    """One assistant cycle over simulated days with the training sets' events planted, shared by
    test_pipeline (it reruns the cycle and relabels late outcomes), test_sources, and then
    test_training_sets (whose last tests forget a user and expire days): one cycle instead of two.
    The three modules are one xdist group and run in that (alphabetical) order."""
    from tests.test_pipeline import FIRST, LAST, simulated_cycle
    from tests.test_training_sets import plant

    with simulated_cycle(tmp_path_factory.mktemp("assistant_cycle"), FIRST, LAST, before=plant) as cycle:
        yield cycle


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server for the production profile, started by scripts/postgres.sh (as
    `make postgres` does) on a free port with its data in a temporary folder, and stopped after; the
    test is skipped when PostgreSQL's binaries are not installed."""
    from flywheel_pipeline.launcher import free_port

    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        pytest.skip("PostgreSQL's binaries are not installed (/usr/lib/postgresql/*/bin): "
                    "apt-get install postgresql to run the production profile's test")
    data = Path(tempfile.mkdtemp(prefix="flywheel-postgres-"))
    env = {**os.environ, "FLYWHEEL_POSTGRES_DATA": str(data), "FLYWHEEL_POSTGRES_PORT": str(free_port())}
    env.pop("FLYWHEEL_POSTGRES_URL", None)
    script = str(REPO / "scripts" / "postgres.sh")
    started = subprocess.run([script, "start"], check=False, env=env, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    try:
        yield started.stdout.split("FLYWHEEL_POSTGRES_URL=")[1].strip()
    finally:
        subprocess.run([script, "stop"], check=False, env=env, capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """A local HTTP server taking alerts as a Slack or Teams webhook does: its URL, and the JSON
    bodies it received."""
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()
