"""The action space as data: per-row logs judged slot by slot against a catalogue, what a model's
scores become as it would serve, and a gate that says when no evidence can decide."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import polars as pl
import pytest

from flywheel_pipeline.catalogue import (
    CatalogueError,
    candidate_catalogue,
    judges_slots,
    store_catalogue,
)
from flywheel_pipeline.config import Gate, Serving, parse_config
from flywheel_pipeline.scoring import UniformScorer
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.validation import ValidationReport, compare_models, gate
from flywheel_pipeline.validation import estimators as est
from flywheel_pipeline.validation import evidence as evidence_module
from flywheel_pipeline.validation.evidence import assemble
from flywheel_pipeline.validation.report import Judged
from tests.test_training import TEST_CONFIG, fresh_home

ITEMS, SLOTS = 12, 3
WINDOWS = Windows(date(2026, 3, 1), date(2026, 3, 28), date(2026, 3, 29), date(2026, 3, 31))
NO_CANDIDATES = pl.DataFrame(schema={"interaction_id": pl.String, "item_id": pl.String,
                                     "item_content": pl.String, "mu": pl.List(pl.Float64)})
CATALOGUE = pl.DataFrame({"item_id": [f"i{a}" for a in range(ITEMS)],
                          "item_content": [f"item {a}" for a in range(ITEMS)]})
GATE = Gate(min_samples=50, min_ess=10)


class ItemScorer:
    """A fixed score per item, whatever the context."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        return np.array([self.scores[item] for item in candidates["item_id"]])


class SlotProbabilities:
    """A stochastic policy that gives its own slot probabilities: the same table for every context."""

    def __init__(self, table: np.ndarray):
        self.table = table  # (items, slots)

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        return self.table[[int(item[1:]) for item in candidates["item_id"]]]


def per_row_log(n: int, seed: int, logger: np.ndarray | None = None, propensity: bool = True) -> pl.DataFrame:
    """The Open Bandit shape: one item in one of 3 slots per row, no slate key; the logger picks
    items by ``logger`` (items,) at every slot (uniform by default) and logs that probability."""
    rng = np.random.default_rng(seed)
    logger = np.full(ITEMS, 1 / ITEMS) if logger is None else logger
    attraction = np.linspace(0.05, 0.6, ITEMS)
    slot = rng.integers(SLOTS, size=n)
    item = rng.choice(ITEMS, size=n, p=logger)
    clicked = rng.random(n) < attraction[item] * np.array([1.0, 0.7, 0.5])[slot]
    return pl.DataFrame({
        "domain": "home_feed", "event_date": date(2026, 3, 30), "interaction_id": [f"r{i}" for i in range(n)],
        "item_id": [f"i{a}" for a in item], "position": slot,
        "propensity": pl.Series(logger[item] if propensity else [None] * n, dtype=pl.Float64),
        "policy": "explore", "user_id": [f"anon:r{i}" for i in range(n)], "segment": None,
        "context_features": "{}", "is_new_user": True, "input_text": "", "item_content": [f"item {a}" for a in item],
        "clicked": clicked.astype(float), "verdict": None, "p_good": np.where(clicked, 0.9, 0.2), "label": clicked,
    }, schema_overrides={"segment": pl.String, "verdict": pl.Float64})


def report_of(compared, evidence) -> ValidationReport:
    report = ValidationReport(
        domain="home_feed", primary_metric="dr", windows=WINDOWS, candidate_model_uri="models:/c",
        champion_model_uri=None, slices=compared.slices,
        judged=Judged(evidence.slot_decisions, evidence.propensities_known, compared.same_choices,
                      compared.no_overlap))
    return ValidationReport(**{**report.__dict__, "decision": gate(report, GATE)})


def test_a_per_row_log_with_a_catalogue_gives_the_textbook_estimates():
    rows = per_row_log(3_000, seed=1)
    evidence = assemble(rows, NO_CANDIDATES, "clicked", catalogue=CATALOGUE, slot_decisions=True)
    ranking = {f"i{a}": float(a) for a in range(ITEMS)}  # the highest items first: i11, i10, i9
    compared = compare_models(evidence, "recommendation", ItemScorer(ranking), UniformScorer())
    overall = compared.slices[0].metrics

    reward, mu = rows["clicked"].to_numpy(), rows["propensity"].to_numpy()
    item = np.array([int(a[1:]) for a in rows["item_id"]])
    slot = rows["position"].to_numpy()
    candidate_w = (item == ITEMS - 1 - slot) / mu  # top-k puts item 11 - k at slot k
    champion_w = (1 / ITEMS) / mu  # ties split every slot evenly over the catalogue
    for w, role in ((candidate_w, "candidate"), (champion_w, "champion")):
        assert getattr(overall["pbm_ips"], role) == pytest.approx(np.mean(w * reward), rel=1e-12)
        assert getattr(overall["snips"], role) == pytest.approx(np.sum(w * reward) / np.sum(w), rel=1e-12)
        assert getattr(overall["ess"], role) == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-12)
    assert overall["pbm_ips"].champion == pytest.approx(reward.mean())  # the uniform logger's own rate

    rho = evidence_module.reward_model(evidence, np.ones(SLOTS), ["segment", "item_id"])
    options = evidence.options(0, evidence.n_units)
    pi = est.policy_probabilities(ItemScorer(ranking).predict(options.frame.to_pandas()), options.frame["unit"], SLOTS)
    rho_hat = rho.predict(options)
    shown = options.shown
    frame_slot = np.repeat(slot, ITEMS)  # every unit's rows: its whole catalogue, its shown item first
    direct = np.bincount(options.frame["unit"].to_numpy(), weights=rho_hat * pi[np.arange(len(pi)), frame_slot])
    residual = candidate_w * (reward - rho_hat[shown])
    assert overall["dr"].candidate == pytest.approx(np.mean(direct + residual), rel=1e-12)
    assert not compared.same_choices and not compared.no_overlap


def test_scoring_a_chunk_of_units_at_a_time_changes_no_figure(monkeypatch):
    rows = per_row_log(600, seed=2)
    evidence = assemble(rows, NO_CANDIDATES, "clicked", catalogue=CATALOGUE, slot_decisions=True)
    scorer = ItemScorer({f"i{a}": float(a % 5) for a in range(ITEMS)})
    whole = compare_models(evidence, "recommendation", scorer, UniformScorer()).slices
    monkeypatch.setattr(evidence_module, "CHUNK_ROWS", 50)
    assert len(list(evidence.chunks(50))) > 100
    chunked = compare_models(evidence, "recommendation", scorer, UniformScorer()).slices
    for a, b in zip(whole, chunked):
        for name, metric in a.metrics.items():
            assert metric.candidate == pytest.approx(b.metrics[name].candidate, nan_ok=True), name


def test_a_model_that_gives_its_own_slot_probabilities_is_judged_on_them():
    rows = per_row_log(2_000, seed=3)
    evidence = assemble(rows, NO_CANDIDATES, "clicked", catalogue=CATALOGUE, slot_decisions=True)
    rng = np.random.default_rng(0)
    table = rng.dirichlet(np.ones(ITEMS), size=SLOTS).T  # each slot's distribution over the items
    overall = compare_models(evidence, "recommendation", SlotProbabilities(table), UniformScorer()).slices[0]
    item = np.array([int(a[1:]) for a in rows["item_id"]])
    w = table[item, rows["position"].to_numpy()] / rows["propensity"].to_numpy()
    assert overall.metrics["pbm_ips"].candidate == pytest.approx(np.mean(w * rows["clicked"].to_numpy()))


def test_epsilon_greedy_mixes_the_ranking_with_a_uniformly_random_slate():
    units = pl.Series([0] * 4 + [1] * 2)
    pi = est.policy_probabilities(np.array([4.0, 3.0, 2.0, 1.0, 1.0, 2.0]), units, 3, "epsilon_greedy", 0.2)
    assert np.allclose(pi[:4], 0.8 * np.eye(4)[:, :3] + 0.2 / 4)
    assert np.allclose(pi[4:], [[0.1, 0.8 + 0.1, 0], [0.8 + 0.1, 0.1, 0]])  # 2 candidates fill 2 slots
    with pytest.raises(ValueError, match="sum to at most 1"):
        est.policy_probabilities(np.full((4, 3), 0.5), units[:4], 3)


def test_identical_policies_get_an_outcome_no_evidence_can_change():
    rows = per_row_log(1_000, seed=4)
    evidence = assemble(rows, NO_CANDIDATES, "clicked", catalogue=CATALOGUE, slot_decisions=True)
    scorer = ItemScorer({f"i{a}": float(a) for a in range(ITEMS)})
    compared = compare_models(evidence, "recommendation", scorer, ItemScorer(dict(scorer.scores)))
    decision = report_of(compared, evidence).decision
    assert compared.same_choices and decision.outcome == "inconclusive" and not decision.decidable
    assert decision.reasons == [decision.reasons[0]] and decision.reasons[0].startswith("same_choices:")
    assert decision.samples_needed is None and "more evidence" not in decision.reasons[0]


def test_a_per_row_log_without_a_catalogue_cannot_tell_policies_apart():
    """Each row's only candidate is what it showed: any policy shows the same."""
    rows = per_row_log(1_000, seed=5)
    evidence = assemble(rows, NO_CANDIDATES, "clicked", slot_decisions=True)
    compared = compare_models(evidence, "recommendation", ItemScorer({f"i{a}": a for a in range(ITEMS)}),
                              UniformScorer())
    assert compared.same_choices and report_of(compared, evidence).decision.reasons[0].startswith("same_choices:")


def test_a_logger_that_never_shows_what_the_candidate_would_gives_no_overlap():
    logger = np.r_[np.full(ITEMS - 1, 1 / (ITEMS - 1)), 0.0]  # never item 11
    rows = per_row_log(1_000, seed=6, logger=logger)
    evidence = assemble(rows, NO_CANDIDATES, "clicked", catalogue=CATALOGUE, slot_decisions=True)
    only_11 = ItemScorer({f"i{a}": float(a == ITEMS - 1) for a in range(ITEMS)})
    compared = compare_models(evidence, "recommendation", only_11, UniformScorer(), Serving(ranking="top_k"))
    # top-k also fills slots 1 and 2 with ties among the rest: weight there, so judge slot 0 alone
    slot0 = rows.filter(pl.col("position") == 0)
    evidence0 = assemble(slot0, NO_CANDIDATES, "clicked", catalogue=CATALOGUE, slot_decisions=True)
    compared0 = compare_models(evidence0, "recommendation", only_11, UniformScorer())
    assert not compared.no_overlap and compared0.no_overlap
    decision = report_of(compared0, evidence0).decision
    assert decision.reasons[0].startswith("no_overlap: the logger never shows what the candidate would")


def test_a_log_without_propensities_never_shows_an_importance_weighted_value():
    rows = per_row_log(1_000, seed=7, propensity=False)
    evidence = assemble(rows, NO_CANDIDATES, "clicked", catalogue=CATALOGUE, slot_decisions=True)
    assert not evidence.propensities_known
    compared = compare_models(evidence, "recommendation", ItemScorer({f"i{a}": a for a in range(ITEMS)}),
                              UniformScorer())
    overall = compared.slices[0].metrics
    assert all(np.isnan(overall[m].candidate) for m in ("dr", "pbm_ips", "snips", "ess"))
    assert np.isfinite(overall["replay"].candidate) and np.isfinite(overall["direct"].candidate)
    report = report_of(compared, evidence)
    assert report.decision.reasons[0].startswith("propensity_unknown:") and not report.decision.decidable
    assert "exploration slice" in report.decision.reasons[0] and report.decision.samples_needed is None
    markdown = report.markdown()
    dr_rows = [line for line in markdown.splitlines() if line.startswith("| all |") and "| dr |" in line]
    assert dr_rows and all("n/a" in line for line in dr_rows) and "| replay ‡ |" in markdown
    assert "‡ biased" in markdown and report.metadata()["candidate"] == "undefined"


def test_a_catalogue_file_is_kept_in_the_home_and_read_back(tmp_path):
    items = tmp_path / "item_context.csv"
    items.write_text(",item_id,item_feature_0\n0,0,-0.5\n1,1,0.25\n2,2,0.1\n")
    config = parse_config({**TEST_CONFIG, "domains": {"recommendation": {
        **TEST_CONFIG["domains"]["recommendation"],
        "importing": {"consent": "granted", "catalogue": {"file": str(items), "item": "item_id"}}}}})
    home = fresh_home(tmp_path / "home")
    assert store_catalogue(home, config, "recommendation") == 3
    items.unlink()  # the cycle reads the home's copy, never the file
    stored = candidate_catalogue(home, None, config, "recommendation")
    assert stored["item_id"].to_list() == ["0", "1", "2"] and judges_slots(config, "recommendation")

    items.write_text("item_id\n0\n0\n")
    with pytest.raises(CatalogueError, match=r"importing.catalogue: .* lists an item more than once"):
        store_catalogue(home, config, "recommendation")
    bad_column = parse_config({**TEST_CONFIG, "domains": {"recommendation": {
        **TEST_CONFIG["domains"]["recommendation"],
        "importing": {"consent": "granted", "catalogue": {"file": str(items), "item": "sku"}}}}})
    with pytest.raises(CatalogueError, match=r"importing.catalogue.item: .* no column 'sku'"):
        store_catalogue(home, bad_column, "recommendation")
