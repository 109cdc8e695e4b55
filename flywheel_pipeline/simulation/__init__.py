"""The simulated product: realistic production traces for flywheel, drawn from a hidden truth.

``simulate`` writes one landing batch a day per domain in the event contract (docs/events.md),
served by the model it is given, so the loop can close. The world (users, queries, items) and the
truth behind every impression stay under ``Home.simulator``, which the pipeline never reads; only
scoring code (demo, benchmarks, tests) asks ``true_accuracy`` (``true_accuracy_on`` a given day,
under the world's scenario: simulation/scenarios.py) and ``true_labels``. The same seed
and inputs give byte-identical batches, and successive calls continue the same world.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import polars as pl

from flywheel_pipeline.batches import LABEL_BATCHES
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import Scorer, baseline_scorer
from flywheel_pipeline.simulation import scenarios, truth
from flywheel_pipeline.simulation.assistant import Assistant
from flywheel_pipeline.simulation.delivery import Outbox, write_batch
from flywheel_pipeline.simulation.recommendation import Recommendation
from flywheel_pipeline.simulation.scenarios import SCENARIOS, STALE_SPAN_DAYS
from flywheel_pipeline.simulation.serving import Audit, Holdback, Policy, Product
from flywheel_pipeline.simulation.traps import Traps
from flywheel_pipeline.simulation.world import Stream, World

__all__ = [
    "SCENARIOS",
    "DayBatch",
    "Holdback",
    "SimulationSummary",
    "label_batch",
    "scenario_details",
    "simulate",
    "simulated_through",
    "true_accuracy",
    "true_accuracy_on",
    "true_labels",
]

PRODUCTS: dict[str, Callable[[World], Product]] = {
    "assistant": Assistant.open,
    "recommendation": Recommendation.open,
}
DAILY_STREAMS = (Stream.TRAFFIC, Stream.REQUESTS, Stream.SERVING, Stream.REACTIONS,
                 Stream.DELIVERY, Stream.TRAPS, Stream.ROUTING)


@dataclass(frozen=True)
class DayBatch:
    """One landing batch written."""

    domain: str
    day: date
    interactions: int  # interactions served that day
    events: int        # valid events in the batch (some of them from earlier days)
    bad_rows: int      # lines of the batch that break the contract
    path: Path


@dataclass(frozen=True)
class SimulationSummary:
    """Every batch a ``simulate`` call wrote, per domain and day."""

    batches: tuple[DayBatch, ...]

    @property
    def total_interactions(self) -> int:
        return sum(b.interactions for b in self.batches)

    @property
    def total_events(self) -> int:
        return sum(b.events for b in self.batches)

    @property
    def total_bad_rows(self) -> int:
        return sum(b.bad_rows for b in self.batches)

    @property
    def files(self) -> list[Path]:
        return [b.path for b in self.batches]


def simulate(home: Home, config: FlywheelConfig, start: date, days: int, *, seed: int = 7,
             interactions_per_day: int = 1500, bad_row_share: float = 0.0,
             scorers: Mapping[str, Scorer] | None = None,
             model_versions: Mapping[str, str] | None = None,
             holdbacks: Mapping[str, Holdback] | None = None,
             domains: Sequence[str] | None = None, reviewer_error: float = 0.05,
             review_delay_days: tuple[float, float] = (0.5, 2.0),
             traps: Collection[str] = (), scenario: str | None = None,
             scenario_day: date | int | None = None,
             scenario_span_days: int = STALE_SPAN_DAYS, users: int | None = None) -> SimulationSummary:
    """Serve ``days`` days from ``start`` in each domain and write their landing batches.

    A domain without a scorer serves ``baseline_scorer(shape)`` and logs model version
    "baseline". A domain in ``holdbacks`` routes that share of requests, at random, to the version
    the champion replaced (docs/monitoring.md), and logs that version on them. Each domain's world is created from ``seed`` on first use (``users``
    active users, by default half that call's ``interactions_per_day``: two interactions a user and
    day); later calls continue it and must start after the
    last simulated day (``simulated_through``). Events due after the last day wait in the
    simulator's outbox for the call that simulates their day.

    Each domain's ``audit_share`` of interactions goes to human review: reviewers answer from the
    hidden truth, wrong ``reviewer_error`` of the time, ``review_delay_days`` (uniform) later, as
    ``label`` events in a batch of their own (``labels/<day>.jsonl``, see ``label_batch``).

    ``traps`` (names from ``health.TRAPS``) make the product commit those traps on purpose
    (simulation/traps.py); the world and the hidden truth are the same whichever are on.

    ``scenario`` (one of ``SCENARIOS``) changes the world itself from ``scenario_day`` (a date, or
    days from the world's first day) on: preference_shift, new_items, or stale_holdout (a shift
    during the ``scenario_span_days`` before the day only); simulation/scenarios.py. It is kept
    with the world, so later calls continue it without naming it again; days before it are
    untouched.
    """
    if days < 1 or interactions_per_day < 1 or seed < 0 or not 0 <= bad_row_share < 1 or (users or 1) < 1:
        raise ValueError("need days >= 1, interactions_per_day >= 1, seed >= 0, users >= 1 and "
                         "0 <= bad_row_share < 1")
    scorers, model_versions = scorers or {}, model_versions or {}
    domains = domains or list(config.domains)
    trapped = {domain: Traps.of(traps, domain, config.domain(domain).shape) for domain in domains}
    if scenario is not None:
        for domain in domains:  # every domain's scenario is checked before any is simulated
            scenarios.Scenario.of(scenario, date.min, domain, config.domain(domain).shape,
                                  scenario_span_days)
    batches: list[DayBatch] = []
    for domain in domains:
        settings = config.domain(domain)
        shape = settings.shape
        audit = Audit(settings.audit_share, reviewer_error, review_delay_days)
        policy = Policy(scorers[domain] if domain in scorers else baseline_scorer(shape),
                        model_versions.get(domain, "baseline"),
                        trapped[domain].exploration_share(settings.exploration_share), audit,
                        traps=trapped[domain].strength, holdback=(holdbacks or {}).get(domain))
        batches += _simulate_domain(home, domain, shape, policy, trapped[domain], start, days,
                                    seed=seed, interactions_per_day=interactions_per_day,
                                    bad_row_share=bad_row_share,
                                    max_lateness_days=config.max_lateness_days,
                                    scenario=(scenario, scenario_day, scenario_span_days),
                                    users=users or max(100, interactions_per_day // 2))
    return SimulationSummary(tuple(batches))


def _simulate_domain(home: Home, domain: str, shape: str, policy: Policy, traps: Traps, start: date,
                     days: int, *, seed: int, interactions_per_day: int, bad_row_share: float,
                     max_lateness_days: int,
                     scenario: tuple[str | None, date | int | None, int] = (None, None, 0), users: int
                     ) -> list[DayBatch]:
    folder = home.simulator / domain
    world = World.open(folder, domain, shape, seed=seed, epoch=start, population=users)
    if world.shape != shape:
        raise ValueError(f"{domain}: the simulated world is a {world.shape}, config says {shape}")
    if world.last_day and start <= world.last_day:
        raise ValueError(f"{domain} is simulated through {world.last_day}; "
                         f"start on {world.last_day + timedelta(days=1)} or later")
    scenarios.choose(world, *scenario[:2], domain, shape, scenario[2])
    product = PRODUCTS[shape](world)
    outbox = Outbox(folder / "outbox.jsonl")
    batches = []
    for day in (start + timedelta(days=n) for n in range(days)):
        rng = {stream: world.rng(stream, day) for stream in DAILY_STREAMS}
        world.grow_through(day)
        traffic = world.traffic(day, interactions_per_day, rng[Stream.TRAFFIC])
        served = product.serve_day(traffic, policy, rng)
        truth.save_day(folder, day, served.truth)
        events, sent_at = traps.deliver(served.events, traffic, rng[Stream.TRAPS],
                                        max_lateness_days)
        outbox.post(events, rng[Stream.DELIVERY], max_lateness_days, sent_at)
        batch = outbox.collect(day)
        reviews = [event for event in batch if event["event_type"] == "label"]
        batch = [event for event in batch if event["event_type"] != "label"]
        path = home.landing_file(domain, day.isoformat())
        bad_rows = write_batch(path, batch, bad_row_share, rng[Stream.DELIVERY])
        batches.append(DayBatch(domain, day, len(traffic), len(batch) - bad_rows, bad_rows, path))
        if reviews:
            label_path = label_batch(home, domain, day)
            bad_labels = write_batch(label_path, reviews, bad_row_share, rng[Stream.DELIVERY])
            batches.append(DayBatch(domain, day, 0, len(reviews) - bad_labels, bad_labels, label_path))
        world.last_day = day
    world.save()
    outbox.save()
    return batches


def label_batch(home: Home, domain: str, day: date) -> Path:
    """Where the review queue's ``label`` events of ``day`` land, next to the product's batch."""
    return home.landing / domain / LABEL_BATCHES / f"{day.isoformat()}.jsonl"


def simulated_through(home: Home, domain: str) -> date | None:
    """The last day simulated in ``domain`` (None before the first call): continue after it."""
    folder = home.simulator / domain
    return World.load(folder).last_day if (folder / "world.json").exists() else None


def true_accuracy(home: Home, config: FlywheelConfig, domain: str, scorer: Scorer) -> float:
    """The scorer's accuracy against the hidden truth of the domain's persisted world.

    assistant: share of traffic whose top-scored candidate response is truly good (every query
    weighted by its popularity). recommendation: mean precision@5 of the scorer's top 5 of 20
    candidates against each user's truly most relevant 5, over a fixed panel of users. Ties are
    broken at random, in expectation. For scoring code (demo, benchmarks, tests) only.
    """
    return true_accuracy_on(home, config, domain, scorer, None)


def true_accuracy_on(home: Home, config: FlywheelConfig, domain: str, scorer: Scorer,
                     day: date | None, segment: str | None = None) -> float:
    """``true_accuracy`` against the hidden truth of ``day`` (None: the last simulated day) under
    the world's scenario (simulation/scenarios.py): after a preference shift, the shifted tastes or
    answers; with new items, candidates that include them. Without a scenario every day's truth is
    the same. Any day, simulated or not. ``segment`` (recommendation): over that segment's users
    only, the truth of a group (docs/fairness.md). For scoring code (benchmarks, tests) only.
    """
    shape = config.domain(domain).shape
    world = World.load(home.simulator / domain)
    return PRODUCTS[shape](world).accuracy(world, scorer, day, segment)


def scenario_details(home: Home, domain: str) -> dict:
    """What the world's scenario changes (its scenario.json: hidden truth, e.g. majority_trend's
    ``minority_segment``); {} without a scenario. For scoring code (benchmarks, tests) only."""
    path = home.simulator / domain / "scenario.json"
    return json.loads(path.read_text()) if path.exists() else {}


def true_labels(home: Home, domain: str) -> pl.DataFrame:
    """The hidden truth of every impression simulated so far: interaction_id, item_id, good."""
    return truth.load(home.simulator / domain)
