"""The simulated product's hidden world: users who arrive, return and churn, day by day.

Kept under ``Home.simulator/<domain>/`` (the pipeline never reads it) so that successive
``simulate`` calls continue the same world. Randomness is keyed by (seed, domain, stream, day),
the day counted from the world's first day (its epoch), never the calendar: a day's draws never
depend on how many draws earlier days made, and the same seed makes the same world whichever date it
starts on (a test's outcome cannot depend on the day it runs).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from datetime import date, timedelta
from enum import IntEnum
from pathlib import Path

import numpy as np
import polars as pl

DAY_S = 86_400
TASTE_DIM = 8            # latent preference dimensions
SEGMENTS = 6             # user segments; each has its own typical taste
TASTE_SPREAD = 0.6       # how far a user's taste strays from their segment's
CHURN_SHARE = 0.03       # share of active users who stop returning each day
DENIED_CONSENT = 0.03    # share of users who deny consent to training
MEAN_SESSION = 3         # interactions per human session, on average
BOTS_PER_1000 = 1.0      # bot-like sessions per 1000 interactions
BOT_SESSION = (24, 61)   # interactions per bot session (low, high exclusive)
RATING_SHARE = 0.02      # interactions with an explicit 1-5 rating
RATING_NOISE = 0.15      # ratings given at random
_EPOCH = date(1970, 1, 1)


class Stream(IntEnum):
    """Independent random streams, so changing one kind of draw never shifts another."""

    COHORT = 1
    CATALOGUE = 2
    EVALUATION = 3
    TRAFFIC = 4
    REQUESTS = 5
    SERVING = 6
    REACTIONS = 7
    DELIVERY = 8
    TRAPS = 9
    SCENARIO = 10
    ROUTING = 11


def rng_for(seed: int, domain: str, stream: Stream, day_number: int | None = None) -> np.random.Generator:
    """The stream's generator; a daily stream's is keyed by the day's number from the epoch."""
    keys = [seed, zlib.crc32(domain.encode()), int(stream)]
    if day_number is not None:
        keys.append(day_number)
    return np.random.default_rng(keys)


def day_start(day: date) -> int:
    """Unix seconds at 00:00 UTC of ``day``."""
    return (day - _EPOCH).days * DAY_S


def user_ids(rng: np.random.Generator, size: int) -> np.ndarray:
    return np.array([f"u_{n:012x}" for n in rng.integers(0, 2**48, size)], dtype=object)


@dataclass(frozen=True)
class Traffic:
    """One day's interactions before anything is served: who came, when, in which session."""

    domain: str
    day: date
    day_number: int           # days since the world's epoch: names its interactions and events
    interaction_id: np.ndarray
    session_id: np.ndarray
    session: np.ndarray       # session number; a bot repeats one request within its session
    user_id: np.ndarray
    segment: np.ndarray
    consent: np.ndarray
    is_new_user: np.ndarray
    bot: np.ndarray
    served_at: np.ndarray     # unix seconds
    active_until: np.ndarray  # unix seconds: after this the user has churned and says nothing
    taste: np.ndarray         # (n, TASTE_DIM) hidden preferences

    def __len__(self) -> int:
        return len(self.served_at)

    def bots_repeat(self, requests: np.ndarray) -> np.ndarray:
        """``requests`` with each bot session's first request repeated throughout the session."""
        _, first, session = np.unique(self.session, return_index=True, return_inverse=True)
        bot = self.bot.reshape(-1, *[1] * (requests.ndim - 1))
        return np.where(bot, requests[first][session], requests)


@dataclass
class World:
    """A domain's persisted population: who exists, when they arrived and when they churn."""

    folder: Path
    domain: str
    shape: str
    seed: int
    epoch: date                # first day of the world: its initial users are already returning
    population: int            # active users in steady state
    segment_tastes: np.ndarray  # (SEGMENTS, TASTE_DIM)
    users: pl.DataFrame
    cohorts_through: date      # last day whose arrivals exist in ``users``
    last_day: date | None      # last day simulated
    scenario: dict | None = None  # the scenario the world lives through (simulation/scenarios.py)

    @classmethod
    def open(cls, folder: Path, domain: str, shape: str, *, seed: int, epoch: date,
             population: int) -> World:
        """Load the world from ``folder``, or create it from ``seed`` on first use."""
        if (folder / "world.json").exists():
            return cls.load(folder)
        rng = rng_for(seed, domain, Stream.COHORT)
        world = cls(folder, domain, shape, seed, epoch, population,
                    segment_tastes=rng.standard_normal((SEGMENTS, TASTE_DIM)),
                    users=pl.DataFrame(), cohorts_through=epoch, last_day=None)
        world.users = world._cohort(epoch, population, rng, returning=True)
        world.users = pl.concat([world.users, world._arrivals(epoch)])
        return world

    @classmethod
    def load(cls, folder: Path) -> World:
        if not (folder / "world.json").exists():
            raise FileNotFoundError(f"no simulated world in {folder}: run simulate() first")
        meta = json.loads((folder / "world.json").read_text())
        return cls(folder, meta["domain"], meta["shape"], meta["seed"],
                   date.fromisoformat(meta["epoch"]), meta["population"],
                   np.array(meta["segment_tastes"]), pl.read_parquet(folder / "users.parquet"),
                   date.fromisoformat(meta["cohorts_through"]),
                   date.fromisoformat(meta["last_day"]) if meta["last_day"] else None,
                   meta.get("scenario"))

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.users.write_parquet(self.folder / "users.parquet")
        meta = {
            "domain": self.domain, "shape": self.shape, "seed": self.seed,
            "epoch": self.epoch.isoformat(), "population": self.population,
            "segment_tastes": self.segment_tastes.tolist(),
            "cohorts_through": self.cohorts_through.isoformat(),
            "last_day": self.last_day.isoformat() if self.last_day else None,
        }
        if self.scenario:
            meta["scenario"] = self.scenario
        (self.folder / "world.json").write_text(json.dumps(meta, indent=1) + "\n")

    def day_number(self, day: date) -> int:
        """Days since the world's epoch: what keys a day's randomness and names its interactions."""
        return (day - self.epoch).days

    def rng(self, stream: Stream, day: date) -> np.random.Generator:
        return rng_for(self.seed, self.domain, stream, self.day_number(day))

    def grow_through(self, day: date) -> None:
        """Add the new users who arrive on each day up to ``day``."""
        cohorts = []
        while self.cohorts_through < day:
            self.cohorts_through += timedelta(days=1)
            cohorts.append(self._arrivals(self.cohorts_through))
        if cohorts:
            self.users = pl.concat([self.users, *cohorts])

    def _arrivals(self, day: date) -> pl.DataFrame:
        rng = self.rng(Stream.COHORT, day)
        return self._cohort(day, int(rng.poisson(self.population * CHURN_SHARE)), rng,
                            returning=False)

    def _cohort(self, day: date, size: int, rng: np.random.Generator, *,
                returning: bool) -> pl.DataFrame:
        """Users first seen on ``day`` (or, if ``returning``, some weeks before it)."""
        segment = rng.integers(SEGMENTS, size=size)
        taste = self.segment_tastes[segment] + TASTE_SPREAD * rng.standard_normal((size, TASTE_DIM))
        days_before = rng.integers(1, 91, size) if returning else np.zeros(size, np.int64)
        first = day.toordinal() - days_before
        last = day.toordinal() + rng.geometric(CHURN_SHARE, size) - 1
        return pl.DataFrame({
            "user_id": user_ids(rng, size),
            "segment": [f"s{s}" for s in segment],
            "consent": np.where(rng.random(size) < DENIED_CONSENT, "denied", "granted"),
            "activity": rng.lognormal(0.0, 0.8, size),
            "first_day": [date.fromordinal(int(d)) for d in first],
            "last_day": [date.fromordinal(int(d)) for d in last],
            "taste": taste,
        }, schema_overrides={"user_id": pl.String, "first_day": pl.Date, "last_day": pl.Date,
                             "taste": pl.Array(pl.Float64, TASTE_DIM)})

    def active(self, day: date) -> pl.DataFrame:
        return self.users.filter(pl.col("first_day") <= day, pl.col("last_day") >= day)

    def traffic(self, day: date, interactions: int, rng: np.random.Generator) -> Traffic:
        """``interactions`` interactions in sessions of active users, plus a few bots."""
        bot_lengths = _bot_sessions(interactions, rng)
        human_lengths = _session_lengths(interactions - int(bot_lengths.sum()), rng)
        users = self.active(day)
        weights = users["activity"].to_numpy()
        who = rng.choice(len(users), size=len(human_lengths), p=weights / weights.sum())
        humans = users[who]
        n_bots = len(bot_lengths)
        sessions = {
            "user_id": np.concatenate([humans["user_id"].to_numpy(), user_ids(rng, n_bots)]),
            "segment": np.concatenate([humans["segment"].to_numpy(),
                                       [f"s{s}" for s in rng.integers(SEGMENTS, size=n_bots)]]),
            "consent": np.concatenate([humans["consent"].to_numpy(), ["granted"] * n_bots]),
            "is_new_user": np.concatenate([(humans["first_day"] == day).to_numpy(),
                                           np.ones(n_bots, bool)]),
            "bot": np.concatenate([np.zeros(len(humans), bool), np.ones(n_bots, bool)]),
            "active_until": np.concatenate([
                (humans["last_day"].cast(pl.Int64).to_numpy() + 1) * DAY_S,
                np.full(n_bots, np.iinfo(np.int64).max)]),
            "taste": np.concatenate([humans["taste"].to_numpy(), np.zeros((n_bots, TASTE_DIM))]),
        }
        lengths = np.concatenate([human_lengths, bot_lengths])
        gaps = np.concatenate([
            rng.lognormal(np.log(40.0), 0.8, int(human_lengths.sum())) + 2,  # humans read, type
            rng.integers(1, 6, int(bot_lengths.sum())),                       # bots, seconds apart
        ])
        starts = np.concatenate([
            np.clip(rng.normal(14 * 3600, 4.5 * 3600, len(human_lengths)), 0, 23 * 3600),
            rng.uniform(0, 22 * 3600, n_bots),
        ])
        return _arrange(self.domain, day, self.day_number(day), sessions, lengths, starts, gaps)


def _session_lengths(interactions: int, rng: np.random.Generator) -> np.ndarray:
    """Geometric session lengths (at least 1) summing exactly to ``interactions``."""
    lengths = rng.geometric(1 / MEAN_SESSION, interactions + 1)
    ends = np.cumsum(lengths)
    count = int(np.searchsorted(ends, interactions)) + 1
    lengths = lengths[:count]
    lengths[-1] -= int(ends[count - 1]) - interactions
    return lengths[lengths > 0]


def _bot_sessions(interactions: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of the day's bot sessions (dozens of identical requests), at most 1/10 of traffic."""
    lengths = rng.integers(*BOT_SESSION, rng.poisson(BOTS_PER_1000 * interactions / 1000))
    return lengths[np.cumsum(lengths) <= interactions // 10]


def _arrange(domain: str, day: date, day_number: int, sessions: dict[str, np.ndarray],
             lengths: np.ndarray, starts: np.ndarray, gaps: np.ndarray) -> Traffic:
    """Lay sessions out in time; number sessions and interactions in time order, named by the
    world's day number (not the date: ids key hashes downstream, e.g. the label model's folds)."""
    by_start = np.argsort(starts, kind="stable")
    session_of = np.repeat(np.arange(len(lengths)), lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    gaps = gaps.astype(np.int64)
    elapsed = np.cumsum(gaps) - gaps
    offset = elapsed - elapsed[first]
    served_at = day_start(day) + starts.astype(np.int64)[session_of] + offset
    session_rank = np.empty_like(by_start)
    session_rank[by_start] = np.arange(len(lengths))
    order = np.lexsort((offset, session_rank[session_of], served_at))
    session_of = session_of[order]
    stamp = f"d{day_number:04d}"
    return Traffic(
        domain=domain,
        day=day,
        day_number=day_number,
        interaction_id=np.array([f"i_{domain}_{stamp}_{n:06d}" for n in range(len(order))],
                                dtype=object),
        session_id=np.array([f"s_{domain}_{stamp}_{session_rank[s]:05d}" for s in session_of],
                            dtype=object),
        session=session_of,
        served_at=served_at[order],
        **{name: values[session_of] for name, values in sessions.items()},
    )
