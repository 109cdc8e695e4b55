"""The simulated product: contract-true, reproducible traces drawn from a hidden truth."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pytest

from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.cli import parser
from flywheel_pipeline.config import load_config
from flywheel_pipeline.health import TRAPS
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import baseline_scorer
from flywheel_pipeline.simulation import (
    SimulationSummary,
    simulate,
    simulated_through,
    true_accuracy,
    true_labels,
)
from flywheel_pipeline.simulation.recommendation import Recommendation
from flywheel_pipeline.simulation.world import World

CONFIG = load_config(Path(__file__).resolve().parent.parent / "flywheel.yaml")
START = date(2025, 3, 1)
DAYS = 4
PER_DAY = 600
BAD_ROW_SHARE = 0.03
SLATE_SIZE = {"assistant": 1, "recommendation": 5}
CANDIDATES = {"assistant": 5, "recommendation": 20}
SIGNAL_TYPES = {"rating", "accept", "reject", "edit", "revert", "copy", "reformulate", "abandon",
                "dwell", "click"}


# -- a small, independent reading of docs/events.md ---------------------------------------------

def contract_violation(line: str, domain: str) -> str | None:
    """Why a landing line breaks the event contract, or None when it keeps it."""
    try:
        event = json.loads(line)
    except ValueError:
        return "malformed_json"
    if not isinstance(event, dict):
        return "not_an_object"
    for field in ("event_id", "event_type", "domain", "timestamp", "user_id", "session_id",
                  "interaction_id"):
        if not isinstance(event.get(field), str) or not 1 <= len(event[field]) <= 128:
            return f"bad:{field}"
    if event["domain"] != domain:
        return "domain_mismatch"
    if not re.fullmatch(r"u_[0-9a-f]+", event["user_id"]):
        return "user_id_not_pseudonymous"
    if _parse(event["timestamp"]) > datetime.now(UTC):
        return "future_timestamp"
    check = {"interaction": _interaction_violation, "signal": _signal_violation,
             "outcome": _outcome_violation, "label": _label_violation}.get(event["event_type"])
    return check(event) if check else "bad:event_type"


def _interaction_violation(event: dict) -> str | None:
    if event["policy"] not in {"champion", "explore"} or event["consent"] not in {"granted",
                                                                                 "denied"}:
        return "bad:policy_or_consent"
    if not isinstance(event["model_version"], str) or not isinstance(event["input"], str):
        return "bad:model_version_or_input"
    if not isinstance(event.get("context", {}), dict):
        return "bad:context"
    impressions = event["impressions"]
    if not 1 <= len(impressions) <= 50:
        return "bad:impressions"
    for k, impression in enumerate(impressions):
        if (impression["position"] != k or not isinstance(impression["item_id"], str)
                or not isinstance(impression["content"], str)
                or not 0 < impression["propensity"] <= 1):
            return "bad:impression"
    return None


def _signal_violation(event: dict) -> str | None:
    kind, value = event["signal_type"], event.get("value")
    if kind not in SIGNAL_TYPES:
        return "bad:signal_type"
    if kind == "rating" and not (isinstance(value, int | float) and 1 <= value <= 5):
        return "bad:rating"
    if kind == "dwell" and not (isinstance(value, int | float) and value >= 0):
        return "bad:dwell"
    if kind == "click" and not isinstance(event.get("item_id"), str):
        return "bad:click"
    if kind == "edit" and not isinstance(event.get("text"), str):
        return "bad:edit"
    return None


def _outcome_violation(event: dict) -> str | None:
    if not isinstance(event["name"], str) or not isinstance(event["value"], int | float):
        return "bad:outcome"
    return None


def _label_violation(event: dict) -> str | None:
    if event["verdict"] not in {"good", "bad"} or not isinstance(event["reviewer"], str):
        return "bad:label"
    return None


def _parse(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp)


def read_batches(home: Home, domain: str) -> list[tuple[date, dict | None]]:
    """(batch day, event or None when the line breaks the contract) for every landing line; of the valid lines
    sharing an event id in a batch, the first when they are all the same, none when they differ."""
    rows = []
    for path in sorted((home.landing / domain).rglob("*.jsonl")):
        day = date.fromisoformat(path.stem)
        events = [json.loads(line) if contract_violation(line, domain) is None else None
                  for line in filter(None, path.read_text(encoding="utf-8").split("\n"))]
        copies: dict[str, list[dict]] = {}
        for event in filter(None, events):
            copies.setdefault(event["event_id"], []).append(event)
        seen: set[str] = set()
        for event in events:
            if event is not None:
                same = copies[event["event_id"]]
                if event["event_id"] in seen or any(copy != same[0] for copy in same):
                    event = None  # a repeated line, or one of copies that differ
                else:
                    seen.add(event["event_id"])
            rows.append((day, event))
    return rows


def events_of(home: Home, domain: str) -> list[dict]:
    return [event for _, event in read_batches(home, domain) if event is not None]


def landing_bytes(home: Home) -> dict[str, bytes]:
    return {str(p.relative_to(home.landing)): p.read_bytes()
            for p in sorted(home.landing.rglob("*.jsonl"))}


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Home, SimulationSummary]:
    """Both domains, a few days served by the baselines, with some bad rows."""
    home = Home(tmp_path_factory.mktemp("simulated"))
    summary = simulate(home, CONFIG, START, DAYS, interactions_per_day=PER_DAY,
                       bad_row_share=BAD_ROW_SHARE)
    return home, summary


class AssistantOracle:
    """Reads the hidden truth: 1 for a query's own answers, 0 otherwise."""

    def __init__(self, home: Home, domain: str = "assistant"):
        folder = home.simulator / domain
        queries = pl.read_parquet(folder / "queries.parquet")
        good = pl.read_parquet(folder / "candidates.parquet").filter("good").join(queries,
                                                                                 on="query_id")
        self.good = set(zip(good["text"], good["response_id"]))

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        return np.array([float((q, r) in self.good)
                         for q, r in zip(candidates["input_text"], candidates["item_id"])])


class RecommendationOracle:
    """Reads the hidden truth: each user's true relevance of each item."""

    def __init__(self, home: Home, domain: str = "recommendation"):
        self.world = World.load(home.simulator / domain)
        self.catalogue = Recommendation.open(self.world)

    def predict(self, candidates: pd.DataFrame) -> np.ndarray:
        users = self.world.users
        taste = dict(zip(users["user_id"], users["taste"].to_numpy()))
        index = {item: n for n, item in enumerate(self.catalogue.item_id)}
        tastes = np.stack([taste.get(u, np.zeros(users["taste"].dtype.size))
                           for u in candidates["user_id"]])
        items = np.array([index[i] for i in candidates["item_id"]])
        return self.catalogue.relevance(tastes, items[:, None]).ravel()


# -- tests --------------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_batches(tmp_path: Path) -> None:
    homes = [Home(tmp_path / name) for name in ("a", "b", "c")]
    for home, seed in zip(homes, (3, 3, 4)):
        simulate(home, CONFIG, START, 3, seed=seed, interactions_per_day=200, bad_row_share=0.05)
    first, again, other_seed = (landing_bytes(h) for h in homes)
    assert len([name for name in first if "/labels/" not in name]) == 6
    assert first == again
    assert first != other_seed


def _shifted_back(line: str, days: int) -> str:
    """``line`` with every timestamp (ISO, or unix seconds as some bad rows have it) moved ``days``
    days earlier."""
    def earlier(match: re.Match) -> str:
        moved = datetime.fromisoformat(match.group(0)) - timedelta(days=days)
        return moved.strftime("%Y-%m-%dT%H:%M:%S") + "Z"
    line = re.sub(r'"timestamp":(\d+)', lambda m: f'"timestamp":{int(m.group(1)) - days * 86_400}', line)
    return re.sub(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", earlier, line)


def test_the_same_seed_draws_the_same_world_whatever_date_it_starts(tmp_path: Path) -> None:
    """Randomness is keyed by the day's number in the world, not the calendar: a test's outcome
    cannot depend on the day it runs. Started 400 days apart, the batches differ only in dates."""
    later = START + timedelta(days=400)
    homes = [Home(tmp_path / name) for name in ("start", "later")]
    for home, first in zip(homes, (START, later)):
        simulate(home, CONFIG, first, 3, seed=3, interactions_per_day=200, bad_row_share=0.05)
    early, late = (landing_bytes(home) for home in homes)
    renamed = {name.replace(str(later + timedelta(days=n)), str(START + timedelta(days=n))): lines
               for name, lines in late.items() for n in range(3) if str(later + timedelta(days=n)) in name}
    assert renamed.keys() == early.keys() and len(early) >= 6
    for name, lines in early.items():
        moved = [_shifted_back(line, 400) for line in renamed[name].decode().splitlines()]
        assert moved == lines.decode().splitlines(), name


def test_every_valid_line_keeps_the_contract_and_bad_rows_are_the_rest(simulated) -> None:
    home, summary = simulated
    for domain in ("assistant", "recommendation"):
        rows = read_batches(home, domain)
        broken = sum(event is None for _, event in rows)
        written = [b for b in summary.batches if b.domain == domain]
        assert broken == sum(b.bad_rows for b in written)
        assert len(rows) == sum(b.events + b.bad_rows for b in written)
        assert broken / len(rows) == pytest.approx(BAD_ROW_SHARE, abs=0.01)
        assert {b.interactions for b in written if b.path.parent.name != "labels"} == {PER_DAY}
        assert {b.interactions for b in written if b.path.parent.name == "labels"} == {0}


def test_the_pipeline_quarantines_exactly_the_bad_rows(simulated) -> None:
    home, summary = simulated
    days = [START + timedelta(days=n) for n in range(DAYS)]
    with duckdb.connect() as con:
        for domain in ("assistant", "recommendation"):
            report = accumulate(con, home, CONFIG, domain, days)
            assert report.quarantined == sum(b.bad_rows for b in summary.batches
                                             if b.domain == domain)
            assert len(report.reasons) >= 5


def test_the_users_are_as_many_as_asked_whatever_the_traffic(tmp_path: Path) -> None:
    """By default a world has half as many users as interactions a day (two each); ``users`` sets
    them apart from the traffic: the same 400 interactions a day from 50 users, each seen more."""
    active = {}
    for users in (None, 50):
        home = Home(tmp_path / str(users))
        simulate(home, CONFIG, START, 3, interactions_per_day=400, domains=["recommendation"], users=users)
        interactions = [event for _, event in read_batches(home, "recommendation")
                        if event and event["event_type"] == "interaction"]
        assert World.load(home.simulator / "recommendation").population == (users or 200)
        active[users] = len({event["user_id"] for event in interactions})
    assert active[50] <= len(World.load(tmp_path / "50" / "simulator" / "recommendation").users) < active[None] / 2


def test_no_clean_run_has_bad_rows(tmp_path: Path) -> None:
    home = Home(tmp_path)
    summary = simulate(home, CONFIG, START, 2, interactions_per_day=200)
    assert summary.total_bad_rows == 0
    assert all(event is not None for d in CONFIG.domains for _, event in read_batches(home, d))


def test_no_event_is_timestamped_after_its_batch_day_and_a_few_arrive_late(simulated) -> None:
    home, _ = simulated
    for domain in ("assistant", "recommendation"):
        delivered = [(day, _parse(event["timestamp"]).date())
                     for day, event in read_batches(home, domain) if event is not None]
        assert all(happened <= day for day, happened in delivered)
        late = [day - happened for day, happened in delivered if happened < day]
        assert 0.005 < len(late) / len(delivered) < 0.03
        assert max(late) <= timedelta(days=3)


def test_explicit_feedback_consent_and_reviews_at_their_rates(simulated) -> None:
    home, _ = simulated
    for domain in ("assistant", "recommendation"):
        events = events_of(home, domain)
        interactions = [e for e in events if e["event_type"] == "interaction"]
        rated = {e["interaction_id"] for e in events if e.get("signal_type") == "rating"}
        denied = sum(e["consent"] == "denied" for e in interactions)
        assert 0.01 <= len(rated) / len(interactions) <= 0.03
        assert 0.005 <= denied / len(interactions) <= 0.06


def test_the_audit_sample_comes_back_as_label_events_in_its_own_batch(tmp_path: Path) -> None:
    """A random audit_share of interactions, each shown item judged from the hidden truth, wrong
    reviewer_error of the time, within the review delay; only in ``labels/<day>.jsonl``."""
    home, error, share, n = Home(tmp_path / "audit"), 0.1, 0.05, 3 * 1000
    config = CONFIG.model_copy(update={"domains": {
        d: c.model_copy(update={"audit_share": share}) for d, c in CONFIG.domains.items()}})
    simulate(home, config, START, 3, interactions_per_day=1000, reviewer_error=error,
             review_delay_days=(0.5, 1.0), domains=["assistant"])
    events = events_of(home, "assistant")
    labels = [e for e in events if e["event_type"] == "label"]
    served = {e["interaction_id"]: _parse(e["timestamp"]) for e in events if e["event_type"] == "interaction"}
    assert list((home.landing / "assistant" / "labels").glob("*.jsonl"))
    assert all((p.parent.name == "labels") == (e["event_type"] == "label")
               for p in (home.landing / "assistant").rglob("*.jsonl")
               for e in map(json.loads, p.read_text().splitlines()))
    reviewed = {e["interaction_id"] for e in labels}
    expected, sd = share * n, np.sqrt(n * share * (1 - share))
    # reviews of the last day's second half come after the simulated days: not all delivered
    assert expected - 4 * sd - share * 1000 < len(reviewed) <= expected + 4 * sd
    delays = [(_parse(e["timestamp"]) - served[e["interaction_id"]]).total_seconds() / 86400
              for e in labels if e["interaction_id"] in served]  # some interactions arrive late
    assert 0.5 <= min(delays) and max(delays) <= 1.0
    truth = dict(zip(zip(*true_labels(home, "assistant").select("interaction_id", "item_id")
                         .to_dict(as_series=False).values()), true_labels(home, "assistant")["good"]))
    wrong = np.mean([(e["verdict"] == "good") != truth[e["interaction_id"], e["item_id"]] for e in labels])
    assert abs(wrong - error) < 4 * np.sqrt(error * (1 - error) / len(labels))
    assert len({e["reviewer"] for e in labels}) > 1


def test_every_interaction_logs_its_candidates_with_per_position_propensities(simulated) -> None:
    home, _ = simulated
    for domain, candidates, slate in (("assistant", 5, 1), ("recommendation", 20, 5)):
        for event in (e for e in events_of(home, domain) if e["event_type"] == "interaction"):
            ranked = event["context"]["candidates"]
            assert len(ranked) == candidates and all(len(c["propensities"]) == slate for c in ranked)
            by_item = {c["item_id"]: c["propensities"] for c in ranked}
            for impression in event["impressions"]:  # the shown item's own propensity agrees
                assert by_item[impression["item_id"]][impression["position"]] == pytest.approx(
                    impression["propensity"], abs=1e-6)
            assert np.allclose(np.sum([c["propensities"] for c in ranked], axis=0), 1, atol=1e-4)


def test_outcomes_arrive_hours_to_days_after_their_interaction(simulated) -> None:
    home, _ = simulated
    for domain, name, min_h, max_h in (("assistant", "resolved", 1, 240),
                                       ("recommendation", "purchase", 24, 15 * 24)):
        events = events_of(home, domain)
        served_at = {e["interaction_id"]: _parse(e["timestamp"]) for e in events
                     if e["event_type"] == "interaction"}
        delays_h = [(_parse(e["timestamp"]) - served_at[e["interaction_id"]]).total_seconds() / 3600
                    for e in events if e.get("name") == name and e["interaction_id"] in served_at]
        assert len(delays_h) > 50
        assert min_h <= min(delays_h) and max(delays_h) <= max_h
        assert np.median(delays_h) < max_h / 2  # heavy-tailed: most arrive early


def test_baseline_propensities_are_probabilities(simulated) -> None:
    home, _ = simulated
    for domain in ("assistant", "recommendation"):
        interactions = [e for e in events_of(home, domain) if e["event_type"] == "interaction"]
        explored = sum(e["policy"] == "explore" for e in interactions) / len(interactions)
        assert explored == pytest.approx(0.1, abs=0.03)
        assert {len(e["impressions"]) for e in interactions} == {SLATE_SIZE[domain]}
        propensities = [i["propensity"] for e in interactions for i in e["impressions"]]
        assert all(0 < p <= 1 for p in propensities)
        if domain == "recommendation":  # the uniform baseline: every item equally likely anywhere
            assert set(propensities) == {0.05}


def test_propensities_match_the_policy_of_a_tie_free_scorer(tmp_path: Path) -> None:
    home = Home(tmp_path)
    simulate(home, CONFIG, START, 1, interactions_per_day=50)  # creates the worlds
    oracles = {"assistant": AssistantOracle(home), "recommendation": RecommendationOracle(home)}

    class Tiebreak:
        """The oracle, its ties broken by a tiny per-item amount (item ids end in their number)."""

        def __init__(self, oracle):
            self.oracle = oracle

        def predict(self, candidates: pd.DataFrame) -> np.ndarray:
            number = np.array([int(item.rsplit("_", 1)[1]) for item in candidates["item_id"]])
            return self.oracle.predict(candidates) + number * 1e-6

    simulate(home, CONFIG, START + timedelta(days=1), 2, interactions_per_day=300,
             scorers={d: Tiebreak(o) for d, o in oracles.items()},
             model_versions={"assistant": "7", "recommendation": "oracle"})
    for domain in ("assistant", "recommendation"):
        eps, k = 0.1, CANDIDATES[domain]
        served = [e for e in events_of(home, domain) if e["event_type"] == "interaction"
                  and _parse(e["timestamp"]).date() > START]
        assert {e["model_version"] for e in served} == {"7" if domain == "assistant" else "oracle"}
        top, random_only = round(1 - eps + eps / k, 6), round(eps / k, 6)
        for event in served:
            propensities = {i["propensity"] for i in event["impressions"]}
            if event["policy"] == "champion":
                assert propensities == {top}
            else:
                assert propensities <= {top, random_only}


def test_truth_is_kept_apart_from_the_landing_batches(simulated) -> None:
    home, _ = simulated
    assert not list(home.landing.rglob("*.parquet"))
    assert list((home.simulator / "assistant" / "truth").glob("*.parquet"))
    for domain in ("assistant", "recommendation"):
        labels = true_labels(home, domain)
        assert labels.columns == ["interaction_id", "item_id", "good"]
        assert 0.1 < labels["good"].mean() < 0.7
        events = events_of(home, domain)
        shown = {(e["interaction_id"], i["item_id"]) for e in events
                 if e["event_type"] == "interaction" for i in e["impressions"]}
        assert shown <= set(zip(labels["interaction_id"], labels["item_id"]))
        assert not any("good" in e or "relevance" in e for e in events)


def test_a_scorer_reading_the_truth_beats_the_baseline(simulated) -> None:
    home, _ = simulated
    oracles = {"assistant": AssistantOracle(home), "recommendation": RecommendationOracle(home)}
    for domain, oracle in oracles.items():
        baseline = true_accuracy(home, CONFIG, domain,
                                 baseline_scorer(CONFIG.domain(domain).shape))
        assert 0.2 <= baseline <= 0.6
        assert true_accuracy(home, CONFIG, domain, oracle) == pytest.approx(1.0)


def test_successive_calls_continue_one_world(tmp_path: Path) -> None:
    whole, split = Home(tmp_path / "whole"), Home(tmp_path / "split")
    simulate(whole, CONFIG, START, 6, interactions_per_day=200, bad_row_share=0.02)
    simulate(split, CONFIG, START, 3, interactions_per_day=200, bad_row_share=0.02)
    assert simulated_through(split, "assistant") == START + timedelta(days=2)
    simulate(split, CONFIG, START + timedelta(days=3), 3, interactions_per_day=200,
             bad_row_share=0.02)
    assert landing_bytes(split) == landing_bytes(whole)  # outcomes held back, then delivered
    assert World.load(split.simulator / "assistant").users.equals(
        World.load(whole.simulator / "assistant").users)
    assert true_labels(split, "assistant").equals(true_labels(whole, "assistant"))
    with pytest.raises(ValueError, match="simulated through"):
        simulate(split, CONFIG, START + timedelta(days=5), 1)


def test_users_return_arrive_and_churn(simulated) -> None:
    home, _ = simulated
    for domain in ("assistant", "recommendation"):
        events = events_of(home, domain)
        users_by_day: dict[date, set[str]] = {}
        sessions: Counter[str] = Counter()
        for event in events:
            if event["event_type"] == "interaction":
                day = _parse(event["timestamp"]).date()
                users_by_day.setdefault(day, set()).add(event["user_id"])
                sessions[event["session_id"]] += 1
        days = sorted(users_by_day)
        seen_before = set().union(*(users_by_day[d] for d in days[:-1]))
        last = users_by_day[days[-1]]
        assert len(last & users_by_day[days[0]]) > 0.1 * len(last)  # returning users
        assert last - seen_before  # newcomers
        assert max(sessions.values()) >= 24  # a bot's session
        assert np.mean(list(sessions.values())) > 2
        churned = World.load(home.simulator / domain).users.filter(pl.col("last_day") < days[-1])
        last_day = dict(zip(churned["user_id"], churned["last_day"]))
        assert last_day
        assert all(_parse(e["timestamp"]).date() <= last_day[e["user_id"]] for e in events
                   if e["user_id"] in last_day and e["event_type"] != "label")


# -- trap injection (simulation/traps.py) -------------------------------------------------------

TRAP_DAYS, TRAP_PER_DAY = 4, 200


def simulate_trapped(home: Home, domain: str, traps: tuple[str, ...] = (),
                     days: int = TRAP_DAYS) -> list[tuple[date, dict]]:
    """One domain simulated with ``traps`` on; (batch day, event) for every landing line."""
    simulate(home, CONFIG, START, days, interactions_per_day=TRAP_PER_DAY, domains=[domain],
             traps=traps)
    return [(day, event) for day, event in read_batches(home, domain) if event is not None]


def of_type(delivered: list[tuple[date, dict]], event_type: str) -> list[dict]:
    return [event for _, event in delivered if event["event_type"] == event_type]


def test_no_trap_leaves_the_batches_as_they_were(tmp_path: Path) -> None:
    """``traps=()`` is today's simulator; a trap changes what the product does, not the world."""
    plain, none, trapped = (Home(tmp_path / name) for name in ("plain", "none", "trapped"))
    simulate(plain, CONFIG, START, 2, interactions_per_day=TRAP_PER_DAY, bad_row_share=0.02)
    simulate(none, CONFIG, START, 2, interactions_per_day=TRAP_PER_DAY, bad_row_share=0.02,
             traps=())
    assert landing_bytes(plain) == landing_bytes(none)
    simulate(trapped, CONFIG, START, 2, interactions_per_day=TRAP_PER_DAY, bad_row_share=0.02,
             domains=["recommendation"], traps=[t for t in TRAPS if t != "exposure_bias"])
    assert landing_bytes(trapped) != {name: text for name, text in landing_bytes(plain).items()
                                      if name.startswith("recommendation/")}
    world = World.load(plain.simulator / "recommendation")
    assert World.load(trapped.simulator / "recommendation").users.equals(world.users)
    served = true_labels(plain, "recommendation")["interaction_id"].unique().sort()
    assert true_labels(trapped, "recommendation")["interaction_id"].unique().sort().equals(served)


def test_an_unknown_or_misplaced_trap_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown trap overfitting: the traps are exposure_bias"):
        simulate(Home(tmp_path), CONFIG, START, 1, traps=["overfitting"])
    with pytest.raises(ValueError, match="diversity trap applies only to domains of shape "
                                         "recommendation; assistant has shape assistant"):
        simulate(Home(tmp_path), CONFIG, START, 1, traps=["diversity"])
    with pytest.raises(ValueError, match="the leakage trap's strength is 1.5: it must be in"):
        simulate(Home(tmp_path), CONFIG, START, 1, traps={"leakage": 1.5})
    args = parser().parse_args(["simulate", "--domain", "recommendation", "--trap", "leakage",
                                "--trap", "diversity=0.25"])
    assert (args.domain, args.trap) == (["recommendation"], [("leakage", 1.0), ("diversity", 0.25)])
    for bad in ("overfitting", "leakage=0", "leakage=strong"):
        with pytest.raises(SystemExit):
            parser().parse_args(["simulate", "--trap", bad])


def test_exposure_bias_never_explores(tmp_path: Path) -> None:
    """Every interaction is the champion's; propensities say so (0 for what it never shows)."""
    for traps in ((), ("exposure_bias",)):
        interactions = of_type(simulate_trapped(Home(tmp_path / str(traps)), "assistant", traps),
                               "interaction")
        explored = np.mean([e["policy"] == "explore" for e in interactions])
        propensities = np.array([[c["propensities"][0] for c in e["context"]["candidates"]]
                                 for e in interactions])
        assert np.allclose(propensities.sum(axis=1), 1, atol=1e-4)
        if traps:
            assert explored == 0 and (propensities == 0).any()
        else:
            assert explored > 0.05 and propensities.min() >= 0.1 / 5 - 1e-6


def test_survivorship_drops_exactly_the_reactions_of_users_who_soon_churn(tmp_path: Path) -> None:
    """The honest batches less every signal and outcome of an interaction whose user churns within
    7 days of it (the world's hidden last_day); the interaction itself still comes."""
    honest = simulate_trapped(Home(tmp_path / "honest"), "recommendation")
    home = Home(tmp_path / "trapped")
    trapped = simulate_trapped(home, "recommendation", ("survivorship",))
    world = World.load(home.simulator / "recommendation")
    last_day = dict(zip(world.users["user_id"], world.users["last_day"]))

    def churns_soon(event: dict) -> bool:
        served = world.epoch + timedelta(days=int(event["interaction_id"].split("_")[2].removeprefix("d")))
        return last_day.get(event["user_id"], date.max) < served + timedelta(days=7)

    dropped = {e["event_id"] for _, e in honest
               if e["event_type"] in ("signal", "outcome") and churns_soon(e)}
    assert 0.05 < len(dropped) / len(honest) < 0.3
    assert any(churns_soon(e) for e in of_type(trapped, "interaction"))
    assert trapped == [(day, e) for day, e in honest if e["event_id"] not in dropped]


def test_label_delay_backdates_outcomes_that_arrive_days_later(tmp_path: Path) -> None:
    """Outcomes claim no delay (the interaction's timestamp) yet come days later, within the
    lateness limit; accumulation still puts each with its interaction."""
    home, days = Home(tmp_path), 9
    delivered = simulate_trapped(home, "assistant", ("label_delay",), days=days)
    served_at = {e["interaction_id"]: e["timestamp"] for e in of_type(delivered, "interaction")}
    outcomes = [(day, e) for day, e in delivered if e["event_type"] == "outcome"]
    assert len(outcomes) > 100
    assert all(e["timestamp"] == served_at[e["interaction_id"]] for _, e in outcomes)
    late = [(day - _parse(e["timestamp"]).date()).days for day, e in outcomes]
    assert min(late) >= 1 and max(late) <= CONFIG.max_lateness_days
    assert np.median(late) >= 5
    dates = [START + timedelta(days=n) for n in range(days)]
    with duckdb.connect() as con:
        assert accumulate(con, home, CONFIG, "assistant", dates).quarantined == 0
        orphans, attached = con.execute("""
            SELECT count(*) FILTER (i.interaction_id IS NULL OR i.event_date <> o.event_date),
                   count(*)
            FROM raw.outcomes o LEFT JOIN raw.interactions i USING (interaction_id)""").fetchone()
    assert orphans == 0 and attached == len(outcomes)


def test_leakage_copies_the_outcome_into_a_feature_known_once_it_arrived(tmp_path: Path) -> None:
    """context.features.outcome_signal is the outcome; the interaction comes in the outcome's
    batch (without one, the next day's); the serving scorer never sees the feature."""
    seen: list[str] = []

    class Recording:
        def predict(self, candidates: pd.DataFrame) -> np.ndarray:
            seen.extend(candidates["context_features"].unique())
            return np.zeros(len(candidates))

    home = Home(tmp_path)
    simulate(home, CONFIG, START, 6, interactions_per_day=TRAP_PER_DAY, domains=["assistant"],
             traps=["leakage"], scorers={"assistant": Recording()})
    delivered = [(day, e) for day, e in read_batches(home, "assistant") if e is not None]
    outcome = {e["interaction_id"]: (day, e["value"]) for day, e in delivered
               if e["event_type"] == "outcome"}
    interactions = [(day, e) for day, e in delivered if e["event_type"] == "interaction"]
    with_outcome = [(day, e) for day, e in interactions if e["interaction_id"] in outcome]
    assert len(with_outcome) > 100 and set(seen) == {"{}"}
    assert all(e["context"]["features"]["outcome_signal"] == outcome[e["interaction_id"]][1]
               for _, e in with_outcome)
    same_batch = np.mean([day == outcome[e["interaction_id"]][0] for day, e in with_outcome])
    next_day = np.mean([day == _parse(e["timestamp"]).date() + timedelta(days=1)
                        for day, e in interactions if e["interaction_id"] not in outcome])
    assert same_batch > 0.95 and next_day > 0.9


def test_self_consumption_hears_only_the_models_own_choices(tmp_path: Path) -> None:
    """The honest batches less every reaction to the exploration slice (which is still served and
    logged) and every human review."""
    home = Home(tmp_path / "honest")
    honest = simulate_trapped(home, "recommendation")
    trapped_home = Home(tmp_path / "trapped")
    trapped = simulate_trapped(trapped_home, "recommendation", ("self_consumption",))
    waiting = [json.loads(line)["event"] for line in
               (home.simulator / "recommendation" / "outbox.jsonl").read_text().splitlines()]
    explored = {e["interaction_id"] for e in [*of_type(honest, "interaction"), *waiting]
                if e["event_type"] == "interaction" and e["policy"] == "explore"}
    dropped = {e["event_id"] for _, e in honest if e["event_type"] == "label" or (
        e["event_type"] in ("signal", "outcome") and e["interaction_id"] in explored)}
    assert len(explored) > 30 and of_type(honest, "label") and len(dropped) > 100
    assert trapped == [(day, e) for day, e in honest if e["event_id"] not in dropped]
    assert not (trapped_home.landing / "recommendation" / "labels").exists()


def test_diversity_collapses_the_champion_onto_a_head_of_ten_items(tmp_path: Path) -> None:
    """Champion slates only from 10 items; exploration uniform over the request's own
    candidates, with exact propensities; the loop still accepts every line."""
    for traps in ((), ("diversity",)):
        home = Home(tmp_path / str(traps))
        interactions = of_type(simulate_trapped(home, "recommendation", traps), "interaction")
        shown = {p: Counter(i["item_id"] for e in interactions if e["policy"] == p
                            for i in e["impressions"]) for p in ("champion", "explore")}
        for event in interactions:
            ranked = event["context"]["candidates"]
            assert np.allclose(np.sum([c["propensities"] for c in ranked], axis=0), 1, atol=1e-4)
            by_item = {c["item_id"]: c["propensities"] for c in ranked}
            assert all(by_item[i["item_id"]][i["position"]] == pytest.approx(i["propensity"])
                       for i in event["impressions"])
        if traps:
            assert len(shown["champion"]) == 10 and not shown["champion"].keys() & shown["explore"]
            assert len(shown["explore"]) > 100
            assert {len(e["context"]["candidates"]) for e in interactions} == {30}
            dates = [START + timedelta(days=n) for n in range(TRAP_DAYS)]
            with duckdb.connect() as con:
                assert accumulate(con, home, CONFIG, "recommendation", dates).quarantined == 0
        else:
            assert len(shown["champion"]) > 100


def test_a_trap_at_strength_one_is_the_named_trap_and_a_weaker_one_loses_about_its_share(tmp_path: Path) -> None:
    """``{"survivorship": 1.0}`` writes the same batches as ``["survivorship"]``; at 0.5 about half of
    the reactions the full trap loses are lost, and nothing else."""
    honest = simulate_trapped(Home(tmp_path / "honest"), "recommendation")
    full = simulate_trapped(Home(tmp_path / "full"), "recommendation", ("survivorship",))
    simulate(Home(tmp_path / "one"), CONFIG, START, TRAP_DAYS, interactions_per_day=TRAP_PER_DAY,
             domains=["recommendation"], traps={"survivorship": 1.0})
    assert landing_bytes(Home(tmp_path / "one")) == landing_bytes(Home(tmp_path / "full"))
    simulate(Home(tmp_path / "half"), CONFIG, START, TRAP_DAYS, interactions_per_day=TRAP_PER_DAY,
             domains=["recommendation"], traps={"survivorship": 0.5})
    half = {e["event_id"] for _, e in read_batches(Home(tmp_path / "half"), "recommendation") if e}
    lost_by_full = {e["event_id"] for _, e in honest} - {e["event_id"] for _, e in full}
    lost_by_half = {e["event_id"] for _, e in honest} - half
    assert len(lost_by_full) > 200 and lost_by_half < lost_by_full
    assert 0.4 < len(lost_by_half) / len(lost_by_full) < 0.6


def test_vocal_minority_hears_one_segment_and_loses_most_of_the_others(tmp_path: Path) -> None:
    """Every interaction comes; segment s0 sends all its reactions, the others about a fifth of theirs."""
    honest = simulate_trapped(Home(tmp_path / "honest"), "recommendation")
    trapped = simulate_trapped(Home(tmp_path / "trapped"), "recommendation", ("vocal_minority",))
    segment = {e["interaction_id"]: e["context"]["segment"] for e in of_type(honest, "interaction")}
    kept = {e["event_id"] for _, e in trapped}
    assert {e["event_id"] for e in of_type(honest, "interaction")} <= kept
    reactions = [e for _, e in honest if e["event_type"] in ("signal", "outcome") and e["interaction_id"] in segment]
    share = {vocal: np.mean([e["event_id"] in kept for e in reactions if (segment[e["interaction_id"]] == "s0") == vocal])
             for vocal in (True, False)}
    assert share[True] == 1.0 and 0.1 < share[False] < 0.3


def clicks_and_purchases(home: Home) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(interaction_id, item_id) of every click and every purchase the recommendation product sent (written, or
    waiting in the outbox for a later day)."""
    waiting = [json.loads(line)["event"] for line in
               (home.simulator / "recommendation" / "outbox.jsonl").read_text().splitlines()]
    events = [e for _, e in read_batches(home, "recommendation") if e] + waiting
    pairs = {kind: {(e["interaction_id"], e["item_id"]) for e in events
                    if e.get("signal_type", e.get("name")) == kind} for kind in ("click", "purchase")}
    return pairs["click"], pairs["purchase"]


@pytest.mark.parametrize("trap", ["popularity", "engagement"])
def test_popularity_and_engagement_draw_clicks_but_not_purchases(tmp_path: Path, trap: str) -> None:
    """The same slates; every honest click is still there, the extra ones only on the day's most shown
    items (popularity) or on electronics (engagement); the purchases are exactly the honest ones."""
    honest_home, trapped_home = Home(tmp_path / "honest"), Home(tmp_path / "trapped")
    simulate_trapped(honest_home, "recommendation")
    simulate_trapped(trapped_home, "recommendation", (trap,))
    (honest_clicks, honest_purchases), (clicks, purchases) = map(clicks_and_purchases, (honest_home, trapped_home))
    assert purchases == honest_purchases and honest_clicks < clicks
    extra = {item for _, item in clicks - honest_clicks}
    if trap == "engagement":
        catalogue = pl.read_parquet(trapped_home.simulator / "recommendation" / "items.parquet")
        electronics = set(catalogue.filter(pl.col("category") == "electronics")["item_id"])
        assert len(clicks - honest_clicks) > 50 and extra <= electronics
    else:
        shown = true_labels(trapped_home, "recommendation").with_columns(
            day=pl.col("interaction_id").str.extract(r"_d(\d+)_"))
        counts = shown.group_by("day", "item_id").len()
        head = counts.filter(pl.col("len") >= pl.col("len").sort(descending=True).get(29).over("day"))
        day_of = dict(shown.select("interaction_id", "day").unique().iter_rows())
        in_head = set(head.select("day", "item_id").iter_rows())
        assert len(clicks - honest_clicks) > 50
        assert all((day_of[i], item) in in_head for i, item in clicks - honest_clicks)


def test_mislogged_propensity_serves_the_same_slates_and_logs_a_stale_exploration_share(tmp_path: Path) -> None:
    """The same interactions and slates; each candidate's logged chances still sum to 1 per position, but as if
    the product explored 0.55 as often (1 - 0.9 x 0.5): an explored item the champion would not have shown is
    logged at 0.55 of exploration's chance, exploration share / candidates (a champion without ties: one that ties every item
    shows each with the same chance whatever it believes)."""
    class ByItem:
        def predict(self, candidates: pd.DataFrame) -> np.ndarray:
            return candidates["item_id"].str.removeprefix("item_").astype(float).to_numpy()

    for name, traps in (("honest", {}), ("trapped", {"mislogged_propensity": 0.5})):
        simulate(Home(tmp_path / name), CONFIG, START, TRAP_DAYS, interactions_per_day=TRAP_PER_DAY,
                 domains=["recommendation"], traps=traps, scorers={"recommendation": ByItem()})
    honest, trapped = (of_type([(d, e) for d, e in read_batches(Home(tmp_path / name), "recommendation") if e],
                               "interaction") for name in ("honest", "trapped"))
    slates = {e["interaction_id"]: [i["item_id"] for i in e["impressions"]] for e in honest}
    assert {e["interaction_id"]: [i["item_id"] for i in e["impressions"]] for e in trapped} == slates
    share = CONFIG.domain("recommendation").exploration_share
    lowest = min(i["propensity"] for e in trapped if e["policy"] == "explore" for i in e["impressions"])
    assert lowest == pytest.approx(share * 0.55 / 20, rel=1e-3)
    assert min(i["propensity"] for e in honest if e["policy"] == "explore"
               for i in e["impressions"]) == pytest.approx(share / 20, rel=1e-3)
    for event in trapped:
        assert np.allclose(np.sum([c["propensities"] for c in event["context"]["candidates"]], axis=0), 1, atol=1e-4)
