"""Simulator scenarios (simulation/scenarios.py): the world changes on purpose from a given day on."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from flywheel_pipeline.cli import parser
from flywheel_pipeline.config import load_config
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import baseline_scorer
from flywheel_pipeline.simulation import simulate, true_accuracy, true_accuracy_on, true_labels
from flywheel_pipeline.simulation.recommendation import ITEMS, Recommendation
from flywheel_pipeline.simulation.scenarios import NEW_ITEM_SHARE, NEW_ITEMS, SCENARIOS
from flywheel_pipeline.simulation.world import World
from tests.test_simulation import AssistantOracle

CONFIG = load_config(Path(__file__).resolve().parent.parent / "flywheel.yaml")
START = date(2025, 3, 1)
DAYS, SHIFT, PER_DAY = 4, 2, 300   # the world changes on the third day
SHIFT_DAY = START + timedelta(days=SHIFT)
BEFORE, AFTER = SHIFT_DAY - timedelta(days=1), SHIFT_DAY
MIN_DROP = 0.02  # the regression the monitor must detect


def run(home: Home, scenario: str | None, domains: list[str], days: int = DAYS, seed: int = 7,
        **options) -> None:
    simulate(home, CONFIG, START, days, seed=seed, interactions_per_day=PER_DAY, domains=domains,
             scenario=scenario, scenario_day=SHIFT if scenario else None, **options)


def landing(home: Home, domain: str, days: list[date] | None = None) -> dict[str, bytes]:
    files = sorted((home.landing / domain).rglob("*.jsonl"))
    return {str(f.relative_to(home.landing)): f.read_bytes() for f in files
            if days is None or any(day.isoformat() in f.name for day in days)}


class AssistantBefore(AssistantOracle):
    """Perfect before the change: reads the hidden truth as the world was created."""


class RecommendationBefore:
    """Perfect before the change: each user's relevance of each item as the world was created;
    an item it never saw scores 0 (as a popularity model would)."""

    def __init__(self, home: Home):
        self.world = World.load(home.simulator / "recommendation")
        self.catalogue = Recommendation.open(self.world)

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        users = self.world.users
        taste = dict(zip(users["user_id"], users["taste"].to_numpy()))
        index = {item: n for n, item in enumerate(self.catalogue.item_id[:ITEMS])}
        tastes = np.stack([taste[u] for u in candidates["user_id"]])
        items = np.array([index.get(i, 0) for i in candidates["item_id"]])
        seen = np.array([i in index for i in candidates["item_id"]])
        return np.where(seen, self.catalogue.relevance(tastes, items[:, None]).ravel(), 0.0)


BEFORE_MODELS = {"assistant": AssistantBefore, "recommendation": RecommendationBefore}


@pytest.fixture(scope="module")
def shifted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Home]:
    """Each scenario (and none) over the same seed: both domains, new_items and majority_trend
    recommendation only."""
    homes = {}
    for scenario in (None, *SCENARIOS):
        home = Home(tmp_path_factory.mktemp(scenario or "plain"))
        run(home, scenario, ["recommendation"] if scenario in ("new_items", "majority_trend")
            else ["assistant", "recommendation"])
        homes[scenario or "plain"] = home
    return homes


def test_a_day_before_the_change_is_untouched(shifted) -> None:
    plain = shifted["plain"]
    before = [START + timedelta(days=n) for n in range(SHIFT)]
    for scenario in ("preference_shift", "new_items"):
        home = shifted[scenario]
        domains = ["recommendation"] if scenario == "new_items" else ["assistant", "recommendation"]
        for domain in domains:
            assert landing(home, domain, before) == landing(plain, domain, before)
            assert landing(home, domain) != landing(plain, domain)
            truth, untouched = true_labels(home, domain), true_labels(plain, domain)
            stamp = "|".join(f"d{n:04d}" for n in range(SHIFT))
            early = pl.col("interaction_id").str.contains(stamp)
            assert truth.filter(early).equals(untouched.filter(early))
            assert World.load(home.simulator / domain).users.equals(
                World.load(plain.simulator / domain).users)
            model = BEFORE_MODELS[domain](home)
            assert true_accuracy_on(home, CONFIG, domain, model, BEFORE) == pytest.approx(
                true_accuracy_on(plain, CONFIG, domain, BEFORE_MODELS[domain](plain), BEFORE))


@pytest.mark.parametrize("domain", ["assistant", "recommendation"])
def test_preference_shift_makes_a_model_perfect_before_truly_worse(shifted, domain) -> None:
    home = shifted["preference_shift"]
    model = BEFORE_MODELS[domain](home)
    before = true_accuracy_on(home, CONFIG, domain, model, BEFORE)
    after = true_accuracy_on(home, CONFIG, domain, model, AFTER)
    assert before == pytest.approx(1.0)
    assert before - after >= MIN_DROP
    # measured at seed 7: assistant 1.000 -> 0.665, recommendation 1.000 -> 0.884
    assert before - after == pytest.approx({"assistant": 0.335, "recommendation": 0.116}[domain],
                                           abs=0.01)
    assert true_accuracy_on(home, CONFIG, domain, model, AFTER + timedelta(days=30)) == after
    assert true_accuracy(home, CONFIG, domain, model) == after  # the last simulated day's truth
    # the recorded truth changed on the day for the impressions the scenario names, only then
    truth = pl.concat([pl.read_parquet(f) for f in
                       sorted((home.simulator / domain / "truth").glob("*.parquet"))],
                      how="diagonal")
    changed = truth.filter(pl.col("scenario"))
    assert len(changed) and changed["interaction_id"].str.contains(f"d{SHIFT:04d}|d{SHIFT + 1:04d}").all()
    record = json.loads((home.simulator / domain / "scenario.json").read_text())
    assert (record["name"], record["day"]) == ("preference_shift", SHIFT_DAY.isoformat())
    if domain == "assistant":
        assert 1 / 3 <= record["moved_share"] <= 1 / 3 + 0.11
    else:
        assert len(record["swapped_segments"]) == 2
        # the users of the swapped segments now have the other segment's preferences
        day = truth.filter(pl.col("interaction_id").str.contains(f"d{SHIFT:04d}"))
        assert day["scenario"].mean() == pytest.approx(1 / 3, abs=0.1)


def test_new_items_enter_the_candidates_at_the_planned_share(shifted) -> None:
    home = shifted["new_items"]
    record = json.loads((home.simulator / "recommendation" / "scenario.json").read_text())
    new = set(record["new_items"])
    assert len(new) == NEW_ITEMS and not new & set(pl.read_parquet(
        home.simulator / "recommendation" / "items.parquet")["item_id"])
    by_day: dict[date, list[float]] = {}
    for path in sorted((home.landing / "recommendation").glob("*.jsonl")):
        day = date.fromisoformat(path.stem)
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event.get("event_type") == "interaction":
                shown = [i["item_id"] in new for i in event["impressions"]]
                ranked = [c["item_id"] in new for c in event["context"]["candidates"]]
                by_day.setdefault(day, []).append((np.mean(shown), np.mean(ranked)))
    for day, shares in sorted(by_day.items()):
        shown, ranked = np.mean(shares, axis=0)
        if day < SHIFT_DAY:
            assert shown == ranked == 0
        else:  # the baseline serves at random: impressions follow the candidates
            assert ranked == pytest.approx(NEW_ITEM_SHARE, abs=0.02)
            assert shown == pytest.approx(NEW_ITEM_SHARE, abs=0.03)
    model = RecommendationBefore(home)
    before = true_accuracy_on(home, CONFIG, "recommendation", model, BEFORE)
    after = true_accuracy_on(home, CONFIG, "recommendation", model, AFTER)
    assert before == pytest.approx(1.0)
    assert before - after >= MIN_DROP
    assert before - after == pytest.approx(0.308, abs=0.01)  # measured at seed 7: 1.000 -> 0.692
    # some new items are attractive: the truth knows it, the old catalogue never will
    truth = true_labels(home, "recommendation").filter(pl.col("item_id").is_in(list(new)))
    assert truth["good"].mean() > true_labels(home, "recommendation").filter(
        ~pl.col("item_id").is_in(list(new)))["good"].mean()


def test_stale_holdout_reverses_a_fad_on_the_day_after_the_held_out_window(shifted) -> None:
    """By construction: a model fitted and held out inside the fad beats the one fitted before it
    on the held-out days, and is truly worse than it from the day on (the truth before the fad)."""
    home, plain = shifted["stale_holdout"], shifted["plain"]
    for domain in ("assistant", "recommendation"):
        champion = BEFORE_MODELS[domain](home)   # fitted before the fad: the original truth
        candidate = FadModel(home, domain)       # fitted inside the fad: the truth of BEFORE
        held_out = [true_accuracy_on(home, CONFIG, domain, m, BEFORE) for m in (candidate, champion)]
        live = [true_accuracy_on(home, CONFIG, domain, m, AFTER) for m in (candidate, champion)]
        assert held_out[0] == pytest.approx(1.0) and held_out[0] - held_out[1] >= MIN_DROP
        assert live[1] == pytest.approx(1.0) and live[1] - live[0] >= MIN_DROP
        # the days from the day on are the world without a scenario
        after = [START + timedelta(days=n) for n in range(SHIFT, DAYS)]
        assert landing(home, domain, after) != {}
        stamp = "|".join(f"d{n:04d}" for n in range(SHIFT, DAYS))
        late = pl.col("interaction_id").str.contains(stamp)
        assert true_labels(home, domain).filter(late).equals(true_labels(plain, domain).filter(late))


class FadModel:
    """A model perfect inside the fad: reads the scenario's shifted truth of the day before."""

    def __init__(self, home: Home, domain: str):
        self.home, self.domain = home, domain
        self.world = World.load(home.simulator / domain)

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        if self.domain == "assistant":
            from flywheel_pipeline.simulation.assistant import Assistant
            product = Assistant.open(self.world)
            good, _ = product.truth_on(BEFORE)
            text = {t: q for q, t in enumerate(product.query_text.tolist())}
            slot = {(q, product.response_id[r]): good[q, k]
                    for q, row in enumerate(product.slots) for k, r in enumerate(row)}
            return np.array([float(slot[(text[q], r)])
                             for q, r in zip(candidates["input_text"], candidates["item_id"])])
        product = Recommendation.open(self.world)
        users = self.world.users
        taste = dict(zip(users["user_id"], users["taste"].to_numpy()))
        segment = dict(zip(users["user_id"], users["segment"]))
        tastes = product._tastes(BEFORE, np.stack([taste[u] for u in candidates["user_id"]]),
                                 np.array([segment[u] for u in candidates["user_id"]]))
        index = {item: n for n, item in enumerate(product.item_id)}
        items = np.array([index[i] for i in candidates["item_id"]])
        return product.relevance(tastes, items[:, None]).ravel()


def test_the_same_seed_gives_the_same_world(tmp_path: Path, shifted) -> None:
    again, other = Home(tmp_path / "again"), Home(tmp_path / "other")
    run(again, "new_items", ["recommendation"])
    run(other, "new_items", ["recommendation"], seed=8)
    home = shifted["new_items"]
    assert landing(again, "recommendation") == landing(home, "recommendation")
    for name in ("scenario.json", "new_items.parquet", "world.json"):
        assert (again.simulator / "recommendation" / name).read_bytes() == (
            home.simulator / "recommendation" / name).read_bytes()
    assert true_labels(again, "recommendation").equals(true_labels(home, "recommendation"))
    assert landing(other, "recommendation") != landing(home, "recommendation")


def test_a_continued_world_keeps_its_scenario(tmp_path: Path, shifted) -> None:
    split = Home(tmp_path / "split")
    run(split, "preference_shift", ["assistant"], days=1)
    simulate(split, CONFIG, START + timedelta(days=1), DAYS - 1, interactions_per_day=PER_DAY,
             domains=["assistant"])  # not named again: the world lives through it
    assert landing(split, "assistant") == landing(shifted["preference_shift"], "assistant")
    late = Home(tmp_path / "late")  # chosen later, before its day: the same world
    run(late, None, ["assistant"], days=1)
    simulate(late, CONFIG, START + timedelta(days=1), DAYS - 1, interactions_per_day=PER_DAY,
             domains=["assistant"], scenario="preference_shift", scenario_day=SHIFT_DAY)
    assert landing(late, "assistant") == landing(shifted["preference_shift"], "assistant")
    with pytest.raises(ValueError, match="already lives through preference_shift"):
        simulate(late, CONFIG, START + timedelta(days=DAYS), 1, domains=["assistant"],
                 scenario="stale_holdout", scenario_day=DAYS + 5)
    simulated = Home(tmp_path / "simulated")
    run(simulated, None, ["assistant"], days=2)
    with pytest.raises(ValueError, match="would change 2025-03-02, already simulated"):
        simulate(simulated, CONFIG, START + timedelta(days=2), 1, domains=["assistant"],
                 scenario="preference_shift", scenario_day=1)


def test_an_unknown_or_misplaced_scenario_is_a_clear_error(tmp_path: Path) -> None:
    home = Home(tmp_path)
    with pytest.raises(ValueError, match="unknown scenario drift: the scenarios are preference_shift"):
        simulate(home, CONFIG, START, 1, scenario="drift", scenario_day=1)
    with pytest.raises(ValueError, match="new_items scenario applies only to domains of shape "
                                         "recommendation; assistant has shape assistant"):
        simulate(home, CONFIG, START, 1, scenario="new_items", scenario_day=1)
    with pytest.raises(ValueError, match="needs a day"):
        simulate(home, CONFIG, START, 1, scenario="preference_shift")
    assert not home.landing.exists() or not any(home.landing.rglob("*.jsonl"))


def test_the_cli_selects_a_scenario_by_name_and_day() -> None:
    args = parser().parse_args(["simulate", "--scenario", "stale_holdout", "--scenario-day", "35"])
    assert (args.scenario, args.scenario_day) == ("stale_holdout", 35)
    args = parser().parse_args(["simulate", "--scenario", "new_items",
                                "--scenario-day", "2025-04-01"])
    assert args.scenario_day == date(2025, 4, 1)
    with pytest.raises(SystemExit):
        parser().parse_args(["simulate", "--scenario", "drift", "--scenario-day", "1"])


def test_the_baseline_keeps_serving_through_every_scenario(shifted) -> None:
    for scenario in SCENARIOS:
        home = shifted[scenario]
        for domain in ("assistant", "recommendation"):
            if (home.simulator / domain).exists():
                value = true_accuracy_on(home, CONFIG, domain,
                                         baseline_scorer(CONFIG.domain(domain).shape), AFTER)
                assert 0.1 <= value <= 0.6


def test_a_groups_truth_moves_only_where_its_users_tastes_moved(shifted) -> None:
    """true_accuracy_on per segment (the truth of a group, docs/fairness.md): the preference shift
    swaps two segments' tastes; a model perfect before it stays perfect on every other segment."""
    home = shifted["preference_shift"]
    model = RecommendationBefore(home)
    swapped = json.loads((home.simulator / "recommendation" / "scenario.json").read_text())["swapped_segments"]
    for segment in (f"s{n}" for n in range(6)):
        before = true_accuracy_on(home, CONFIG, "recommendation", model, BEFORE, segment=segment)
        after = true_accuracy_on(home, CONFIG, "recommendation", model, AFTER, segment=segment)
        assert before == pytest.approx(1.0)
        assert (after < 0.9) if segment in swapped else after == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no user of segment 's9'"):
        true_accuracy_on(home, CONFIG, "recommendation", model, AFTER, segment="s9")
    with pytest.raises(ValueError, match="carry no segment"):
        true_accuracy_on(home, CONFIG, "assistant", AssistantBefore(home), AFTER, segment="s0")


def test_majority_trend_moves_every_group_but_the_minority(shifted) -> None:
    home = shifted["majority_trend"]
    model = RecommendationBefore(home)
    record = json.loads((home.simulator / "recommendation" / "scenario.json").read_text())
    minority = record["minority_segment"]
    assert np.linalg.norm(record["trend"]) == pytest.approx(2.0)
    for segment in (f"s{n}" for n in range(6)):
        after = true_accuracy_on(home, CONFIG, "recommendation", model, AFTER, segment=segment)
        assert after == pytest.approx(1.0) if segment == minority else after < 0.95
    assert true_accuracy_on(home, CONFIG, "recommendation", model, BEFORE) == pytest.approx(1.0)
