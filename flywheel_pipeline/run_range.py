"""The days `flywheel run` covers, checked before anything is launched.

A run's days must be day partitions: on or after the first one, and ended (the latest is yesterday,
UTC). The first day partition is ``partitions_start`` (flywheel.yaml), or the earliest day an
import wrote when that is earlier: `flywheel import` records it in ``<home>/partitions_start``
(``record_imported_days``) and the Dagster definitions start their days there, so a log of any age
needs no edit. A whole cycle also needs traffic in both of the domain's windows, as the training
code computes them from the run's last day: the held-out window (``holdout_days`` up to it) and the
training window (``lookback_days`` before that); a log no longer than the held-out window is
refused with the windows that fit it. The traffic a run sees is the domain's landing batches of its
days, which it accumulates, and the days its warehouse already holds. A run that lacks them would
fail minutes later; refused here, in seconds, the message names what is missing and the option or
setting to change. Days older than ``retention_days`` run, with a note (``expiring``): the
retention job deletes them once it runs, counting back from the calendar (how long events may be
kept, docs/privacy.md), so an old log needs a longer retention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel_pipeline.batches import LABEL_BATCHES, batch_day
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.home import HOME_ENV, Home, write_atomically
from flywheel_pipeline.warehouse import WarehouseBusy
from flywheel_pipeline.warehouses import Warehouses

if TYPE_CHECKING:
    from flywheel_pipeline.training import Windows


ACCUMULATE = "accumulate"  # `flywheel run --only accumulate`: accumulate -> filter -> label
IMPORTED_START = "partitions_start"  # <home>/partitions_start: the earliest day an import wrote


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
    held, last = held_days(Warehouses.for_settings(home, config.warehouse), domain), end or today - timedelta(days=1)
    first = start or default_start(config, domain, held, last)
    for check in _checks(home, config, domain, held, first, last, today, accumulate_only):
        check()
    return first, last


def cycle_refusals(home: Home, config: FlywheelConfig, domain: str, last: date,
                   today: date) -> list[str]:
    """Every reason a whole cycle of ``domain`` ending ``last`` (from the default first day) would
    be refused, each with its fix: an import's next steps name them all at once."""
    held = held_days(Warehouses.for_settings(home, config.warehouse), domain)
    first = default_start(config, domain, held, last)
    refusals = []
    for check in _checks(home, config, domain, held, first, last, today, accumulate_only=False):
        try:
            check()
        except RunRefused as refused:
            refusals.append(str(refused))
    return refusals


def _checks(home: Home, config: FlywheelConfig, domain: str, held: HeldDays, first: date,
            last: date, today: date, accumulate_only: bool) -> list[Callable[[], None]]:
    """A run's checks, in the order a refusal names them: its days are partitions, it has traffic
    (both windows, or something to accumulate)."""
    begin, latest = partitions_start(config, home), today - timedelta(days=1)
    traffic = (partial(check_something_to_accumulate, home, domain, held, first, last)
               if accumulate_only else partial(check_windows, config, domain, held, first, last,
                                               latest, begin))
    return [partial(check_partitions, config, begin, first, last, latest), traffic]


def partitions_start(config: FlywheelConfig, home: Home) -> date:
    """The first day partition: ``partitions_start`` (flywheel.yaml), or the earliest day an
    import wrote into the home when that is earlier."""
    path = home.root / IMPORTED_START
    imported = date.fromisoformat(path.read_text().strip()) if path.exists() else None
    return min(config.partitions_start, imported) if imported else config.partitions_start


def record_imported_days(home: Home, config: FlywheelConfig, days: Iterable[date]) -> None:
    """Move the home's first day partition back to the earliest of an import's ``days`` when it is
    earlier, so that they are partitions (the Dagster definitions start there when next loaded)."""
    earliest = min(days, default=None)
    if earliest is not None and earliest < partitions_start(config, home):
        write_atomically(home.root / IMPORTED_START, f"{earliest}\n".encode())


def held_days(warehouses: Warehouses, domain: str) -> HeldDays:
    """The days of ``domain``'s landing batches and of the interactions in its warehouse."""
    folder = warehouses.home.landing / domain
    return HeldDays(_batch_days(folder), _batch_days(folder / LABEL_BATCHES), _warehouse_days(warehouses, domain))


def _batch_days(folder: Path) -> frozenset[date]:
    """The days of the non-empty landing batches in ``folder`` (batches.batch_day)."""
    paths = folder.glob("*.jsonl") if folder.exists() else []
    return frozenset(day for path in paths
                     if (day := batch_day(path)) is not None and path.stat().st_size > 0)


def _warehouse_days(warehouses: Warehouses, domain: str) -> frozenset[date] | None:
    """The days of ``domain``'s accumulated interactions; None while a run holds the warehouse."""
    try:
        return warehouses.interaction_days(domain)
    except WarehouseBusy:
        return None


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


def check_partitions(config: FlywheelConfig, begin: date, first: date, last: date,
                     latest: date) -> None:
    """Refuse days that are no day partitions: before ``begin`` (``partitions_start``, or the
    earliest day imported), or after ``latest`` (yesterday: a day has no partition before it has
    ended)."""
    if first > last:
        raise RunRefused(f"--start {first} is after --end {last}")
    if first < begin:  # then before flywheel.yaml's partitions_start too
        also = f", or pass --start {begin} or later" if last >= begin else ""
        raise RunRefused(f"the days {first}..{last} start before partitions_start "
                         f"{config.partitions_start} (flywheel.yaml), the first day partition the "
                         f"pipeline knows: set partitions_start to {first} or earlier{also}")
    if last > latest:
        raise RunRefused(f"--end {last} has not ended yet: a day is a partition once it has ended "
                         f"(UTC), the latest is {latest}: pass --end {latest} or earlier")


def check_windows(config: FlywheelConfig, domain: str, held: HeldDays, first: date, last: date,
                  latest: date, begin: date) -> None:
    """Refuse a cycle whose held-out or training window has no day of traffic (``latest``: the
    last day a run may end on; ``begin``: the first day partition). A busy warehouse's days cannot
    be read: then the launch tells."""
    if held.warehouse is None:
        return
    settings, spans = config.domain(domain), windows(config, domain, last)
    seen = held.seen_by(first, last)
    held_out = f"{spans.holdout_start}..{spans.holdout_end}"
    if not _any_between(seen, spans.holdout_start, spans.holdout_end):
        fix = _held_out_fix(config, domain, held, latest, begin)
        raise RunRefused(f"{domain}: no traffic in the held-out window {held_out} (holdout_days "
                         f"{settings.holdout_days} up to the run's last day): "
                         f"{held.summary(domain)}; {fix}")
    if not _any_between(seen, spans.train_start, spans.train_end):
        fix = _training_fix(config, domain, held, first, spans)
        raise RunRefused(f"{domain}: no traffic in the training window {spans.train_start}.."
                         f"{spans.train_end} (lookback_days {settings.lookback_days} before the "
                         f"held-out window {held_out}): {held.summary(domain)}; {fix}")


def _held_out_fix(config: FlywheelConfig, domain: str, held: HeldDays, latest: date,
                  begin: date) -> str:
    """What to change when the held-out window has no traffic: --end on the last day of traffic
    that is a partition (and windows that fit it, when it is short), or traffic."""
    ended = sorted(day for day in held.traffic() if day <= latest)
    fit = f"; then {fix}" if (fix := _fitting_windows(config, domain, held)) else ""
    if ended and ended[-1] < begin:
        return (f"pass --end {ended[-1]}, the last day of traffic it holds, and set "
                f"partitions_start (flywheel.yaml, now {config.partitions_start}) to {ended[0]} or "
                f"earlier: its traffic is before it{fit}")
    if ended:
        return f"pass --end {ended[-1]}, the last day of traffic it holds{fit}"
    return f"land or import its traffic (docs/importing.md), or {_simulate(config, domain, held)}"


def _training_fix(config: FlywheelConfig, domain: str, held: HeldDays, first: date,
                  spans: Windows) -> str:
    """What to change when the training window has no traffic: the range, the windows (a log no
    longer than the held-out window), or the home."""
    skipped = sorted(day for day in held.landing if spans.train_start <= day < first)
    if skipped:
        return (f"its landing holds {len(skipped)} of those days from {skipped[0]}, before the "
                f"run's first day {first}: pass --start {skipped[0]} (or leave --start out)")
    if fit := _fitting_windows(config, domain, held):
        return fit
    return (f"land or import the days {spans.train_start}..{spans.train_end} (docs/importing.md), "
            f"{_simulate(config, domain, held)}, or shorten domains.{domain}.lookback_days in "
            f"flywheel.yaml")


def _fitting_windows(config: FlywheelConfig, domain: str, held: HeldDays) -> str | None:
    """The windows to set when the home's traffic spans no more days than the held-out window (no
    run ending on its last day has a day to train on): both within those days, about half of them
    held out (``holdout_days`` <= ``lookback_days``); None when the windows are not the problem."""
    settings, days = config.domain(domain), sorted(held.traffic())
    span = (days[-1] - days[0]).days + 1 if days else 0
    if not days or span > settings.holdout_days:
        return None
    needed = (f"lookback_days {settings.lookback_days} + holdout_days {settings.holdout_days} need "
              f"{settings.lookback_days + settings.holdout_days} days, its traffic spans {span}")
    if span < 2:
        return f"{needed}: a cycle needs 2 days (one to train on, one held out): import more days"
    holdout = span // 2
    return (f"{needed}: set domains.{domain}.lookback_days to {span - holdout} and holdout_days to "
            f"{holdout} in flywheel.yaml, or import more days")


def expiring(config: FlywheelConfig, domain: str, first: date, today: date) -> str | None:
    """What the retention job will delete of the days from ``first`` on, and the retention that
    keeps them; None when nothing. It counts back from ``today`` (the calendar, not the days held:
    how long events may be kept) and runs on its own schedule, never within a run."""
    keep = config.domain(domain).retention_days
    cutoff = today - timedelta(days=keep)
    if first >= cutoff:
        return None
    return (f"{domain}: the days from {first} are older than retention_days {keep}: the retention "
            f"job (schedule retention_daily, once on) deletes the events before {cutoff}, counting "
            f"back from today; to keep them, set domains.{domain}.retention_days in flywheel.yaml "
            f"to at least {(today - first).days} (the days since {first}), plus the days to keep "
            f"them for")


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
