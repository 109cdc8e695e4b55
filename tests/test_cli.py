"""The command line, in process: simulate, status, and the clear errors a person gets."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import date, timedelta

import pytest

from flywheel_pipeline import cli, warehouse
from flywheel_pipeline.cli import main
from flywheel_pipeline.defs.resources import MlflowResource
from flywheel_pipeline.home import Home
from flywheel_pipeline.run_range import held_days, run_range
from flywheel_pipeline.warehouse import connect, ensure_raw_tables
from flywheel_pipeline.warehouses import Warehouses
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
    assert "flywheel-assistant: champion=baseline, candidate=none, previous=none" in out  # nothing deployed


def test_status_reads_its_own_homes_registry_wherever_mlflow_was_pointed_before(cli_home, tmp_path, capsys):
    """A Dagster run in the same process points MLflow's process-wide URIs at its home; the CLI
    still reads the registry of the home it was given."""
    other = MlflowResource(home_path=str(tmp_path / "other")).client()
    other.create_registered_model("flywheel-assistant")
    version = other.create_model_version("flywheel-assistant", source=str(tmp_path / "model")).version
    other.set_registered_model_alias("flywheel-assistant", "candidate", version)

    main(["status"])

    assert "flywheel-assistant: champion=baseline, candidate=none, previous=none" in capsys.readouterr().out


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


# --- `flywheel run` refuses, before it starts anything, a range the run would fail on ------------

TODAY = date(2026, 11, 20)  # the runs' clock: fixed, whatever day the tests run


@pytest.fixture
def run_home(cli_home, monkeypatch):
    """A home whose clock says TODAY, with nothing of Dagster's in it yet."""
    monkeypatch.setattr(cli, "_today", lambda: TODAY)
    return cli_home


def simulate_assistant(start: date, days: int) -> None:
    main(["simulate", "--domain", "assistant", "--days", str(days), "--per-day", "10",
          "--start", str(start)])


def refusal(*args: str) -> str:
    """``flywheel run --domain assistant ARGS``'s refusal, checked to come before anything ran."""
    with pytest.raises(SystemExit) as refused:
        main(["run", "--domain", "assistant", *args])
    return str(refused.value)


def nothing_launched(home: Home) -> bool:
    """No Dagster instance storage, services lock or run: the dagster folder as `ensure` made it."""
    return sorted(path.name for path in home.dagster.iterdir()) == ["dagster.yaml"]


def test_run_refuses_too_few_days_for_the_windows(run_home):
    simulate_assistant(date(2026, 11, 13), 7)  # the README's old `simulate --days 7`: held-out only
    started = time.monotonic()
    message = refusal()  # the defaults: the windows ending yesterday
    assert time.monotonic() - started < 60  # a launch starts a code server and a daemon first
    assert message.startswith(
        "flywheel: assistant: no traffic in the training window 2026-10-16..2026-11-12 "
        "(lookback_days 28 before the held-out window 2026-11-13..2026-11-19)")
    assert "the home holds assistant traffic of 2026-11-13..2026-11-19 (7 days)" in message
    assert nothing_launched(run_home)


def test_run_refuses_days_before_partitions_start(run_home):
    simulate_assistant(date(2025, 11, 1), 35)
    message = refusal("--start", "2025-11-01", "--end", "2025-12-05")
    assert message == ("flywheel: the days 2025-11-01..2025-12-05 start before partitions_start "
                       "2026-01-01 (flywheel.yaml), the first day partition the pipeline knows: "
                       "set partitions_start to 2025-11-01 or earlier")
    assert refusal().endswith(  # the defaults: the windows ending yesterday hold none of its days
        "pass --end 2025-12-05, the last day of traffic it holds, and set partitions_start "
        "(flywheel.yaml, now 2026-01-01) to 2025-11-01 or earlier: its traffic is before it")
    assert nothing_launched(run_home)


def test_run_refuses_a_range_ending_after_today(run_home):
    simulate_assistant(date(2026, 10, 1), 35)
    for end in (TODAY, TODAY + timedelta(days=3)):
        assert refusal("--start", "2026-10-01", "--end", str(end)) == (
            f"flywheel: --end {end} has not ended yet: a day is a partition once it has ended "
            f"(UTC), the latest is 2026-11-19: pass --end 2026-11-19 or earlier")
    assert nothing_launched(run_home)


def test_run_refusals_name_the_option_or_setting_to_change(run_home):
    simulate_assistant(date(2026, 10, 1), 35)  # 2026-10-01..2026-11-04
    # the defaults end yesterday, 2026-11-19: no held-out day
    assert refusal().endswith("pass --end 2026-11-04, the last day of traffic it holds")
    assert refusal("--start", "2026-10-29", "--end", "2026-11-04").endswith(
        "its landing holds 28 of those days from 2026-10-01, before the run's first day "
        "2026-10-29: pass --start 2026-10-01 (or leave --start out)")
    assert refusal("--start", "2026-10-01", "--end", "2026-10-07").endswith(  # no earlier day
        "land or import the days 2026-09-03..2026-09-30 (docs/importing.md), simulate a home that "
        "holds both windows (`flywheel simulate --days 35`, in a new FLYWHEEL_HOME: simulation "
        "continues after the days a home holds), or shorten domains.assistant.lookback_days in "
        "flywheel.yaml")
    accumulate = refusal("--start", "2026-11-10", "--end", "2026-11-12", "--only", "accumulate")
    assert accumulate.endswith(
        "nothing to accumulate in 2026-11-10..2026-11-12: no landing batch of those days in "
        f"{run_home.landing / 'assistant'}, none in its warehouse; the home holds assistant "
        "traffic of 2026-10-01..2026-11-04 (35 days): pass --start and --end around its days")
    assert nothing_launched(run_home)


def test_run_defaults_cover_the_windows_from_the_first_day_the_home_holds(run_home, config):
    simulate_assistant(date(2026, 10, 1), 35)  # exactly lookback_days + holdout_days
    held = held_days(Warehouses(run_home), "assistant")
    assert held.traffic() == {date(2026, 10, 1) + timedelta(days=n) for n in range(35)}
    end = date(2026, 11, 4)
    assert run_range(run_home, config, "assistant", None, end, TODAY) == (date(2026, 10, 1), end)
    later = date(2026, 11, 19)  # the windows start after the home's first day: they decide
    assert run_range(run_home, config, "assistant", None, later, TODAY, accumulate_only=True) == (
        date(2026, 10, 16), later)


def test_a_busy_warehouse_leaves_the_windows_to_the_launch(run_home, config, monkeypatch):
    simulate_assistant(date(2026, 11, 13), 7)
    with connect(run_home.warehouse("assistant")) as con:
        ensure_raw_tables(con)
    hold = ("import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    writer = subprocess.Popen([sys.executable, "-c", hold, str(run_home.warehouse("assistant"))],
                              stdout=subprocess.PIPE, text=True)
    monkeypatch.setattr(warehouse, "_LOCK_RETRIES", 2)  # refused at once, not after 10 s
    try:
        assert writer.stdout.readline() == "locked\n"
        assert held_days(Warehouses(run_home), "assistant").warehouse is None  # its days unknown: no crash
        end = date(2026, 11, 19)
        first = date(2026, 11, 13)  # the home's first day: the landing decides alone
        assert run_range(run_home, config, "assistant", None, end, TODAY) == (first, end)
    finally:
        writer.kill()
        writer.wait()


def test_an_import_of_reviews_suggests_loading_it_without_training(run_home, config, tmp_path,
                                                                   capsys):
    data = {"input": "q", "content": "a", "domain": "assistant", "interaction_id": "i_1",
            "item_id": "r0", "user_id": "u1", "session_id": "s1", "selection": "audit"}
    verdict = {"from_name": "verdict", "to_name": "content", "type": "choices",
               "value": {"choices": ["good"]}}
    annotation = {"id": 1, "completed_by": 3, "created_at": "2026-11-10T09:00:00Z",
                  "result": [verdict]}
    export = tmp_path / "export.json"
    export.write_text(json.dumps([{"id": 1, "data": data, "annotations": [annotation]}]))
    main(["import", "label-studio", str(export), "--domain", "assistant"])
    out = capsys.readouterr().out
    assert ("next: flywheel run --domain assistant --start 2026-11-10 --end 2026-11-10 "
            "--only accumulate") in out
    assert "  or: flywheel run --domain assistant --end 2026-11-10   (the whole cycle" in out
    day = date(2026, 11, 10)  # the review's batch is something to accumulate
    assert run_range(run_home, config, "assistant", day, day, TODAY, accumulate_only=True) == (
        day, day)
