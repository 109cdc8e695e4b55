"""OTLP JSON exports decoded: their spans, log records and span events, whatever JSON printer wrote them.

Reads an OTLP JSON export (``{"resourceSpans": [...]}``, and ``{"resourceLogs": [...]}`` for events
sent as log records): one object per file, or one per line as the collector's file exporter writes
them. Keys may be camelCase (OTLP JSON) or snake_case (protobuf's JSON printer keeping the proto field
names), int64s strings or numbers, trace and span ids hex (OTLP JSON) or base64 (protobuf's JSON
printer, for bytes); ids are normalised to lowercase hex, so each form lands the same events.
Records are spans and log records, numbered from 1 in file order (a line that is not JSON counts as
one record, rejected as ``malformed_json``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from flywheel_pipeline.importers.base import Rejected

TRACE_ID_BYTES, SPAN_ID_BYTES = 16, 8
_SNAKE = re.compile(r"_([a-z0-9])")
_SIGNALS = (("resourceSpans", "scopeSpans", "spans"), ("resourceLogs", "scopeLogs", "logRecords"))

SpanIds = tuple[str | None, str | None]  # (trace id, span id) as hex; None: missing or invalid


class Record(NamedTuple):
    """A span or a log record of the file, with its number and its resource's attributes."""

    number: int
    data: dict[str, Any]
    resource: dict[str, Any]
    log: bool


@dataclass(frozen=True)
class SpanEvent:
    """A span event, or a log record of the span, with its fields: the attributes, with a
    ``gen_ai.event.content`` JSON object and the body merged in."""

    name: str
    fields: dict[str, Any]
    nanos: int  # when it happened; 0 when not recorded


def value(any_value: dict[str, Any]) -> Any:
    """An OTLP AnyValue as Python (``{"stringValue": "x"}`` -> ``"x"``; intValue may be a string)."""
    for kind, raw in any_value.items():
        if kind == "intValue":
            return int(raw)
        if kind == "doubleValue":
            return float(raw)
        if kind == "arrayValue":
            return [value(v) for v in raw.get("values", [])]
        if kind == "kvlistValue":
            return attributes(raw.get("values", []))
        return raw
    return None


def attributes(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """OTLP key-value pairs as a dict of Python values."""
    return {pair["key"]: value(pair.get("value") or {}) for pair in pairs}


def parse_json(text: str) -> Any:
    """The JSON value of ``text``; None when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def mapping(raw: Any) -> dict[str, Any]:
    """A map as written: a dict, or a JSON object in a string; else empty."""
    parsed = parse_json(raw) if isinstance(raw, str) else raw
    return parsed if isinstance(parsed, dict) else {}


def hex_id(raw: Any, size: int) -> str | None:
    """A trace or span id of ``size`` bytes as lowercase hex, from hex (OTLP JSON) or base64
    (protobuf's JSON printer); None when it is neither."""
    if not isinstance(raw, str):
        return None
    if len(raw) == 2 * size and all(c in string.hexdigits for c in raw):
        return raw.lower()
    try:
        decoded = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded.hex() if len(decoded) == size else None


def span_ids(data: dict[str, Any]) -> SpanIds:
    """The (trace id, span id) of a span or log record, as hex."""
    return hex_id(data.get("traceId"), TRACE_ID_BYTES), hex_id(data.get("spanId"), SPAN_ID_BYTES)


def _camel_case(raw: Any) -> Any:
    """protobuf's JSON with the proto field names kept (``resource_spans``) in OTLP JSON's camelCase."""
    if isinstance(raw, dict):
        return {_SNAKE.sub(lambda m: m[1].upper(), key): _camel_case(v) for key, v in raw.items()}
    if isinstance(raw, list):
        return [_camel_case(v) for v in raw]
    return raw


def _nanos(raw: Any) -> int:
    """An int64 of nanoseconds, written as a string or a number; 0 when missing or not one."""
    try:
        return int(raw or 0)
    except (TypeError, ValueError):
        return 0


def utc_time(nanos: Any) -> datetime:
    """An int64 of nanoseconds since the epoch as a UTC time; raises when it is not one."""
    return datetime.fromtimestamp(int(nanos) / 1e9, UTC)


def _exports(text: str) -> Iterator[tuple[dict | None, str]]:
    """Each export object of the file's text (None where a line is not JSON) with its text."""
    try:
        yield json.loads(text), text
        return
    except json.JSONDecodeError:
        pass
    for line in text.splitlines():
        if line.strip():
            try:
                yield json.loads(line), line
            except json.JSONDecodeError:
                yield None, line


def records(text: str) -> Iterator[Record | Rejected]:
    """The file's spans and log records in file order; a line that is no OTLP export, rejected."""
    number = 0
    for export, written in _exports(text):
        if isinstance(export, dict) and ("resource_spans" in export or "resource_logs" in export):
            export = _camel_case(export)
        signals = [keys for keys in _SIGNALS if isinstance(export, dict) and isinstance(export.get(keys[0]), list)]
        if not signals:
            number += 1
            yield Rejected.of(number, "malformed_json" if export is None else "not_an_otlp_export", written)
        for resources, scopes, items in signals:
            for group in export[resources]:
                resource = attributes((group.get("resource") or {}).get("attributes", []))
                for scope in group.get(scopes, []):
                    for item in scope.get(items, []):
                        number += 1
                        yield Record(number, item, resource, items == "logRecords")


def logs_by_span(found: Iterable[Record | Rejected]) -> dict[SpanIds, list[Record]]:
    """The log records among ``found``, by the ids of their span."""
    by_span: dict[SpanIds, list[Record]] = {}
    for record in found:
        if isinstance(record, Record) and record.log:
            by_span.setdefault(span_ids(record.data), []).append(record)
    return by_span


def span_events(span: dict[str, Any], logs: list[Record]) -> list[SpanEvent]:
    """The span's events, then the log records of the span (events sent as logs)."""
    events = []
    for event in span.get("events", []):
        attrs = attributes(event.get("attributes", []))
        events.append(SpanEvent(event.get("name", ""), {**attrs, **mapping(attrs.get("gen_ai.event.content"))},
                                _nanos(event.get("timeUnixNano"))))
    for log in logs:
        attrs = attributes(log.data.get("attributes", []))
        fields = {**attrs, **mapping(attrs.get("gen_ai.event.content")), **mapping(value(log.data.get("body") or {}))}
        events.append(SpanEvent(log.data.get("eventName") or attrs.get("event.name", ""), fields,
                                _nanos(log.data.get("timeUnixNano")) or _nanos(log.data.get("observedTimeUnixNano"))))
    return events
