"""The monitor's confidence sequence and its decisions (flywheel_pipeline/monitoring.py)."""

from __future__ import annotations

import itertools
from datetime import date, datetime

import duckdb
import numpy as np
import polars as pl
import pytest

from flywheel_pipeline.config import Serving
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
from flywheel_pipeline.validation import Routing, score_models
from flywheel_pipeline.validation.evidence import assemble
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


class _Prefers:
    """A model that ranks a fixed item first per question, the rest by item id."""

    def __init__(self, first: dict[str, str]):
        self.first = first

    def predict(self, frame):
        return np.array([2.0 if self.first[q] == item else -int(item[1:]) / 100
                         for q, item in zip(frame["input_text"], frame["item_id"])])


def _two_arm_log(rng: np.random.Generator, n: int, share: float, eps: float, models: dict[str, _Prefers],
                 attraction: dict[tuple[str, str], float]):
    """n interactions of 4 candidates, one shown: routed to "prev" with ``share``, else "new", each
    epsilon-greedy; each logs its own probability of every candidate (what serving logs)."""
    questions, items = ["q0", "q1", "q2"], ["i0", "i1", "i2", "i3"]
    rows, candidates = [], []
    for u in range(n):
        q = questions[rng.integers(3)]
        version = "prev" if rng.random() < share else "new"
        top = models[version].first[q]
        mu = {item: (1 - eps) * (item == top) + eps / 4 for item in items}
        shown = top if rng.random() >= eps else items[rng.integers(4)]
        rows.append({"interaction_id": f"u{u}", "domain": "d", "user_id": f"user{u}", "segment": None,
                     "context_features": "{}", "is_new_user": False, "input_text": q,
                     "policy": "explore" if shown != top else "champion", "model_version": version,
                     "event_date": date(2026, 11, 2), "item_id": shown, "item_content": shown, "position": 0,
                     "propensity": mu[shown], "outcome": float(rng.random() < attraction[q, shown]),
                     "verdict": None, "p_good": 0.5, "label": None})
        candidates += [{"interaction_id": f"u{u}", "item_id": i, "item_content": i, "mu": [mu[i]]} for i in items]
    return pl.DataFrame(rows), pl.DataFrame(candidates)


def test_a_holdback_is_judged_with_the_routings_mixture_of_loggers():
    """Two versions served side by side (a 20% holdback, 10% exploration): with the routing's
    mixture as each unit's logger (comparison.Routing) the difference is unbiased and several times
    less noisy than with each arm's own propensities, where the other version's choices have only
    the exploration slice's support."""
    rng = np.random.default_rng(11)
    models = {"new": _Prefers({"q0": "i0", "q1": "i1", "q2": "i2"}), "prev": _Prefers({"q0": "i0", "q1": "i3", "q2": "i3"})}
    attraction = {(q, i): 0.3 for q in ("q0", "q1", "q2") for i in ("i0", "i1", "i2", "i3")}
    attraction |= {("q1", "i1"): 0.2, ("q2", "i2"): 0.25, ("q1", "i3"): 0.5, ("q2", "i3"): 0.45}
    truth = np.mean([attraction[q, models["new"].first[q]] - attraction[q, models["prev"].first[q]]
                     for q in ("q0", "q1", "q2")])  # -0.1667: the new version is worse
    estimates = {"mixture": [], "own arm": []}
    for _ in range(30):
        rows, candidates = _two_arm_log(rng, 1500, share=0.2, eps=0.1, models=models, attraction=attraction)
        evidence = assemble(rows, candidates, "outcome")
        held = (evidence.units["model_version"] == "prev").to_numpy()
        for name, routing in (("mixture", Routing(np.full(evidence.n_units, 0.2), held, 0.1)), ("own arm", None)):
            scored, _ = score_models(evidence, "assistant", models["new"], models["prev"], Serving(), routing)
            values = {role: scored.roles[role].terms.direct + scored.roles[role].terms.residual
                      for role in ("candidate", "champion")}
            estimates[name].append(float((values["candidate"] - values["champion"]).mean()))
    mixture, own = np.array(estimates["mixture"]), np.array(estimates["own arm"])
    assert abs(mixture.mean() - truth) < 0.02
    assert mixture.std() < own.std() / 2
