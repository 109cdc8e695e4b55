"""The flywheel_health measures, each on both sides of its threshold; the audit on a warehouse."""

from __future__ import annotations

import json
import math
from datetime import date, datetime, timedelta

import duckdb
import numpy as np
import polars as pl
import pytest

from flywheel_pipeline.config import HealthSettings, parse_config
from flywheel_pipeline.health import TRAPS, measures
from flywheel_pipeline.health.audit import audit, measure_history, save_measures
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.warehouse import ensure_raw_tables

SETTINGS = HealthSettings()
WINDOWS = Windows(date(2026, 3, 1), date(2026, 3, 20), date(2026, 3, 21), date(2026, 3, 27))
CONFIG = parse_config({
    "partitions_start": "2026-01-01",
    "domains": {
        "recommendation": {
            "shape": "recommendation", "cadence": "weekly", "lookback_days": 20, "holdout_days": 7,
            "label_maturity": {"outcome": "purchase"}, "approvers": ["recsys-lead"],
        },
    },
})


def impressions(n: int, seed: int = 0, *, explore: float = 0.1, audit: float = 0.03,
                days: tuple[date, date] = (WINDOWS.train_start, WINDOWS.train_end),
                items: int = 50, slate: int = 1, **columns) -> pl.DataFrame:
    """``n`` interactions of ``slate`` impressions: random users, items, labels and policies."""
    rng = np.random.default_rng(seed)
    span = (days[1] - days[0]).days + 1
    interaction = np.repeat(np.arange(n), slate)
    day = pl.Series([days[0] + timedelta(days=int(d)) for d in rng.integers(span, size=n)],
                    dtype=pl.Date).gather(interaction)
    explored = (rng.random(n) < explore)[interaction]
    user = rng.integers(max(n // 10, 1), size=n)[interaction]
    good = rng.random(n * slate) < 0.4
    frame = pl.DataFrame({
        "domain": "recommendation",
        "event_date": day,
        "interaction_id": [f"x{days[0]:%m%d}_{i}" for i in interaction],
        "item_id": [f"i{item}" for item in rng.integers(items, size=n * slate)],
        "position": np.tile(np.arange(slate), n),
        "propensity": np.where(explored, 0.2, 0.6),
        "policy": np.where(explored, "explore", "champion"),
        "model_version": "baseline",
        "served_at": day.cast(pl.Datetime("us")) + timedelta(hours=12),
        "user_id": [f"u{u}" for u in user],
        "session_id": "s",
        "is_new_user": user % 4 == 0,
        "segment": np.where(user % 2 == 0, "a", "b"),
        "context_features": [json.dumps({"hour": float(hour)})
                             for hour in rng.integers(24, size=n * slate)],
        "slate_size": slate,
        "candidates": items,
        "p_good": np.where(good, 0.9, 0.1),
        "audit_review_value": np.where(rng.random(n * slate) < audit, good.astype(float), np.nan),
        "interaction_delivered": day,
        "evidence_delivered": day + timedelta(days=1),
    }).with_columns(pl.col("audit_review_value").fill_nan(None))
    clicked = good & (rng.random(n * slate) < 0.7)
    frame = frame.with_columns(clicked=clicked, outcome_value=pl.Series(
        np.where(clicked & (rng.random(n * slate) < 0.3), 1.0, np.nan)).fill_nan(None))
    return frame.with_columns(**{name: pl.lit(value) for name, value in columns.items()})


def activity(frame: pl.DataFrame) -> pl.DataFrame:
    """Every user back the next day."""
    seen = frame.select("user_id", "event_date").unique()
    return pl.concat([seen, seen.with_columns(pl.col("event_date") + timedelta(days=1))]).unique()


# --- exposure bias ---------------------------------------------------------------------------


def test_exposure_bias_flags_a_logger_without_exploration():
    healthy = measures.exposure_bias(impressions(2000), SETTINGS, "assistant")
    assert not healthy.flagged and 0.08 < healthy.measures["exploration_share"] < 0.12
    assert 0 < healthy.measures["ips_ess_share"] <= 1
    on_policy = measures.exposure_bias(impressions(2000, explore=0.0), SETTINGS, "assistant")
    assert on_policy.flagged and "exploration share 0.0%" in on_policy.summary


def test_exposure_bias_flags_explored_impressions_logged_as_rarer_than_exploration_made_them():
    """Exploring 10% over 50 candidates shows each at least 0.002 of the time; a logger that believes it
    explores 0.5% logs 0.0001 for the explored ones the champion would not have shown."""
    rows = impressions(3000)
    stale = rows.with_columns(propensity=pl.when(pl.col("policy") == "explore").then(0.0001).otherwise("propensity"))
    finding = measures.exposure_bias(stale, SETTINGS, "assistant")
    assert finding.flagged and "not the serving policy's" in finding.summary
    assert finding.measures["explored_below_floor_share"] == 1.0
    assert measures.exposure_bias(rows, SETTINGS, "assistant").measures["explored_below_floor_share"] == 0.0


def test_exposure_bias_measures_the_examination_curve_and_its_correction():
    rows = impressions(3000, explore=0.3, slate=3)
    seen = np.array([1.0, 0.5, 0.25])[rows["position"].to_numpy()]  # lower slots examined less
    rows = rows.with_columns(p_good=pl.Series(np.where(np.random.default_rng(1).random(rows.height)
                                                       < 0.6 * seen, 1.0, 0.0)))
    finding = measures.exposure_bias(rows, SETTINGS, "recommendation")
    table = finding.tables["by_position"]
    assert not finding.flagged and table["position"].to_list() == [0, 1, 2]
    assert finding.measures["theta@2"] == pytest.approx(0.25, abs=0.08)
    assert table["explore_rate"][2] / table["explore_rate"][0] == pytest.approx(0.25, abs=0.08)
    # the trainer's weights close most of the position gap
    assert finding.measures["position_gap_raw"] == pytest.approx(0.75, abs=0.08)
    assert finding.measures["position_gap_weighted"] < finding.measures["position_gap_raw"] / 2
    assert "lower raw" in finding.summary and "as the trainer weighs" in finding.summary
    few_explored = rows.filter(pl.col("policy") == "champion").with_columns(
        policy=pl.when(pl.int_range(pl.len()) < 60).then(pl.lit("explore")).otherwise("policy"))
    thin = measures.exposure_bias(few_explored, SETTINGS.model_copy(
        update={"min_exploration_share": 0.0}), "recommendation")
    assert thin.flagged and "examination curve cannot be estimated" in thin.summary


# --- survivorship ----------------------------------------------------------------------------


def test_survivorship_flags_churned_users_without_labels():
    rows = impressions(3000)
    leavers = pl.col("user_id").is_in([f"u{u}" for u in range(0, 300, 3)])
    returning = activity(rows.filter(~leavers))
    assert not measures.survivorship(rows, activity(rows), SETTINGS).flagged
    same_labels = measures.survivorship(rows, returning, SETTINGS)
    assert not same_labels.flagged and same_labels.measures["coverage@churned"] == pytest.approx(1)
    silenced = rows.with_columns(p_good=pl.when(leavers).then(None).otherwise(pl.col("p_good")))
    finding = measures.survivorship(silenced, returning, SETTINGS)
    assert finding.flagged and finding.summary.startswith("churned")
    assert finding.measures["coverage@churned"] == 0.0


def test_survivorship_flags_churned_users_whose_reactions_never_came_though_they_are_labelled():
    """A slate nobody clicked is labelled bad: a cohort whose clicks never arrive stays labelled."""
    rows = impressions(3000)
    leavers = pl.col("user_id").is_in([f"u{u}" for u in range(0, 300, 3)])
    unheard = rows.with_columns(evidence_delivered=pl.when(leavers).then(None).otherwise("evidence_delivered"))
    finding = measures.survivorship(unheard, activity(rows.filter(~leavers)), SETTINGS)
    assert finding.flagged and "churned" in finding.summary and "reactions" in finding.summary
    assert finding.measures["coverage@churned"] == 1.0 and finding.measures["reaction_coverage@churned"] == 0.0
    assert not measures.survivorship(rows, activity(rows.filter(~leavers)), SETTINGS).flagged


def test_survivorship_flags_a_segment_left_unlabelled():
    rows = impressions(3000)

    def unlabelled(tenths: int) -> pl.DataFrame:
        """``tenths`` of segment a's impressions without a label."""
        dropped = (pl.col("segment") == "a") & (pl.int_range(pl.len()) % 10 < tenths)
        return rows.with_columns(p_good=pl.when(dropped).then(None).otherwise("p_good"))

    finding = measures.survivorship(unlabelled(7), activity(rows), SETTINGS)
    assert finding.flagged and "segment=a" in finding.summary
    assert not measures.survivorship(unlabelled(1), activity(rows), SETTINGS).flagged


# --- label delay -----------------------------------------------------------------------------


def outcomes(delivered_after_days: int, claimed_h: float = 30.0, n: int = 500) -> pl.DataFrame:
    days = [WINDOWS.train_start + timedelta(days=i % 27) for i in range(n)]
    return pl.DataFrame({
        "name": "purchase",
        "event_date": days,
        "served_at": [datetime.combine(d, datetime.min.time()) + timedelta(hours=12) for d in days],
        "delay_s": claimed_h * 3600,
        "delivered": [d + timedelta(days=delivered_after_days) for d in days],
    })


def test_label_delay_flags_outcomes_arriving_much_later_than_their_timestamps_say():
    backdated = measures.label_delay(outcomes(6, claimed_h=0.0), WINDOWS, CONFIG.domain("recommendation"))
    assert backdated.flagged and "later than their timestamps say" in backdated.summary
    assert backdated.measures["understated_delay_days"] == pytest.approx(5.5)
    honest = measures.label_delay(outcomes(2, claimed_h=30.0), WINDOWS, CONFIG.domain("recommendation"))
    assert honest.measures["understated_delay_days"] < 2 and "timestamps" not in honest.summary


def test_label_delay_sees_backdated_outcomes_by_their_delivery():
    settings = CONFIG.domain("recommendation")
    healthy = measures.label_delay(outcomes(2), WINDOWS, settings)
    assert not healthy.flagged and healthy.measures["immature_share"] == 0
    assert healthy.measures["delivery_p50_h@purchase"] == pytest.approx(60)
    assert healthy.measures["claimed_p90_h@purchase"] == pytest.approx(30)
    backdated = measures.label_delay(outcomes(10), WINDOWS, settings)
    assert backdated.flagged and backdated.measures["immature_days"] == 3  # Mar 18-20 + 10 > Mar 27
    assert "younger than the 90% delivery delay of purchase (10 d" in backdated.summary


def test_cadence_days_of_named_cadences_and_crons():
    assert measures.cadence_days("quarterly") == 91
    assert measures.cadence_days("0 3 * * 1,4") == pytest.approx(3.5, abs=0.5)


# --- leakage ---------------------------------------------------------------------------------


def test_leakage_names_a_feature_made_from_the_label():
    rows = impressions(2000)
    holdout = impressions(300, seed=1, days=(WINDOWS.holdout_start, WINDOWS.holdout_end))
    healthy = measures.leakage(rows, holdout, SETTINGS)
    assert not healthy.flagged and healthy.measures["max_feature_auc"] < 0.6
    purchased = (pl.col("p_good") > 0.5).cast(pl.Int8).cast(pl.String)
    leaky = rows.with_columns(
        context_features=pl.lit('{"hour": 3, "purchased": ') + purchased + pl.lit("}"))
    finding = measures.leakage(leaky, holdout, SETTINGS)
    assert finding.flagged and "context.purchased" in finding.summary
    assert finding.measures["auc@context.purchased"] == 1.0
    assert "auc@context.hour" not in finding.measures  # constant: nothing to judge


def test_leakage_flags_interactions_delivered_after_their_evidence():
    rows = impressions(2000)
    holdout = impressions(300, seed=1, days=(WINDOWS.holdout_start, WINDOWS.holdout_end))
    late = pl.when(pl.int_range(pl.len()) % 10 == 0)
    few = rows.with_columns(interaction_delivered=late.then(
        pl.col("event_date") + timedelta(days=3)).otherwise("interaction_delivered"))
    finding = measures.leakage(few, holdout, SETTINGS)
    assert finding.flagged and finding.measures["late_interaction_share"] == pytest.approx(0.1)
    lenient = SETTINGS.model_copy(update={"max_late_feature_share": 0.2})
    assert not measures.leakage(few, holdout, lenient).flagged


def test_leakage_flags_held_out_rows_in_training():
    rows = impressions(2000)
    holdout = impressions(300, seed=1, days=(WINDOWS.holdout_start, WINDOWS.holdout_end))
    finding = measures.leakage(pl.concat([rows, holdout.head(5)]), holdout, SETTINGS)
    assert finding.flagged and finding.measures["overlap_interactions"] >= 1
    assert finding.measures["overlap_user_days"] >= 1


# --- self-consumption ------------------------------------------------------------------------


def test_self_consumption_flags_a_loop_with_no_independent_labels():
    for explore, audit_share in ((0.1, 0.03), (0.0, 0.03), (0.1, 0.0)):
        rows = impressions(3000, explore=explore, audit=audit_share)
        finding = measures.self_consumption(rows, SETTINGS)
        assert not finding.flagged, (explore, audit_share, finding.summary)
    closed = measures.self_consumption(
        impressions(3000, explore=0.0, audit=0.0, model_version="3"), SETTINGS)
    assert closed.flagged and closed.measures["self_consumption_share"] == 1.0
    assert closed.measures["flywheel_share"] == 1.0 and closed.measures["share@3"] == 1.0
    assert closed.measures["independent_share"] == 0.0
    # exploration still served, but nothing came back from it (labelled bad from silence): no evidence
    rows = impressions(3000, explore=0.1, audit=0.0)
    unheard = rows.with_columns(evidence_delivered=pl.when(pl.col("policy") == "explore").then(None)
                                .otherwise("evidence_delivered"))
    silent = measures.self_consumption(unheard, SETTINGS)
    assert silent.flagged and silent.measures["independent_share"] == 0.0


# --- diversity -------------------------------------------------------------------------------


def test_diversity_flags_a_champion_that_shows_a_few_items():
    baseline = impressions(3000, items=100, days=(date(2026, 3, 1), date(2026, 3, 10)))
    healthy = measures.diversity(baseline, SETTINGS)
    assert not healthy.flagged and healthy.measures["coverage@baseline"] > 0.9
    narrow = impressions(3000, seed=2, items=8, days=(date(2026, 3, 11), date(2026, 3, 20)),
                         model_version="2")
    finding = measures.diversity(pl.concat([baseline, narrow]), SETTINGS)
    assert finding.flagged and finding.summary.startswith("version 2 shows 8.0%")
    assert finding.measures["top_share@2"] == 1.0 and finding.measures["gini@2"] > 0.9
    assert finding.measures["top_share@baseline"] < 0.3
    assert finding.tables["by_version"]["model_version"].to_list() == ["baseline", "2"]


# --- vocal minority, popularity, engagement ---------------------------------------------------


def test_vocal_minority_flags_a_segment_whose_reactions_make_most_of_the_labels():
    rows = impressions(3000)

    def quiet(tenths: int) -> pl.DataFrame:
        """``tenths`` of segment b's impressions with nothing coming back."""
        lost = (pl.col("segment") == "b") & (pl.int_range(pl.len()) % 10 < tenths)
        return rows.with_columns(evidence_delivered=pl.when(lost).then(None).otherwise("evidence_delivered"))

    finding = measures.vocal_minority(quiet(8), SETTINGS)
    assert finding.flagged and "segment a" in finding.summary
    assert finding.measures["representation@a"] == pytest.approx(1 / (0.5 + 0.5 * 0.2) * 0.5 / 0.5, rel=0.05)
    assert not measures.vocal_minority(quiet(0), SETTINGS).flagged
    assert measures.vocal_minority(quiet(0), SETTINGS).measures["max_representation"] == pytest.approx(1.0)


def explored_days(head_lift: float, seed: int = 0) -> pl.DataFrame:
    """20 days of 40 items, 4 a day in the head (shown 50 times, the others 5), at random; explored
    impressions clicked at the item's own rate, plus ``head_lift`` on its head days."""
    rng = np.random.default_rng(seed)
    rows = []
    for day in range(20):
        head = set(rng.choice(40, 4, replace=False).tolist())
        for item in range(40):
            in_head = item in head
            merit = 0.1 + 0.4 * item / 40
            for n in range(50 if in_head else 5):
                explore = n < 5
                rows.append({"event_date": WINDOWS.train_start + timedelta(days=day), "item_id": f"i{item}",
                             "policy": "explore" if explore else "champion",
                             "clicked": bool(rng.random() < merit + head_lift * in_head)})
    return pl.DataFrame(rows)


def test_popularity_flags_items_clicked_more_on_the_days_they_are_most_shown():
    finding = measures.popularity(explored_days(0.3), SETTINGS)
    assert finding.flagged and finding.measures["head_click_lift"] == pytest.approx(0.3, abs=0.1)
    honest = measures.popularity(explored_days(0.0), SETTINGS)
    assert not honest.flagged and abs(honest.measures["head_click_z"]) < 3


def items_clicked(clickbait_outcomes: float, seed: int = 0) -> pl.DataFrame:
    """100 items shown 100 times each, clicked more the better they are (and the outcome with it);
    the 10 clickiest are clickbait: clicked 60% of the time, an outcome on ``clickbait_outcomes`` of clicks."""
    rng = np.random.default_rng(seed)
    merit = np.repeat(np.linspace(0.05, 0.4, 100), 100)
    bait = merit >= np.linspace(0.05, 0.4, 100)[90]
    clicked = rng.random(merit.size) < np.where(bait, 0.6, merit)
    outcome = clicked & (rng.random(merit.size) < np.where(bait, clickbait_outcomes, merit))
    return pl.DataFrame({"item_id": np.repeat([f"i{i}" for i in range(100)], 100), "clicked": clicked,
                         "outcome_value": np.where(outcome, 1.0, np.nan)}).with_columns(pl.col("outcome_value").fill_nan(None))


def test_engagement_flags_the_clickiest_items_leading_to_fewer_outcomes_per_click():
    finding = measures.engagement(items_clicked(0.05), SETTINGS)
    assert finding.flagged and finding.measures["outcome_per_click_ratio_upper"] < 0.8
    honest = measures.engagement(items_clicked(0.4), SETTINGS)
    assert not honest.flagged and honest.measures["outcome_per_click_ratio"] > 1


# --- the audit on a warehouse ----------------------------------------------------------------


def warehouse(con: duckdb.DuckDBPyConnection, rows: pl.DataFrame) -> None:
    """raw interactions and outcomes with their batch files, the marts and the labels."""
    ensure_raw_tables(con)
    con.register("rows", rows.with_columns(
        interaction_file=pl.format("recommendation/{}.jsonl", pl.col("interaction_delivered")),
        outcome_file=pl.format("recommendation/{}.shop.jsonl", pl.col("evidence_delivered"))))
    con.execute("""
        CREATE SCHEMA marts; CREATE SCHEMA labels;
        CREATE TABLE marts.fct_impressions AS SELECT * EXCLUDE (p_good, interaction_delivered,
            evidence_delivered, interaction_file, outcome_file), 'home' AS input_text,
            item_id AS item_content FROM rows;
        CREATE TABLE marts.fct_interactions AS SELECT DISTINCT domain, event_date, interaction_id,
            user_id, served_at FROM rows;
        CREATE TABLE labels.impression_labels AS SELECT domain, event_date, interaction_id,
            item_id, p_good FROM rows;
        INSERT INTO raw.interactions SELECT DISTINCT 'e' || interaction_id, domain, event_date,
            served_at, user_id, 's', interaction_id, model_version, policy, 'granted', '', NULL,
            interaction_file, 1, now() FROM rows;
        INSERT INTO raw.outcomes SELECT DISTINCT 'o' || interaction_id, domain, event_date,
            served_at + INTERVAL 30 HOUR, user_id, 's', interaction_id, 'purchase', 1, NULL,
            outcome_file, 1, now() FROM rows;
    """)
    con.unregister("rows")


def test_audit_reads_the_warehouse_and_keeps_each_cycles_measures(tmp_path):
    held_out = (WINDOWS.holdout_start, WINDOWS.holdout_end)
    rows = pl.concat([impressions(1500, slate=3, explore=0.2),
                      impressions(400, seed=1, slate=3, days=held_out)])
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    warehouse(con, rows)
    assert measure_history(con, "recommendation").is_empty()
    report = audit(con, CONFIG, "recommendation", WINDOWS, date(2026, 3, 25), "baseline",
                   "models:/m/1")
    assert [finding.trap for finding in report.findings] == list(TRAPS)
    assert report.flagged == [], [f.summary for f in report.findings if f.flagged]
    assert report.finding("label_delay").measures["delivery_wait_days"] == 1
    assert report.finding("leakage").measures["late_interaction_share"] == 0
    written = save_measures(con, report, {"improvement": 0.01})
    save_measures(con, report, {"improvement": 0.02})  # the same candidate again: replaced
    later = audit(con, CONFIG, "recommendation", Windows(WINDOWS.train_start, date(2026, 3, 19),
                                                         date(2026, 3, 20), date(2026, 3, 26)),
                  None, "baseline", "models:/m/2")
    save_measures(con, later)
    history = measure_history(con, "recommendation")
    assert history["as_of"].unique().to_list() == [date(2026, 3, 26), date(2026, 3, 27)]
    first = history.filter(pl.col("candidate_model_uri") == "models:/m/1")
    assert first.height == written
    assert first.filter(pl.col("trap") == "validation")["value"].to_list() == [0.02]
    assert set(history["trap"]) == {*TRAPS, "validation"}
    assert not any(math.isnan(value) for value in history["value"].drop_nulls())
