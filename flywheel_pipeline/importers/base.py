"""What every importer yields: events of the contract (docs/events.md), or a record it could not map.

An importer reads a file another tool wrote (OpenTelemetry spans, a bandit log, a review tool's
export) and yields, record by record, either event dicts that follow the event contract or a
``Rejected`` naming the record and why it could not be mapped; records in = records mapped +
records rejected, as for accumulation's lines.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

QUARANTINED_TEXT_CHARS = 1000  # as much of a rejected record as the quarantine keeps


@dataclass(frozen=True)
class Rejected:
    """A source record that maps to no event: its 1-based number in the file and the reason."""

    record: int  # the line, row, span or task number in the source file, from 1
    reason: str  # e.g. ``missing_field:propensity``, ``invalid_value:position``
    text: str  # the record as text, cut to QUARANTINED_TEXT_CHARS

    @classmethod
    def of(cls, record: int, reason: str, raw: object) -> Rejected:
        return cls(record, reason, str(raw)[:QUARANTINED_TEXT_CHARS])


Event = dict[str, Any]  # one event of the contract, ready to be written as a landing line
Mapped = Iterator[Event | Rejected]
