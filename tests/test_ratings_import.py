"""`flywheel import bandit` of explicit-ratings logs without a logging policy (MovieLens-100K's u.data,
ml-latest-small's ratings.csv): reading TSV without a header and epoch timestamps, ratings as
clicks and rating signals, unknown propensities through the contract, the raw tables and the marts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml

from flywheel_pipeline import warehouse
from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.config import ConfigError, FlywheelConfig, load_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.transform import RAW_EVENTS, dbt_model_keys
from flywheel_pipeline.home import Home
from flywheel_pipeline.importers import UnreadableFile, import_file
from tests.conftest import REPO

TODAY = datetime.now(UTC).date()
FIRST = TODAY - timedelta(days=2)  # the logs' two days, ending yesterday
KEY = "domains.recommendation.importing.bandit_log"

# MovieLens-100K's u.data: tab-separated, no header line, ratings 1-5, unix seconds
U_DATA = {"separator": "\t", "header": False, "columns": ["user_id", "item_id", "rating", "timestamp"],
          "timestamp": "timestamp", "timestamp_format": "epoch_s", "item": "item_id", "user": "user_id",
          "reward": "rating", "reward_threshold": 4, "rating_scale": [1, 5], "propensity": "unknown",
          "policy": "champion"}
# ml-latest-small's ratings.csv: a header line, half-star ratings 0.5-5.0, unix seconds
RATINGS_CSV = {"timestamp": "timestamp", "timestamp_format": "epoch_s", "item": "movieId", "user": "userId",
               "reward": "rating", "reward_threshold": 4, "rating_scale": [0.5, 5], "propensity": "unknown",
               "policy": "champion"}


def ratings_config(tmp_path: Path, bandit_log: dict) -> Path:
    """The repository's flywheel.yaml whose recommendation domain imports ``bandit_log``: a ratings
    log explores nothing, and its labels wait for nothing later than a click."""
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw["domains"]["recommendation"].update(exploration_share=0.0, label_maturity={"outcome": "click"},
                                            importing={"consent": "granted", "bandit_log": bandit_log})
    path = tmp_path / "flywheel.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bandit_log: dict) -> tuple[Home, FlywheelConfig]:
    path = ratings_config(tmp_path, bandit_log)
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(path))
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    return Home(tmp_path / "home").ensure(), load_config(path)


def ratings(first: date, days: int, per_day: int, scale: tuple[float, ...], seed: int = 0) -> list[tuple]:
    """(user, item, rating, unix seconds): distinct (user, item) pairs, in no time order (as u.data)."""
    rng = np.random.default_rng(seed)
    pairs = rng.permutation(40 * 50)[: days * per_day]
    start = int(datetime.combine(first, time(), UTC).timestamp())
    seconds = rng.permutation(np.arange(start, start + days * 86_400, 97))[: len(pairs)]
    return [(int(p // 50) + 1, int(p % 50) + 1, float(rng.choice(scale)), int(s)) for p, s in zip(pairs, seconds)]


def u_data(path: Path, rows: list[tuple]) -> Path:
    path.write_text("".join(f"{u}\t{i}\t{int(r)}\t{s}\n" for u, i, r, s in rows))
    return path


def ratings_csv(path: Path, rows: list[tuple]) -> Path:
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{s}\n" for u, i, r, s in rows))
    return path


def landed(home: Home, batches: list[str]) -> list[dict]:
    return [json.loads(line) for batch in batches for line in (home.landing / batch).read_text().splitlines()]


def iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def test_movielens_u_data_maps_each_rating_to_an_interaction_at_its_time(tmp_path, monkeypatch):
    home, config = project(tmp_path, monkeypatch, U_DATA)
    rows = ratings(FIRST, 2, 30, (1, 2, 3, 4, 5))
    report = import_file(home, config, "bandit", u_data(tmp_path / "u.data", rows), "recommendation")
    liked = sum(r >= 4 for _, _, r, _ in rows)
    assert not report.rejected and report.records_mapped == len(rows)
    assert report.events == {"interaction": len(rows), "signal": len(rows) + liked}
    assert report.days == [FIRST, FIRST + timedelta(days=1)]

    events = landed(home, report.batches)
    interactions = {e["interaction_id"]: e for e in events if e["event_type"] == "interaction"}
    for n, (user, item, rating, seconds) in enumerate(rows, start=1):
        served = interactions[f"bandit-u:{n}"]
        assert served["timestamp"] == iso(seconds) and served["user_id"] == str(user)
        assert served["impressions"] == [{"item_id": str(item), "position": 0, "propensity": None,
                                          "content": str(item)}]
    signals = [e for e in events if e["event_type"] == "signal"]
    rated = {(e["interaction_id"], e["item_id"]): e["value"] for e in signals if e["signal_type"] == "rating"}
    clicked = {(e["interaction_id"], e["item_id"]) for e in signals if e["signal_type"] == "click"}
    assert rated == {(f"bandit-u:{n}", str(item)): rating for n, (_, item, rating, _) in enumerate(rows, start=1)}
    assert clicked == {(f"bandit-u:{n}", str(item)) for n, (_, item, rating, _) in enumerate(rows, start=1)
                       if rating >= 4}  # a 3 is shown and not clicked
    assert all(e["timestamp"] == interactions[e["interaction_id"]]["timestamp"] for e in signals)


def test_ml_latest_small_half_star_ratings_are_rescaled_and_clicked_from_the_threshold(tmp_path, monkeypatch):
    home, config = project(tmp_path, monkeypatch, RATINGS_CSV)
    rows = [(1, 31, 0.5, 1_000_000_000), (1, 1029, 3.5, 1_000_000_001), (2, 31, 4.0, 1_000_000_002),
            (7, 1061, 5.0, 1_000_000_003)]
    report = import_file(home, config, "bandit", ratings_csv(tmp_path / "ratings.csv", rows), "recommendation")
    events = landed(home, report.batches)
    assert [e["timestamp"] for e in events if e["event_type"] == "interaction"] == [iso(s) for *_, s in rows]
    rated = [e["value"] for e in events if e.get("signal_type") == "rating"]
    assert rated == pytest.approx([1.0, 1 + 4 * 3 / 4.5, 1 + 4 * 3.5 / 4.5, 5.0], abs=1e-4)
    assert [e["item_id"] for e in events if e.get("signal_type") == "click"] == ["31", "1061"]  # 4.0 and 5.0


def test_a_rating_outside_the_scale_is_rejected(tmp_path, monkeypatch):
    home, config = project(tmp_path, monkeypatch, RATINGS_CSV)
    path = ratings_csv(tmp_path / "ratings.csv", [(1, 31, 4.0, 1_000_000_000), (1, 32, 6.0, 1_000_000_000)])
    report = import_file(home, config, "bandit", path, "recommendation")
    assert report.rejected == {"invalid_value:rating": 1} and report.records_mapped == 1


@pytest.mark.parametrize(("timestamp_format", "written", "parquet"), [
    ("epoch_ms", 1_000_000_000_123, True),  # a Parquet integer column
    ("epoch_s", "1000000000.123", False),
    ("%d/%m/%Y %H:%M:%S%.f", "09/09/2001 01:46:40.123", False),  # naive: UTC
    ("%Y-%m-%d %H:%M:%S%.f%z", "2001-09-09 03:46:40.123+0200", False),
    ("iso", "2001-09-09 01:46:40.123", False),
])
def test_timestamps_read_as_declared(tmp_path, monkeypatch, timestamp_format, written, parquet):
    log = {"timestamp": "when", "timestamp_format": timestamp_format, "item": "item", "reward": "clicked",
           "propensity": "p", "policy": "explore"}
    home, config = project(tmp_path, monkeypatch, log)
    frame = pl.DataFrame({"when": [written], "item": ["a"], "clicked": [1], "p": [0.5]})
    path = tmp_path / ("log.parquet" if parquet else "log.csv")
    if parquet:
        frame.write_parquet(path)
    else:
        frame.write_csv(path)
    report = import_file(home, config, "bandit", path, "recommendation")
    [interaction, click] = landed(home, report.batches)
    assert interaction["timestamp"] == click["timestamp"] == "2001-09-09T01:46:40.123Z"
    assert interaction["impressions"][0]["propensity"] == 0.5


def config_error(tmp_path: Path, bandit_log: dict) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(ratings_config(tmp_path, bandit_log))
    return str(error.value)


def test_bad_reading_keys_are_named(tmp_path):
    assert f"{KEY}.separator: Value error, must be one or more characters other than a quote, a backslash" in config_error(
        tmp_path, dict(U_DATA, separator="\\t"))  # a backslash and a t: YAML without double quotes
    missing = config_error(tmp_path, {k: v for k, v in U_DATA.items() if k != "propensity"})
    assert f"{KEY}.propensity: Value error, missing: declare the column" in missing and "`unknown`" in missing
    assert "columns: missing" in config_error(tmp_path, {k: v for k, v in U_DATA.items() if k != "columns"})
    assert f"{KEY}.timestamp_format: Value error" in config_error(tmp_path, dict(U_DATA, timestamp_format="unix"))
    assert "position_base: missing" in config_error(tmp_path, dict(U_DATA, position="rank"))


def test_a_wrong_separator_or_a_missing_column_stops_the_import_naming_the_key(tmp_path, monkeypatch):
    rows = ratings(FIRST, 1, 5, (1, 5))
    home, config = project(tmp_path / "a", monkeypatch, dict(U_DATA, separator=","))
    with pytest.raises(UnreadableFile, match=rf"{KEY}.columns names 4 columns, .*, its first row holds 1 "
                                             rf"\(read as one column: is {KEY}.separator ','"):
        import_file(home, config, "bandit", u_data(tmp_path / "u.data", rows), "recommendation")

    tsv = tmp_path / "ratings.tsv"
    tsv.write_text(ratings_csv(tmp_path / "ratings.csv", rows).read_text().replace(",", "\t"))
    home, config = project(tmp_path / "b", monkeypatch, RATINGS_CSV)
    with pytest.raises(UnreadableFile, match=rf"no column '\w+' \({KEY}\.\w+: \w+\).*is {KEY}.separator ','"):
        import_file(home, config, "bandit", tsv, "recommendation")

    home, config = project(tmp_path / "c", monkeypatch, dict(RATINGS_CSV, content="title"))
    with pytest.raises(UnreadableFile, match=rf"no column 'title' \({KEY}.content: title\); its columns: "
                                             r"\['movieId', 'rating', 'timestamp', 'userId'\]$"):
        import_file(home, config, "bandit", tmp_path / "ratings.csv", "recommendation")


def interaction(event_id: str, **impression: object) -> dict:
    return {"event_id": event_id, "event_type": "interaction", "domain": "recommendation",
            "timestamp": f"{FIRST}T09:15:00Z", "user_id": "u_1", "session_id": f"s_{event_id}",
            "interaction_id": f"i_{event_id}", "model_version": "baseline", "policy": "champion",
            "consent": "granted", "input": "", "impressions": [{"item_id": "a", "position": 0, **impression}]}


def test_the_contract_takes_a_null_propensity_as_unknown_and_an_absent_one_as_missing(tmp_path, monkeypatch):
    home, config = project(tmp_path, monkeypatch, U_DATA)
    lines = [interaction("known", propensity=0.5, content="A"), interaction("unknown", propensity=None, content="B"),
             interaction("absent", content="C"), interaction("zero", propensity=0, content="D")]
    batch = home.landing / "recommendation" / f"{FIRST}.jsonl"
    batch.parent.mkdir(parents=True, exist_ok=True)
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with warehouse.connect(home.warehouse("recommendation")) as con:
        accumulate(con, home, config, "recommendation", [FIRST])
        assert con.execute("SELECT interaction_id, propensity FROM raw.impressions ORDER BY 1").fetchall() == [
            ("i_known", 0.5), ("i_unknown", None)]
        assert con.execute("SELECT source_line, reason FROM raw.quarantine ORDER BY 1").fetchall() == [
            (3, "missing_field:impressions.propensity"), (4, "invalid_value:impressions.propensity")]


def test_a_warehouse_made_before_takes_unknown_propensities(tmp_path):
    path = tmp_path / "old.duckdb"
    with warehouse.connect(path) as con:
        con.execute("""CREATE SCHEMA raw; CREATE TABLE raw.impressions (
            event_id VARCHAR NOT NULL, domain VARCHAR NOT NULL, event_date DATE NOT NULL,
            interaction_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL, position INTEGER NOT NULL,
            propensity DOUBLE NOT NULL, content VARCHAR NOT NULL, PRIMARY KEY (event_id, item_id))""")
        con.execute("INSERT INTO raw.impressions VALUES ('e1', 'r', DATE '2026-11-02', 'i1', 'a', 0, 0.5, 'A')")
    for _ in range(2):  # idempotent
        with warehouse.connect(path) as con:
            warehouse.ensure_raw_tables(con)
    with warehouse.connect(path) as con:
        con.execute("INSERT INTO raw.impressions VALUES ('e2', 'r', DATE '2026-11-02', 'i2', 'a', 0, NULL, 'A')")
        assert con.execute("SELECT event_id, propensity FROM raw.impressions ORDER BY 1").fetchall() == [
            ("e1", 0.5), ("e2", None)]


@pytest.fixture
def u_data_in_the_marts(tmp_path, monkeypatch) -> Iterator[tuple[Home, list[tuple], dg.ExecuteInProcessResult]]:
    """A u.data log imported, accumulated and built into the marts by the cycle's raw and dbt assets."""
    home, config = project(tmp_path, monkeypatch, U_DATA)
    rows = ratings(FIRST, 2, 40, (1, 2, 3, 4, 5), seed=1)
    import_file(home, config, "bandit", u_data(tmp_path / "u.data", rows), "recommendation")
    home.activate()
    instance = dg.DagsterInstance.local_temp(str(home.dagster))
    result = execute_cycle(build_definitions(config, home), instance, "recommendation", FIRST,
                           FIRST + timedelta(days=1), asset_selection=[RAW_EVENTS, *dbt_model_keys()])
    yield home, rows, result
    instance.dispose()


@pytest.mark.slow
def test_unknown_propensities_are_null_in_the_marts(u_data_in_the_marts):
    home, rows, result = u_data_in_the_marts
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["filtered_impressions"] and checks["accumulated_traffic"]
    with warehouse.connect(home.warehouse("recommendation"), read_only=True) as con:
        marts = con.execute("""SELECT interaction_id, item_id, position, propensity, clicked, rating
                               FROM marts.fct_impressions ORDER BY 1""").fetchall()
    expected = sorted((f"bandit-u:{n}", str(item), 0, None, rating >= 4, rating)
                      for n, (_, item, rating, _) in enumerate(rows, start=1))
    assert marts == expected
