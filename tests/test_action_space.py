"""The action space as data: per-row logs judged slot by slot against a catalogue, what a model's
scores become as it would serve, and a gate that says when no evidence can decide."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import polars as pl
import pytest
import yaml

from flywheel_pipeline.catalogue import candidate_catalogue, judges_slots
from flywheel_pipeline.config import Gate, Serving, load_config, parse_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.home import Home
from flywheel_pipeline.importers import UnreadableFile, import_file
from flywheel_pipeline.scoring import UniformScorer
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.validation import ValidationReport, compare_models, gate
from flywheel_pipeline.validation import estimators as est
from flywheel_pipeline.validation import evidence as evidence_module
from flywheel_pipeline.validation.evidence import assemble
from flywheel_pipeline.validation.report import Judged
from tests.conftest import REPO

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


def catalogue_project(root: Path, catalogue: dict, bandit_log: dict | None = None) -> tuple[Home, object]:
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    raw["domains"]["recommendation"]["importing"] = {"consent": "granted", "catalogue": catalogue,
                                                     "bandit_log": bandit_log or OPEN_BANDIT}
    return Home(root / "home").ensure(), parse_config(raw)


def test_an_import_keeps_the_catalogue_in_the_home_and_a_bad_one_stops_it_first(tmp_path):
    items = tmp_path / "item_context.csv"
    items.write_text(",item_id,item_feature_0\n" + "".join(f"{a},{a},0.1\n" for a in range(ITEMS)))
    home, config = catalogue_project(tmp_path, {"file": str(items), "item": "item_id"})
    report = import_file(home, config, "bandit", open_bandit_log(tmp_path / "all.csv", rows_per_day=5),
                         "recommendation")
    assert report.catalogue_items == ITEMS and report.records_mapped == 30
    items.unlink()  # a cycle reads the home's copy, never the file
    stored = candidate_catalogue(home, None, config, "recommendation")
    assert stored["item_id"].to_list() == [str(a) for a in range(ITEMS)]  # as the file lists them
    assert judges_slots(config, "recommendation")

    items.write_text("item_id\n3\n3\n")
    batches = sorted(home.landing.rglob("*.jsonl"))
    with pytest.raises(UnreadableFile, match=r"importing.catalogue: .* lists an item more than once, e.g. \['3'\]"):
        import_file(home, config, "bandit", tmp_path / "all.csv", "recommendation")
    assert sorted(home.landing.rglob("*.jsonl")) == batches and candidate_catalogue(
        home, None, config, "recommendation").height == ITEMS  # nothing written, the kept one kept
    _, sku = catalogue_project(tmp_path, {"file": str(items), "item": "sku"})
    with pytest.raises(UnreadableFile, match=r"importing.catalogue.item: .* no column 'sku'"):
        import_file(home, sku, "bandit", tmp_path / "all.csv", "recommendation")


def test_movielens_1m_reads_with_its_double_colon_separator_and_latin_1_titles(tmp_path):
    movies = tmp_path / "movies.dat"
    movies.write_bytes("1::Toy Story (1995)::Animation\n2::Misérables, Les (1995)::Drama\n".encode("latin-1"))
    ratings = tmp_path / "ratings.dat"
    ratings.write_text("1::1::5::978300760\n1::2::3::978302109\n2::1::4::978298709\n")
    home, config = catalogue_project(
        tmp_path, {"file": str(movies), "item": "movie_id", "content": "title", "separator": "::", "header": False,
                   "columns": ["movie_id", "title", "genres"]},
        {**RATINGS, "separator": "::", "columns": ["user_id", "item_id", "rating", "timestamp"]})
    report = import_file(home, config, "bandit", ratings, "recommendation")
    assert report.catalogue_items == 2 and report.records_mapped == 3 and report.events["signal"] == 3 + 2
    titles = candidate_catalogue(home, None, config, "recommendation")["item_content"].to_list()
    assert titles[0] == "Toy Story (1995)" and titles[1].startswith("Mis") and titles[1].endswith("Les (1995)")


# --- real log shapes through the whole cycle ------------------------------------------------------

LOG_DAYS = [date(2019, 11, 24) + timedelta(days=d) for d in range(6)]  # an old, short log: 3 trained, 3 held out


def open_bandit_log(path: Path, rows_per_day: int = 400) -> Path:
    """The Open Bandit Dataset's CSV shape: an unnamed index column, 1-based slots, no slate key, a
    uniformly random logger over 12 items that logs 1/12 at every slot."""
    rng = np.random.default_rng(8)
    attraction = np.linspace(0.02, 0.4, ITEMS)
    lines = [",timestamp,item_id,position,click,propensity_score,user_feature_0"]
    for d, day in enumerate(LOG_DAYS):
        for k in range(rows_per_day):
            item, slot = int(rng.integers(ITEMS)), int(rng.integers(1, SLOTS + 1))
            click = int(rng.random() < attraction[item] / slot)
            lines.append(f"{d * rows_per_day + k},{day} 10:{k // 60 % 60:02d}:{k % 60:02d}.5+00:00,{item},{slot},"
                         f"{click},{1 / ITEMS},{'abc'[k % 3]}")
    path.write_text("\n".join(lines) + "\n")
    return path


def ratings_log(path: Path, rows_per_day: int = 400) -> Path:
    """MovieLens-100K's u.data shape: tab-separated, no header, user, item, rating 1-5, unix seconds."""
    rng = np.random.default_rng(9)
    lines = []
    for day in LOG_DAYS:
        start = int(pd.Timestamp(day, tz="UTC").timestamp())
        for _ in range(rows_per_day):
            lines.append(f"{rng.integers(1, 90)}\t{rng.integers(1, ITEMS + 1)}\t{rng.integers(1, 6)}\t"
                         f"{start + int(rng.integers(86_400))}")
    path.write_text("\n".join(lines) + "\n")
    return path


OPEN_BANDIT = {"timestamp": "timestamp", "item": "item_id", "position": "position", "position_base": 1,
               "reward": "click", "propensity": "propensity_score", "policy": "explore",
               "context": ["user_feature_0"]}
RATINGS = {"separator": "\t", "header": False, "columns": ["user_id", "item_id", "rating", "timestamp"],
           "timestamp": "timestamp", "timestamp_format": "epoch_s", "item": "item_id", "user": "user_id",
           "reward": "rating", "reward_threshold": 4, "rating_scale": [1, 5], "propensity": "unknown",
           "policy": "champion"}


def cycle_on(root: Path, log: Path, bandit_log: dict, catalogue: object, exploration: float) -> dict:
    """Import ``log`` through the documented config only, run the recommendation domain's cycle
    over its days, and return the gate check's metadata and the validation report's."""
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    raw["domains"]["recommendation"].update(
        lookback_days=3, holdout_days=3, exploration_share=exploration, audit_share=0.0, retention_days=3650,
        label_maturity={"outcome": "click"}, gate={"min_samples": 200, "min_ess": 20},
        importing={"consent": "granted", "bandit_log": bandit_log, "catalogue": catalogue})
    path = root / "flywheel.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLYWHEEL_CONFIG", str(path))
        for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
            patch.delenv(name, raising=False)
        home, config = Home(root / "home").activate(), load_config(path)
        import_file(home, config, "bandit", log, "recommendation")
        instance = dg.DagsterInstance.local_temp(str(home.dagster))
        result = execute_cycle(build_definitions(config, home), instance, "recommendation", LOG_DAYS[0], LOG_DAYS[-1])
        gate_check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "gate")
        report = next(m for m in result.get_asset_materialization_events()
                      if m.asset_key == dg.AssetKey(["recommendation", "validation_report"]))
        instance.dispose()
    metadata = {**report.materialization.metadata, **gate_check.metadata}
    return {name: value.value for name, value in metadata.items()}


@pytest.fixture(scope="module")
def open_bandit_cycle(tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("obd")
    items = root / "item_context.csv"
    items.write_text(",item_id,item_feature_0\n" + "".join(f"{a},{a},{a / ITEMS}\n" for a in range(ITEMS)))
    yield cycle_on(root, open_bandit_log(root / "all.csv"), OPEN_BANDIT, {"file": str(items), "item": "item_id"}, 1.0)


@pytest.mark.slow
def test_a_per_row_log_with_a_catalogue_gets_a_decision_on_sane_numbers(open_bandit_cycle):
    gate = open_bandit_cycle
    assert not any(code in gate["reasons"] for code in ("same_choices", "no_overlap", "estimate_out_of_range",
                                                         "too_few_samples", "undefined_metric")), gate["reasons"]
    assert 0 <= gate["champion"] <= 1 and 0 <= gate["candidate"] <= 1  # click rates, each slot judged alone
    assert gate["ess_candidate"] < gate["n_samples"]  # a ranking over 12 items is no uniform logger
    assert gate["n_samples"] == 3 * 400


@pytest.mark.slow
def test_a_ratings_log_without_propensities_is_told_what_a_decision_needs(tmp_path):
    gate = cycle_on(tmp_path, ratings_log(tmp_path / "u.data"), RATINGS, "log", 0.0)
    assert gate["gate"] == "inconclusive" and gate["reasons"].startswith("propensity_unknown:")
    assert "exploration slice" in gate["reasons"] and gate["candidate"] == "undefined"
    assert "samples_needed" not in gate or gate["samples_needed"] == "unknown"
