"""Fine-tune: windows, point-in-time training set, the MLflow run, and what the trainers learn.

The synthetic warehouse built here (also used by test_validation.py) holds a learnable pattern:
assistant queries whose good response shares no words with them while a bad "echo" response
repeats them (the lexical baseline picks the wrong one), and recommendation slates whose labels
are depressed by position, with a uniformly random exploration slice.
"""

from __future__ import annotations

import atexit
import functools
import math
import shutil
import tempfile
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from flywheel_pipeline import training
from flywheel_pipeline.config import parse_config
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import SERVING_FEATURES, LexicalOverlapScorer
from flywheel_pipeline.training import split_windows, train_candidate
from flywheel_pipeline.training.base import SERVING_TIME_COLUMNS, Windows, impressions
from flywheel_pipeline.training.recommendation import (
    HashedRecommendationTrainer,
    RecommendationTrainer,
    examination_curve,
)

AS_OF = date(2026, 3, 31)
DAYS = 31  # 28 training days + 3 held-out days
EXAMINATION = np.array([1.0, 0.7, 0.5, 0.35, 0.25])  # the hidden position bias
REACTION_COLUMNS = {
    "accepted": "BOOLEAN",
    "accepted_at_s": "DOUBLE",
    "reverted_after_accept_s": "DOUBLE",
    "rejected": "BOOLEAN",
    "edit_ratio": "DOUBLE",
    "edited_text": "VARCHAR",
    "reformulated_after_s": "DOUBLE",
    "copied": "BOOLEAN",
    "abandoned_after_s": "DOUBLE",
    "rating": "DOUBLE",
    "clicked": "BOOLEAN",
    "clicked_after_s": "DOUBLE",
    "dwell_s": "DOUBLE",
    "max_clicked_position": "INTEGER",
    "outcome_name": "VARCHAR",
    "outcome_value": "DOUBLE",
    "outcome_at": "TIMESTAMP",
    "outcome_delay_s": "DOUBLE",
    "review_value": "DOUBLE",
    "reviewed_at": "TIMESTAMP",
    "review_selection": "VARCHAR",
    "audit_review_value": "DOUBLE",
}
FCT_IMPRESSIONS_DDL = """
CREATE SCHEMA IF NOT EXISTS marts;
CREATE SCHEMA IF NOT EXISTS labels;
CREATE TABLE IF NOT EXISTS marts.fct_impressions (
    domain VARCHAR, event_date DATE, interaction_id VARCHAR, item_id VARCHAR, position INTEGER,
    propensity DOUBLE, policy VARCHAR, model_version VARCHAR, served_at TIMESTAMP,
    user_id VARCHAR, session_id VARCHAR, is_new_user BOOLEAN, segment VARCHAR, context_features VARCHAR,
    input_text VARCHAR, item_content VARCHAR, slate_size INTEGER, {reactions}
);
CREATE TABLE IF NOT EXISTS labels.impression_labels (
    domain VARCHAR, event_date DATE, interaction_id VARCHAR, item_id VARCHAR, p_good DOUBLE,
    label BOOLEAN, n_votes INTEGER, label_model_version VARCHAR, labelled_at TIMESTAMP
);
""".format(reactions=", ".join(f"{name} {kind}" for name, kind in REACTION_COLUMNS.items()))

TEST_CONFIG = {
    "partitions_start": "2026-01-01",
    "domains": {
        "assistant": {
            "shape": "assistant",
            "cadence": "weekly",
            "lookback_days": 28,
            "holdout_days": 3,
            "label_maturity": {"outcome": "resolved"},
            "gate": {"min_improvement": 0.0, "max_slice_regression": 0.05, "min_samples": 200},
            "approvers": ["ml-oncall"],
        },
        "recommendation": {
            "shape": "recommendation",
            "cadence": "weekly",
            "lookback_days": 28,
            "holdout_days": 3,
            "exploration_share": 0.2,
            "label_maturity": {"outcome": "purchase"},
            "gate": {"min_improvement": 0.0, "max_slice_regression": 0.05, "min_samples": 200},
            "approvers": ["recsys-lead"],
        },
    },
}


# --- the synthetic world --------------------------------------------------------------------


def _served_at(rng: np.random.Generator, day: date) -> datetime:
    return datetime.combine(day, datetime.min.time()) + timedelta(seconds=int(rng.integers(86400)))


def _noisy_p_good(rng: np.random.Generator, good: bool) -> float | None:
    """The label model's belief: mostly right, sometimes wrong, sometimes abstaining."""
    if rng.random() < 0.05:
        return None
    if rng.random() < 0.1:
        good = not good
    return float(np.clip(rng.normal(0.85 if good else 0.15, 0.08), 0.01, 0.99))


def assistant_impressions(
    days: int, per_day: int, seed: int = 0, end: date = AS_OF
) -> pd.DataFrame:
    """Queries about 24 topics; one good response per topic shares no words with the query."""
    rng = np.random.default_rng(seed)
    verbs, nouns = (
        ["reset", "install", "update", "remove"],
        ["printer", "router", "laptop", "phone", "modem", "tablet"],
    )
    templates = ["how do i {v} my {n}", "what is the way to {v} a {n}", "{v} {n} help please"]
    rows = []
    for d in range(days):
        day = end - timedelta(days=days - 1 - d)
        for k in range(per_day):
            t = int(rng.integers(24))
            verb, noun = verbs[t % 4], nouns[t // 4]
            responses = [
                (f"r{t}_good", f"open settings{t} and choose option{t} then confirm"),
                (f"r{t}_echo", f"to {verb} your {noun} you {verb} the {noun} my {noun} help"),
                (f"r{t}_sorry", "sorry i cannot help with that"),
                (f"r{t}_other", f"open settings{(t + 1) % 24} and choose option{(t + 1) % 24}"),
            ]
            explore = rng.random() < 0.2
            probabilities = np.full(4, 0.25) if explore else np.array([0.3, 0.5, 0.1, 0.1])
            choice = int(rng.choice(4, p=probabilities))
            p_good = _noisy_p_good(rng, choice == 0)
            rows.append(
                {
                    "domain": "assistant",
                    "event_date": day,
                    "interaction_id": f"a{d}_{k}",
                    "item_id": responses[choice][0],
                    "position": 0,
                    "propensity": probabilities[choice],
                    "policy": "explore" if explore else "champion",
                    "model_version": "baseline",
                    "served_at": _served_at(rng, day),
                    "user_id": f"u{rng.integers(300)}",
                    "session_id": f"s{d}_{k}",
                    "is_new_user": bool(rng.random() < 0.3),
                    "segment": None,
                    "context_features": "{}",
                    "input_text": rng.choice(templates).format(v=verb, n=noun),
                    "item_content": responses[choice][1],
                    "slate_size": 1,
                    "accepted": bool(choice == 0),
                    "p_good": p_good,
                }
            )
    return pd.DataFrame(rows)


def recommendation_relevance(seed: int = 0) -> np.ndarray:
    """The hidden P(good | segment, item): 3 segments x 20 items."""
    return np.random.default_rng(seed + 100).uniform(0.05, 0.8, size=(3, 20))


def _slate(rng: np.random.Generator, preference: np.ndarray) -> tuple[list[int], list[float]]:
    """Plackett-Luce draw of 5 items; each with the logger's probability of that item at that
    position (the contract's propensity: a marginal, not the draw's conditional)."""
    weights, items = preference.copy(), []
    for _ in range(5):
        item = int(rng.choice(len(weights), p=weights / weights.sum()))
        items.append(item)
        weights[item] = 0.0
    marginals = _plackett_luce_marginals(tuple(preference))
    return items, [float(marginals[item, position]) for position, item in enumerate(items)]


@functools.cache
def _plackett_luce_marginals(preference: tuple[float, ...], draws: int = 400_000) -> np.ndarray:
    """(items, 5): P(item at position) under Plackett-Luce, by Gumbel-top-5 draws (a fixed seed)."""
    gumbel = np.log(np.asarray(preference)) + np.random.default_rng(99).gumbel(size=(draws, len(preference)))
    top = np.argsort(-gumbel, axis=1)[:, :5]
    counts = np.zeros((len(preference), 5))
    for position in range(5):
        counts[:, position] = np.bincount(top[:, position], minlength=len(preference))
    return counts / draws


def recommendation_impressions(
    days: int, per_day: int, seed: int = 0, end: date = AS_OF, exploration: float = 0.2
) -> pd.DataFrame:
    """Slates of 5 out of 20 items; the champion prefers popular items; lower slots are seen less."""
    rng = np.random.default_rng(seed)
    relevance = recommendation_relevance(seed)
    popularity = np.exp(4 * relevance.mean(axis=0))
    user_segment = rng.integers(3, size=150)
    rows = []
    for d in range(days):
        day = end - timedelta(days=days - 1 - d)
        for k in range(per_day):
            user = int(rng.integers(150))
            segment = int(user_segment[user])
            explore = rng.random() < exploration
            items, propensities = _slate(rng, np.ones(20) if explore else popularity)
            served_at, is_new = _served_at(rng, day), bool(user % 5 == 0)
            for position, (item, propensity) in enumerate(zip(items, propensities)):
                clicked = rng.random() < EXAMINATION[position] * relevance[segment, item]
                rows.append(
                    {
                        "domain": "recommendation",
                        "event_date": day,
                        "interaction_id": f"r{d}_{k}",
                        "item_id": f"i{item}",
                        "position": position,
                        "propensity": propensity,
                        "policy": "explore" if explore else "champion",
                        "model_version": "1",
                        "served_at": served_at,
                        "user_id": f"u{user}",
                        "session_id": f"s{d}_{k}",
                        "is_new_user": is_new,
                        "segment": f"s{segment}",
                        "context_features": "{}",
                        "input_text": "home",
                        "item_content": f"item {item}",
                        "slate_size": 5,
                        "clicked": bool(clicked),
                        "p_good": _noisy_p_good(rng, clicked),
                    }
                )
    return pd.DataFrame(rows)


def write_warehouse(con: duckdb.DuckDBPyConnection, frame: pd.DataFrame) -> None:
    """Append impressions (with their reaction bait columns) and their labels."""
    con.sql(FCT_IMPRESSIONS_DDL)
    labelled = frame.assign(
        label=frame["p_good"] >= 0.5,
        n_votes=3,
        label_model_version="t",
        labelled_at=datetime(2026, 4, 1),
    )
    con.register("frame", frame.drop(columns="p_good"))
    con.register("labelled", labelled)
    con.sql("INSERT INTO marts.fct_impressions BY NAME SELECT * FROM frame")
    con.sql(
        "INSERT INTO labels.impression_labels BY NAME SELECT domain, event_date, interaction_id,"
        " item_id, p_good, CASE WHEN p_good IS NULL THEN NULL ELSE label END AS label, n_votes,"
        " label_model_version, labelled_at FROM labelled"
    )
    con.unregister("frame")
    con.unregister("labelled")


@functools.cache
def _mlflow_store_template() -> Path:
    """An empty, migrated MLflow sqlite store: creating one takes seconds, copying it does not."""
    root = Path(tempfile.mkdtemp(prefix="flywheel-mlflow-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    home = Home(root).ensure()
    mlflow.MlflowClient(home.mlflow_tracking_uri).search_experiments()
    return home.mlflow / "mlflow.db"


def fresh_home(root: Path) -> Home:
    """A new home whose MLflow store starts empty."""
    home = Home(root).ensure()
    shutil.copyfile(_mlflow_store_template(), home.mlflow / "mlflow.db")
    return home


@pytest.fixture
def config():
    """Fixed windows and gates, whatever flywheel.yaml says (overrides conftest's)."""
    return parse_config(TEST_CONFIG)


@pytest.fixture
def home(tmp_path) -> Home:
    """conftest's home, with a ready MLflow store."""
    return fresh_home(tmp_path / "home")


@pytest.fixture(scope="module")
def con(tmp_path_factory):
    """Both domains' impressions and labels, days 2026-03-01 to 2026-03-31."""
    connection = duckdb.connect(str(tmp_path_factory.mktemp("warehouse") / "warehouse.duckdb"))
    write_warehouse(connection, assistant_impressions(DAYS, 100))
    write_warehouse(connection, recommendation_impressions(DAYS, 90))
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def assistant_candidate(con, tmp_path_factory):
    """One assistant training run, shared by the tests that only read it: (home, result)."""
    home = fresh_home(tmp_path_factory.mktemp("assistant") / "home")
    return home, train_candidate(con, home, parse_config(TEST_CONFIG), "assistant", AS_OF)


# --- windows ------------------------------------------------------------------------------


def test_windows_never_overlap_and_respect_maturity(config):
    domain = config.domain("assistant")
    for offset in range(0, 60, 7):
        as_of = AS_OF + timedelta(days=offset)
        for mature_until in (None, as_of, as_of - timedelta(days=5), as_of - timedelta(days=20)):
            w = split_windows(as_of, domain, mature_until)
            assert w.train_start <= w.train_end < w.holdout_start <= w.holdout_end == as_of
            assert (w.holdout_end - w.holdout_start).days + 1 == domain.holdout_days
            assert (w.holdout_start - w.train_start).days == domain.lookback_days
            if mature_until is not None:
                assert w.train_end <= mature_until
    with pytest.raises(ValueError):
        Windows(date(2026, 3, 1), date(2026, 3, 29), date(2026, 3, 29), date(2026, 3, 31))
    with pytest.raises(ValueError, match="no mature training day"):
        split_windows(AS_OF, domain, mature_until=AS_OF - timedelta(days=60))


# --- point in time ------------------------------------------------------------------------


class SpyTrainer:
    """Wraps a real trainer and records the columns it is given."""

    def __init__(self, trainer):
        self.trainer, self.name, self.seen = trainer, trainer.name, []
        self.pip_requirements = trainer.pip_requirements

    def params(self):
        return self.trainer.params()

    def weigh(self, rows):
        self.seen.append(("weigh", rows.columns))
        return self.trainer.weigh(rows)

    def fit(self, train):
        self.seen.append(("fit", train.columns))
        return self.trainer.fit(train)


def test_no_reaction_column_reaches_the_trainer(con, home, config, monkeypatch):
    assert "clicked" in con.sql("SELECT * FROM marts.fct_impressions LIMIT 0").columns
    spy = SpyTrainer(training.trainer_for(config.domain("recommendation")))
    monkeypatch.setattr(training, "trainer_for", lambda *args: spy)
    train_candidate(con, home, config, "recommendation", AS_OF)
    assert {stage for stage, _ in spy.seen} == {"weigh", "fit"}
    for stage, columns in spy.seen:
        assert not set(columns) & set(REACTION_COLUMNS), stage
        assert set(columns) <= {*SERVING_TIME_COLUMNS, "p_good", "label", "weight"}
        if stage == "fit":
            assert columns == [*SERVING_FEATURES, "p_good", "weight"]


# --- the MLflow run -----------------------------------------------------------------------


def test_training_logs_one_run_with_params_metrics_dataset_and_a_loadable_model(
    con, assistant_candidate
):
    home, result = assistant_candidate
    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    run = client.get_run(result.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "flywheel-assistant"
    assert experiment.artifact_location.startswith(home.mlflow_artifacts.as_uri())
    assert run.data.params["train_end"] == result.windows.train_end.isoformat() == "2026-03-28"
    assert run.data.params["holdout_start"] == "2026-03-29"
    assert int(run.data.params["n_labelled"]) == result.n_labelled < result.n_rows
    assert "trainer.alpha" in run.data.params
    for name in (
        "label_coverage",
        "exploration_share",
        "self_consumption_share",
        "internal_check_auc",
        "internal_check_log_loss",
        "training_auc",
    ):
        assert name in run.data.metrics
    assert run.data.metrics["exploration_share"] + run.data.metrics[
        "self_consumption_share"
    ] == pytest.approx(1.0)
    assert run.data.metrics["internal_check_auc"] > 0.8
    assert result.metadata()["training_run_id"] == result.run_id
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name.startswith("assistant-train-")
    assert {tag.key: tag.value for tag in dataset_input.tags}["mlflow.data.context"] == "training"

    model = mlflow.pyfunc.load_model(result.model_uri)
    sample = impressions(con, "assistant", AS_OF, AS_OF).to_pandas().head(20)
    scores = model.predict(sample[SERVING_FEATURES])
    assert scores.shape == (20,) and np.all((scores >= 0) & (scores <= 1))
    assert model.metadata.get_input_schema().input_names() == SERVING_FEATURES


def test_assistant_candidate_beats_the_lexical_baseline_on_held_out_rows(con, assistant_candidate):
    _, result = assistant_candidate
    w = result.windows
    held_out = impressions(con, "assistant", w.holdout_start, w.holdout_end).to_pandas()
    held_out = held_out[held_out["p_good"].notna()]
    good, confidence = held_out["p_good"] >= 0.5, (2 * held_out["p_good"] - 1).abs()
    candidate = mlflow.pyfunc.load_model(result.model_uri).predict(held_out)
    baseline = LexicalOverlapScorer().predict(held_out)
    candidate_auc = roc_auc_score(good, candidate, sample_weight=confidence)
    baseline_auc = roc_auc_score(good, baseline, sample_weight=confidence)
    assert candidate_auc > 0.85
    assert baseline_auc < 0.5  # the lexical baseline prefers the echo


def test_recommendation_trainer_corrects_position_bias_and_reports_its_sources(con, home, config):
    result = train_candidate(con, home, config, "recommendation", AS_OF)
    metrics = result.metrics
    assert metrics["examination_estimated"] == 1.0
    estimated = [metrics[f"examination_position_{p}"] for p in range(5)]
    # Labels, not clicks, are what the trainer sees: good-label rate by position over the top's.
    p_good_clicked, p_good_not = 0.9 * 0.85 + 0.1 * 0.15, 0.9 * 0.15 + 0.1 * 0.85
    label_rate = (
        p_good_not + (p_good_clicked - p_good_not) * EXAMINATION * recommendation_relevance().mean()
    )
    assert estimated[0] == 1.0
    assert np.allclose(estimated, label_rate / label_rate[0], atol=0.08)
    assert metrics["exploration_share"] == pytest.approx(0.2, abs=0.05)
    assert metrics["self_consumption_share"] == pytest.approx(0.8, abs=0.05)

    model = mlflow.pyfunc.load_model(result.model_uri)
    relevance = recommendation_relevance()
    grid = pd.DataFrame(
        [
            {
                "domain": "recommendation",
                "user_id": "nobody",
                "segment": f"s{s}",
                "context_features": "{}",
                "is_new_user": False,
                "input_text": "home",
                "item_id": f"i{i}",
                "item_content": f"item {i}",
            }
            for s in range(3)
            for i in range(20)
        ]
    )
    scores = model.predict(grid).reshape(3, 20)
    for segment in range(3):
        assert np.corrcoef(scores[segment], relevance[segment])[0, 1] > 0.7


def taste_rows(seed: int, users: int = 120, items: int = 40, seen: int = 12) -> tuple[pl.DataFrame, np.ndarray]:
    """One segment whose users split into two tastes (the first or the second half of the items):
    each user rates ``seen`` random items; returns the rows and each (user, item)'s truth."""
    rng = np.random.default_rng(seed)
    likes = (np.arange(items)[None, :] < items // 2) == (np.arange(users)[:, None] % 2 == 0)
    rated = np.argsort(rng.random((users, items)), axis=1)[:, :seen]
    user, item = np.repeat(np.arange(users), seen), rated.ravel()
    good = likes[user, item] ^ (rng.random(len(user)) < 0.05)
    rows = pl.DataFrame({
        "domain": "recommendation", "user_id": [f"u{u}" for u in user], "segment": "s0",
        "context_features": "{}", "is_new_user": False, "input_text": "home",
        "item_id": [f"i{i}" for i in item], "item_content": [f"item {i}" for i in item],
        "p_good": np.where(good, 0.9, 0.1), "weight": 1.0,
    })
    return rows, likes


def test_the_recommendation_trainer_learns_a_users_taste_for_items_they_never_saw():
    rows, likes = taste_rows(seed=0)
    users, items = likes.shape
    unseen = pd.DataFrame([
        {"domain": "recommendation", "user_id": f"u{u}", "segment": "s0", "context_features": "{}",
         "is_new_user": False, "input_text": "home", "item_id": f"i{i}", "item_content": f"item {i}"}
        for u in range(users) for i in range(items)])
    seen = set(zip(rows["user_id"].to_list(), rows["item_id"].to_list()))
    mask = ~np.array([(u, i) in seen for u, i in zip(unseen["user_id"], unseen["item_id"])])
    truth = likes.ravel()[mask]
    embeddings = RecommendationTrainer().fit(rows)
    hashed = HashedRecommendationTrainer().fit(rows)
    # the embeddings carry a user's taste to the items only others rated; user x item cannot
    assert roc_auc_score(truth, embeddings.predict(unseen)[mask]) > 0.95
    assert roc_auc_score(truth, hashed.predict(unseen)[mask]) < 0.65
    # the same rows give the same model; an unknown user scores by the segment alone
    assert np.array_equal(RecommendationTrainer().fit(rows).predict(unseen), embeddings.predict(unseen))
    stranger = unseen.head(items).assign(user_id="nobody")
    assert np.allclose(embeddings.predict(stranger), embeddings.predict(stranger.assign(user_id="nobody else")))


def test_the_recommendation_trainer_weighs_a_soft_label_by_inverse_examination():
    rows = pl.DataFrame({"policy": ["explore"] * 4 + ["champion"] * 2, "position": [0, 0, 1, 1, 0, 1],
                         "p_good": [0.8, 0.8, 0.4, 0.4, 0.8, 0.4]})
    weighted, metrics = RecommendationTrainer(min_exploration_rows=2).weigh(rows)
    assert metrics["examination_position_1"] == pytest.approx(0.5)
    # P(good) 0.4 at a slot seen half as often: 0.4 / 0.5 good, 0.6 bad
    assert weighted["weight"].to_list() == pytest.approx([1.0, 1.0, 1.4, 1.4, 1.0, 1.4])
    assert weighted["p_good"].to_list() == pytest.approx([0.8, 0.8, 0.8 / 1.4, 0.8 / 1.4, 0.8, 0.8 / 1.4])


def test_the_examination_curve_is_each_slots_exact_mean_in_any_row_order():
    # a parallel mean's last bit depends on how the rows were split among threads, and the
    # embeddings' fit (not convex) made a different model of the same rows from it
    rng = np.random.default_rng(7)
    rows = pl.DataFrame({"policy": "explore", "position": rng.integers(0, 5, 20_000).astype(np.int32),
                         "p_good": rng.random(20_000) ** 3})
    mean = {p: math.fsum(rows.filter(pl.col("position") == p)["p_good"].to_list())
            / rows.filter(pl.col("position") == p).height for p in range(5)}
    exact = {p: min(1.0, max(0.1, mean[p] / mean[0])) for p in range(5)}
    for _ in range(20):
        assert examination_curve(rows, min_rows=30, floor=0.1) == exact
        assert examination_curve(rows.sample(fraction=1.0, shuffle=True, seed=3), 30, 0.1) == exact


def test_immature_days_never_reach_the_training_set(con, home, config, monkeypatch):
    class DaySpy(SpyTrainer):
        def weigh(self, rows):
            self.days = sorted(set(rows["event_date"].to_list()))
            return self.trainer.weigh(rows)

    spy = DaySpy(training.trainer_for(config.domain("recommendation")))
    monkeypatch.setattr(training, "trainer_for", lambda *args: spy)
    mature_until = AS_OF - timedelta(days=10)
    result = train_candidate(con, home, config, "recommendation", AS_OF, mature_until=mature_until)

    assert spy.days[-1] == mature_until == result.windows.train_end
    (labelled,) = con.execute(
        """SELECT count(*) FROM labels.impression_labels
           WHERE domain = 'recommendation' AND p_good IS NOT NULL AND event_date BETWEEN ? AND ?""",
        [result.windows.train_start, mature_until],
    ).fetchall()[0]
    assert result.n_labelled == labelled
    assert result.metadata()["mature_until"] == mature_until.isoformat()
    run = mlflow.MlflowClient(home.mlflow_tracking_uri).get_run(result.run_id)
    assert run.data.params["mature_until"] == run.data.params["train_end"] == mature_until.isoformat()
