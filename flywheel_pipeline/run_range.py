"""The days `flywheel run` covers, checked before anything is launched.

A run's days must be day partitions: on or after ``partitions_start``, and ended (the latest is
yesterday, UTC). A whole cycle also needs traffic in both of the domain's windows, as the training
code computes them from the run's last day: the held-out window (``holdout_days`` up to it) and the
training window (``lookback_days`` before that). The traffic a run sees is the domain's landing
batches of its days, which it accumulates, and the days its warehouse already holds. A run that
lacks them would fail minutes later; refused here, in seconds, the message names what is missing
and the option or setting to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from flywheel_pipeline.accumulation import LABEL_BATCHES, batch_day
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.home import HOME_ENV, Home
from flywheel_pipeline.warehouse import WarehouseBusy, connect

if TYPE_CHECKING:
    from flywheel_pipeline.training import Windows


ACCUMULATE = "accumulate"  # `flywheel run --only accumulate`: accumulate -> filter -> label


class RunRefused(ValueError):
    """A run over these days would fail: what is missing, and what to change."""


@dataclass(frozen=True)
class HeldDays:
    """The days of a domain's events the home holds."""

    landing: frozenset[date]  # batches of interactions: <day>.jsonl and <day>.<source>.jsonl
    reviews: frozenset[date]  # review batches (labels/<day>.jsonl): label events only
    warehouse: frozenset[date] | None  # raw.interactions' days; None: busy (a run writes it)

    def traffic(self) -> set[date]:
        """Every day of interactions the home holds: in landing batches or in the warehouse."""
        return set(self.landing | (self.warehouse or frozenset()))

    def seen_by(self, first: date, last: date) -> set[date]:
        """The days of interactions a run over first..last sees: the landing batches it
        accumulates and every day the warehouse already holds."""
        landing = {day for day in self.landing if first <= day <= last}
        return landing | set(self.warehouse or ())

    def any_in(self, first: date, last: date) -> bool:
        """Whether a run over first..last has anything to accumulate (or rebuild)."""
        days = self.landing | self.reviews | (self.warehouse or frozenset())
        return any(first <= day <= last for day in days)

    def summary(self, domain: str) -> str:
        """``the home holds assistant traffic of 2026-11-29..2026-12-05 (7 days)``."""
        days = sorted(self.traffic())
        if not days:
            return f"the home holds no {domain} traffic"
        return f"the home holds {domain} traffic of {days[0]}..{days[-1]} ({len(days)} days)"


def run_range(home: Home, config: FlywheelConfig, domain: str, start: date | None,
              end: date | None, today: date, accumulate_only: bool = False) -> tuple[date, date]:
    """The first and last day of a run of ``domain``: ``start``..``end``, by default the domain's
    windows ending yesterday, from no earlier than the first day of traffic the home holds.
    Raises RunRefused when the run would fail: days that are no partitions, or (a whole cycle) a
    window without traffic, or (``accumulate_only``) nothing to accumulate."""
    held, latest = held_days(home, domain), today - timedelta(days=1)
    last = end or latest
    first = start or default_start(config, domain, held, last)
    check_partitions(config, first, last, latest)
    if accumulate_only:
        check_something_to_accumulate(home, domain, held, first, last)
    else:
        check_windows(config, domain, held, first, last, latest)
    return first, last


def held_days(home: Home, domain: str) -> HeldDays:
    """The days of ``domain``'s landing batches and of the interactions in its warehouse."""
    folder = home.landing / domain
    return HeldDays(_batch_days(folder), _batch_days(folder / LABEL_BATCHES),
                    _warehouse_days(home, domain))


def _batch_days(folder: Path) -> frozenset[date]:
    """The days of the non-empty landing batches in ``folder`` (accumulation.batch_day)."""
    paths = folder.glob("*.jsonl") if folder.exists() else []
    return frozenset(day for path in paths
                     if (day := batch_day(path)) is not None and path.stat().st_size > 0)


def _warehouse_days(home: Home, domain: str) -> frozenset[date] | None:
    """The days of ``domain``'s accumulated interactions; None while a run holds the warehouse."""
    path = home.warehouse(domain)
    if not path.exists():
        return frozenset()
    try:
        with connect(path, read_only=True) as con:
            rows = con.execute("SELECT DISTINCT event_date FROM raw.interactions WHERE domain = ?",
                               [domain]).fetchall()
    except WarehouseBusy:
        return None
    except duckdb.CatalogException:  # a warehouse without raw tables yet
        return frozenset()
    return frozenset(day for (day,) in rows)


def default_start(config: FlywheelConfig, domain: str, held: HeldDays, last: date) -> date:
    """The first day of the domain's windows ending ``last``, or the first day of traffic the home
    holds when that is later (never after ``last``)."""
    start = windows(config, domain, last).train_start
    traffic = held.traffic()
    return min(max(start, min(traffic)), last) if traffic else start


def windows(config: FlywheelConfig, domain: str, last: date) -> Windows:
    """The training and held-out windows of a cycle whose last day is ``last``, as training
    splits them (imported here: scikit-learn and MLflow load only when a run is planned)."""
    from flywheel_pipeline.training import split_windows

    return split_windows(last, config.domain(domain))


def check_partitions(config: FlywheelConfig, first: date, last: date, latest: date) -> None:
    """Refuse days that are no day partitions: before ``partitions_start``, or after ``latest``
    (yesterday: a day has no partition before it has ended)."""
    if first > last:
        raise RunRefused(f"--start {first} is after --end {last}")
    begin = config.partitions_start
    if first < begin:
        also = f", or pass --start {begin} or later" if last >= begin else ""
        raise RunRefused(f"the days {first}..{last} start before partitions_start {begin} "
                         f"(flywheel.yaml), the first day partition the pipeline knows: set "
                         f"partitions_start to {first} or earlier{also}")
    if last > latest:
        raise RunRefused(f"--end {last} has not ended yet: a day is a partition once it has ended "
                         f"(UTC), the latest is {latest}: pass --end {latest} or earlier")


def check_windows(config: FlywheelConfig, domain: str, held: HeldDays, first: date, last: date,
                  latest: date) -> None:
    """Refuse a cycle whose held-out or training window has no day of traffic (``latest``: the
    last day a run may end on). A busy warehouse's days cannot be read: then the launch tells."""
    if held.warehouse is None:
        return
    settings, spans = config.domain(domain), windows(config, domain, last)
    seen = held.seen_by(first, last)
    held_out = f"{spans.holdout_start}..{spans.holdout_end}"
    if not _any_between(seen, spans.holdout_start, spans.holdout_end):
        fix = _held_out_fix(config, domain, held, latest)
        raise RunRefused(f"{domain}: no traffic in the held-out window {held_out} (holdout_days "
                         f"{settings.holdout_days} up to the run's last day): "
                         f"{held.summary(domain)}; {fix}")
    if not _any_between(seen, spans.train_start, spans.train_end):
        fix = _training_fix(config, domain, held, first, spans)
        raise RunRefused(f"{domain}: no traffic in the training window {spans.train_start}.."
                         f"{spans.train_end} (lookback_days {settings.lookback_days} before the "
                         f"held-out window {held_out}): {held.summary(domain)}; {fix}")


def _held_out_fix(config: FlywheelConfig, domain: str, held: HeldDays, latest: date) -> str:
    """What to change when the held-out window has no traffic: --end on the last day of traffic
    that is a partition, or traffic."""
    ended = sorted(day for day in held.traffic() if day <= latest)
    begin = config.partitions_start
    if ended and ended[-1] < begin:
        return (f"pass --end {ended[-1]}, the last day of traffic it holds, and set "
                f"partitions_start (flywheel.yaml, now {begin}) to {ended[0]} or earlier: its "
                f"traffic is before it")
    if ended:
        return f"pass --end {ended[-1]}, the last day of traffic it holds"
    return f"land or import its traffic (docs/importing.md), or {_simulate(config, domain, held)}"


def _training_fix(config: FlywheelConfig, domain: str, held: HeldDays, first: date,
                  spans: Windows) -> str:
    """What to change when the training window has no traffic: the range, the home or the window."""
    skipped = sorted(day for day in held.landing if spans.train_start <= day < first)
    if skipped:
        return (f"its landing holds {len(skipped)} of those days from {skipped[0]}, before the "
                f"run's first day {first}: pass --start {skipped[0]} (or leave --start out)")
    return (f"land or import the days {spans.train_start}..{spans.train_end} (docs/importing.md), "
            f"{_simulate(config, domain, held)}, or shorten domains.{domain}.lookback_days in "
            f"flywheel.yaml")


def _simulate(config: FlywheelConfig, domain: str, held: HeldDays) -> str:
    """The command that simulates a home holding both of the domain's windows: a new one when
    this one holds traffic (simulation continues after the days it holds)."""
    settings = config.domain(domain)
    command = f"`flywheel simulate --days {settings.lookback_days + settings.holdout_days}`"
    if not held.traffic():
        return f"simulate both windows ({command})"
    return (f"simulate a home that holds both windows ({command}, in a new {HOME_ENV}: "
            f"simulation continues after the days a home holds)")


def check_something_to_accumulate(home: Home, domain: str, held: HeldDays, first: date,
                                  last: date) -> None:
    """Refuse to accumulate days without a landing batch or an accumulated day."""
    if not held.any_in(first, last):
        raise RunRefused(f"{domain}: nothing to accumulate in {first}..{last}: no landing batch of "
                         f"those days in {home.landing / domain}, none in its warehouse; "
                         f"{held.summary(domain)}: pass --start and --end around its days")


def _any_between(days: set[date], first: date, last: date) -> bool:
    return any(first <= day <= last for day in days)
