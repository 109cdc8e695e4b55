"""The landing writer: an importer's events as landing batches, its rejected records in the quarantine.

An importer is a landing adapter. Its events are written as batches named
``<day>.<source>.jsonl`` (``source``: the format and the file's stem, e.g. ``otel-traces``), one
per event day, in ``<home>/landing/<domain>/`` (``label`` events in ``labels/``), where the next
accumulation run picks them up like the product's own batches. Each batch is written whole to a
temporary file and renamed, so a crash never leaves half a batch; importing the same file again
rewrites the same batches (event ids come from the source, so accumulation deduplicates) and
removes that source's batches it no longer produces. Days before the first day partition move it
back to them (``run_range.record_imported_days``), so a log of any age is runnable. Rejected
records go to ``raw.quarantine`` (source_file: the imported file's absolute path; source_line: the
record number) in one transaction that replaces the file's earlier rejects, redacted like
accumulation's.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO

import polars as pl

from flywheel_pipeline import privacy
from flywheel_pipeline.batches import LABEL_BATCHES
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.home import Home
from flywheel_pipeline.importers.base import RECORDS, Encoded, Event, Mapped, Rejected, Skipped
from flywheel_pipeline.run_range import record_imported_days
from flywheel_pipeline.sources import Scope
from flywheel_pipeline.warehouse import ensure_raw_tables, transaction
from flywheel_pipeline.warehouses import Warehouses

_MAX_OPEN_BATCHES = 64  # temporary batch files held open at once while events stream in


def source_name(fmt: str, path: Path) -> str:
    """The batches' source: a slug of the format and the file's stem (``otel-traces``)."""
    return re.sub(r"[^a-z0-9]+", "-", f"{fmt}-{path.stem}".lower()).strip("-")


@dataclass
class ImportReport:
    """What one import read, wrote and rejected: records in = mapped + rejected + skipped."""

    format: str
    domain: str
    path: Path
    source: str
    records_mapped: int = 0
    events: Counter[str] = field(default_factory=Counter)  # by event_type
    rejected: Counter[str] = field(default_factory=Counter)  # by reason
    skipped: Counter[str] = field(default_factory=Counter)  # by reason
    batches: list[str] = field(default_factory=list)  # relative to the landing folder
    days: list[date] = field(default_factory=list)  # the event days the batches carry
    removed_batches: list[str] = field(default_factory=list)  # this source's stale batches
    catalogue_items: int | None = None  # items of the domain's catalogue file kept (flywheel_pipeline/catalogue.py)

    @property
    def records(self) -> int:
        return self.records_mapped + self.rejected.total() + self.skipped.total()


def _event_day(event: Event, today: date) -> date:
    """The UTC day of the event's timestamp (an unreadable one lands today, where accumulation
    quarantines it)."""
    timestamp = str(event.get("timestamp"))
    try:
        if timestamp.endswith("Z"):  # UTC already: the day is its first ten characters
            return date.fromisoformat(timestamp[:10])
        return datetime.fromisoformat(timestamp).astimezone(UTC).date()
    except ValueError:
        return today


class _Batches:
    """Temporary batch files, one per (folder, day), appended to as events stream in; at most
    _MAX_OPEN_BATCHES open at a time."""

    def __init__(self, landing: Path, domain: str, source: str) -> None:
        self.landing, self.domain, self.source = landing, domain, source
        self.started: dict[tuple[date, bool], tuple[Path, Path]] = {}  # -> (final path, temporary path)
        self.open: dict[tuple[date, bool], IO[str]] = {}

    def folder(self, labels: bool) -> Path:
        return self.landing / self.domain / LABEL_BATCHES if labels else self.landing / self.domain

    def add(self, day: date, labels: bool, text: str) -> None:
        """Append ``text`` (lines, each ending in a newline) to the batch of ``day``."""
        key = (day, labels)
        handle = self.open.get(key)
        if handle is None:
            if len(self.open) >= _MAX_OPEN_BATCHES:
                self.open.pop(next(iter(self.open))).close()
            if key not in self.started:
                final = self.folder(labels) / f"{day.isoformat()}.{self.source}.jsonl"
                final.parent.mkdir(parents=True, exist_ok=True)
                self.started[key] = (final, final.with_name(f".{final.name}.{os.getpid()}.tmp"))
                handle = self.started[key][1].open("w", encoding="utf-8")
            else:
                handle = self.started[key][1].open("a", encoding="utf-8")
            self.open[key] = handle
        handle.write(text)

    def commit(self) -> tuple[list[Path], list[Path]]:
        """Rename every batch into place; remove this source's batches not written this time.
        Returns (written, removed)."""
        for handle in self.open.values():
            handle.close()
        written = {final for final, _ in self.started.values()}
        for final, temporary in self.started.values():
            temporary.replace(final)
        folders = [folder for labels in (False, True) if (folder := self.folder(labels)).exists()]
        stale = [path for folder in folders for path in folder.glob(f"*.{self.source}.jsonl") if path not in written]
        for path in stale:
            path.unlink()
        for leftover in (path for folder in folders for path in folder.glob(f".*.{self.source}.jsonl.*.tmp")):
            leftover.unlink(missing_ok=True)  # an earlier import's, which crashed
        return sorted(written), sorted(stale)

    def discard(self) -> None:
        for handle in self.open.values():
            handle.close()
        for _, temporary in self.started.values():
            temporary.unlink(missing_ok=True)


def write_import(home: Home, config: FlywheelConfig, fmt: str, path: Path, domain: str, mapped: Mapped,
                 now: datetime | None = None) -> ImportReport:
    """Stream ``mapped`` (an importer's output for the file at ``path``) into landing batches and
    the quarantine."""
    now = now or datetime.now(UTC)
    report = ImportReport(fmt, domain, path, source_name(fmt, path))
    batches = _Batches(home.landing, domain, report.source)
    rejects: list[Rejected] = []
    days: set[date] = set()
    try:
        for item in mapped:
            if isinstance(item, Rejected):
                rejects.append(item)
                report.rejected[item.reason] += 1
            elif isinstance(item, Skipped):
                report.skipped[item.reason] += 1
            elif isinstance(item, Encoded):
                _add_encoded(batches, report, days, item.frame)
            else:
                report.records_mapped += item.pop(RECORDS, 1)
                report.events[item["event_type"]] += 1
                day = _event_day(item, now.date())
                days.add(day)
                batches.add(day, item["event_type"] == "label", json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n")
    except BaseException:
        batches.discard()
        raise
    record_imported_days(home, config, days)  # before the batches: their days are partitions
    written, removed = batches.commit()
    report.batches = [str(p.relative_to(home.landing)) for p in written]
    report.removed_batches = [str(p.relative_to(home.landing)) for p in removed]
    report.days = sorted(days)
    _quarantine(home, config, domain, path, rejects, now)
    return report


def _add_encoded(batches: _Batches, report: ImportReport, days: set[date], frame: pl.DataFrame) -> None:
    """A frame of encoded events into the batches of their days, a write per (day, event type)."""
    report.records_mapped += int(frame["records"].sum())
    for (day, event_type), group in frame.group_by("day", "event_type", maintain_order=True):
        report.events[event_type] += group.height
        days.add(day)
        batches.add(day, event_type == "label", "\n".join(group["line"]) + "\n")


def _quarantine(home: Home, config: FlywheelConfig, domain: str, path: Path, rejects: list[Rejected],
                now: datetime) -> None:
    """Replace the file's rows in raw.quarantine with ``rejects``, in one transaction."""
    frame = pl.DataFrame(
        {"event_date": [r.day or now.date() for r in rejects], "source_line": [r.record for r in rejects],
         "reason": [r.reason for r in rejects], "line": [r.text for r in rejects]},
        schema={"event_date": pl.Date, "source_line": pl.Int64, "reason": pl.String, "line": pl.String},
    )
    params = {"domain": domain, "file": str(path), "now": now.astimezone(UTC).replace(tzinfo=None)}
    # the quarantine alone: a file's earlier rejects may lie on any day
    quarantine = Scope(whole=("raw.quarantine",))
    with Warehouses.for_settings(home, config.warehouse).for_days(domain, quarantine) as (con, _):
        ensure_raw_tables(con)
        privacy.install_redaction(con)
        con.register("rejects", frame)
        with transaction(con):
            con.execute("DELETE FROM raw.quarantine WHERE domain = $domain AND source_file = $file",
                        {k: params[k] for k in ("domain", "file")})
            con.execute("""INSERT INTO raw.quarantine
                           SELECT $domain, event_date, $file, source_line, NULL, reason, quarantined_line(line), $now
                           FROM rejects""", params)
