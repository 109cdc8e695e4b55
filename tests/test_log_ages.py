"""Logs of any age and length: an old log's days become day partitions when it is imported,
windows longer than the log are refused in seconds, before anything runs, naming the windows that
fit, and days past retention run with a note naming the retention that keeps them (through the
command line, with its clock fixed)."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import pytest
import yaml

from flywheel_pipeline import cli, launcher
from flywheel_pipeline.cli import main
from flywheel_pipeline.config import load_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.jobs import cycle_job_name
from flywheel_pipeline.defs.partitions import partition_key
from flywheel_pipeline.defs.transform import RAW_EVENTS
from flywheel_pipeline.home import Home
from flywheel_pipeline.run_range import IMPORTED_START, partitions_start, run_range
from tests.conftest import REPO

TODAY = date(2026, 11, 20)  # the commands' clock: fixed, whatever day the tests run
FIRST = date(2019, 11, 24)  # the Open Bandit Dataset's week: 2019-11-24..2019-11-30
LAST = FIRST + timedelta(days=6)
SINCE = (TODAY - FIRST).days  # the retention that keeps FIRST on TODAY
EXPIRING = (f"home_feed: the days from {FIRST} are older than retention_days 365: the retention job "
            f"(schedule retention_daily, once on) deletes the events before 2025-11-20, counting back "
            f"from today; to keep them, set domains.home_feed.retention_days in flywheel.yaml to at "
            f"least {SINCE} (the days since {FIRST}), plus the days to keep them for")
LOG = {"timestamp": "ts", "item": "item_id", "position": "slot", "position_base": 1, "reward": "click",
       "propensity": "pscore", "policy": "explore", "request": "impression_id"}


class Feed:
    """A project whose one domain, home_feed, imports a random logger's click log; flywheel.yaml
    is the repository's (partitions_start 2026-01-01, windows 28 + 7 days, retention 365 days)
    with the domain's ``settings``."""

    def __init__(self, root: Path) -> None:
        self.root, self.config_path, self.home = root, root / "flywheel.yaml", Home(root / "home")

    def configure(self, **settings: object) -> None:
        raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
        feed = raw["domains"]["recommendation"]
        feed.update(exploration_share=1.0, label_maturity={"outcome": "click"},
                    importing={"consent": "granted", "bandit_log": LOG}, **settings)
        raw["domains"] = {"home_feed": feed}
        self.config_path.write_text(yaml.safe_dump(raw))

    def log(self, first: date, days: int, name: str = "obd") -> Path:
        """``days`` days of 4 slates of 3 slots from ``first``, the top slot clicked now and then."""
        path = self.root / f"{name}.csv"
        with path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["ts", "impression_id", "item_id", "slot", "click", "pscore"])
            for d in range(days):
                for s in range(4):
                    for slot in range(3):
                        writer.writerow([f"{first + timedelta(days=d)} 08:0{s}:00", f"r{d}_{s}",
                                         f"item_{(s + slot) % 5}", slot + 1, int(slot == 0 and s % 2), 0.2])
        return path

    def import_log(self, first: date, days: int, name: str = "obd") -> None:
        main(["import", "bandit", str(self.log(first, days, name)), "--domain", "home_feed"])

    def refusal(self, *args: str) -> str:
        """``flywheel run --domain home_feed ARGS``'s refusal, checked to come in seconds, before
        anything of Dagster's started."""
        started = time.monotonic()
        with pytest.raises(SystemExit) as refused:
            main(["run", "--domain", "home_feed", *args])
        assert time.monotonic() - started < 30  # a launch starts a code server and a daemon first
        assert sorted(path.name for path in self.home.dagster.iterdir()) == ["dagster.yaml"]
        return str(refused.value)


@pytest.fixture
def feed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Feed:
    project = Feed(tmp_path)
    project.configure()
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(project.config_path))
    monkeypatch.setenv("FLYWHEEL_HOME", str(project.home.root))
    # as `flywheel run` sets them (Home.activate), undone after the test
    monkeypatch.setenv("DAGSTER_HOME", str(project.home.dagster))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project.home.mlflow_tracking_uri)
    monkeypatch.setattr(cli, "_today", lambda: TODAY)
    return project


def first_partition(feed: Feed) -> Callable[[date], bool]:
    """Whether a day is a home_feed partition of the cycle job the definitions build now."""
    defs = build_definitions(load_config(feed.config_path), feed.home)
    keys = set(defs.resolve_job_def(cycle_job_name("home_feed")).partitions_def.get_partition_keys())
    return lambda day: partition_key("home_feed", day) in keys


def test_an_old_log_moves_the_day_partitions_back_to_its_first_day(feed):
    feed.import_log(date(2026, 11, 2), 3, "recent")  # after partitions_start: nothing to move
    assert not (feed.home.root / IMPORTED_START).exists()
    feed.import_log(FIRST, 7)
    assert (feed.home.root / IMPORTED_START).read_text() == f"{FIRST}\n"
    config = load_config(feed.config_path)
    assert config.partitions_start == date(2026, 1, 1)  # flywheel.yaml is left as it was
    assert partitions_start(config, feed.home) == FIRST
    is_partition = first_partition(feed)
    assert is_partition(FIRST) and not is_partition(FIRST - timedelta(days=1))
    feed.import_log(date(2020, 3, 1), 2, "later")  # a later old log never moves it forward
    assert partitions_start(config, feed.home) == FIRST


def test_the_import_names_the_windows_and_retention_its_days_need(feed, capsys):
    feed.import_log(FIRST, 7)
    out = capsys.readouterr().out
    assert f"next: flywheel run --domain home_feed --end {LAST}   (the whole cycle" in out
    [refused] = [line for line in out.splitlines() if "refuses the cycle" in line]
    assert refused.endswith(
        "the home holds home_feed traffic of 2019-11-24..2019-11-30 (7 days); lookback_days 28 + "
        "holdout_days 7 need 35 days, its traffic spans 7: set domains.home_feed.lookback_days to 4 "
        "and holdout_days to 3 in flywheel.yaml, or import more days")
    assert f"\n  note: {EXPIRING}\n" in out

    feed.configure(lookback_days=4, holdout_days=3, retention_days=SINCE + 365)
    feed.import_log(FIRST, 7)
    out = capsys.readouterr().out
    assert "refuses" not in out and "note" not in out


def test_run_refuses_windows_longer_than_the_log_in_seconds_and_notes_retention(feed, capsys,
                                                                               monkeypatch):
    feed.import_log(FIRST, 7)
    windows = "set domains.home_feed.lookback_days to 4 and holdout_days to 3 in flywheel.yaml"
    assert feed.refusal().endswith(  # the defaults: the windows ending yesterday
        f"pass --end {LAST}, the last day of traffic it holds; then lookback_days 28 + holdout_days 7 "
        f"need 35 days, its traffic spans 7: {windows}, or import more days")
    assert feed.refusal("--end", str(LAST)).startswith(
        "flywheel: home_feed: no traffic in the training window 2019-10-27..2019-11-23 (lookback_days "
        "28 before the held-out window 2019-11-24..2019-11-30)")
    feed.configure(lookback_days=4, holdout_days=3)
    assert run_range(feed.home, load_config(feed.config_path), "home_feed", None, LAST, TODAY) == (
        FIRST, LAST)

    def launch(*args: object) -> None:
        raise launcher.LaunchError("not launched by the test")

    monkeypatch.setattr(launcher, "local_dagster", launch)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="not launched by the test"):
        main(["run", "--domain", "home_feed", "--end", str(LAST)])
    assert capsys.readouterr().out.splitlines()[1] == f"  note: {EXPIRING}"  # past retention: it runs


@pytest.mark.parametrize(("days", "fits"), [
    (1, "a cycle needs 2 days (one to train on, one held out): import more days"),
    (2, "set domains.home_feed.lookback_days to 1 and holdout_days to 1"),
    (5, "set domains.home_feed.lookback_days to 3 and holdout_days to 2"),
])
def test_a_log_no_longer_than_the_held_out_window_gets_windows_within_its_days(feed, days, fits):
    feed.import_log(date(2026, 10, 1), days)
    assert fits in feed.refusal("--end", str(date(2026, 10, days)))


def test_a_log_longer_than_the_held_out_window_runs_on_the_days_it_holds(feed):
    feed.import_log(date(2026, 10, 1), 10)  # 3 days before the 7 held out: trained on
    last = date(2026, 10, 10)
    assert run_range(feed.home, load_config(feed.config_path), "home_feed", None, last, TODAY) == (
        date(2026, 10, 1), last)


def test_an_old_logs_days_accumulate_through_dagster(feed):
    feed.configure(lookback_days=4, holdout_days=3, retention_days=SINCE)
    feed.import_log(FIRST, 7)
    home, config = feed.home, load_config(feed.config_path)  # partitions_start 2026-01-01
    instance = dg.DagsterInstance.local_temp(str(home.dagster))
    try:
        result = execute_cycle(build_definitions(config, home), instance, "home_feed", FIRST, LAST,
                               asset_selection=[RAW_EVENTS])
    finally:
        instance.dispose()
    assert result.success
    assert result.asset_materializations_for_node(RAW_EVENTS.path[-1])
