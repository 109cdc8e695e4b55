"""What every importer yields: events of the contract (docs/events.md), or a record it could not map.

An importer reads a file another tool wrote (OpenTelemetry spans, a bandit log, a review tool's
export) and yields, record by record, either event dicts that follow the event contract (or, for
a vectorised reader, frames of them already encoded: ``Encoded``), a
``Rejected`` naming the record and why it could not be mapped, or a ``Skipped`` record that is not
meant for the flywheel (a span of a database call in a trace export): records in = records mapped +
records rejected + records skipped, as for accumulation's lines.

An event accounts for one source record unless it says otherwise under ``RECORDS``: a slate built
from three rows of a bandit log carries 3, a signal derived from a span already counted 0. The
writer drops the key before the event lands.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

import polars as pl

from flywheel_pipeline.events import ID_PATTERN

QUARANTINED_TEXT_CHARS = 1000  # as much of a rejected record as the quarantine keeps
RECORDS = "_records"  # how many source records an event accounts for (default 1); never written


@dataclass(frozen=True)
class Rejected:
    """A source record that maps to no event: its 1-based number in the file and the reason."""

    record: int  # the line, row, span or task number in the source file, from 1
    reason: str  # e.g. ``missing_field:propensity``, ``invalid_value:position``
    text: str  # the record as text, cut to QUARANTINED_TEXT_CHARS
    day: date | None = None  # the record's own day when it could be read (its quarantine partition)

    @classmethod
    def of(cls, record: int, reason: str, raw: object, day: date | None = None) -> Rejected:
        """``raw`` as the quarantine keeps it: text as it is, a parsed record (a span, a row) as JSON."""
        text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
        return cls(record, reason, text[:QUARANTINED_TEXT_CHARS], day)


@dataclass(frozen=True)
class Skipped:
    """A source record that is not meant for the flywheel (counted in the report, not quarantined)."""

    record: int
    reason: str  # e.g. ``not_a_chat_span``


@dataclass(frozen=True)
class Encoded:
    """Events already written as JSON, a frame at a time: a vectorised reader's way out (a bandit
    log's millions of rows never become Python dicts). Columns: ``day`` (the event's UTC day),
    ``event_type``, ``records`` (as under ``RECORDS``) and ``line`` (the event as JSON)."""

    frame: pl.DataFrame


Event = dict[str, Any]  # one event of the contract, ready to be written as a landing line
Mapped = Iterator[Event | Encoded | Rejected | Skipped]

_ID = re.compile(ID_PATTERN)


def is_id(value: object) -> bool:
    """Whether ``value`` is an id of the contract (1-128 of ``A-Z a-z 0-9 _ . : -``)."""
    return isinstance(value, str) and _ID.match(value) is not None


class UnreadableFile(ValueError):
    """A file that cannot be imported at all (not the format, a declared column missing)."""
