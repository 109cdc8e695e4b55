"""The monitor's confidence sequence and its decisions (flywheel_pipeline/monitoring.py)."""

from __future__ import annotations

import itertools
from datetime import date, datetime

import duckdb
import numpy as np
import pytest

from flywheel_pipeline.health.report import render_html
from flywheel_pipeline.monitoring import (
    Bound,
    Deployed,
    Forecast,
    Watch,
    calibration,
    confidence_sequence,
    latest_watch,
    save_watch,
)
from tests.test_health_report import health_report, history, validation

ALPHA = 0.05


def looks(rng: np.random.Generator, mean: float, days: int, per_day: int, sd: float = 1.0) -> list[Bound]:
    """The confidence sequence at the end of each day of a stream of per-interaction values."""
    values = rng.normal(mean, sd, days * per_day)
    return [confidence_sequence(values[: (d + 1) * per_day], ALPHA, 3 * per_day) for d in range(days)]


def test_watching_every_day_keeps_the_false_alarm_rate_of_one_look():
    """Under no regression, the share of streams whose upper bound ever falls below 0 over 30 daily
    looks stays near alpha; a daily 95% interval would cross far more often."""
    rng = np.random.default_rng(3)
    ever, naive = 0, 0
    for _ in range(400):
        values = rng.normal(0.0, 1.0, 30 * 200)
        bounds = [confidence_sequence(values[: (d + 1) * 200], ALPHA, 600) for d in range(30)]
        ever += any(b.high < 0 for b in bounds)
        naive += any(values[: (d + 1) * 200].mean() + 1.645 * values[: (d + 1) * 200].std() / np.sqrt((d + 1) * 200) < 0
                     for d in range(30))
    assert ever / 400 <= ALPHA + 0.02  # time-uniform: about alpha
    assert naive / 400 > 2 * ALPHA  # what looking daily at a fixed-n interval does


def test_a_regression_is_found_within_days_and_the_bound_tightens():
    rng = np.random.default_rng(4)
    bounds = looks(rng, mean=-0.1, days=10, per_day=500)
    first = next(d for d, b in enumerate(bounds) if b.high < 0)
    assert first <= 3
    widths = [b.high - b.low for b in bounds]
    assert all(a > b for a, b in itertools.pairwise(widths))


def test_too_few_values_or_no_spread():
    assert np.isnan(confidence_sequence(np.array([1.0]), ALPHA, 100).high)
    assert confidence_sequence(np.zeros(50), ALPHA, 100) == Bound(0.0, 0.0, 0.0)


def deployed(forecast_low: float = 0.5) -> Deployed:
    return Deployed("recommendation", "4", "3", datetime(2026, 11, 2, 9),
                    Forecast(Bound(0.55, forecast_low, 0.6), Bound(0.02, 0.0, 0.04)))


@pytest.mark.parametrize(("difference", "live", "regressed", "below"), [
    (Bound(-0.03, -0.05, -0.01), Bound(0.52, 0.51, 0.53), True, False),  # worse than what it replaced
    (Bound(-0.03, -0.05, 0.01), Bound(0.52, 0.51, 0.53), False, False),  # not yet sure
    (Bound(0.01, 0.0, 0.02), Bound(0.45, 0.44, 0.46), False, True),  # the world moved: below the forecast
])
def test_a_watch_says_regressed_only_when_the_whole_sequence_is_below(difference, live, regressed, below):
    seen = Watch(deployed(), datetime(2026, 11, 5).date(), 3, 4500, live, difference, margin=0.0)
    assert (seen.regressed, seen.below_forecast) == (regressed, below)
    assert "v4 live" in seen.summary() and "vs v3" in seen.summary()


def test_each_deployments_realised_gain_is_set_against_its_forecast_in_the_table_and_the_report(tmp_path):
    """save_watch keeps a row a day; calibration takes each deployment's latest; the health report
    shows them with the share that fell within the forecast."""
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    assert calibration(con, "recommendation").is_empty()  # before any look
    good, bad = deployed(), Deployed("recommendation", "5", "4", datetime(2026, 11, 9, 9),
                                     Forecast(Bound(0.56, 0.52, 0.6), Bound(0.01, -0.01, 0.03)))
    for day, difference in ((5, Bound(0.01, -0.02, 0.04)), (6, Bound(0.02, 0.0, 0.04))):
        save_watch(con, Watch(good, date(2026, 11, day), day - 1, 1500 * (day - 1), Bound(0.5, 0.49, 0.51),
                              difference, 0.0), "healthy", datetime(2026, 11, day, 6))
    save_watch(con, Watch(bad, date(2026, 11, 12), 3, 4500, Bound(0.5, 0.49, 0.51), Bound(-0.05, -0.07, -0.03), 0.0),
               "rollback ...", datetime(2026, 11, 12, 6))
    rows = calibration(con, "recommendation")
    assert rows["version"].to_list() == ["4", "5"] and rows["realised_gain"].to_list() == [0.02, -0.05]
    assert rows["within_forecast"].to_list() == [True, False]  # 0.02 in [0.0, 0.04]; -0.05 below [-0.01, 0.03]
    assert latest_watch(con, "recommendation") == "2026-11-12: v5 regressed (declared 2026-11-12: rollback ...)"

    report = health_report()
    page = render_html(report, history(), validation(report), live=rows.to_dicts())
    section = page[page.index('id="live"'):page.index('id="evidence"')]
    assert "1 of 2 deployments gained within the interval" in section
    assert "<td>v5</td><td>v4</td>" in section and "+0.0100 [-0.0100, +0.0300]" in section
    assert 'id="live"' not in render_html(report, history(), validation(report))
