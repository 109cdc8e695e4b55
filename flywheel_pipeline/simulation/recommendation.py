"""The recommendation domain: a user opens the home feed and is shown a ranked slate of items.

Users and items share a hidden taste space: true relevance = sigmoid(AFFINITY * u.v / sqrt(d) +
item bias), and an item is truly good for a user when its relevance is at least 1/2. Users click
with position bias (they examine position k with probability 1 / (1 + k) ** 0.8), dwell on what
they click, abandon slates they do not click, and sometimes buy a clicked item days later.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from flywheel_pipeline.scoring import Scorer
from flywheel_pipeline.simulation.delivery import EventLog
from flywheel_pipeline.simulation.scenarios import Shift
from flywheel_pipeline.simulation.serving import (
    Audit,
    DayLog,
    Policy,
    Served,
    candidate_frame,
    impressions,
    logged_candidates,
    score,
    serve,
)
from flywheel_pipeline.simulation.traps import (
    CLICKBAIT_CATEGORY,
    click_chance,
    head_items,
    mislogged,
    serve_collapsed,
)
from flywheel_pipeline.simulation.world import (
    DAY_S,
    RATING_NOISE,
    RATING_SHARE,
    TASTE_DIM,
    Stream,
    Traffic,
    World,
    rng_for,
)

ITEMS = 300
CANDIDATES = 20              # items retrieved per request
SLATE = 5                    # items shown
AFFINITY = 1.5               # weight of taste match in relevance (vs item bias)
ITEM_BIAS = (-1.5, 0.5)      # normal (mean, sd) of how appealing an item is to anyone
ITEM_SPREAD = 0.5            # how far an item's taste strays from its category's
GOOD_RELEVANCE = 0.5
EXAMINATION_DECAY = 0.8
PURCHASE_RATE = 0.3          # P(purchase | click) = PURCHASE_RATE * relevance
PURCHASE_DELAY_DAYS = (3.0, 0.7)  # lognormal (median, sigma), clipped to 1 .. 14 days
EVALUATION_USERS = 500
REQUEST = "home feed"
CATEGORIES = {
    "sports": ("Trail running shoe", "Yoga mat", "Tennis racket", "Cycling helmet", "Dumbbell set",
               "Football"),
    "outdoors": ("Hiking backpack", "Camping tent", "Sleeping bag", "Headlamp", "Water filter",
                 "Trekking poles"),
    "kitchen": ("Chef's knife", "Cast iron skillet", "Coffee grinder", "Stand mixer",
                "Cutting board", "Rice cooker"),
    "books": ("Mystery novel", "Cookbook", "Science fiction paperback", "Biography",
              "Travel guide", "Poetry collection"),
    "electronics": ("Wireless earbuds", "Phone charger", "Smart speaker", "Mechanical keyboard",
                    "Webcam", "E-reader"),
    "toys": ("Building blocks", "Jigsaw puzzle", "Board game", "Plush bear", "Model train", "Kite"),
    "fashion": ("Denim jacket", "Wool scarf", "Leather belt", "Sneakers", "Sunglasses",
                "Rain coat"),
    "beauty": ("Face cream", "Shampoo", "Perfume", "Lip balm", "Hair dryer", "Nail kit"),
    "garden": ("Pruning shears", "Watering can", "Seed pack", "Garden hose", "Flower pot",
               "Compost bin"),
    "music": ("Acoustic guitar", "Vinyl record", "Drum pad", "Ukulele", "Studio headphones",
              "Keyboard stand"),
}


class Recommendation:
    """The item catalogue: titles the product shows, tastes and biases it never sees; with the
    new_items scenario, the new items after the ITEMS first (simulation/scenarios.py)."""

    def __init__(self, items: pl.DataFrame, shift: Shift | None = None,
                 segment_tastes: np.ndarray | None = None):
        self.items = items  # item_id, category, title, bias, taste
        self.shift = shift or Shift(None, 0, "")
        self.segment_tastes = segment_tastes
        self.item_id = items["item_id"].to_numpy()
        self.title = items["title"].to_numpy()
        self.bias = items["bias"].to_numpy()
        self.taste = items["taste"].to_numpy()
        self.category = items["category"].to_numpy()

    @classmethod
    def open(cls, world: World) -> Recommendation:
        """Load the world's catalogue, or build it on first use."""
        path = world.folder / "items.parquet"
        if path.exists():
            items = pl.read_parquet(path)
        else:
            items = _catalogue(rng_for(world.seed, world.domain, Stream.CATALOGUE))
            world.folder.mkdir(parents=True, exist_ok=True)
            items.write_parquet(path)
        shift = Shift.of_world(world)
        if shift.scenario is None:
            return cls(items, shift, world.segment_tastes)
        if shift.scenario.name == "new_items":
            new = world.folder / "new_items.parquet"
            if not new.exists():
                shift.new_catalogue(items).write_parquet(new)
            items = pl.concat([items, pl.read_parquet(new)])
        if not (world.folder / "scenario.json").exists():
            shift.record(world.folder, _scenario_details(shift, items))
        return cls(items, shift, world.segment_tastes)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.items[:ITEMS].write_parquet(folder / "items.parquet")

    def relevance(self, taste: np.ndarray, items: np.ndarray) -> np.ndarray:
        """True relevance of (n, k) ``items`` to each of n users with ``taste``."""
        match = np.einsum("nd,nkd->nk", taste, self.taste[items]) / np.sqrt(TASTE_DIM)
        return 1 / (1 + np.exp(-(AFFINITY * match + self.bias[items])))

    def serve_day(self, traffic: Traffic, policy: Policy,
                  rng: dict[Stream, np.random.Generator]) -> DayLog:
        if "diversity" in policy.traps:
            candidates, served, versions = self._serve_head(traffic, policy, rng)
        else:
            candidates = traffic.bots_repeat(self.shift.with_new_items(
                traffic.day, _retrieve(len(traffic), rng[Stream.REQUESTS]), ITEMS,
                rng[Stream.REQUESTS]))
            scores, versions = policy.score(self._frame(traffic, candidates), CANDIDATES, rng[Stream.ROUTING])
            served = serve(scores, SLATE, policy.exploration_share, rng[Stream.SERVING])
            if "mislogged_propensity" in policy.traps:
                served = mislogged(served, policy.exploration_share, policy.traps["mislogged_propensity"])
        shown = np.take_along_axis(candidates, served.slate, axis=1)
        relevance = self.relevance(self._tastes(traffic.day, traffic.taste, traffic.segment,
                                                traffic.bot), shown)
        chance = click_chance(relevance, shown, policy.traps, self.category == CLICKBAIT_CATEGORY)
        reactions = _Reactions(relevance, policy.audit, rng[Stream.REACTIONS], chance)
        slates = impressions(self.item_id[shown], self.title[shown], served.propensity)
        ranked = logged_candidates(self.item_id[candidates], self.title[candidates],
                                   served.candidate_propensity)
        log = EventLog(traffic)
        for i, (slate, policy_name, version, segment, bot) in enumerate(zip(
                slates, served.policy.tolist(), versions.tolist(), traffic.segment.tolist(), traffic.bot.tolist())):
            log.interaction(i, model_version=version, policy=policy_name,
                            input_text=REQUEST, impressions=slate,
                            context={"segment": segment, "candidates": ranked[i]})
            reactions.log(log, i, [item["item_id"] for item in slate], bot)
        truth = pl.DataFrame({
            "interaction_id": np.repeat(traffic.interaction_id, SLATE),
            "item_id": self.item_id[shown].ravel(),
            "good": relevance.ravel() >= GOOD_RELEVANCE,
            "relevance": relevance.ravel(),
        }, schema_overrides={"interaction_id": pl.String, "item_id": pl.String})
        if self.shift.shifted(traffic.day) or self.shift.new_items(traffic.day):
            changed = self.shift.changed_users(traffic.day, traffic.segment, traffic.bot)
            truth = truth.with_columns(scenario=(np.repeat(changed, SLATE)
                                                 | (shown >= ITEMS).ravel()))
        return DayLog(log.events, truth)

    def _tastes(self, day: date, taste: np.ndarray, segment: np.ndarray,
                bot: np.ndarray | None = None) -> np.ndarray:
        """The users' tastes on ``day``, as the world's scenario has them."""
        if not self.shift.shifted(day):
            return taste
        return self.shift.tastes_on(day, taste, segment, self.segment_tastes, bot)

    def _frame(self, traffic: Traffic, candidates: np.ndarray) -> pd.DataFrame:
        """The scorer's input for each interaction's (n, k) ``candidates``."""
        return candidate_frame(traffic.domain, traffic.user_id, traffic.segment,
                               traffic.is_new_user, np.full(len(traffic), REQUEST),
                               self.item_id[candidates], self.title[candidates])

    def _serve_head(self, traffic: Traffic, policy: Policy,
                    rng: dict[Stream, np.random.Generator]) -> tuple[np.ndarray, Served, np.ndarray]:
        """The diversity trap: the request's candidates (none from the head), then the head,
        which alone the champion ranks; candidates (n, CANDIDATES + HEAD_ITEMS), what was shown
        and the versions that served."""
        head = head_items(self.bias[:ITEMS], policy.traps["diversity"])
        requested = traffic.bots_repeat(self.shift.with_new_items(
            traffic.day, _retrieve(len(traffic), rng[Stream.REQUESTS], head), ITEMS,
            rng[Stream.REQUESTS]))
        heads = np.broadcast_to(head, (len(traffic), len(head)))
        scores, versions = policy.score(self._frame(traffic, heads), len(head), rng[Stream.ROUTING])
        served = serve_collapsed(scores, CANDIDATES, SLATE, policy.exploration_share, rng[Stream.SERVING])
        return np.concatenate([requested, heads], axis=1), served, versions

    def accuracy(self, world: World, scorer: Scorer, day: date | None = None, segment: str | None = None) -> float:
        """Mean precision@5: the scorer's top 5 of 20 random candidates vs the truly best 5.

        Over a fixed panel of the world's initial users (of ``segment`` only, when given), each
        with fixed candidates; a tie at the cut counts the expected share of it that makes the top
        5 (random tie-break). The truth is the one of ``day`` (default: the last simulated day)
        under the world's scenario: shifted tastes, and new items among the candidates (the same
        ones each day).
        """
        day = day or world.last_day or world.epoch
        rng = rng_for(world.seed, world.domain, Stream.EVALUATION)
        initial = world.users.filter(pl.col("first_day") < world.epoch)
        if segment is not None:
            initial = initial.filter(pl.col("segment") == segment)
            if initial.is_empty():
                raise ValueError(f"{world.domain} has no user of segment {segment!r}")
        panel = initial[np.sort(rng.choice(len(initial), min(EVALUATION_USERS, len(initial)),
                                           replace=False))]
        m = len(panel)
        candidates = self.shift.with_new_items(day, _retrieve(m, rng), ITEMS, rng)
        relevance = self.relevance(self._tastes(day, panel["taste"].to_numpy(),
                                                panel["segment"].to_numpy()), candidates)
        truly_best = relevance >= np.sort(relevance, axis=1)[:, [-SLATE]]
        frame = candidate_frame(world.domain, panel["user_id"].to_numpy(),
                                panel["segment"].to_numpy(), np.zeros(m, bool),
                                np.full(m, REQUEST), self.item_id[candidates],
                                self.title[candidates])
        scores = score(scorer, frame, CANDIDATES)[:, :, None]
        above = (scores.transpose(0, 2, 1) > scores).sum(axis=2)
        ties = (scores.transpose(0, 2, 1) == scores).sum(axis=2)
        in_top = np.clip((SLATE - above) / ties, 0, 1)
        return float((in_top * truly_best).sum(axis=1).mean() / SLATE)


class _Reactions:
    """Examinations, clicks, dwell, purchases and ratings for a day's slates, drawn in one go.

    A click's chance once examined, and the dwell that follows, go with ``click_chance`` (the true
    relevance, unless a popularity or engagement trap inflates it); a purchase follows only the
    clicks the true relevance would have drawn, as often as it says."""

    def __init__(self, relevance: np.ndarray, audit: Audit, rng: np.random.Generator,
                 click_chance: np.ndarray):
        n = len(relevance)
        self.relevance = relevance
        self.audit = audit
        examined = rng.random((n, SLATE)) < 1 / (1 + np.arange(SLATE)) ** EXAMINATION_DECAY
        draw = rng.random((n, SLATE))
        self.clicked = examined & (draw < click_chance)
        self.clicked_any = self.clicked.any(axis=1).tolist()
        self.dwell_s = np.round(rng.lognormal(np.log(15 + 90 * click_chance), 0.6), 1)
        self.purchased = (examined & (draw < relevance)
                          & (rng.random((n, SLATE)) < PURCHASE_RATE * relevance))
        median, sigma = PURCHASE_DELAY_DAYS
        delay_days = np.clip(rng.lognormal(np.log(median), sigma, (n, SLATE)), 1, 14)
        self.purchase_after_s = (delay_days * DAY_S).astype(np.int64)
        self.pause_s = rng.integers(2, 16, (n, SLATE))
        self.u = {name: rng.random(n) for name in (
            "first_click", "abandon", "rated", "rating_noise", "rating", "rated_after", "reviewed",
            "reviewed_after")}
        self.review_noise = rng.random((n, SLATE)) < audit.reviewer_error

    def log(self, log: EventLog, i: int, items: list[str], bot: bool) -> None:
        if bot:
            log.signal(i, 1, "click", item_id=items[0])  # clicks the top item, every time
        else:
            self._browse(log, i, items)
            self._rate(log, i, items)
        self._review(log, i, items)

    def _browse(self, log: EventLog, i: int, items: list[str]) -> None:
        """Clicks top to bottom, each followed by its dwell; abandon if nothing is clicked."""
        if not self.clicked_any[i]:
            log.signal(i, int(5 + 55 * self.u["abandon"][i]), "abandon")
            return
        at = int(2 + 18 * self.u["first_click"][i])
        for k in np.flatnonzero(self.clicked[i]):
            dwell = float(self.dwell_s[i, k])
            log.signal(i, at, "click", item_id=items[k])
            log.signal(i, at + int(np.ceil(dwell)), "dwell", item_id=items[k], value=dwell)
            if self.purchased[i, k]:
                log.outcome(i, at + self.purchase_after_s[i, k], "purchase", 1.0,
                            item_id=items[k])
            at += int(np.ceil(dwell)) + int(self.pause_s[i, k])

    def _rate(self, log: EventLog, i: int, items: list[str]) -> None:
        """Now and then, a 1-5 rating of the first clicked item (or the top one)."""
        if self.u["rated"][i] >= RATING_SHARE:
            return
        k = int(self.clicked[i].argmax())
        if self.u["rating_noise"][i] < RATING_NOISE:
            rating = 1 + int(self.u["rating"][i] * 5)
        else:
            rating = int(np.clip(np.round(1 + 4 * self.relevance[i, k]
                                          + 2 * (self.u["rating"][i] - 0.5)), 1, 5))
        log.signal(i, int(60 + 240 * self.u["rated_after"][i]), "rating", item_id=items[k],
                   value=rating)

    def _review(self, log: EventLog, i: int, items: list[str]) -> None:
        """A human verdict on every shown item of a random slice of interactions."""
        u = self.u["reviewed"][i]
        if not self.audit.reviewed(u):
            return
        after, reviewer = self.audit.delay_s(self.u["reviewed_after"][i]), self.audit.reviewer(u)
        good = (self.relevance[i] >= GOOD_RELEVANCE) != self.review_noise[i]
        for k, item in enumerate(items):
            log.review(i, after, bool(good[k]), item_id=item, reviewer=reviewer)


def _scenario_details(shift: Shift, items: pl.DataFrame) -> dict:
    """What the scenario changes, for its record beside the world (hidden truth)."""
    if shift.scenario.name == "new_items":
        return {"new_items": items["item_id"][ITEMS:].to_list()}
    if shift.scenario.name == "majority_trend":
        return {"minority_segment": shift.minority_segment(), "trend": shift.trend(TASTE_DIM).tolist()}
    return {"swapped_segments": [f"s{n}" for n in shift.swapped_segments().tolist()]}


def _retrieve(n: int, rng: np.random.Generator, excluded: np.ndarray | None = None) -> np.ndarray:
    """CANDIDATES distinct random items per request, none of ``excluded``, (n, CANDIDATES)."""
    draws = rng.random((n, ITEMS))
    if excluded is not None:
        draws[:, excluded] = 2.0  # after every drawn item
    return np.argpartition(draws, CANDIDATES, axis=1)[:, :CANDIDATES]


def _catalogue(rng: np.random.Generator) -> pl.DataFrame:
    """ITEMS items in balanced categories; items of a category share a typical taste."""
    names = list(CATEGORIES)
    category_taste = rng.standard_normal((len(names), TASTE_DIM))
    category = rng.permutation(np.arange(ITEMS) % len(names))
    noun = rng.integers(len(next(iter(CATEGORIES.values()))), size=ITEMS)
    return pl.DataFrame({
        "item_id": [f"item_{i:03d}" for i in range(ITEMS)],
        "category": [names[c] for c in category],
        "title": [f"{CATEGORIES[names[c]][w]} #{i} ({names[c]})"
                  for i, (c, w) in enumerate(zip(category, noun))],
        "bias": rng.normal(*ITEM_BIAS, ITEMS),
        "taste": category_taste[category] + ITEM_SPREAD * rng.standard_normal((ITEMS, TASTE_DIM)),
    }, schema_overrides={"taste": pl.Array(pl.Float64, TASTE_DIM)})
