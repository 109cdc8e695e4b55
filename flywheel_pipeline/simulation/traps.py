"""Traps the simulated product commits on purpose, so the health audit can be shown to catch each.

One switch per trap of ``health.TRAPS``; a trap off changes nothing (same batches, byte for byte),
and the hidden truth stays the truth whatever is on (docs/events.md: Trap injection):

    exposure_bias     no exploration: the champion's ranking is always served (propensities to match)
    survivorship      the reactions of a user who churns within CHURN_HORIZON_DAYS are never delivered
    label_delay       outcomes come about LATE_OUTCOME_DAYS later, logged backdated to their interaction
    leakage           each interaction carries LEAKED_FEATURE = its outcome, delivered once that is known
    self_consumption  reactions only on the champion's choices; no audit reviews (``label`` events)
    diversity         the champion shows only a fixed head of HEAD_ITEMS items (recommendation only)
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from flywheel_pipeline.health import TRAPS
from flywheel_pipeline.simulation.serving import Served, position_propensities
from flywheel_pipeline.simulation.world import DAY_S, Traffic

CHURN_HORIZON_DAYS = 7
LATE_OUTCOME_DAYS = (6.0, 0.4)   # lognormal (median, sigma), clipped to 1 day .. max lateness
LEAKED_FEATURE = "outcome_signal"
HEAD_ITEMS = 10
SHAPES = {"diversity": ("recommendation",)}  # traps that apply to some shapes only
REACTIONS = ("signal", "outcome")


def applies_to(trap: str, shape: str) -> bool:
    """Whether the product of a domain of ``shape`` can commit ``trap``."""
    return shape in SHAPES.get(trap, (shape,))


@dataclass(frozen=True)
class Traps:
    """The traps switched on for one domain."""

    on: frozenset[str] = frozenset()

    @classmethod
    def of(cls, names: Collection[str], domain: str, shape: str) -> Traps:
        """The named traps, checked against TRAPS and the domain's shape."""
        unknown = sorted(set(names) - set(TRAPS))
        if unknown:
            raise ValueError(f"unknown trap {', '.join(unknown)}: the traps are {', '.join(TRAPS)}")
        for name in names:
            if not applies_to(name, shape):
                raise ValueError(f"the {name} trap applies only to domains of shape "
                                 f"{', '.join(SHAPES[name])}; {domain} has shape {shape}")
        return cls(frozenset(names))

    def __contains__(self, name: str) -> bool:
        return name in self.on

    def exploration_share(self, configured: float) -> float:
        """exposure_bias: none of the traffic is explored."""
        return 0.0 if "exposure_bias" in self else configured

    def deliver(self, events: list[dict], traffic: Traffic, rng: np.random.Generator,
                max_lateness_days: int) -> tuple[list[dict], list[int | None] | None]:
        """The day's events as the trapped product sends them, and when it sends each (unix
        seconds; None for an event it never sends). No list for an honest product: each event is
        sent when it happened."""
        if not self.on & {"label_delay", "survivorship", "self_consumption", "leakage"}:
            return events, None
        day = _Day(traffic, max_lateness_days)
        sent: list[Sent] = [(event, event["timestamp"]) for event in events]
        if "label_delay" in self:
            sent = day.late_backdated_outcomes(sent, rng)
        if "survivorship" in self:
            sent = [(e, None if day.churns_soon(e) else at) for e, at in sent]
        if "self_consumption" in self:
            sent = day.on_model_choices_only(sent)
        if "leakage" in self:
            sent = day.leaked(sent)
        return [e for e, _ in sent], [at for _, at in sent]


Sent = tuple[dict, int | None]  # an event, and when the product sends it (None: never)


class _Day:
    """What the traps need to know of a day's interactions, by interaction id."""

    def __init__(self, traffic: Traffic, max_lateness_days: int):
        self.index = {iid: i for i, iid in enumerate(traffic.interaction_id.tolist())}
        self.served_at = traffic.served_at.tolist()
        self.active_until = traffic.active_until.tolist()
        self.max_lateness_days = max_lateness_days

    def latest_sent(self, i: int) -> int:
        """The last second an event of interaction ``i`` can be sent and still be accepted."""
        return (self.served_at[i] // DAY_S + self.max_lateness_days + 1) * DAY_S - 1

    def churns_soon(self, event: dict) -> bool:
        """survivorship: a reaction of a user who churns within CHURN_HORIZON_DAYS."""
        i = self.index[event["interaction_id"]]
        return (event["event_type"] in REACTIONS
                and self.active_until[i] <= self.served_at[i] + CHURN_HORIZON_DAYS * DAY_S)

    def late_backdated_outcomes(self, sent: list[Sent], rng: np.random.Generator) -> list[Sent]:
        """label_delay: each outcome comes LATE_OUTCOME_DAYS after its interaction (never once
        the user churned), timestamped as the interaction and sent when it truly happens."""
        median, sigma = LATE_OUTCOME_DAYS
        outcomes = sum(event["event_type"] == "outcome" for event, _ in sent)
        delays = iter(rng.lognormal(np.log(median), sigma, outcomes) * DAY_S)
        backdated: list[Sent] = []
        for event, at in sent:
            if event["event_type"] == "outcome":
                i = self.index[event["interaction_id"]]
                happens = min(self.served_at[i] + max(int(next(delays)), DAY_S),
                              self.latest_sent(i))
                event = {**event, "timestamp": self.served_at[i]}
                at = happens if happens < self.active_until[i] else None
            backdated.append((event, at))
        return backdated

    def on_model_choices_only(self, sent: list[Sent]) -> list[Sent]:
        """self_consumption: no reactions to the exploration slice, no human reviews."""
        explored = {e["interaction_id"] for e, _ in sent
                    if e["event_type"] == "interaction" and e["policy"] == "explore"}
        return [(e, None if e["event_type"] == "label" or (
                    e["event_type"] in REACTIONS and e["interaction_id"] in explored) else at)
                for e, at in sent]

    def leaked(self, sent: list[Sent]) -> list[Sent]:
        """leakage: LEAKED_FEATURE = the interaction's outcome (1 resolved / purchased, else 0),
        as the product receives it; the interaction is sent when its last outcome arrives (none:
        the next day)."""
        outcome: dict[str, tuple[float, int]] = {}
        for event, at in sent:
            if event["event_type"] == "outcome" and at is not None:
                value, arrived = outcome.get(event["interaction_id"], (0.0, 0))
                outcome[event["interaction_id"]] = (max(value, float(event["value"] == 1)),
                                                    max(arrived, at))
        leaked: list[Sent] = []
        for event, at in sent:
            if event["event_type"] == "interaction":
                i = self.index[event["interaction_id"]]
                value, arrived = outcome.get(event["interaction_id"],
                                             (0.0, (self.served_at[i] // DAY_S + 1) * DAY_S))
                context = event.get("context", {})
                event = {**event, "context": {
                    **context, "features": {**context.get("features", {}), LEAKED_FEATURE: value}}}
                at = min(arrived, self.latest_sent(i))
            leaked.append((event, at))
        return leaked


def head_items(bias: np.ndarray) -> np.ndarray:
    """diversity: the catalogue's HEAD_ITEMS most appealing items, most appealing first."""
    return np.argsort(-bias, kind="stable")[:HEAD_ITEMS]


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
