"""Signals real logs carry: negative evidence from silence, empty input, exploration as declared,
0-based slots, numeric context; and validation that neither crashes on an empty slice nor depends
on the order rows come in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import date, datetime, time, timedelta

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from flywheel_pipeline import quality, warehouse
from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.config import ConfigError, parse_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.partitions import range_tags
from flywheel_pipeline.defs.transform import build_dbt_assets, dbt_resource
from flywheel_pipeline.labeling.functions import (
    ABSTAIN,
    BAD,
    LABELING_FUNCTIONS,
    apply_lfs,
    vote_matrix,
    voters,
)
from flywheel_pipeline.labeling.model import DawidSkene
from flywheel_pipeline.labeling.stage import label_partitions
from flywheel_pipeline.runs import read_outcome
from flywheel_pipeline.training.base import FlywheelScorerModel
from flywheel_pipeline.training.recommendation import RecommendationTrainer
from flywheel_pipeline.validation import compare_models, gate
from flywheel_pipeline.validation.evidence import assemble
from tests.test_accumulation import interaction, run, table, write_batch
from tests.test_labeling import FCT_IMPRESSIONS, impression
from tests.test_quality import traffic
from tests.test_validation import logged_bandit, report_with, target_and_logger_favourite

NEGATIVE_LFS = ("not_clicked_top", "not_clicked_lower")
DAY = date(2026, 11, 2)


def with_domain(config, domain: str, **settings):
    """``config`` with ``domain``'s settings updated."""
    updated = config.domain(domain).model_copy(update=settings)
    return config.model_copy(update={"domains": {**config.domains, domain: updated}})


# --- config ----------------------------------------------------------------------------------------


def test_real_loggers_fit_the_config(config):
    raw = config.model_dump(mode="json")
    raw["domains"]["recommendation"].update(exploration_share=1.0, label_maturity={"outcome": "click"})
    fully_random_click_only = parse_config(raw).domain("recommendation")
    assert fully_random_click_only.exploration_share == 1.0 and fully_random_click_only.input_optional
    assert not config.domain("assistant").input_optional  # an assistant answers a query
    raw["domains"]["recommendation"]["exploration_share"] = 1.5
    with pytest.raises(ConfigError, match=r"domains\.recommendation\.exploration_share: .*less than or equal to 1"):
        parse_config(raw)
    raw["domains"]["recommendation"]["exploration_share"] = 1.0
    raw["domains"]["assistant"]["label_maturity"] = {"outcome": "click"}
    with pytest.raises(ConfigError, match=r"domains\.assistant: .*label_maturity\.outcome 'click' needs shape"):
        parse_config(raw)


# --- negative evidence -----------------------------------------------------------------------------


@pytest.mark.parametrize(("reaction", "top", "lower"), [
    ({"position": 0, "clicked": False, "reaction_window_closed": True}, BAD, ABSTAIN),
    ({"position": 3, "clicked": False, "reaction_window_closed": True}, ABSTAIN, BAD),
    ({"position": 0, "clicked": True, "reaction_window_closed": True}, ABSTAIN, ABSTAIN),
    ({"position": 0, "clicked": False, "reaction_window_closed": False}, ABSTAIN, ABSTAIN),
    ({"position": 0, "clicked": False}, ABSTAIN, ABSTAIN),  # window unknown (an assistant's responses)
])
def test_silence_votes_bad_only_once_the_window_has_closed(reaction, top, lower):
    rows = pl.DataFrame([impression(**reaction)], schema=FCT_IMPRESSIONS)
    assert [LABELING_FUNCTIONS[lf](rows).item() for lf in NEGATIVE_LFS] == [top, lower]


DAYS = [date(2026, 3, 1) + timedelta(days=d) for d in range(7)]
EXAMINATION = np.array([1.0, 0.6, 0.4, 0.3])


def click_log(seed: int = 0, per_day: int = 300, rated_share: float = 0.0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """fct_impressions of a click domain (4 slots, position-based examination, clicks a minute or
    so after serving; a ``rated_share`` of impressions rated, 85% right) and the hidden truth."""
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for day in DAYS:
        for i in range(per_day):
            served_at = datetime.combine(day, time()) + timedelta(seconds=int(rng.integers(86_400)))
            if (day, i) == (DAYS[-1], 0):
                served_at = datetime.combine(day, time(23, 59, 30))  # its click window still open
            for position in range(len(EXAMINATION)):
                good = bool(rng.random() < 0.4)
                clicked = bool(rng.random() < EXAMINATION[position] * (0.7 if good else 0.08))
                rating = (5.0 if good == (rng.random() < 0.85) else 1.0) if rng.random() < rated_share else None
                key = {"interaction_id": f"r-{day:%d}-{i}", "item_id": f"item{position}"}
                rows.append(impression(
                    domain="recommendation", event_date=day, position=position, served_at=served_at,
                    is_new_user=False, segment="s0", clicked=clicked, rating=rating, **key,
                    clicked_after_s=float(rng.integers(5, 120)) if clicked else None))
                truth.append({**key, "good": good})
    marts = pl.DataFrame(rows, schema=FCT_IMPRESSIONS).drop("reaction_window_closed")
    return marts, pl.DataFrame(truth)


def accuracy_against(truth: pl.DataFrame, rows: pl.DataFrame, p_good: np.ndarray,
                     only: np.ndarray | None = None) -> float:
    """Label accuracy of ``p_good`` (one per row of ``rows``, NaN unlabelled) against the truth, over
    the labelled rows (and ``only`` those, when given)."""
    good = rows.select("interaction_id", "item_id").join(truth, on=["interaction_id", "item_id"],
                                                         how="left", maintain_order="left")["good"].to_numpy()
    labelled = ~np.isnan(p_good) & (True if only is None else only)
    return float(((p_good[labelled] >= 0.5) == good[labelled]).mean())


def labels_before_and_after(tmp_path, config, marts: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, object]:
    """p_good per row of ``marts`` without the "not clicked" LFs and, through the labeling stage of
    a click-only domain, with them; and the stage's report."""
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    con.execute("CREATE SCHEMA marts")
    con.register("rows", marts)
    con.execute("CREATE TABLE marts.fct_impressions AS SELECT * FROM rows")
    maturity = config.domain("recommendation").label_maturity.model_copy(update={"outcome": "click"})
    report = label_partitions(con, "recommendation", DAYS, with_domain(config, "recommendation", label_maturity=maturity),
                              fit_window_days=len(DAYS))
    after = marts.select("interaction_id", "item_id").join(
        con.sql("SELECT interaction_id, item_id, p_good FROM labels.impression_labels").pl(),
        on=["interaction_id", "item_id"], how="left", maintain_order="left")["p_good"].fill_null(np.nan).to_numpy()
    assert con.sql("SELECT count(*) FROM labels.label_matrix WHERE interaction_id = 'r-07-0' "
                   "AND lf LIKE 'not_clicked%'").fetchall() == [(0,)]  # served 30 s before the end: window open
    without = [lf for name, lf in LABELING_FUNCTIONS.items() if name not in NEGATIVE_LFS]
    votes = vote_matrix(apply_lfs(marts, without))
    return DawidSkene(voters(without)).fit(votes).predict_proba(votes), after, report


def test_a_click_only_log_gets_both_classes(tmp_path, config):
    marts, truth = click_log()
    before, after, report = labels_before_and_after(tmp_path, config, marts)
    assert np.nanmin(before) >= 0.5  # clicks alone: every label good, training has one class
    assert 0.1 < report.share_good < 0.5 and report.coverage > 0.99
    assert accuracy_against(truth, marts, after) > 0.7  # labelling all bad would score 0.6


def test_with_another_source_a_lower_slots_silence_counts_less_and_labels_lose_no_accuracy(tmp_path, config):
    marts, truth = click_log(rated_share=0.1)
    before, after, report = labels_before_and_after(tmp_path, config, marts)
    learned = dict(zip(report.lf_stats["lf"], report.lf_stats["learned_accuracy"]))
    assert learned["not_clicked_top"] > learned["not_clicked_lower"] + 0.1
    assert report.coverage > 0.99 and np.isfinite(before).mean() < 0.4
    previously_labelled = np.isfinite(before)
    assert (accuracy_against(truth, marts, after, only=previously_labelled)
            >= accuracy_against(truth, marts, before) - 0.01)


# --- the quality filter and checks on a feed log ---------------------------------------------------


def feed_events(day: date, n: int) -> list[dict]:
    """A home feed's interactions as an on-policy logger writes them: no query, slots numbered
    from 1, two numeric context features, a click on some."""
    events = []
    for i in range(n):
        stamp = datetime.combine(day, time(9)) + timedelta(minutes=7 * i)
        event = interaction(
            f"feed_{day:%d}_{i}", domain="recommendation", input="", user_id=f"u_{i % 15}",
            session_id=f"s_{day:%d}_{i}", interaction_id=f"i_{day:%d}_{i}",
            timestamp=f"{stamp:%Y-%m-%dT%H:%M:%SZ}",
            context={"segment": "s1", "features": {"affinity": i / n, "visits_7d": i % 4}},
            impressions=[{"item_id": f"item_{(i + k) % 9}", "position": k + 1, "propensity": 1.0,
                          "content": f"item {(i + k) % 9}"} for k in range(3)])
        events.append(event)
        if i % 3 == 0:
            events.append({"event_id": f"click_{day:%d}_{i}", "event_type": "signal", "domain": "recommendation",
                           "timestamp": f"{stamp + timedelta(seconds=30):%Y-%m-%dT%H:%M:%SZ}",
                           "user_id": event["user_id"], "session_id": event["session_id"],
                           "interaction_id": event["interaction_id"], "signal_type": "click",
                           "item_id": event["impressions"][0]["item_id"]})
    return events


@pytest.fixture(scope="module")
def feed_cycle(tmp_path_factory):
    """A recommendation cycle over two days of an on-policy feed log (exploration_share 0, 1-based
    slots, empty input); then the assistant's dbt build of a day with an empty input."""
    from flywheel_pipeline.config import load_config
    from flywheel_pipeline.home import Home
    from tests.conftest import REPO

    with pytest.MonkeyPatch.context() as patch:
        for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
            patch.delenv(name, raising=False)
        home = Home(tmp_path_factory.mktemp("feed") / "home").activate()
        config = with_domain(load_config(REPO / "flywheel.yaml"), "recommendation", exploration_share=0.0)
        first, last = date.today() - timedelta(days=3), date.today() - timedelta(days=2)
        for day in (first, last):
            write_batch(home, day.isoformat(), feed_events(day, 40), domain="recommendation")
        instance = dg.DagsterInstance.local_temp(str(home.dagster))
        result = execute_cycle(build_definitions(config, home), instance, "recommendation", first, last)
        outcome = read_outcome(instance, "recommendation", instance.get_run_by_id(result.run_id))

        write_batch(home, first.isoformat(), [interaction("empty", input="  ", timestamp=f"{first}T10:00:00Z")])
        with warehouse.connect(home.warehouse("assistant")) as con:
            accumulate(con, home, config, "assistant", [first])
        dg.materialize([build_dbt_assets(config)], resources={"dbt": dbt_resource(home, config)},
                       tags=range_tags("assistant", first, first), instance=instance)
        yield home, outcome
        instance.dispose()


@pytest.mark.slow
def test_a_feed_keeps_its_empty_input_where_an_assistant_drops_it(feed_cycle):
    home, _ = feed_cycle
    flagged = "SELECT domain, drop_reason, count(*) FROM intermediate.int_interactions_flagged GROUP BY ALL"
    assert table(home, flagged, "assistant") == [("assistant", "input_too_short", 1)]
    assert table(home, flagged, "recommendation") == [("recommendation", None, 80)]
    assert table(home, "SELECT count(*), min(position) FROM marts.fct_impressions", "recommendation") == [(240, 1)]


@pytest.mark.slow
def test_a_failed_check_says_what_it_observed_and_expected(feed_cycle):
    _, outcome = feed_cycle
    assert not outcome.succeeded and outcome.gate is None
    failed = "\n".join(outcome.failed_checks)
    # 1-based slots: no top slot, so no examination curve; loud, and blocking
    assert ("filtered_impressions (error): expect_column_min_to_be_between(position): observed 1, "
            "expected 0..0") in failed
    # declared 0 and logged none: the accumulated traffic passes, the missing exploration is a warning
    assert "exploration (warn): expect_column_max_to_be_between(is_exploration): observed 0, expected >= 1" in failed
    assert "accumulated_traffic" not in failed


def test_numeric_context_reaches_the_mart_and_a_bad_one_is_quarantined(home, config):
    write_batch(home, "2026-11-02", [
        interaction("ok", context={"segment": "ada@example.com", "features": {"affinity": 0.25, "n": -3}}),
        interaction("text", context={"features": {"affinity": "high"}}),
        interaction("list", context={"features": [0.25]}),
        json.dumps(interaction("huge", context={"features": {"affinity": 1.5}})).replace("1.5", "1e400"),
        interaction("null", context={"features": {"affinity": None}}),
    ])
    report = run(home, config)
    assert report.accepted["interactions"] == 1
    assert table(home, "SELECT reason, count(*) FROM raw.quarantine GROUP BY ALL") == [
        ("wrong_type:context.features", 4)]
    [(segment, features)] = table(home, "SELECT context ->> 'segment', context -> 'features' FROM raw.interactions")
    assert segment == "<EMAIL_ADDRESS>" and json.loads(features) == {"affinity": 0.25, "n": -3}


# --- exploration as declared -----------------------------------------------------------------------


@pytest.mark.parametrize(("share", "explore_every", "passes"), [
    (1.0, 1, True),  # a fully random logger
    (1.0, 10, False),  # claims random, mostly is not
    (0.0, 0, True),  # a pure on-policy logger that says so
])
def test_the_exploration_check_compares_with_what_the_domain_declares(config, share, explore_every, passes):
    settings = config.domain("recommendation").model_copy(update={"exploration_share": share})
    result = quality.run_suite("t", traffic(100, explore_every), quality.raw_interactions_suite(settings, DAY, DAY))
    assert result.success == passes, result.failures



# --- numeric context in training -------------------------------------------------------------------


def test_the_recommendation_trainer_learns_from_a_numeric_context_feature():
    rng = np.random.default_rng(0)
    n = 4000
    affinity = rng.random(n)
    item = rng.integers(2, size=n)
    good = np.where(item == 1, affinity > 0.5, affinity < 0.5) ^ (rng.random(n) < 0.05)
    rows = pl.DataFrame({
        "domain": "recommendation", "user_id": [f"u{i}" for i in rng.integers(1000, size=n)], "segment": "s0",
        "context_features": [json.dumps({"affinity": float(a)}) for a in affinity], "is_new_user": False,
        "input_text": "", "item_id": [f"i{k}" for k in item], "item_content": "",
        "p_good": np.where(good, 0.9, 0.1), "weight": 0.8,
    })
    train, held_out = rows.head(3000), rows.tail(1000)
    scorers = {name: RecommendationTrainer().fit(frame)
               for name, frame in (("with", train), ("without", train.with_columns(context_features=pl.lit("{}"))))}
    auc = {name: roc_auc_score(good[3000:], scorer.predict(held_out.to_pandas())) for name, scorer in scorers.items()}
    assert auc["with"] > 0.9 and auc["without"] < 0.65
    # a model logged before context_features existed is served a frame without them (MLflow drops
    # inputs its signature does not name): they count as none
    served = FlywheelScorerModel(scorers["with"]).predict(None, held_out.drop("context_features").to_pandas())
    as_none = held_out.with_columns(context_features=pl.lit("{}")).to_pandas()
    assert np.allclose(served, scorers["with"].predict(as_none))


# --- validation ------------------------------------------------------------------------------------


def test_a_held_out_window_where_no_user_returns_is_reported_not_a_crash(config):
    rows, candidates = logged_bandit(400, seed=3)
    evidence = assemble(rows.with_columns(is_new_user=pl.lit(True)), candidates, "outcome")
    slices = compare_models(evidence, "assistant", *target_and_logger_favourite()).slices
    returning = {s.name: s for s in slices}["returning_users"]
    assert returning.n_samples == 0
    assert all(np.isnan(m.candidate) and np.isnan(m.difference_ci[0]) for m in returning.metrics.values())
    decision = gate(replace(report_with({}), slices=slices), config.domain("assistant").gate)
    assert decision.outcome != "failed" and "returning_users (0 samples)" in decision.ungated_slices


BOOTSTRAP_SCRIPT = """
import json, sys
import polars as pl
from flywheel_pipeline.validation import compare_models
from flywheel_pipeline.validation.evidence import assemble
from tests.test_validation import logged_bandit, target_and_logger_favourite
rows, candidates = logged_bandit(3000, seed=3)
rows = rows.with_columns(segment=pl.format("s{}", pl.col("user_id").str.slice(1).cast(pl.Int64) % 3))
if sys.argv[1] == "shuffled":  # the same rows as a warehouse may return them: in another order
    candidates = candidates.sample(fraction=1.0, shuffle=True, seed=1)
slices = compare_models(assemble(rows, candidates, "outcome"), "assistant", *target_and_logger_favourite()).slices
print(json.dumps({s.name: {m: [c.candidate_ci, c.difference_ci] for m, c in s.metrics.items()} for s in slices}))
"""


@pytest.mark.slow
def test_seeded_bootstrap_intervals_are_the_same_in_another_process():
    from tests.conftest import REPO

    processes = [subprocess.Popen([sys.executable, "-c", BOOTSTRAP_SCRIPT, order], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "PYTHONHASHSEED": seed, "POLARS_MAX_THREADS": threads,
                                       "PYTHONPATH": str(REPO)})
                 for order, seed, threads in (("as_read", "1", "1"), ("shuffled", "2", "3"))]
    outputs = [process.communicate()[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert json.loads(outputs[0]) and outputs[0] == outputs[1]
