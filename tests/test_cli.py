"""The command line, in process: simulate, status, and the clear errors a person gets."""

from __future__ import annotations

import pytest

from flywheel_pipeline.cli import main


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
    assert str(cli_home.warehouse) in out
    assert "flywheel-assistant: champion=none, candidate=none, previous=none" in out


def test_errors_name_what_is_wrong(cli_home, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="flywheel-assistant has no previous champion"):
        main(["rollback", "--domain", "assistant"])
    with pytest.raises(SystemExit, match="rejection needs --reason"):
        main(["approve", "--domain", "assistant", "--version", "1", "--approver", "ml-oncall", "--reject"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("partitions_start: 2026-01-01\ndomains: {assistant: {shape: chatbot}}\n")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(bad))
    with pytest.raises(SystemExit, match=r"domains\.assistant\.shape"):
        main(["status"])
