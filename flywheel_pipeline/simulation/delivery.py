"""The product's side of the event contract (docs/events.md): events, daily batches, bad rows.

Events carry unix-second timestamps until written. Each event is delivered in the batch of the
day it happened (a small share 1-3 days late); events after the last simulated day wait in the
simulator's outbox for the call that simulates their day. Bad rows replace a share of a batch's
lines, as a flaky client would.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from datetime import date, datetime, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np

from flywheel_pipeline.simulation.world import DAY_S, Traffic

LATE_SHARE = 0.02          # events delivered 1-3 days after the day they happened
LATENESS_DAYS = (1, 4)     # low, high exclusive
_EPOCH = date(1970, 1, 1)


class EventLog:
    """A simulated day's events, numbered in the order they are made."""

    def __init__(self, traffic: Traffic):
        self.events: list[dict] = []
        self._domain = traffic.domain
        self._prefix = f"e_{traffic.domain}_d{traffic.day_number:04d}_"
        # plain lists: per-event indexing of numpy arrays is slow
        self._who = list(zip(traffic.user_id.tolist(), traffic.session_id.tolist(),
                             traffic.interaction_id.tolist()))
        self._consent = traffic.consent.tolist()
        self._served_at = traffic.served_at.tolist()
        self._active_until = traffic.active_until.tolist()

    def _event(self, event_type: str, i: int, at: int, fields: dict) -> None:
        user_id, session_id, interaction_id = self._who[i]
        self.events.append({
            "event_id": f"{self._prefix}{len(self.events):07d}",
            "event_type": event_type,
            "domain": self._domain,
            "timestamp": int(at),
            "user_id": user_id,
            "session_id": session_id,
            "interaction_id": interaction_id,
            **fields,
        })

    def interaction(self, i: int, *, model_version: str, policy: str, input_text: str,
                    impressions: list[dict], context: dict | None = None) -> None:
        fields = {"model_version": model_version, "policy": policy,
                  "consent": self._consent[i], "input": input_text}
        if context is not None:
            fields["context"] = context
        self._event("interaction", i, self._served_at[i],
                    {**fields, "impressions": impressions})

    def signal(self, i: int, after_s: float, signal_type: str, *, item_id: str | None = None,
               value: float | None = None, text: str | None = None) -> None:
        fields = {"signal_type": signal_type}
        for name, given in (("item_id", item_id), ("value", value), ("text", text)):
            if given is not None:
                fields[name] = given
        self._event("signal", i, self._served_at[i] + after_s, fields)

    def outcome(self, i: int, after_s: float, name: str, value: float, *,
                item_id: str | None = None) -> None:
        """The user's delayed outcome; it never comes if the user churns before it would."""
        if self._served_at[i] + after_s < self._active_until[i]:
            self._outcome(i, after_s, name, value, item_id)

    def review(self, i: int, after_s: float, verdict: bool, *, item_id: str, reviewer: str) -> None:
        """A human reviewer's ``label`` event on one impression, whatever became of the user."""
        self._event("label", i, self._served_at[i] + after_s,
                    {"item_id": item_id, "reviewer": reviewer, "verdict": "good" if verdict else "bad"})

    def _outcome(self, i: int, after_s: float, name: str, value: float,
                 item_id: str | None) -> None:
        fields = {"name": name, "value": float(value)}
        if item_id is not None:
            fields["item_id"] = item_id
        self._event("outcome", i, self._served_at[i] + after_s, fields)


class Outbox:
    """Events waiting for the batch of the day they are delivered; persisted between calls."""

    def __init__(self, path: Path):
        self.path = path
        self._by_day: dict[int, list[dict]] = defaultdict(list)
        if path.exists():
            with path.open(encoding="utf-8") as lines:
                for line in lines:
                    entry = json.loads(line)
                    self._by_day[entry["deliver"]].append(entry["event"])

    def post(self, events: list[dict], rng: np.random.Generator, max_lateness_days: int,
             sent_at: list[int | None] | None = None) -> None:
        """Schedule each event for the batch of the day it is sent (by default, when it happened;
        None: never), a few of them late, never more than ``max_lateness_days`` after their
        timestamp."""
        late = rng.random(len(events)) < LATE_SHARE
        lateness = np.minimum(rng.integers(*LATENESS_DAYS, len(events)), max_lateness_days)
        sent_at = sent_at or [event["timestamp"] for event in events]
        for event, at, days_late in zip(events, sent_at, np.where(late, lateness, 0)):
            if at is not None:
                latest = event["timestamp"] // DAY_S + max_lateness_days
                self._by_day[min(at // DAY_S + int(days_late), latest)].append(event)

    def collect(self, day: date) -> list[dict]:
        """Everything due by ``day`` (anything due on a day never simulated arrives late)."""
        due = [d for d in sorted(self._by_day) if d <= (day - _EPOCH).days]
        return [event for d in due for event in self._by_day.pop(d)]

    def save(self) -> None:
        self.path.write_text("".join(
            _dumps({"deliver": d, "event": event}) + "\n"
            for d in sorted(self._by_day) for event in self._by_day[d]), encoding="utf-8")


def write_batch(path: Path, events: list[dict], bad_row_share: float,
                rng: np.random.Generator) -> int:
    """Write one landing batch, a share of its lines replaced by bad rows; returns how many lines the
    pipeline will quarantine: the bad rows, and the good lines a bad row copied the event id of (two
    valid copies that differ are both quarantined)."""
    events = sorted(events, key=lambda e: (e["timestamp"], e["event_id"]))
    lines = [{**event, "timestamp": iso(event["timestamp"])} for event in events]
    text = [_dumps(line) for line in lines]
    bad = np.flatnonzero(rng.random(len(lines)) < bad_row_share)
    good = np.setdiff1d(np.arange(len(lines)), bad)
    kinds = rng.integers(len(BAD_ROWS), size=len(bad))
    conflicted = set()  # good lines whose id a bad row took: the pipeline quarantines every conflicting copy
    for i, kind in zip(bad, kinds):
        j = rng.choice(good) if len(good) else None
        text[i] = BAD_ROWS[kind](lines[i], "e_0" if j is None else lines[j]["event_id"])
        if BAD_ROWS[kind] is _duplicate_id and j is not None:
            conflicted.add(int(j))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in text), encoding="utf-8")
    return len(bad) + len(conflicted)


@lru_cache(maxsize=4096)
def _day_text(days: int) -> str:
    return (_EPOCH + timedelta(days=days)).isoformat()


def iso(ts: int) -> str:
    """Unix seconds -> ``2026-11-02T09:15:00Z``."""
    days, seconds = divmod(ts, DAY_S)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return f"{_day_text(days)}T{hours:02d}:{minutes:02d}:{seconds:02d}Z"


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _malformed(line: dict, _: str) -> str:
    text = _dumps(line)
    return text[: len(text) // 2]


def _not_an_object(line: dict, _: str) -> str:
    return _dumps([line])


def _missing_user(line: dict, _: str) -> str:
    return _dumps({name: value for name, value in line.items() if name != "user_id"})


def _numeric_timestamp(line: dict, _: str) -> str:
    return _dumps({**line, "timestamp": int(datetime.fromisoformat(line["timestamp"]).timestamp())})


def _duplicate_id(line: dict, other_event_id: str) -> str:
    return _dumps({**line, "event_id": other_event_id})


def _future_timestamp(line: dict, _: str) -> str:
    ten_years_on = date.fromisoformat(line["timestamp"][:10]) + timedelta(days=3650)
    return _dumps({**line, "timestamp": ten_years_on.isoformat() + line["timestamp"][10:]})


def _email_user(line: dict, _: str) -> str:
    return _dumps({**line, "user_id": "jane.doe@example.com"})


# Each bad row replaces a good line: (the line, another good line's event_id) -> the text written.
BAD_ROWS: tuple[Callable[[dict, str], str], ...] = (
    _malformed, _not_an_object, _missing_user, _numeric_timestamp, _duplicate_id,
    _future_timestamp, _email_user,
)
