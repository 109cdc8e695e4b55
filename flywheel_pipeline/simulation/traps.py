"""Traps the simulated product commits on purpose, so the health audit can be shown to catch each.

One switch per trap of ``health.TRAPS``, each with a strength in (0, 1] (1: the blatant trap, the
default); a trap off changes nothing (same batches, byte for byte), and the hidden truth stays the
truth whatever is on (docs/events.md: Trap injection). At strength s:

    exposure_bias     exploration shrinks to (1 - s) of the configured share (none at 1)
    survivorship      each reaction of a user who churns within CHURN_HORIZON_DAYS is lost, chance s
    label_delay       each outcome comes LATE_OUTCOME_DAYS later, logged backdated, chance s
    leakage           an interaction carries LEAKED_FEATURE = its outcome with chance s (sent once it
                      is known), else a coin of the day's outcome rate
    self_consumption  each reaction to an explored slate and each human review is lost, chance s
    diversity         the champion ranks only the catalogue's HEAD_ITEMS / s most appealing items
    vocal_minority    the reactions of users outside VOCAL_SEGMENT are lost, chance s * QUIET_SHARE
    popularity        the day's most shown POPULAR_SHARE of the catalogue wear a "popular now" badge:
                      a click on them moves s * POPULARITY_PULL of the way to certain, whatever
                      their merit
    engagement        items of CLICKBAIT_CATEGORY draw clicks and dwell as if s * CLICKBAIT_PULL of
                      the way to certain, but buy only as often as their true relevance says

Besides the traps, one subtler exposure fault (``health.FAULTS``, caught by the exposure_bias check):

    mislogged_propensity  the logger computes propensities with a stale exploration share,
                          (1 - STALE_SHARE * s) of the one it serves with: explored items look rarer
                          than they were (never impossible: a propensity of 0 breaks the contract)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from flywheel_pipeline.health import FAULTS, TRAPS
from flywheel_pipeline.simulation.serving import Served, position_propensities
from flywheel_pipeline.simulation.world import DAY_S, Traffic

CHURN_HORIZON_DAYS = 7
LATE_OUTCOME_DAYS = (6.0, 0.4)   # lognormal (median, sigma), clipped to 1 day .. max lateness
LEAKED_FEATURE = "outcome_signal"
HEAD_ITEMS = 10
VOCAL_SEGMENT = "s0"
QUIET_SHARE = 0.8
POPULAR_SHARE = 0.1
POPULARITY_PULL = 0.5
CLICKBAIT_CATEGORY = "electronics"
CLICKBAIT_PULL = 0.7
STALE_SHARE = 0.9
# traps that apply to some shapes only: the simulated assistant logs no segment (no group to hear) and
# has no catalogue (nothing to collapse onto, no items to badge or bait with)
SHAPES = {trap: ("recommendation",)
          for trap in ("diversity", "vocal_minority", "popularity", "engagement", "mislogged_propensity")}
REACTIONS = ("signal", "outcome")
DELIVERY_TRAPS = frozenset({"label_delay", "survivorship", "self_consumption", "leakage", "vocal_minority"})


def applies_to(trap: str, shape: str) -> bool:
    """Whether the product of a domain of ``shape`` can commit ``trap``."""
    return shape in SHAPES.get(trap, (shape,))


@dataclass(frozen=True)
class Traps:
    """The traps switched on for one domain, each with its strength in (0, 1]."""

    strength: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, traps: Collection[str] | Mapping[str, float], domain: str, shape: str) -> Traps:
        """The named traps (a mapping gives their strengths; names alone are at strength 1),
        checked against TRAPS and the domain's shape."""
        strength = dict(traps) if isinstance(traps, Mapping) else dict.fromkeys(traps, 1.0)
        unknown = sorted(set(strength) - {*TRAPS, *FAULTS})
        if unknown:
            raise ValueError(f"unknown trap {', '.join(unknown)}: the traps are {', '.join([*TRAPS, *FAULTS])}")
        for name, value in strength.items():
            if not 0 < value <= 1:
                raise ValueError(f"the {name} trap's strength is {value}: it must be in (0, 1]")
            if not applies_to(name, shape):
                raise ValueError(f"the {name} trap applies only to domains of shape "
                                 f"{', '.join(SHAPES[name])}; {domain} has shape {shape}")
        return cls(strength)

    def __contains__(self, name: str) -> bool:
        return name in self.strength

    def __getitem__(self, name: str) -> float:
        """The trap's strength; 0 when it is off."""
        return self.strength.get(name, 0.0)

    def exploration_share(self, configured: float) -> float:
        """exposure_bias: exploration shrinks with the strength (none at 1)."""
        return configured * (1 - self["exposure_bias"])

    def deliver(self, events: list[dict], traffic: Traffic, rng: np.random.Generator,
                max_lateness_days: int) -> tuple[list[dict], list[int | None] | None]:
        """The day's events as the trapped product sends them, and when it sends each (unix
        seconds; None for an event it never sends). No list for an honest product: each event is
        sent when it happened."""
        if not DELIVERY_TRAPS & set(self.strength):
            return events, None
        day = _Day(traffic, max_lateness_days, rng)
        sent: list[Sent] = [(event, event["timestamp"]) for event in events]
        if "label_delay" in self:
            sent = day.late_backdated_outcomes(sent, self["label_delay"])
        if "survivorship" in self:
            sent = day.lose(sent, day.churns_soon, self["survivorship"])
        if "vocal_minority" in self:
            sent = day.lose(sent, day.quiet, self["vocal_minority"] * QUIET_SHARE)
        if "self_consumption" in self:
            sent = day.lose(sent, day.independent(sent), self["self_consumption"])
        if "leakage" in self:
            sent = day.leaked(sent, self["leakage"])
        return [e for e, _ in sent], [at for _, at in sent]


Sent = tuple[dict, int | None]  # an event, and when the product sends it (None: never)


class _Day:
    """What the traps need to know of a day's interactions, by interaction id."""

    def __init__(self, traffic: Traffic, max_lateness_days: int, rng: np.random.Generator):
        self.index = {iid: i for i, iid in enumerate(traffic.interaction_id.tolist())}
        self.served_at = traffic.served_at.tolist()
        self.active_until = traffic.active_until.tolist()
        self.segment = traffic.segment.tolist()
        self.max_lateness_days = max_lateness_days
        self.rng = rng

    def latest_sent(self, i: int) -> int:
        """The last second an event of interaction ``i`` can be sent and still be accepted."""
        return (self.served_at[i] // DAY_S + self.max_lateness_days + 1) * DAY_S - 1

    def chosen(self, n: int, chance: float) -> list[bool]:
        """n draws of chance ``chance``; no random draw at all when it is certain (strength 1)."""
        return [True] * n if chance >= 1 else (self.rng.random(n) < chance).tolist()

    def lose(self, sent: list[Sent], lost: Callable[[dict], bool], chance: float) -> list[Sent]:
        """Each event ``lost`` says of is never sent, with ``chance``."""
        return [(e, None if drawn and lost(e) else at)
                for (e, at), drawn in zip(sent, self.chosen(len(sent), chance))]

    def churns_soon(self, event: dict) -> bool:
        """survivorship: a reaction of a user who churns within CHURN_HORIZON_DAYS."""
        i = self.index[event["interaction_id"]]
        return (event["event_type"] in REACTIONS
                and self.active_until[i] <= self.served_at[i] + CHURN_HORIZON_DAYS * DAY_S)

    def quiet(self, event: dict) -> bool:
        """vocal_minority: a reaction of a user outside VOCAL_SEGMENT."""
        return (event["event_type"] in REACTIONS
                and self.segment[self.index[event["interaction_id"]]] != VOCAL_SEGMENT)

    @staticmethod
    def independent(sent: list[Sent]) -> Callable[[dict], bool]:
        """self_consumption: a human review, or a reaction to the exploration slice."""
        explored = {e["interaction_id"] for e, _ in sent
                    if e["event_type"] == "interaction" and e["policy"] == "explore"}
        return lambda e: e["event_type"] == "label" or (
            e["event_type"] in REACTIONS and e["interaction_id"] in explored)

    def late_backdated_outcomes(self, sent: list[Sent], chance: float) -> list[Sent]:
        """label_delay: an outcome comes LATE_OUTCOME_DAYS after its interaction (never once the
        user churned), timestamped as the interaction and sent when it truly happens, with
        ``chance``."""
        median, sigma = LATE_OUTCOME_DAYS
        outcomes = [event["event_type"] == "outcome" for event, _ in sent]
        late = iter(self.chosen(sum(outcomes), chance))
        delays = iter(self.rng.lognormal(np.log(median), sigma, sum(outcomes)) * DAY_S)
        backdated: list[Sent] = []
        for (event, at), outcome in zip(sent, outcomes):
            if outcome and next(late):
                i = self.index[event["interaction_id"]]
                happens = min(self.served_at[i] + max(int(next(delays)), DAY_S),
                              self.latest_sent(i))
                event = {**event, "timestamp": self.served_at[i]}
                at = happens if happens < self.active_until[i] else None
            backdated.append((event, at))
        return backdated

    def leaked(self, sent: list[Sent], chance: float) -> list[Sent]:
        """leakage: with ``chance``, LEAKED_FEATURE = the interaction's outcome (1 resolved /
        purchased, else 0), as the product receives it, and the interaction sent when its last
        outcome arrives (none: the next day); otherwise a coin of the day's outcome rate, sent on
        time."""
        outcome: dict[str, tuple[float, int]] = {}
        for event, at in sent:
            if event["event_type"] == "outcome" and at is not None:
                value, arrived = outcome.get(event["interaction_id"], (0.0, 0))
                outcome[event["interaction_id"]] = (max(value, float(event["value"] == 1)),
                                                    max(arrived, at))
        interactions = [event["event_type"] == "interaction" for event, _ in sent]
        leaks = iter(self.chosen(sum(interactions), chance))
        rate = sum(value for value, _ in outcome.values()) / max(sum(interactions), 1)
        coins = iter(self.rng.random(sum(interactions)) < rate if chance < 1 else [])
        leaked: list[Sent] = []
        for (event, at), interaction in zip(sent, interactions):
            if interaction:
                i = self.index[event["interaction_id"]]
                if next(leaks):
                    value, arrived = outcome.get(event["interaction_id"],
                                                 (0.0, (self.served_at[i] // DAY_S + 1) * DAY_S))
                    at = min(arrived, self.latest_sent(i))
                else:
                    value = float(next(coins))
                context = event.get("context", {})
                event = {**event, "context": {
                    **context, "features": {**context.get("features", {}), LEAKED_FEATURE: value}}}
            leaked.append((event, at))
        return leaked


def mislogged(served: Served, exploration_share: float, strength: float) -> Served:
    """mislogged_propensity: what was served, with the propensities of a logger that believes it
    explores (1 - STALE_SHARE * ``strength``) of ``exploration_share``: each candidate's chance at each position
    recomputed as (1 - eps') * P(champion puts it there) + eps' / candidates. A logger that only
    explores (share 1) never serves the champion: nothing stale to believe."""
    if exploration_share >= 1:
        return served
    candidates = served.candidate_propensity.shape[1]
    champion = (served.candidate_propensity - exploration_share / candidates) / (1 - exploration_share)
    believed = exploration_share * (1 - STALE_SHARE * strength)
    every = (1 - believed) * champion + believed / candidates
    shown = np.take_along_axis(every, served.slate[:, :, None], axis=1)
    return Served(served.slate, np.diagonal(shown, axis1=1, axis2=2), served.policy, every)


def head_items(bias: np.ndarray, strength: float) -> np.ndarray:
    """diversity: the catalogue's HEAD_ITEMS / ``strength`` most appealing items, most appealing
    first."""
    return np.argsort(-bias, kind="stable")[:round(HEAD_ITEMS / strength)]


def popular(shown: np.ndarray, catalogue: int) -> np.ndarray:
    """popularity: the catalogue items among the POPULAR_SHARE most shown in ``shown`` (the day's
    slates, as catalogue indices), ties included: those a "popular now" badge marks."""
    exposure = np.bincount(shown.ravel(), minlength=catalogue)
    return exposure >= np.sort(exposure)[-max(round(POPULAR_SHARE * catalogue), 1)]


def click_chance(relevance: np.ndarray, shown: np.ndarray, traps: Mapping[str, float],
                 clickbait: np.ndarray) -> np.ndarray:
    """popularity and engagement: the chance each shown item (``shown``: (n, k) catalogue indices)
    is clicked once examined, which is its true ``relevance`` for an honest product;
    ``clickbait``: which catalogue items are of CLICKBAIT_CATEGORY."""
    chance = relevance
    if traps.get("popularity"):
        chance = np.where(popular(shown, len(clickbait))[shown],
                          chance + (1 - chance) * traps["popularity"] * POPULARITY_PULL, chance)
    if traps.get("engagement"):
        chance = np.where(clickbait[shown], chance + (1 - chance) * traps["engagement"] * CLICKBAIT_PULL,
                          chance)
    return chance


def serve_collapsed(head_scores: np.ndarray, requested: int, size: int, exploration_share: float,
                    rng: np.random.Generator) -> Served:
    """diversity: the champion ranks only the head, exploring picks from the request's candidates.

    Columns are the ``requested`` candidates, then the head's (``head_scores``: (n, head)); every
    column's propensity is exact: (1-eps) * P(champion puts it there) + eps * P(random slate does).
    """
    n, head = head_scores.shape
    champion = requested + np.lexsort((rng.random((n, head)), -head_scores), axis=-1)
    random_order = np.argsort(rng.random((n, requested)), axis=-1)
    explore = rng.random(n) < exploration_share
    slate = np.where(explore[:, None], random_order[:, :size], champion[:, :size])
    every = np.concatenate([
        np.full((n, requested, size), exploration_share / requested),
        (1 - exploration_share) * position_propensities(head_scores, size, 0.0)], axis=1)
    shown = np.take_along_axis(every, slate[:, :, None], axis=1)
    return Served(slate, np.diagonal(shown, axis1=1, axis2=2),
                  np.where(explore, "explore", "champion").astype(object), every)
