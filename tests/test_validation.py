"""Validation: held-out evidence and estimators against known truth, the gate's three outcomes,
and the whole step with MLflow."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date, datetime
from statistics import NormalDist

import dagster as dg
import duckdb
import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from flywheel_pipeline import registry
from flywheel_pipeline.config import Gate, Groups, parse_config
from flywheel_pipeline.defs.assets import build_model_assets
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.groups import anonymous
from flywheel_pipeline.health import HealthReport
from flywheel_pipeline.scoring import UniformScorer
from flywheel_pipeline.training import train_candidate
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.validation import (
    MetricComparison,
    SliceResult,
    ValidationReport,
    compare_models,
    gate,
    holdout_rows,
    latest_inconclusive,
    validate_candidate,
    validate_cycle,
    weighted_auc,
)
from flywheel_pipeline.validation.evidence import assemble
from flywheel_pipeline.validation.intervals import CI_LEVEL, bootstrap_blocks, bootstrap_counts
from tests.test_training import (
    AS_OF,
    DAYS,
    TEST_CONFIG,
    fresh_home,
    recommendation_impressions,
    write_warehouse,
)

WINDOWS = Windows(date(2026, 3, 1), date(2026, 3, 28), date(2026, 3, 29), date(2026, 3, 31))
PER_DAY = 300  # slates a day for the revisit: 3 days fall short of min_samples, 6 decide
Z = 4.0  # standard errors an unbiased estimate may stray (fails by chance ~6e-5 of the time)


# --- estimators on held-out evidence ------------------------------------------------------------


def test_weighted_auc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 10, 500).astype(float)  # many ties
    good = rng.random(500) < 1 / (1 + np.exp(-(scores - 5) / 3))
    weights = rng.uniform(0, 2, (3, 500))
    expected = [roc_auc_score(good, scores, sample_weight=w) for w in weights]
    assert np.allclose(weighted_auc(scores, good, weights), expected)


def test_the_bootstrap_in_blocks_draws_the_same_resamples():
    """Blocks of resamples (what bounds validation's memory) are the rows of the whole matrix."""
    whole = bootstrap_counts(50, 10, np.random.default_rng(3))
    blocks = list(bootstrap_blocks(50, 10, np.random.default_rng(3), rows=4))
    assert [len(block) for block in blocks] == [4, 4, 3]
    assert np.array_equal(np.vstack(blocks), whole) and np.array_equal(whole[0], np.ones(50))
    assert whole.shape == (11, 50) and np.array_equal(whole[1:].sum(axis=1), np.full(10, 50))


class TableScorer:
    """A fixed score per (query, response)."""

    def __init__(self, scores: dict[tuple[str, str], float]):
        self.scores = scores

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        pairs = zip(candidates["input_text"], candidates["item_id"])
        return np.array([self.scores[pair] for pair in pairs])


QUERIES = ["reset my printer", "install a router"]
GOOD_RATE = np.array([[0.9, 0.2, 0.1], [0.1, 0.3, 0.8]])  # P(resolved) per query x response
LOGGING = np.array([[0.1, 0.6, 0.3], [0.1, 0.8, 0.1]])
TARGET = [0, 1]  # the target's response per query


def logged_bandit(n: int, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Assistant-shaped held-out logs of a known logging policy: shown rows with their outcome,
    and every interaction's logged candidates with the logger's propensities. The logger rarely
    shows the target's choice where it is good (query 0) and often where it is poor (query 1)."""
    rng = np.random.default_rng(seed)
    rows, candidates = [], []
    for i in range(n):
        q = int(rng.integers(2))
        a = int(rng.choice(3, p=LOGGING[q]))
        resolved = float(rng.random() < GOOD_RATE[q, a])
        rows.append({
            "domain": "assistant", "event_date": date(2026, 3, 30), "interaction_id": f"i{i}",
            "item_id": f"r{a}", "position": 0, "propensity": LOGGING[q, a], "policy": "champion",
            "model_version": "1", "served_at": datetime(2026, 3, 30), "user_id": f"u{i % 50}",
            "session_id": f"s{i}", "is_new_user": i % 4 == 0, "segment": None, "context_features": "{}",
            "input_text": QUERIES[q], "item_content": f"response {a}", "slate_size": 1,
            "p_good": 0.95 if resolved else 0.05, "label": bool(resolved), "clicked": 0.0,
            "outcome": resolved, "verdict": resolved if i % 10 == 0 else None,
        })
        candidates += [{"interaction_id": f"i{i}", "item_id": f"r{b}", "item_content": f"response {b}",
                        "mu": [LOGGING[q, b]]} for b in range(3)]
    return pl.DataFrame(rows), pl.DataFrame(candidates)


def target_and_logger_favourite() -> tuple[TableScorer, TableScorer]:
    target = TableScorer({(q, f"r{a}"): float(a == TARGET[k]) for k, q in enumerate(QUERIES) for a in range(3)})
    favourite = TableScorer({(q, f"r{a}"): float(a == 1) for q in QUERIES for a in range(3)})
    return target, favourite


def test_off_policy_estimates_recover_the_targets_true_value_where_a_naive_mean_does_not():
    rows, candidates = logged_bandit(20_000, seed=3)
    evidence = assemble(rows, candidates, "outcome")
    target, favourite = target_and_logger_favourite()
    overall = compare_models(evidence, "assistant", target, favourite).slices[0]

    true_value = float(np.mean([GOOD_RATE[q, TARGET[q]] for q in range(2)]))
    weight = np.array([1 / LOGGING[q, TARGET[q]] for q in range(2)])
    se = np.sqrt(np.mean(GOOD_RATE[[0, 1], TARGET] * weight) / 2 / 20_000)  # IPS: sqrt(E[(w r)^2] / n)
    for metric in ("dr", "pbm_ips", "snips"):
        assert overall.metrics[metric].candidate == pytest.approx(true_value, abs=Z * se), metric
    low, high = overall.metrics["dr"].candidate_ci
    assert low < true_value < high
    assert overall.metrics["ess"].candidate < overall.n_samples / 3

    agrees = rows.filter(pl.col("item_id") == pl.when(pl.col("input_text") == QUERIES[0])
                         .then(pl.lit("r0")).otherwise(pl.lit("r1")))
    assert abs(agrees["outcome"].mean() - true_value) > 10 * se


def test_without_logged_candidates_a_policy_is_judged_on_what_was_shown():
    rows, _ = logged_bandit(2_000, seed=4)
    evidence = assemble(rows, pl.DataFrame(schema={"interaction_id": pl.String, "item_id": pl.String,
                                                   "item_content": pl.String, "mu": pl.List(pl.Float64)}),
                        "outcome")
    assert evidence.candidates_logged == 0
    assert sum(o.frame.height for o in evidence.chunks()) == rows.height  # only the shown response per interaction


def test_an_interaction_whose_logged_candidates_miss_a_shown_item_falls_back_to_what_was_shown():
    rows, candidates = logged_bandit(100, seed=5)
    shown_of_i0 = rows.filter(pl.col("interaction_id") == "i0")["item_id"][0]
    broken = candidates.filter((pl.col("interaction_id") != "i0") | (pl.col("item_id") != shown_of_i0))
    evidence = assemble(rows, broken, "outcome")
    assert evidence.candidates_logged == pytest.approx(0.99)
    own = evidence.options(0, evidence.n_units).frame.filter(pl.col("interaction_id") == "i0")
    assert own["item_id"].to_list() == [shown_of_i0] and own["position"].to_list() == [0]
    assert evidence.n_units == 100 and evidence.unit_attributes().height == 100


def test_tied_scores_split_the_target_policy_evenly():
    slates = pl.from_pandas(recommendation_impressions(days=1, per_day=20)).with_columns(
        clicked=pl.lit(0.0), outcome=pl.lit(0.0), verdict=pl.lit(None, pl.Float64),
        label=pl.col("p_good") >= 0.5)
    evidence = assemble(slates, pl.DataFrame(schema={"interaction_id": pl.String, "item_id": pl.String,
                                                     "item_content": pl.String, "mu": pl.List(pl.Float64)}),
                        "clicked")
    overall = compare_models(evidence, "recommendation", UniformScorer(), UniformScorer()).slices[0]
    assert all(m.difference == 0 for m in overall.metrics.values() if np.isfinite(m.difference))


# --- the gate -------------------------------------------------------------------------------------


Z_CI = NormalDist().inv_cdf(1 - (1 - CI_LEVEL) / 2)


def comparison(difference: float, se: float, champion: float = 0.5) -> MetricComparison:
    """A normal-looking bootstrap result: difference +- z se at the gate's interval level."""
    candidate = champion + difference
    half = Z_CI * se
    return MetricComparison(candidate, champion, difference, (candidate - half, candidate + half),
                            (champion, champion), (difference - half, difference + half), se)


def report_with(slices: dict[str, tuple[int, float, float]], ess: float = 1000.0) -> ValidationReport:
    """A hand-built report: slice name -> (samples, difference, its standard error)."""
    return ValidationReport(
        domain="assistant", primary_metric="dr", windows=WINDOWS,
        candidate_model_uri="models:/m-candidate", champion_model_uri=None,
        slices=[SliceResult(name, n, {"dr": comparison(d, se), "ess": comparison(0, 0, champion=ess)})
                for name, (n, d, se) in slices.items()],
    )


GATE = Gate(min_improvement=0.0, max_slice_regression=0.05, min_samples=200, min_ess=100)


def test_a_better_candidate_passes():
    decision = gate(report_with({"all": (1000, 0.04, 0.01), "new_users": (300, 0.03, 0.02)}), GATE)
    assert decision.outcome == "passed" and decision.passed and decision.reasons == []


def test_an_interval_straddling_the_minimum_is_inconclusive_and_says_how_many_more_samples():
    report = report_with({"all": (1000, 0.01, 0.01)})  # 0.01 +- 1.645 * 0.01 straddles 0
    decision = gate(report, GATE)
    assert decision.outcome == "inconclusive" and not decision.passed
    assert decision.reasons[0].startswith("improvement_uncertain")
    # the interval narrows as 1/sqrt(n): it clears 0 once n = 1000 * (z * 0.01 / 0.01)^2
    total = 1000 * Z_CI**2
    assert decision.samples_needed == pytest.approx(total - 1000, abs=2)
    enough = int(total * 1.05)
    assert gate(report_with({"all": (enough, 0.01, 0.01 * np.sqrt(1000 / enough))}), GATE).passed


def test_a_truly_regressing_candidate_fails():
    decision = gate(report_with({"all": (1000, -0.03, 0.01)}), GATE)
    assert decision.outcome == "failed"
    assert decision.reasons[0].startswith("improvement_below_minimum")


def test_a_single_noisy_small_slice_cannot_veto():
    noisy = report_with({"all": (1000, 0.04, 0.01), "segment_s5": (60, -0.20, 0.12)})
    assert gate(noisy, GATE).passed  # its drop of 0.20 is within noise of the 0.05 allowed
    tiny = report_with({"all": (1000, 0.04, 0.01), "segment_s6": (12, -0.60, 0.01)})
    decision = gate(tiny, GATE)
    assert decision.passed and decision.ungated_slices == ["segment_s6 (12 samples)"]


def test_a_slice_that_clearly_regresses_fails_the_gate_and_is_named():
    report = report_with({"all": (1000, 0.04, 0.01), "new_users": (300, -0.15, 0.02),
                          "returning_users": (700, 0.08, 0.01)})
    decision = gate(report, GATE)
    assert decision.outcome == "failed"
    (reason,) = decision.reasons
    assert reason.startswith("slice_regression") and "new_users" in reason


def test_holm_keeps_many_borderline_slice_regressions_from_vetoing_by_chance():
    # each slice alone: p ~= 0.02 < 0.05, but not < 0.05 / 5 after Holm
    slices = {"all": (2000, 0.04, 0.01)} | {f"segment_s{k}": (300, -0.05 - 2.05 * 0.02, 0.02) for k in range(5)}
    assert gate(report_with(slices), GATE).passed
    one = {"all": (2000, 0.04, 0.01), "segment_s0": (300, -0.05 - 2.05 * 0.02, 0.02)}
    assert gate(report_with(one), GATE).outcome == "failed"


def test_too_few_samples_or_a_low_effective_sample_size_is_inconclusive_not_failed():
    few = gate(report_with({"all": (150, -0.5, 0.01)}), GATE)
    assert few.outcome == "inconclusive" and few.reasons[0].startswith("too_few_samples")
    assert few.samples_needed == 50
    thin = gate(report_with({"all": (1000, 0.2, 0.01)}, ess=20), GATE)
    assert thin.outcome == "inconclusive" and thin.reasons[0].startswith("low_effective_sample_size")
    assert thin.samples_needed == 4000  # ESS grows with n: 5x the samples for 5x the ESS


def test_a_non_inferiority_margin_promotes_what_is_no_worse_than_it():
    report = report_with({"all": (1000, -0.005, 0.005)})  # [-0.0132, +0.0032]
    assert gate(report, GATE).outcome == "inconclusive"
    assert gate(report, GATE.model_copy(update={"non_inferiority_margin": 0.02})).passed
    assert gate(report, GATE.model_copy(update={"non_inferiority_margin": 0.01})).outcome == "inconclusive"


def test_metadata_is_small_and_names_the_outcome_and_the_samples_needed():
    report = report_with({"all": (1000, 0.01, 0.01)})
    report = replace(report, decision=gate(report, GATE))
    metadata = report.metadata()
    assert metadata["gate"] == "inconclusive" and metadata["samples_needed"] == report.decision.samples_needed
    assert all(isinstance(v, (str, int, float, bool)) for v in metadata.values()) and len(metadata) <= 15
    assert "| all | 1000 |" in report.markdown()


def test_an_estimate_outside_the_rewards_range_is_never_reported_as_the_estimate():
    report = report_with({"all": (1000, 1.28, 0.3)})  # dr 1.78 for a 0/1 reward
    markdown = report.markdown()
    assert "| 1.7800 (" not in markdown and "| † (1.7800) |" in markdown and "not an estimate of it" in markdown
    assert report.metadata()["candidate"] == "outside 0..1 (1.7800): no estimate"
    decision = gate(report, GATE)
    assert decision.outcome == "inconclusive"
    assert decision.reasons[0].startswith("estimate_out_of_range: dr of the candidate is 1.7800")
    assert "†" not in report_with({"all": (1000, 0.2, 0.01)}).markdown()


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
    assert report.primary_metric == "dr"
    segments = sorted(f"segment_{anonymous(s)}" for s in ("s0", "s1", "s2"))  # no product text in a name
    assert [s.name for s in report.slices] == ["all", "new_users", "returning_users", *segments]
    assert report.candidates_logged == 0  # the synthetic warehouse logs no candidates
    weak = report.overall.metrics["weak_label_value"]
    assert weak.candidate > weak.champion  # the uniform baseline
    assert report.decision == gate(report, config.domain("recommendation").gate)

    metadata = report.metadata()
    assert all(isinstance(v, (str, int, float, bool)) for v in metadata.values())
    assert metadata["gate"] == report.decision.outcome
    assert metadata["champion_model"] == "baseline"
    assert metadata["difference"] == round(report.overall.metrics["dr"].difference, 4)
    assert len(metadata) <= 15

    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    run = client.get_run(report.run_id)
    assert run.info.experiment_id == client.get_run(candidate.run_id).info.experiment_id
    assert run.data.tags["flywheel.candidate_run_id"] == candidate.run_id
    assert run.data.tags["flywheel.gate.outcome"] == report.decision.outcome
    assert run.data.tags["flywheel.gate.passed"] == str(report.decision.passed).lower()
    s1 = next(s for s in report.slices if s.name == f"segment_{anonymous('s1')}")
    assert run.data.metrics[f"{s1.name}/dr/difference"] == pytest.approx(s1.metrics["dr"].difference)
    artifacts = {a.path for a in client.list_artifacts(report.run_id, "validation")}
    assert artifacts == {"validation/report.json", "validation/report.md"}
    logged = json.loads(mlflow.artifacts.load_text(f"runs:/{report.run_id}/validation/report.json"))
    assert logged["decision"]["outcome"] == report.decision.outcome


def test_declared_groups_are_measured_and_a_protected_one_with_too_little_evidence_is_named(world, tmp_path):
    """Through validate_candidate on the warehouse: the segments as declared groups (one protected,
    needing more held-out interactions than there are), then a users file's groups."""
    con, home, config, candidate = world
    report = validate_candidate(con, home, with_groups(config, protected=["s1"], min_samples=10**6), "recommendation",
                                candidate.model_uri, None, candidate.windows)
    hashed = [f"group_{anonymous(s)}" for s in ("s0", "s2")]  # undeclared: named by their hash
    assert [s.name for s in report.slices] == ["all", "new_users", "returning_users", *sorted([*hashed, "group_s1"])]
    assert report.decision.outcome == "inconclusive"
    assert any(r.startswith("group_evidence: protected group s1 has ") for r in report.decision.reasons)
    logged = mlflow.MlflowClient(home.mlflow_tracking_uri).get_run(report.run_id).data.metrics
    assert report.disparity()["candidate"] > 0
    assert logged["disparity/candidate"] == pytest.approx(report.disparity()["candidate"])
    assert "group_s1/dr/difference" in logged and "| s1 |" in report.markdown()

    users = holdout_rows(con, "recommendation", candidate.windows)["user_id"].unique().sort()
    path = tmp_path / "groups.csv"
    pl.DataFrame({"user_id": users, "group": ["north" if i % 3 else "south" for i in range(len(users))]}).write_csv(path)
    mapped = validate_candidate(con, home, with_groups(config, field=None, users_file=path), "recommendation",
                                candidate.model_uri, None, candidate.windows)
    names = [s.name for s in mapped.slices]
    assert names[-2:] == ["group_north", "group_south"] and f"segment_{anonymous('s1')}" in names
    assert sum(s.n_samples for s in mapped.slices[-2:]) == mapped.overall.n_samples


def with_groups(config, **groups):
    """``config`` with the recommendation domain's groups declared."""
    domain = config.domain("recommendation").model_copy(update={"groups": Groups(**groups)})
    return config.model_copy(update={"domains": {**config.domains, "recommendation": domain}})


def test_a_candidate_compared_with_itself_is_inconclusive_not_promoted(world):
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
    assert all(m.difference == 0 for s in report.slices for m in s.metrics.values()
               if np.isfinite(m.difference))
    assert report.decision.outcome == "inconclusive"  # no gain shown, no harm either
    assert report.decision.reasons[0].startswith("same_choices: the candidate and champion choose the same")
    assert report.decision.samples_needed is None and not report.decision.decidable
    assert latest_inconclusive(home, "recommendation") is None  # more days would not decide: nothing to revisit


def unflagged(candidate) -> HealthReport:
    """The flywheel_health audit of ``candidate`` with no trap flagged."""
    w = candidate.windows
    return HealthReport(candidate.domain, w.holdout_end, w.train_start, w.train_end, w.holdout_start, None,
                        "baseline", candidate.model_uri, findings=())


def test_a_candidate_regressing_on_a_slice_is_not_registered_so_never_promoted(world):
    """The registered_candidate asset itself, given a real candidate and a failed gate."""
    _, home, config, candidate = world
    report = report_with({"all": (1000, 0.04, 0.01), "new_users": (300, -0.15, 0.02)})
    report = replace(report, domain="recommendation", decision=gate(report, GATE))
    *_, registered_candidate = build_model_assets(config, "recommendation")

    results = list(registered_candidate(
        dg.build_asset_context(), candidate=candidate, report=report, health=unflagged(candidate),
        warehouse=WarehouseResource(home_path=str(home.root)), mlflow=MlflowResource(home_path=str(home.root)),
    ))

    assert results == []  # not materialized: the run shows registered_candidate as skipped
    assert any("slice_regression" in reason for reason in report.decision.reasons)
    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    assert client.search_model_versions(f"name = '{registry.model_name('recommendation')}'") == []
    assert registry.alias_version(client, "recommendation", registry.CHAMPION) is None


@pytest.mark.slow
def test_an_inconclusive_candidate_is_revisited_next_cycle_on_more_days_and_registered_when_it_passes(
        tmp_path):
    """Cycle 1's candidate has too few held-out samples (3 days < min_samples); cycle 2's too. Cycle 2
    revisits cycle 1's on its 3 held-out days plus cycle 2's 3: enough samples to decide, on days
    it never trained on; registered_candidate then registers *that* model, with its own lineage."""
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    write_warehouse(con, recommendation_impressions(DAYS, PER_DAY))
    settings = TEST_CONFIG["domains"]["recommendation"]
    config = parse_config({**TEST_CONFIG, "domains": {"recommendation": {
        **settings, "gate": {**settings["gate"], "min_samples": 4 * PER_DAY}}}})
    home = fresh_home(tmp_path / "home")
    first = train_candidate(con, home, config, "recommendation", AS_OF - pd.Timedelta(days=3).to_pytimedelta())
    cycle_1 = validate_cycle(con, home, config, "recommendation", first.model_uri, None, first.windows)
    assert cycle_1.outcome == "inconclusive" and cycle_1.revisit is None
    assert cycle_1.decision.reasons[0].startswith(f"too_few_samples: {3 * PER_DAY}")

    second = train_candidate(con, home, config, "recommendation", AS_OF)
    cycle_2 = validate_cycle(con, home, config, "recommendation", second.model_uri, None, second.windows)

    assert cycle_2.outcome == "inconclusive" and not cycle_2.is_revisit
    revisit = cycle_2.revisit
    assert revisit.is_revisit and revisit.candidate_model_uri == first.model_uri
    assert (revisit.windows.holdout_start, revisit.windows.holdout_end) == (first.windows.holdout_start, AS_OF)
    assert revisit.windows.train_end == first.windows.train_end  # never trained on what it is judged on
    assert revisit.overall.n_samples == 6 * PER_DAY
    assert revisit.outcome == "passed", revisit.decision.reasons  # the learned ranking beats the uniform baseline
    assert cycle_2.accepted is revisit
    assert cycle_2.metadata()["revisit"].startswith(f"{first.model_uri} on {first.windows.holdout_start}")
    client = mlflow.MlflowClient(home.mlflow_tracking_uri, home.mlflow_tracking_uri)
    assert client.get_run(revisit.run_id).data.tags["flywheel.revisit"] == "true"
    assert latest_inconclusive(home, "recommendation").model_uri == second.model_uri  # one revisit each

    *_, registered_candidate = build_model_assets(config, "recommendation")
    [result] = registered_candidate(
        dg.build_asset_context(), candidate=second, report=cycle_2, health=unflagged(second),
        warehouse=WarehouseResource(home_path=str(home.root)), mlflow=MlflowResource(home_path=str(home.root)))
    assert result.metadata["model_uri"] == first.model_uri
    version = client.get_model_version(registry.model_name("recommendation"), str(result.metadata["version"]))
    assert version.run_id == first.run_id
    assert version.tags["training.holdout_start"] == first.windows.holdout_start.isoformat()
    assert version.tags["validation.revisit"] == "true"
    assert version.tags["health.flagged"] == "none"
