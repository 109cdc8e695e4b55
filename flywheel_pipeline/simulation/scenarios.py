"""Scenarios the simulated world lives through on purpose, so a post-deployment monitor can be shown
to catch each: from a given day on, the hidden truth changes and a champion fitted before it is
truly worse live than its held-out evaluation said.

Unlike a trap (simulation/traps.py), which changes what the product does and never the truth, a
scenario changes the world itself, from ``day`` on; every day before it is untouched (same batches,
byte for byte, same truth). One scenario per world, chosen when the world is created (or later, if
it changes no day already simulated), kept in its world.json; its details are drawn from the seed
alone (stream SCENARIO) and recorded in ``scenario.json`` beside the world, under the simulator's
hidden folder that the pipeline never reads:

    preference_shift  from ``day`` on, users' preferences change. recommendation: the users of
                      SHIFTED_SEGMENTS segments swap tastes (each now likes what the other segment
                      liked); assistant (its requests carry no segment): for a popularity-weighted
                      SHIFTED_QUERY_SHARE of the queries, the truly good response moves to one of
                      the query's distractors, and the old answer becomes bad.
    new_items         recommendation only: from ``day`` on, NEW_ITEMS items the champion never saw
                      are in the catalogue, attractive on average (bias NEW_ITEM_BIAS), and each
                      retrieved candidate is a new item with probability NEW_ITEM_SHARE.
    majority_trend    recommendation only: from ``day`` on, the users of every segment but one (the
                      minority, drawn from the seed) share a new trend: their tastes move by one
                      common vector of length TREND_LENGTH, the minority's stay. A model fitted on
                      the new traffic serves the majority better and, where its item effects follow
                      the majority, the minority worse (docs/fairness.md).
    stale_holdout     the preference shift is on during the ``span_days`` before ``day`` only (a fad)
                      and gone from ``day`` on: a candidate fitted and held-out-evaluated inside the
                      fad (``day`` = the day after its held-out window, when it is deployed) learnt a
                      truth that no longer holds, while a champion fitted on the world before the fad
                      fits the world after it. By construction, on and after ``day`` the truth is
                      the truth before the fad; check a pair with ``true_accuracy_on`` on both sides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from flywheel_pipeline.simulation.world import SEGMENTS, Stream, rng_for

SCENARIOS = ("preference_shift", "new_items", "stale_holdout", "majority_trend")
SHAPES = {"new_items": ("recommendation",), "majority_trend": ("recommendation",)}  # some shapes only
SHIFTED_SEGMENTS = 2          # recommendation: segments whose users swap tastes
SHIFTED_QUERY_SHARE = 1 / 3   # assistant: popularity-weighted share of queries whose answer moves
NEW_ITEMS = 60                # recommendation: items that enter the catalogue on the day
NEW_ITEM_SHARE = 0.25         # share of retrieved candidates that are new items, from the day on
NEW_ITEM_BIAS = (-1.0, 0.75)  # normal (mean, sd): more appealing than the catalogue's (-1.5, 0.5)
STALE_SPAN_DAYS = 28          # stale_holdout: how long the fad lasts before ``day`` (a lookback)
TREND_LENGTH = 2.0            # majority_trend: how far the majority's tastes move (a segment's spread is ~2.8)


def applies_to(scenario: str, shape: str) -> bool:
    """Whether a domain of ``shape`` can live through ``scenario``."""
    return shape in SHAPES.get(scenario, (shape,))


@dataclass(frozen=True)
class Scenario:
    """A scenario and the day the world changes (for stale_holdout: the day the fad ends)."""

    name: str
    day: date
    span_days: int = STALE_SPAN_DAYS  # stale_holdout only

    @classmethod
    def of(cls, name: str, day: date, domain: str, shape: str,
           span_days: int = STALE_SPAN_DAYS) -> Scenario:
        """The named scenario, checked against SCENARIOS and the domain's shape."""
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name}: the scenarios are {', '.join(SCENARIOS)}")
        if not applies_to(name, shape):
            raise ValueError(f"the {name} scenario applies only to domains of shape "
                             f"{', '.join(SHAPES[name])}; {domain} has shape {shape}")
        if span_days < 1:
            raise ValueError("need scenario span_days >= 1")
        return cls(name, day, span_days if name == "stale_holdout" else STALE_SPAN_DAYS)

    @classmethod
    def from_json(cls, spec: dict | None) -> Scenario | None:
        if not spec:
            return None
        return cls(spec["name"], date.fromisoformat(spec["day"]),
                   spec.get("span_days", STALE_SPAN_DAYS))

    def to_json(self) -> dict:
        spec: dict = {"name": self.name, "day": self.day.isoformat()}
        if self.name == "stale_holdout":
            spec["span_days"] = self.span_days
        return spec

    @property
    def first_day(self) -> date:
        """The first day whose truth the scenario changes."""
        if self.name == "stale_holdout":
            return self.day - timedelta(days=self.span_days)
        return self.day

    def shifted(self, day: date) -> bool:
        """Whether users' preferences are shifted on ``day``."""
        if self.name in ("preference_shift", "majority_trend"):
            return day >= self.day
        if self.name == "stale_holdout":
            return self.first_day <= day < self.day
        return False

    def new_items(self, day: date) -> bool:
        """Whether the new items are in the catalogue on ``day``."""
        return self.name == "new_items" and day >= self.day


class Shift:
    """A world's scenario with its details, drawn from the world's seed: what the products ask."""

    def __init__(self, scenario: Scenario | None, seed: int, domain: str):
        self.scenario = scenario
        self.seed, self.domain = seed, domain

    @classmethod
    def of_world(cls, world) -> Shift:  # world: World (not imported: world.py knows no scenario)
        return cls(Scenario.from_json(world.scenario), world.seed, world.domain)

    def rng(self) -> np.random.Generator:
        return rng_for(self.seed, self.domain, Stream.SCENARIO)

    def shifted(self, day: date) -> bool:
        return self.scenario is not None and self.scenario.shifted(day)

    def new_items(self, day: date) -> bool:
        return self.scenario is not None and self.scenario.new_items(day)

    # -- recommendation ---------------------------------------------------------------------------

    def swapped_segments(self) -> np.ndarray:
        """The SHIFTED_SEGMENTS segments (numbers) whose users swap tastes, in swap order."""
        return self.rng().choice(SEGMENTS, SHIFTED_SEGMENTS, replace=False)

    def minority_segment(self) -> str:
        """majority_trend: the segment whose users do not follow the trend."""
        return f"s{self.rng().integers(SEGMENTS)}"

    def trend(self, dimensions: int) -> np.ndarray:
        """majority_trend: the vector the majority's tastes move by (length TREND_LENGTH)."""
        direction = rng_for(self.seed, self.domain, Stream.SCENARIO, 2).standard_normal(dimensions)
        return TREND_LENGTH * direction / np.linalg.norm(direction)

    def tastes_on(self, day: date, taste: np.ndarray, segment: np.ndarray,
                  segment_tastes: np.ndarray, bot: np.ndarray | None = None) -> np.ndarray:
        """Each user's taste on ``day``: in a swapped segment, the user's own deviation from their
        segment's typical taste around the next swapped segment's; in majority_trend, moved by the
        trend outside the minority (bots have no taste)."""
        if not self.shifted(day):
            return taste
        if self.scenario.name == "majority_trend":
            moved = self.changed_users(day, segment, np.zeros(len(segment), bool) if bot is None else bot)
            return taste + np.where(moved[:, None], self.trend(taste.shape[1])[None, :], 0.0)
        swapped = self.swapped_segments()
        number = np.array([int(s[1:]) for s in segment.tolist()])
        partner = np.arange(SEGMENTS)
        partner[swapped] = np.roll(swapped, -1)
        moved = np.isin(number, swapped)
        if bot is not None:
            moved &= ~bot
        shifted = taste.copy()
        shifted[moved] += segment_tastes[partner[number[moved]]] - segment_tastes[number[moved]]
        return shifted

    def changed_users(self, day: date, segment: np.ndarray, bot: np.ndarray) -> np.ndarray:
        """Which users' tastes ``tastes_on`` changes on ``day``."""
        if not self.shifted(day):
            return np.zeros(len(segment), bool)
        if self.scenario.name == "majority_trend":
            return (segment != self.minority_segment()) & ~bot
        swapped = {f"s{s}" for s in self.swapped_segments().tolist()}
        return np.array([s in swapped for s in segment.tolist()]) & ~bot

    def new_catalogue(self, items: pl.DataFrame) -> pl.DataFrame:
        """NEW_ITEMS items after ``items``: each from a category (taste around the category's
        typical taste, estimated from its items), more appealing than the catalogue on average."""
        rng = rng_for(self.seed, self.domain, Stream.SCENARIO, 1)  # apart from the shift's draws
        names = items["category"].unique(maintain_order=True).to_list()
        taste = items["taste"].to_numpy()
        category_taste = np.stack([taste[(items["category"] == c).to_numpy()].mean(axis=0)
                                   for c in names])
        spread = float(np.std(taste - category_taste[[names.index(c) for c in items["category"]]]))
        first = len(items)
        category = rng.integers(len(names), size=NEW_ITEMS)
        return pl.DataFrame({
            "item_id": [f"item_{first + i:03d}" for i in range(NEW_ITEMS)],
            "category": [names[c] for c in category],
            "title": [f"New: {names[c]} pick #{first + i} ({names[c]})"
                      for i, c in enumerate(category)],
            "bias": rng.normal(*NEW_ITEM_BIAS, NEW_ITEMS),
            "taste": category_taste[category] + spread * rng.standard_normal(
                (NEW_ITEMS, taste.shape[1])),
        }, schema=items.schema)

    def with_new_items(self, day: date, candidates: np.ndarray, first_new: int,
                       rng: np.random.Generator) -> np.ndarray:
        """(n, k) candidates on ``day``: from the day on, each is a distinct new item (numbered from
        ``first_new``) with probability NEW_ITEM_SHARE."""
        if not self.new_items(day):
            return candidates
        n, k = candidates.shape
        count = rng.binomial(k, NEW_ITEM_SHARE, n)
        new = first_new + np.argsort(rng.random((n, NEW_ITEMS)), axis=1)[:, :k]
        return np.where(np.arange(k)[None, :] < count[:, None], new, candidates)

    # -- assistant --------------------------------------------------------------------------------

    def moved_answers(self, good: np.ndarray, popularity: np.ndarray) -> dict[int, int]:
        """query -> the slot of its new (only) good response, for a popularity-weighted
        SHIFTED_QUERY_SHARE of queries in random order (the one crossing the share included)."""
        rng = self.rng()
        order = rng.permutation(len(popularity))
        mass = np.cumsum(popularity[order])
        chosen = order[: int(np.searchsorted(mass, SHIFTED_QUERY_SHARE)) + 1]
        u = rng.random(good.shape)
        moved = {}
        for q in sorted(chosen.tolist()):
            bad = np.flatnonzero(~good[q])
            if len(bad):
                moved[q] = int(bad[int(u[q, 0] * len(bad))])
        return moved

    def good_on(self, day: date, good: np.ndarray, popularity: np.ndarray) -> np.ndarray:
        """(queries, K) which candidates are truly good on ``day``."""
        if not self.shifted(day):
            return good
        shifted = good.copy()
        for q, slot in self.moved_answers(good, popularity).items():
            shifted[q] = False
            shifted[q, slot] = True
        return shifted

    # -- the record -------------------------------------------------------------------------------

    def record(self, folder: Path, details: dict) -> None:
        """scenario.json beside the world: the scenario and what it changes (hidden truth)."""
        if self.scenario is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        spec = {**self.scenario.to_json(), "first_day": self.scenario.first_day.isoformat(),
                **details}
        (folder / "scenario.json").write_text(json.dumps(spec, indent=1) + "\n")


def choose(world, name: str | None, day: date | int | None, domain: str, shape: str,
           span_days: int = STALE_SPAN_DAYS) -> None:
    """Give ``world`` the scenario ``name`` from ``day`` (a date, or days from the world's epoch),
    or keep the one it has. A continued world takes a new scenario only if it changes no day
    already simulated, and never a second one."""
    if name is None:
        if day is not None:
            raise ValueError("a scenario day needs a scenario")
        return
    if day is None:
        raise ValueError(f"the {name} scenario needs a day")
    if isinstance(day, int):
        day = world.epoch + timedelta(days=day)
    scenario = Scenario.of(name, day, domain, shape, span_days)
    current = Scenario.from_json(world.scenario)
    if current == scenario:
        return
    if current is not None:
        raise ValueError(f"{domain} already lives through {current.name} from {current.day}; "
                         "a world has one scenario")
    if world.last_day and scenario.first_day <= world.last_day:
        raise ValueError(f"{domain} is simulated through {world.last_day}: the {name} scenario "
                         f"would change {scenario.first_day}, already simulated")
    world.scenario = scenario.to_json()
