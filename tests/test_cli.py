"""The command line, in process: simulate, status, and the clear errors a person gets."""

from __future__ import annotations

import pytest

from flywheel_pipeline.cli import main
from flywheel_pipeline.home import Home
from tests.conftest import REPO


@pytest.fixture
def cli_home(home, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(home.root))
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "FLYWHEEL_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return home


def test_simulate_writes_landing_batches_and_continues_where_it_stopped(cli_home, capsys):
    main(["simulate", "--days", "2", "--per-day", "50", "--start", "2026-11-01"])
    main(["simulate", "--days", "1", "--per-day", "50"])
    for domain in ("assistant", "recommendation"):
        days = sorted(path.stem for path in (cli_home.landing / domain).glob("*.jsonl"))
        assert days == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert "2026-11-03" in capsys.readouterr().out


def test_status_names_the_warehouse_and_every_domains_aliases(cli_home, capsys):
    main(["status"])
    out = capsys.readouterr().out
    assert f"assistant: warehouse {cli_home.warehouse('assistant')}" in out
    assert "flywheel-assistant: champion=none, candidate=none, previous=none" in out


def test_errors_name_what_is_wrong(cli_home, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="flywheel-assistant has no previous champion"):
        main(["rollback", "--domain", "assistant"])
    with pytest.raises(SystemExit, match="rejection needs --reason"):
        main(["approve", "--domain", "assistant", "--version", "1", "--approver", "ml-oncall", "--reject"])
    with pytest.raises(SystemExit, match="rejection needs --reason"):
        main(["approve", "--domain", "assistant", "--version", "1", "--approver", "ml-oncall", "--reject",
              "--reason", "  "])
    with pytest.raises(SystemExit, match="assistant has no candidate waiting"):
        main(["approve", "--domain", "assistant", "--approver", "ml-oncall"])
    with pytest.raises(SystemExit, match="'mallory' may not decide"):
        main(["approve", "--domain", "assistant", "--version", "1", "--approver", "mallory"])
    with pytest.raises(SystemExit, match="--start 2026-11-05 is after --end 2026-11-01"):
        main(["run", "--domain", "assistant", "--start", "2026-11-05", "--end", "2026-11-01"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("partitions_start: 2026-01-01\ndomains: {assistant: {shape: chatbot}}\n")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(bad))
    with pytest.raises(SystemExit, match=r"domains\.assistant\.shape"):
        main(["status"])


def test_commands_find_the_project_from_any_folder_or_refuse_naming_flywheel_home(tmp_path, monkeypatch):
    for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI", "FLYWHEEL_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    project = tmp_path / "project"
    (project / "src" / "deep").mkdir(parents=True)
    (project / "flywheel.yaml").write_text((REPO / "flywheel.yaml").read_text())
    monkeypatch.chdir(project / "src" / "deep")

    assert Home.from_env().root == project / ".flywheel"  # beside the project's flywheel.yaml
    with pytest.raises(SystemExit, match=r"no flywheel home at .*project/\.flywheel.*FLYWHEEL_HOME"):
        main(["status"])
    assert not (project / ".flywheel").exists()  # nothing created by asking

    main(["simulate", "--days", "1", "--per-day", "20", "--start", "2026-11-01"])
    main(["status"])
    assert (project / ".flywheel" / "landing" / "assistant" / "2026-11-01.jsonl").exists()
