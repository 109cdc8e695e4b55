"""Input drift (health/drift.py): the PSI and the new-item share on known shifts, a domain's windows
on a real warehouse, the drift sensor evaluated against it, and the drift section of the report."""

from __future__ import annotations

import json
import math
from datetime import date, timedelta

import dagster as dg
import duckdb
import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest

from flywheel_pipeline import registry
from flywheel_pipeline.config import parse_config
from flywheel_pipeline.definitions import build_definitions
from flywheel_pipeline.defs.jobs import cycle_job_name
from flywheel_pipeline.defs.partitions import (
    PARTITION_RANGE_END_TAG,
    PARTITION_RANGE_START_TAG,
    partition_key,
)
from flywheel_pipeline.defs.sensors import DRIFT_REASONS_TAG
from flywheel_pipeline.health.drift import (
    PSI_FLOOR,
    categorical_psi,
    domain_drift,
    measure,
    numeric_psi,
    psi,
    token_psi,
)
from flywheel_pipeline.health.report import render_html, render_stored, write_report
from flywheel_pipeline.warehouses import Warehouses
from tests.test_health_report import PLOTS, health_report, history, sections, validation
from tests.test_training import TEST_CONFIG, fresh_home, write_warehouse

DOMAIN = "recommendation"
FIRST = date(2026, 3, 1)
DAYS = 60  # 2026-03-01 .. 2026-04-29
LATEST = FIRST + timedelta(days=DAYS - 1)
SHIFT = FIRST + timedelta(days=30)  # from this day on, the segment mix is reversed
BEFORE, AFTER = [0.6, 0.3, 0.1], [0.1, 0.3, 0.6]


def config(**drift):
    """TEST_CONFIG (lookback 28, holdout 3; both domains at oversight), drift settings for both."""
    raw = json.loads(json.dumps(TEST_CONFIG))
    for domain in raw["domains"].values():
        domain["drift"] = drift
    return parse_config(raw)


def traffic(days: list[date], per_day: int, mix: list[float], seed: int, items: int = 20,
            domain: str = DOMAIN, new_items: float = 0.0) -> pd.DataFrame:
    """One impression per interaction: segment drawn from ``mix``, a context feature and a query
    whose length do not change, one of ``items`` items (``new_items`` of them never seen before)."""
    rng = np.random.default_rng(seed)
    rows = []
    for day in days:
        for k in range(per_day):
            new = rng.random() < new_items
            rows.append({
                "domain": domain, "event_date": day, "interaction_id": f"{domain}{seed}_{day}_{k}",
                "item_id": f"new{rng.integers(1000)}" if new else f"i{rng.integers(items)}", "position": 0,
                "propensity": 0.5, "policy": "explore" if rng.random() < 0.1 else "champion",
                "model_version": "baseline", "user_id": f"u{rng.integers(500)}", "session_id": f"s{k}",
                "is_new_user": bool(rng.random() < 0.2), "segment": f"s{rng.choice(3, p=mix)}",
                "context_features": json.dumps({"hour": float(rng.integers(24))}),
                "input_text": " ".join(rng.choice(["how", "to", "reset", "my", "router", "phone"],
                                                  size=int(rng.integers(2, 7)))),
                "item_content": "item", "slate_size": 1, "p_good": 0.5,
            })
    return pd.DataFrame(rows)


def days(first: date, count: int) -> list[date]:
    return [first + timedelta(days=offset) for offset in range(count)]


def frame(data: pd.DataFrame) -> pl.DataFrame:
    return pl.from_pandas(data)


# --- the statistic ---------------------------------------------------------------------------

def test_psi_is_the_symmetric_divergence_of_the_binned_shares() -> None:
    assert psi([50, 50], [25, 75]) == pytest.approx((0.25 - 0.5) * math.log(0.5) + (0.75 - 0.5) * math.log(1.5))
    assert psi([1, 2, 3], [10, 20, 30]) == pytest.approx(0.0)  # counts or shares: the same
    # an empty bin is floored, so a category new in the recent traffic counts, finitely
    assert psi([100, 0], [70, 30]) == pytest.approx(
        (0.7 - 1) * math.log(0.7) + (0.3 - PSI_FLOOR) * math.log(0.3 / PSI_FLOOR))
    assert psi([], [1]) == psi([0, 0], [1, 1]) == 0.0


def test_a_shifted_segment_mix_is_beyond_the_threshold_and_the_same_mix_is_not() -> None:
    rng = np.random.default_rng(0)
    reference = rng.choice(["s0", "s1", "s2"], size=20_000, p=BEFORE)
    same = categorical_psi(reference, rng.choice(["s0", "s1", "s2"], size=2_000, p=BEFORE))
    shifted = categorical_psi(reference, rng.choice(["s0", "s1", "s2"], size=2_000, p=AFTER))
    assert same.psi < 0.01 and same.bins == 3
    assert shifted.psi > 0.25  # a large shift by the rule of thumb: about 1.8
    assert shifted.psi == pytest.approx(psi([0.6, 0.3, 0.1], [0.1, 0.3, 0.6]), abs=0.1)
    assert categorical_psi([None, "a"], [None, "a"]).psi == 0.0  # missing is a category


def test_numeric_features_are_binned_by_the_references_deciles() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(size=20_000)
    same, moved = numeric_psi(reference, rng.normal(size=2_000)), numeric_psi(reference, rng.normal(0.5, 1, 2_000))
    assert same.bins == 10 and same.psi < 0.02
    assert 0.15 < moved.psi < 0.35  # half a standard deviation: about 0.23
    assert numeric_psi([3.0] * 100, [3.0] * 40).psi == 0.0  # held constant: one bin
    assert numeric_psi([1.0, 2.0] * 50, [1.0, 2.0] * 20 + [None] * 40).psi > 1  # absent is its own bin


def test_new_items_the_champion_ranks_low_are_seen_among_the_candidates() -> None:
    """Impressions show only what the champion ranks high; the logged candidates hold every new
    item offered: a quarter of them new is drift though no impression shows one."""
    reference = frame(traffic(days(FIRST, 10), 200, BEFORE, seed=2))
    recent = frame(traffic(days(FIRST + timedelta(days=10), 3), 300, BEFORE, seed=3))
    old = pl.Series("item_id", [f"item_{i:03d}" for i in range(40)] * 50)
    offered = pl.Series("item_id", [f"item_{i:03d}" for i in range(30)] * 30 + [f"new_{i}" for i in range(10)] * 30)
    windows = (FIRST, FIRST + timedelta(days=9)), (FIRST + timedelta(days=10), FIRST + timedelta(days=12))
    settings = config().domain(DOMAIN).drift
    assert measure(reference, recent, settings, "recommendation", DOMAIN, *windows).new_item_share == 0.0
    report = measure(reference, recent, settings, "recommendation", DOMAIN, *windows, offered=(old, offered))
    assert report.new_item_share == pytest.approx(0.25)
    assert report.reasons == ("new items: 25.0% of recent candidates > 20%",)
    unlogged = measure(reference, recent, settings, "recommendation", DOMAIN, *windows,
                       offered=(old, pl.Series("item_id", [], pl.String)))
    assert unlogged.new_items_among == "impressions" and unlogged.new_item_share == 0.0


def test_the_input_tokens_distribution() -> None:
    reference = ["how do i reset my router"] * 50 + ["install the phone app"] * 50
    assert token_psi(reference, reference[::-1]).psi == pytest.approx(0.0)
    assert token_psi(reference, ["cancel my subscription now"] * 30).psi > 1  # tokens the reference never had


def test_new_items_are_counted_and_named_with_every_psi() -> None:
    reference = frame(traffic(days(FIRST, 10), 200, BEFORE, seed=2))
    recent = frame(traffic(days(FIRST + timedelta(days=10), 3), 300, BEFORE, seed=3, new_items=0.3))
    report = measure(reference, recent, config().domain(DOMAIN).drift, "recommendation", DOMAIN,
                     (FIRST, FIRST + timedelta(days=9)), (FIRST + timedelta(days=10), FIRST + timedelta(days=12)))
    assert report.new_item_share == pytest.approx(0.3, abs=0.05)
    assert report.drifted and report.reasons == (f"new items: {report.new_item_share:.1%} of recent impressions > 20%",)
    names = [f.feature for f in report.features]
    assert names == ["segment", "context:hour", "input_length"]  # no tokens: a recommender
    assert report.largest.psi < 0.05  # the inputs did not move
    assert report.measures()["new_item_share"] == report.new_item_share
    assert "input_tokens" in [f.feature for f in measure(
        reference, recent, config().domain(DOMAIN).drift, "assistant", DOMAIN, (FIRST, FIRST), (FIRST, FIRST)).features]


def test_nothing_is_measured_without_a_reference() -> None:
    recent = frame(traffic(days(FIRST, 3), 50, BEFORE, seed=4))
    report = measure(recent.clear(), recent, config().domain(DOMAIN).drift, "recommendation", DOMAIN,
                     (FIRST, FIRST), (FIRST, LATEST))
    assert not report.drifted and report.note == "no impressions in the reference window"
    assert "not measured" in report.summary()


# --- a warehouse and the sensor --------------------------------------------------------------

def write_traffic(path) -> None:
    """Both domains' 60 days: the recommendation segment mix reverses on SHIFT, the assistant's never."""
    with duckdb.connect(str(path)) as con:
        write_warehouse(con, traffic(days(FIRST, 30), 120, BEFORE, seed=10))
        write_warehouse(con, traffic(days(SHIFT, 30), 120, AFTER, seed=11))
        write_warehouse(con, traffic(days(FIRST, DAYS), 120, BEFORE, seed=12, domain="assistant"))


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    path = tmp_path_factory.mktemp("drift") / "warehouse.duckdb"
    write_traffic(path)
    return path


def test_before_a_champion_the_reference_is_the_first_lookback_days(warehouse) -> None:
    settings = config().domain(DOMAIN)
    with duckdb.connect(str(warehouse), read_only=True) as con:
        report = domain_drift(con, settings, DOMAIN)
        champion = domain_drift(con, settings, DOMAIN, "3", {"training.train_start": "2026-04-01",
                                                             "training.train_end": "2026-04-20"})
        untagged = domain_drift(con, settings, DOMAIN, "3", {})
        assert domain_drift(con, settings, "nobody") is None
    assert (report.reference_start, report.reference_end) == (FIRST, FIRST + timedelta(days=27))
    assert (report.recent_start, report.recent_end) == (LATEST - timedelta(days=2), LATEST)
    assert report.reference == "the first 28 days (no champion yet)"
    assert report.recent_interactions == 360 and report.reference_interactions == 28 * 120
    assert report.drifted and report.reasons[0].startswith("segment: PSI 1.")
    assert (champion.reference_start, champion.reference_end) == (date(2026, 4, 1), date(2026, 4, 20))
    assert champion.reference == "champion v3's training window" and not champion.drifted
    assert untagged.reference.startswith("the first 28 days (champion v3 names no training window)")


@pytest.fixture
def deployment(tmp_path):
    """A home holding the warehouse of both domains, its definitions and a Dagster instance."""
    home = fresh_home(tmp_path / "home")
    for domain in ("assistant", DOMAIN):
        write_traffic(home.warehouse(domain))
    settings = config()
    defs = build_definitions(settings, home)
    with dg.instance_for_test() as instance:
        yield home, settings, defs, instance


def tick(defs, instance, cursor: str | None = None) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def("drift_sensor")
    resources = {"warehouse": defs.resources["warehouse"], "mlflow": defs.resources["mlflow"]}
    with dg.build_sensor_context(instance=instance, resources=resources, definitions=defs, cursor=cursor) as context:
        return sensor(context)


def test_the_sensor_launches_one_cycle_per_drift_episode(deployment) -> None:
    home, settings, defs, instance = deployment
    sensor = defs.resolve_sensor_def("drift_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == settings.daemon.late_label_sensor_seconds

    first = tick(defs, instance)
    (request,) = first.run_requests  # the recommendation domain drifted, the assistant did not
    assert request.job_name == cycle_job_name(DOMAIN)
    assert request.tags["flywheel/reason"] == "drift"
    assert request.tags[DRIFT_REASONS_TAG].startswith("segment: PSI 1.")
    # over the cycle's windows (lookback 28 + held out 3) ending on the latest day held
    assert request.tags[PARTITION_RANGE_START_TAG] == partition_key(DOMAIN, LATEST - timedelta(days=30))
    assert request.tags[PARTITION_RANGE_END_TAG] == partition_key(DOMAIN, LATEST)
    assert json.loads(first.cursor) == {DOMAIN: {"day": LATEST.isoformat(), "champion": "baseline"}}

    again = tick(defs, instance, first.cursor)  # the same episode: nothing more
    assert not again.run_requests
    assert "already launched a cycle" in again.skip_reason.skip_message
    assert "assistant: no drift (largest PSI" in again.skip_reason.skip_message  # the measured values

    # a champion trained on the new mix ends the episode: no drift against its window
    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    name = registry.model_name(DOMAIN)
    client.create_registered_model(name)
    version = client.create_model_version(name, str(home.root / "model"), tags={
        "training.train_start": (SHIFT + timedelta(days=1)).isoformat(),
        "training.train_end": (LATEST - timedelta(days=5)).isoformat()}).version
    client.set_registered_model_alias(name, registry.CHAMPION, str(version))
    after = tick(defs, instance, again.cursor)
    assert not after.run_requests and json.loads(after.cursor) == {}
    said = after.skip_reason.skip_message
    assert f"{DOMAIN}: no drift" in said and f"champion v{version}'s training window" in said


def test_a_cycle_covering_the_latest_day_launches_no_other(deployment) -> None:
    _, _, defs, instance = deployment
    (request,) = tick(defs, instance).run_requests
    job = defs.resolve_job_def(cycle_job_name(DOMAIN))
    instance.create_run_for_job(job, tags=request.tags)  # queued: as the daemon submits it
    covered = tick(defs, instance)  # a lost cursor: the run says it
    assert not covered.run_requests and f"already covers {LATEST}" in covered.skip_reason.skip_message


def test_drift_that_triggers_nothing_is_measured_only(tmp_path) -> None:
    home = fresh_home(tmp_path / "home")
    write_traffic(home.warehouse(DOMAIN))
    defs = build_definitions(config(triggers_cycle=False), home)
    assert defs.resolve_sensor_def("drift_sensor").default_status == dg.DefaultSensorStatus.STOPPED
    with dg.instance_for_test() as instance:
        result = tick(defs, instance)
    assert not result.run_requests
    said = result.skip_reason.skip_message
    assert "drift.triggers_cycle is off" in said and "assistant: no warehouse yet" in said


def test_domains_at_automation_off_are_not_watched(tmp_path) -> None:
    raw = json.loads(json.dumps(TEST_CONFIG))
    for domain in raw["domains"].values():
        domain["automation"] = "off"
    home = fresh_home(tmp_path / "home")
    write_traffic(home.warehouse(DOMAIN))
    defs = build_definitions(parse_config(raw), home)
    assert defs.resolve_sensor_def("drift_sensor").default_status == dg.DefaultSensorStatus.STOPPED
    with dg.instance_for_test() as instance:
        result = tick(defs, instance)
    assert not result.run_requests and "every automation is off" in result.skip_reason.skip_message


# --- the report ------------------------------------------------------------------------------

def test_the_report_shows_the_cycles_drift(warehouse, tmp_path) -> None:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        drift = domain_drift(con, config().domain(DOMAIN), DOMAIN).to_dict()
    report = health_report()
    page = render_html(report, history(), validation(report), drift=drift)
    assert list(sections(page)) == list(sections(render_html(report, history(), validation(report))))
    assert page.count("<svg") == PLOTS
    section = page[page.index('id="drift"'):page.index('id="evidence"')]
    assert "drifted" in section and "segment: PSI 1." in section
    assert "<td>segment</td>" in section and '<td class="num">0.2</td>' in section  # PSI, threshold
    assert "new items (share of recent impressions)" in section and "20%" in section
    assert 'id="drift"' not in render_html(report, history(), validation(report))  # none measured: no section

    home = fresh_home(tmp_path / "home")
    page_path = write_report(home, report, history(), validation(report), drift=drift)
    _, again = render_stored(Warehouses(home), page_path.with_suffix(".json"))
    assert 'id="drift"' in again and "segment: PSI 1." in again


def test_the_health_assets_metadata_shows_the_drift_table(warehouse) -> None:
    from flywheel_pipeline.defs.health import _drift_metadata

    with duckdb.connect(str(warehouse), read_only=True) as con:
        drift = domain_drift(con, config().domain(DOMAIN), DOMAIN)
    shown = _drift_metadata(drift)
    assert shown["drift"].value.startswith("**drifted**: segment: PSI 1.")
    assert "| segment | 1." in shown["drift"].value and "| new items (share of recent impressions) | 0.0% | 20% |" in \
        shown["drift"].value
    assert shown["drift_max_psi"] == round(drift.largest.psi, 4) and shown["new_item_share"] == 0.0
    assert _drift_metadata(None) == {"drift": "not measured (no impressions)"}


def test_a_drift_episode_is_announced_once_and_semi_launches_no_training(tmp_path, monkeypatch, webhook) -> None:
    url, received = webhook
    monkeypatch.setenv("DRIFT_HOOK", url)
    raw = json.loads(json.dumps(TEST_CONFIG))
    raw["alerts"] = {"webhook_url_env": "DRIFT_HOOK"}
    raw["domains"][DOMAIN]["automation"] = "semi"
    home = fresh_home(tmp_path / "home")
    write_traffic(home.warehouse(DOMAIN))
    defs = build_definitions(parse_config(raw), home)
    with dg.instance_for_test() as instance:
        first = tick(defs, instance)
        again = tick(defs, instance, first.cursor)
    assert not first.run_requests and not again.run_requests  # semi: people decide training
    assert "automation semi: people decide training" in first.skip_reason.skip_message
    assert [m["kind"] for m in received] == ["drift"]  # once for the episode, not every tick
    assert received[0]["domain"] == DOMAIN and "segment: PSI 1." in received[0]["text"]
