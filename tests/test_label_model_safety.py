"""Label-model safety: the dependent-source warning, the majority-vote fallback, calibration on
reviews, and what a labeling run reports of them."""

from __future__ import annotations

import json
import logging
from datetime import date, datetime, timedelta

import duckdb
import numpy as np
import polars as pl
import pytest

from flywheel_pipeline.config import ConfigError, parse_config
from flywheel_pipeline.labeling.functions import (
    ABSTAIN,
    BAD,
    GOOD,
    LABELING_FUNCTIONS,
    LabelingFunction,
)
from flywheel_pipeline.labeling.model import DawidSkene, MajorityVote
from flywheel_pipeline.labeling.safety import calibrate, choose_label_model, dependent_sources
from flywheel_pipeline.labeling.stage import (
    audit_gold,
    label_partitions,
    review_gold,
)
from tests.test_config import broken
from tests.test_labeling import FCT_IMPRESSIONS, impression, independent_votes

# --- the dependent-source warning ----------------------------------------------------------------


def reaction_and_independent_votes(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three LFs reading one reaction (one source, columns 0-2), then an outcome, a rating and a
    noisy heuristic, each independent given the truth."""
    rng = np.random.default_rng(seed)
    truth = (rng.random(rows) < 0.45).astype(np.int8)
    reaction = np.where(  # 0 accept, 1 reject, 2 reformulate, 3 nothing
        truth == 1,
        rng.choice(4, rows, p=[0.7, 0.05, 0.05, 0.2]),
        rng.choice(4, rows, p=[0.1, 0.35, 0.35, 0.2]),
    )
    reactions = np.column_stack(
        [np.where(reaction == r, vote, ABSTAIN) for r, vote in enumerate((GOOD, BAD, BAD))]
    )
    others = independent_votes(rng, truth, [0.9, 0.93, 0.6], [0.4, 0.1, 0.9])
    return np.hstack([reactions, others]).astype(np.int8), truth


NAMES = ["accepted", "rejected", "reformulated", "resolved", "rating", "heuristic"]
SOURCES = ["reaction"] * 3 + ["outcome", "explicit", "heuristic"]
VOTERS = [[0, 1, 2], [3], [4], [5]]


def test_the_warning_names_an_undeclared_copy_and_stays_quiet_on_independent_sources():
    votes, _ = reaction_and_independent_votes(5_000, seed=3)
    assert dependent_sources(votes, NAMES, SOURCES, DawidSkene(VOTERS).fit(votes)) == []

    copied = np.hstack([votes, votes[:, [3]]])  # the outcome again, under a source of its own
    model = DawidSkene([*VOTERS, [6]]).fit(copied)
    [dependency] = dependent_sources(copied, [*NAMES, "resolved_copy"], [*SOURCES, "copy"], model)
    assert dependency.lfs == ("resolved", "resolved_copy")
    assert dependency.sources == ("outcome", "copy")
    assert dependency.declare == ("resolved_copy", "outcome")
    assert dependency.shared_information == pytest.approx(1.0) and dependency.p_value < 1e-6
    assert "declare 'resolved_copy' with source='outcome'" in dependency.message()

    not_accepted = np.where(votes[:, [0]] == ABSTAIN, BAD, ABSTAIN)  # votes where 'accepted' abstains
    complement = np.hstack([votes, not_accepted]).astype(np.int8)
    model = DawidSkene([*VOTERS, [6]]).fit(complement)
    [dependency] = dependent_sources(complement, [*NAMES, "not_accepted"], [*SOURCES, "negative"], model)
    assert dependency.lfs == ("accepted", "not_accepted") and dependency.shared_information > 0.9


# --- the majority-vote fallback ------------------------------------------------------------------


def predictions(truth: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """p_good right (0.9 on the true side) on about ``accuracy`` of the rows."""
    right = rng.random(len(truth)) < accuracy
    return np.where(right == (truth == 1), 0.9, 0.1)


@pytest.mark.parametrize(
    ("reviews", "model_accuracy", "fell_back", "reason"),
    [
        (400, 0.65, True, "fell back to majority vote"),
        (400, 0.95, False, "kept dawid-skene-v1"),
        (30, 0.5, False, "fewer than the 50 needed"),
    ],
    ids=["label-model-worse", "label-model-better", "too-few-reviews"],
)
def test_majority_vote_replaces_the_label_model_only_when_significantly_better_on_gold(
    reviews, model_accuracy, fell_back, reason
):
    rng = np.random.default_rng(0)
    truth = (rng.random(reviews) < 0.5).astype(float)
    p_model, p_majority = predictions(truth, model_accuracy, rng), predictions(truth, 0.8, rng)
    choice = choose_label_model(p_model, p_majority, truth, DawidSkene.version, min_gold_rows=50)
    assert choice.fell_back is fell_back and reason in choice.reason
    assert choice.version == (MajorityVote.version if fell_back else DawidSkene.version)
    assert choice.gold_rows == reviews
    assert choice.model_accuracy == pytest.approx(((p_model >= 0.5) == truth).mean())
    assert choice.majority_vote_accuracy == pytest.approx(((p_majority >= 0.5) == truth).mean())


def test_only_audit_reviews_measure_accuracy():
    reviews = pl.DataFrame({"review_value": [1.0, 0.0, None, 1.0], "audit_review_value": [1.0, None, None, 1.0]})
    np.testing.assert_array_equal(audit_gold(reviews), [1.0, np.nan, np.nan, 1.0])
    np.testing.assert_array_equal(review_gold(reviews), [1.0, 0.0, np.nan, 1.0])


# --- calibration on reviews ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_calibration_is_applied_only_where_it_lowers_the_held_out_error(method):
    rng = np.random.default_rng(1)
    p_good = rng.random(600)
    calibrated_truth = (rng.random(600) < p_good).astype(float)
    kept = calibrate(p_good, calibrated_truth, method)
    assert not kept.applied and "does not significantly lower" in kept.reason
    np.testing.assert_array_equal(kept(p_good), p_good)

    overconfident = np.where(p_good >= 0.5, 0.99, 0.01)  # right on ~75% of rows, claims 99%
    p_good[:5] = np.nan  # unlabelled rows stay unlabelled
    overconfident[:5] = np.nan
    fixed = calibrate(overconfident, calibrated_truth, method)
    assert fixed.applied and fixed.gold_rows == 595
    assert fixed.brier_calibrated < fixed.brier_raw - 0.05
    calibrated = fixed(overconfident)
    assert np.isnan(calibrated[:5]).all()
    assert calibrated[overconfident == 0.99] == pytest.approx(0.75, abs=0.05)


def test_calibration_needs_enough_reviews_of_both_classes():
    p_good = np.linspace(0.01, 0.99, 40)
    assert "fewer than the 50 needed" in calibrate(p_good, (p_good > 0.5) * 1.0).reason
    p_good = np.linspace(0.01, 0.99, 100)
    assert "too few of one class" in calibrate(p_good, np.ones(100)).reason
    assert calibrate(p_good, (p_good > 0.5) * 1.0, "off").reason == "calibration is off"


def test_label_model_settings_name_a_bad_key():
    raw = broken(["domains", "assistant", "label_model"], {"calibration": "sigmoid"})
    with pytest.raises(ConfigError, match=r"domains\.assistant\.label_model\.calibration"):
        parse_config(raw)
    settings = parse_config(broken(["domains", "assistant", "label_model"], {"min_gold_rows": 200}))
    assert settings.domain("assistant").label_model.min_gold_rows == 200


# --- through label_partitions --------------------------------------------------------------------

DAYS = [date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 3)]


def assistant_impressions(per_day: int, seed: int) -> pl.DataFrame:
    """fct_impressions rows drawn from a hidden truth: one reaction, a resolved outcome on 40%,
    a rating on 10%, a review on 15%."""
    rng = np.random.default_rng(seed)
    rows = []
    for day in DAYS:
        for i in range(per_day):
            good = rng.random() < 0.45
            served_at = datetime.combine(day, datetime.min.time()) + timedelta(seconds=30 * i)
            reaction = rng.choice(4, p=[0.7, 0.05, 0.05, 0.2] if good else [0.1, 0.35, 0.35, 0.2])
            values = [{"accepted": True}, {"rejected": True}, {"reformulated_after_s": 20.0}, {}][reaction]
            if rng.random() < 0.4:
                resolved = good if rng.random() < 0.9 else not good
                values |= {"outcome_name": "resolved", "outcome_value": float(resolved),
                           "outcome_delay_s": 3600.0, "outcome_at": served_at + timedelta(hours=1)}
            if rng.random() < 0.1:
                values["rating"] = 5.0 if (good if rng.random() < 0.93 else not good) else 1.0
            if rng.random() < 0.15:
                values["review_value"] = values["audit_review_value"] = float(good)
            rows.append(impression(domain="assistant", event_date=day, interaction_id=f"a-{day:%d}-{i}",
                                   item_id="r0", position=0, served_at=served_at, is_new_user=False,
                                   segment="s0", **values))
    return pl.DataFrame(rows, schema=FCT_IMPRESSIONS)


@pytest.fixture
def warehouse(tmp_path):
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    connection.execute("CREATE SCHEMA marts")
    connection.register("fct_rows", assistant_impressions(per_day=700, seed=5))
    connection.execute("CREATE TABLE marts.fct_impressions AS SELECT * FROM fct_rows")
    connection.unregister("fct_rows")
    yield connection
    connection.close()


def test_a_labeling_run_reports_its_safety_checks(warehouse, config, monkeypatch, caplog):
    report = label_partitions(warehouse, "assistant", DAYS, config)
    assert report.dependencies == [] and report.label_model_version.startswith("dawid-skene-v1")
    assert not report.label_model_choice.fell_back

    copy = LabelingFunction("resolved_copy", "copy", LABELING_FUNCTIONS["delayed_outcome"].expression)
    monkeypatch.setitem(LABELING_FUNCTIONS, copy.name, copy)
    with caplog.at_level(logging.WARNING, logger="flywheel_pipeline.labeling.stage"):
        report = label_partitions(warehouse, "assistant", DAYS, config)
    [dependency] = report.dependencies
    assert dependency.lfs == ("delayed_outcome", "resolved_copy")
    assert "declare 'resolved_copy' with source='delayed_outcome'" in caplog.text
    stats = dict(report.lf_stats.select("lf", "dependent_with").iter_rows())
    assert stats["resolved_copy"] == "delayed_outcome" and stats["rejected"] is None

    choice = report.label_model_choice  # the copy drags Dawid-Skene below majority vote on gold
    assert choice.fell_back and choice.model_accuracy < choice.majority_vote_accuracy
    assert report.label_model_version.startswith(MajorityVote.version)
    written = warehouse.sql("SELECT DISTINCT label_model_version FROM labels.impression_labels").fetchall()
    assert written == [(report.label_model_version,)]

    metadata = report.metadata()
    json.dumps(metadata)
    assert metadata["label_model_choice"].startswith("fell back to majority vote")
    assert metadata["lf_dependencies"] == 1 and "resolved_copy" in metadata["lf_dependency_warnings"]
    assert metadata["calibration_reviews"] == report.calibration.gold_rows > 50
    assert metadata["calibration_applied"] is report.calibration.applied
    assert {"calibration_brier_raw", "calibration_brier_calibrated", "gold_accuracy_label_model"} <= set(metadata)
    day = report.day_metadata(DAYS[0])
    assert day["label_model_choice"] == metadata["label_model_choice"]
    assert day["lf_dependency_warnings"] == metadata["lf_dependency_warnings"]
