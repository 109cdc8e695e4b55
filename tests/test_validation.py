"""Validation: estimators against known truth, the gate, and the whole step with MLflow."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date, datetime

import dagster as dg
import duckdb
import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from flywheel_pipeline import registry
from flywheel_pipeline.config import Gate, parse_config
from flywheel_pipeline.defs.assets import build_model_assets
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.scoring import UniformScorer
from flywheel_pipeline.training import train_candidate
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.validation import (
    MetricComparison,
    SliceResult,
    ValidationReport,
    compare_on_holdout,
    gate,
    holdout_rows,
    scored_choices,
    validate_candidate,
    weighted_auc,
)
from tests.test_training import (
    AS_OF,
    DAYS,
    TEST_CONFIG,
    fresh_home,
    recommendation_impressions,
    write_warehouse,
)

WINDOWS = Windows(date(2026, 3, 1), date(2026, 3, 28), date(2026, 3, 29), date(2026, 3, 31))


# --- estimators ------------------------------------------------------------------------------


def test_weighted_auc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 10, 500).astype(float)  # many ties
    good = rng.random(500) < 1 / (1 + np.exp(-(scores - 5) / 3))
    weights = rng.uniform(0, 2, (3, 500))
    expected = [roc_auc_score(good, scores, sample_weight=w) for w in weights]
    assert np.allclose(weighted_auc(scores, good, weights), expected)


class TableScorer:
    """A fixed score per (query, response)."""

    def __init__(self, scores: dict[tuple[str, str], float]):
        self.scores = scores

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        pairs = zip(candidates["input_text"], candidates["item_id"])
        return np.array([self.scores[pair] for pair in pairs])


def logged_bandit(n: int, seed: int) -> tuple[pl.DataFrame, float]:
    """Assistant-shaped held-out logs of a known logging policy, and the target's true value.

    Two queries, three responses each. The logger rarely shows the target's choice where it is
    good (query 0) and often shows it where it is poor (query 1), so the plain mean reward of the
    interactions where the logs agree with the target is far from its value."""
    rng = np.random.default_rng(seed)
    queries = ["reset my printer", "install a router"]
    good_rate = np.array([[0.9, 0.2, 0.1], [0.1, 0.3, 0.8]])
    logging = np.array([[0.1, 0.6, 0.3], [0.1, 0.8, 0.1]])
    target = [0, 1]
    rows = []
    for i in range(n):
        q = int(rng.integers(2))
        a = int(rng.choice(3, p=logging[q]))
        good = rng.random() < good_rate[q, a]
        rows.append(
            {
                "domain": "assistant",
                "event_date": date(2026, 3, 30),
                "interaction_id": f"i{i}",
                "item_id": f"r{a}",
                "position": 0,
                "propensity": logging[q, a],
                "policy": "champion",
                "model_version": "1",
                "served_at": datetime(2026, 3, 30),
                "user_id": f"u{i % 50}",
                "session_id": f"s{i}",
                "is_new_user": i % 4 == 0,
                "segment": None,
                "input_text": queries[q],
                "item_content": f"response {a}",
                "slate_size": 1,
                "p_good": 0.95 if good else 0.05,
                "label": bool(good),
            }
        )
    true_value = float(np.mean([0.05 + 0.9 * good_rate[q, target[q]] for q in range(2)]))
    return pl.DataFrame(rows), true_value


def test_ips_and_snips_recover_the_target_policys_true_value_where_a_naive_mean_does_not():
    rows, true_value = logged_bandit(20_000, seed=3)
    queries = rows["input_text"].unique().sort().to_list()  # "install ...", "reset ..."
    target = TableScorer(
        {
            (q, f"r{a}"): float(a == (0 if q.startswith("reset") else 1))
            for q in queries
            for a in range(3)
        }
    )
    logger_favourite = TableScorer({(q, f"r{a}"): float(a == 1) for q in queries for a in range(3)})
    overall = compare_on_holdout(rows, "assistant", target, logger_favourite, n_resamples=50)[0]

    ips, snips = overall.metrics["ips"].candidate, overall.metrics["snips"].candidate
    assert ips == pytest.approx(true_value, abs=0.03)
    assert snips == pytest.approx(true_value, abs=0.03)
    low, high = overall.metrics["snips"].candidate_ci
    assert low < true_value < high

    agrees = rows.filter(
        (pl.col("input_text").str.starts_with("reset") & (pl.col("item_id") == "r0"))
        | (pl.col("input_text").str.starts_with("install") & (pl.col("item_id") == "r1"))
    )
    assert abs(agrees["p_good"].mean() - true_value) > 0.15
    assert overall.metrics["ess"].candidate < overall.n_interactions


def test_tied_scores_split_the_target_policy_evenly():
    slates = recommendation_impressions(days=1, per_day=20)
    scored = scored_choices(
        pl.from_pandas(slates), "recommendation", UniformScorer(), UniformScorer()
    )
    assert np.allclose(scored["pi_candidate"].to_numpy(), 1 / 5)


# --- the gate ---------------------------------------------------------------------------------


def report_with(slices: dict[str, tuple[int, float, float]]) -> ValidationReport:
    """A hand-built report: slice name -> (samples, candidate auc, champion auc)."""

    def comparison(candidate: float, champion: float) -> MetricComparison:
        d = candidate - champion
        return MetricComparison(
            candidate, champion, d, (candidate, candidate), (champion, champion), (d, d)
        )

    return ValidationReport(
        domain="assistant",
        primary_metric="auc",
        windows=WINDOWS,
        candidate_model_uri="models:/m-candidate",
        champion_model_uri=None,
        slices=[
            SliceResult(name, n, n, {"auc": comparison(c, h)}) for name, (n, c, h) in slices.items()
        ],
    )


GATE = Gate(min_improvement=0.0, max_slice_regression=0.05, min_samples=200)


def test_gate_passes_a_better_candidate():
    report = report_with(
        {
            "all": (1000, 0.80, 0.75),
            "new_users": (300, 0.78, 0.76),
            "returning_users": (700, 0.81, 0.75),
        }
    )
    assert gate(report, GATE).passed


def test_gate_fails_a_candidate_that_regresses_on_one_slice_and_names_it():
    report = report_with(
        {
            "all": (1000, 0.80, 0.75),
            "new_users": (300, 0.60, 0.76),
            "returning_users": (700, 0.85, 0.75),
        }
    )
    decision = gate(report, GATE)
    assert not decision.passed
    (reason,) = decision.reasons
    assert reason.startswith("slice_regression") and "new_users" in reason


def test_gate_fails_on_too_few_samples_and_on_too_little_improvement():
    decision = gate(report_with({"all": (150, 0.70, 0.75)}), GATE)
    assert not decision.passed
    assert [r.split(":")[0] for r in decision.reasons] == [
        "too_few_samples",
        "improvement_below_minimum",
    ]


def test_gate_reports_but_does_not_gate_a_slice_with_too_few_rows():
    report = report_with({"all": (1000, 0.80, 0.75), "segment_rare": (12, 0.20, 0.90)})
    decision = gate(report, GATE)
    assert decision.passed
    assert decision.ungated_slices == ["segment_rare (12 samples)"]


# --- the whole step -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A warehouse with recommendation logs, a home, and a candidate trained on them."""
    root = tmp_path_factory.mktemp("validation")
    con = duckdb.connect(str(root / "warehouse.duckdb"))
    write_warehouse(con, recommendation_impressions(DAYS, 90))
    home, config = fresh_home(root / "home"), parse_config(TEST_CONFIG)
    candidate = train_candidate(con, home, config, "recommendation", AS_OF)
    yield con, home, config, candidate
    con.close()


def test_held_out_rows_are_the_held_out_days_only(world):
    con, _, _, candidate = world
    rows = holdout_rows(con, "recommendation", candidate.windows)
    assert rows["event_date"].min() == candidate.windows.holdout_start > candidate.windows.train_end
    assert rows["event_date"].max() == AS_OF


def test_validation_against_the_baseline_logs_a_gated_report(world):
    con, home, config, candidate = world
    report = validate_candidate(
        con, home, config, "recommendation", candidate.model_uri, None, candidate.windows
    )
    assert report.primary_metric == "snips"
    assert [s.name for s in report.slices] == [
        "all",
        "new_users",
        "returning_users",
        "segment_s0",
        "segment_s1",
        "segment_s2",
    ]
    snips = report.overall.metrics["snips"]
    assert snips.candidate > snips.champion  # the uniform baseline
    assert report.decision == gate(report, config.domain("recommendation").gate)

    metadata = report.metadata()
    assert all(isinstance(v, (str, int, float, bool)) for v in metadata.values())
    assert metadata["gate"] == ("passed" if report.decision.passed else "failed")
    assert metadata["champion_model"] == "baseline"
    assert metadata["difference"] == round(snips.difference, 4) and len(metadata) < 15

    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    run = client.get_run(report.run_id)
    assert run.info.experiment_id == client.get_run(candidate.run_id).info.experiment_id
    assert run.data.tags["flywheel.candidate_run_id"] == candidate.run_id
    assert run.data.tags["flywheel.gate.passed"] == str(report.decision.passed).lower()
    assert run.data.metrics["segment_s1/snips/difference"] == pytest.approx(
        report.slices[4].metrics["snips"].difference
    )
    artifacts = {a.path for a in client.list_artifacts(report.run_id, "validation")}
    assert artifacts == {"validation/report.json", "validation/report.md"}
    logged = json.loads(mlflow.artifacts.load_text(f"runs:/{report.run_id}/validation/report.json"))
    assert logged["decision"]["passed"] == report.decision.passed


def test_a_candidate_compared_with_itself_shows_no_difference(world):
    con, home, config, candidate = world
    report = validate_candidate(
        con,
        home,
        config,
        "recommendation",
        candidate.model_uri,
        candidate.model_uri,
        candidate.windows,
    )
    assert all(m.difference == 0 for s in report.slices for m in s.metrics.values())
    assert report.decision.passed  # min_improvement 0: no worse is good enough


def test_a_candidate_regressing_on_a_slice_is_not_registered_so_never_promoted(world):
    """The registered_candidate asset itself, given a real candidate and a failed gate."""
    _, home, config, candidate = world
    report = report_with({"all": (1000, 0.80, 0.75), "new_users": (300, 0.60, 0.76)})
    report = replace(report, domain="recommendation", decision=gate(report, GATE))
    *_, registered_candidate = build_model_assets(config, "recommendation")

    results = list(registered_candidate(
        dg.build_asset_context(), candidate=candidate, report=report,
        warehouse=WarehouseResource(home_path=str(home.root)), mlflow=MlflowResource(home_path=str(home.root)),
    ))

    assert results == []  # not materialized: the run shows registered_candidate as skipped
    assert any("slice_regression" in reason for reason in report.decision.reasons)
    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    assert client.search_model_versions(f"name = '{registry.model_name('recommendation')}'") == []
    assert registry.alias_version(client, "recommendation", registry.CHAMPION) is None
