"""OpenTelemetry GenAI spans (OTLP JSON export) -> assistant interactions and signals.

The file's records come from importers/otlp.py, each chat span's messages from
importers/genai_dialects.py, whichever GenAI trace dialect wrote them.

- A chat span becomes an ``interaction``. Its input is the text of the last ``user`` message, its
  one impression the text of the first ``assistant`` output, served at the span's end by
  ``gen_ai.response.model`` (else ``gen_ai.request.model``, ``llm.model_name``), policy
  ``champion``, propensity 1. Other spans (HTTP, database, tool, embedding calls), failed calls and
  responses without text (a tool-call request) are skipped, counted but not quarantined: a trace
  export holds them by design. A chat span without its messages (content capture off) is rejected.
  A log record counts with its span's interaction, else it is skipped.
- user: ``user.id`` or ``enduser.id`` (span, then resource attributes), else ``anon:<session>``;
  session: ``session.id``, else ``gen_ai.conversation.id``, else the trace id. Consent is what the
  domain declares (``importing.consent``): spans do not carry it.
- Signals: a ``gen_ai.evaluation.result`` event whose ``gen_ai.evaluation.score.label`` says pass or
  fail (``GOOD_LABELS``, ``BAD_LABELS``) is a ``rating`` of 5 or 1; a ``flywheel.signal`` event
  carries any signal of the contract (attributes ``signal_type``, ``value``, ``text``); and the next
  turn of a conversation re-asking within ``REASK_WINDOW_S`` (its question shares at least half the
  words of the shorter one) is a ``reformulate`` of this one, with the new question.

Ids come from the source: the interaction id is ``otel:<trace id>:<span id>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from flywheel_pipeline.config import ConfigError, FlywheelConfig
from flywheel_pipeline.events import MAX_INPUT_LENGTH, SIGNAL_TYPES
from flywheel_pipeline.importers.base import (
    RECORDS,
    Event,
    Mapped,
    Rejected,
    Skipped,
    UnreadableFile,
    is_id,
)
from flywheel_pipeline.importers.genai_dialects import (
    Dialect,
    Unreadable,
    chat_dialect,
    find_messages,
)
from flywheel_pipeline.importers.otlp import (
    SPAN_ID_BYTES,
    TRACE_ID_BYTES,
    Record,
    SpanEvent,
    attributes,
    hex_id,
    logs_by_span,
    records,
    span_events,
    span_ids,
    utc_time,
)

GOOD_LABELS = frozenset({"pass", "passed", "correct", "relevant", "good", "positive", "helpful", "thumbs_up", "yes"})
BAD_LABELS = frozenset({"fail", "failed", "incorrect", "not_relevant", "irrelevant", "bad", "negative", "unhelpful",
                        "thumbs_down", "no"})
EVALUATION_EVENT = "gen_ai.evaluation.result"
SIGNAL_EVENT = "flywheel.signal"
REASK_WINDOW_S = 10 * 60  # a re-asked question later than this is a new question
REASK_OVERLAP = 0.5  # share of the shorter question's words the next one repeats
_ERROR_STATUS = (2, "STATUS_CODE_ERROR")
_WORD = re.compile(r"\w+")


@dataclass
class _Turn:
    """A chat span mapped to its interaction, awaiting the conversation's next turn."""

    interaction: Event
    conversation: str
    started: datetime
    ended: datetime
    question: str
    events: list[SpanEvent]


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _reasks(earlier: _Turn, later: _Turn) -> bool:
    """The later turn asks the earlier question again, soon: a reformulation."""
    if (later.started - earlier.ended).total_seconds() > REASK_WINDOW_S:
        return False
    first, second = _words(earlier.question), _words(later.question)
    return bool(first and second) and len(first & second) / min(len(first), len(second)) >= REASK_OVERLAP


def _first(attrs: dict, resource: dict, *keys: str) -> Any:
    """The first of ``keys`` set on the span, else on its resource; None when none is."""
    return next((where[k] for k in keys for where in (attrs, resource) if where.get(k) not in (None, "")), None)


def _exchange(record: int, span: dict, attrs: dict, events: list[SpanEvent], declared: Dialect,
              day: date) -> tuple[str, str] | Rejected | Skipped:
    """The span's (question, response): the last user message's text, the first assistant output's,
    from the first dialect that holds the span's messages."""
    try:
        found = find_messages(attrs, events)
    except Unreadable as error:
        return Rejected.of(record, f"invalid_value:{error.args[0]}", span, day)
    dialect, (prompt, response) = found or (declared, (None, None))
    if prompt is None:
        return Rejected.of(record, f"missing_field:{dialect.prompt_field}", span, day)
    if response is None:
        return Rejected.of(record, f"missing_field:{dialect.response_field}", span, day)
    answer = next((text for role, text in response if role == "assistant"), "")
    if not answer.strip():
        return Skipped(record, "no_text_response")
    question = next((text for role, text in reversed(prompt) if role == "user"), "")
    if len(question) > MAX_INPUT_LENGTH:
        return Rejected.of(record, "invalid_value:input", span, day)
    return question, answer


def _ids_and_times(record: int, span: dict) -> tuple[str, str, datetime, datetime] | Rejected:
    """The span's (trace id, span id) as hex, and its start and end."""
    try:
        raw_ids = span["traceId"], span["spanId"]
        started, ended = utc_time(span["startTimeUnixNano"]), utc_time(span["endTimeUnixNano"])
    except KeyError as error:
        return Rejected.of(record, f"missing_field:{error.args[0]}", span)
    except (TypeError, ValueError, OverflowError):
        return Rejected.of(record, "invalid_value:startTimeUnixNano", span)
    trace, span_id = hex_id(raw_ids[0], TRACE_ID_BYTES), hex_id(raw_ids[1], SPAN_ID_BYTES)
    if trace is None or span_id is None:
        return Rejected.of(record, f"invalid_value:{'traceId' if trace is None else 'spanId'}", span, ended.date())
    return trace, span_id, started, ended


def _map_span(record: Record, logs: list[Record], domain: str, consent: str) -> _Turn | Rejected | Skipped:
    """The span, with its log records, as a turn of its conversation; else why it does not map."""
    span, resource = record.data, record.resource
    attrs = attributes(span.get("attributes", []))
    events = span_events(span, logs)
    declared = chat_dialect(attrs, events)
    if declared is None:
        return Skipped(record.number, "not_a_chat_span")
    frame = _ids_and_times(record.number, span)
    if isinstance(frame, Rejected):
        return frame
    trace, span_id, started, ended = frame
    if (span.get("status") or {}).get("code") in _ERROR_STATUS:
        return Skipped(record.number, "failed_call")
    exchange = _exchange(record.number, span, attrs, events, declared, ended.date())
    if not isinstance(exchange, tuple):
        return exchange
    question, response = exchange
    session = str(_first(attrs, resource, "session.id", "gen_ai.conversation.id") or trace)
    user = str(_first(attrs, resource, "user.id", "enduser.id") or f"anon:{session}")
    for given, reason in ((session, "invalid_value:session.id"), (user, "user_id_not_pseudonymous")):
        if not is_id(given):
            return Rejected.of(record.number, reason, span, ended.date())
    interaction_id = f"otel:{trace}:{span_id}"
    interaction = {
        "event_id": interaction_id, "event_type": "interaction", "domain": domain, "timestamp": _iso(ended),
        "user_id": user, "session_id": session, "interaction_id": interaction_id,
        "model_version": str(_first(attrs, resource, "gen_ai.response.model", "gen_ai.request.model", "llm.model_name")
                             or "unknown"),
        "policy": "champion", "consent": consent, "input": question,
        "impressions": [{"item_id": str(attrs.get("gen_ai.response.id") or span_id), "position": 0,
                         "propensity": 1.0, "content": response}],
        RECORDS: 1 + len(logs),  # the span and its log records
    }
    conversation = str(_first(attrs, resource, "gen_ai.conversation.id", "session.id") or trace)
    return _Turn(interaction, conversation, started, ended, question, events)


def _signal(turn: _Turn, n: int, at: datetime, signal_type: str, **fields: Any) -> Event:
    interaction = turn.interaction
    return {"event_id": f"{interaction['interaction_id']}:{n}", "event_type": "signal",
            "domain": interaction["domain"], "timestamp": _iso(max(at, turn.ended)),
            "user_id": interaction["user_id"], "session_id": interaction["session_id"],
            "interaction_id": interaction["interaction_id"], "signal_type": signal_type,
            "item_id": interaction["impressions"][0]["item_id"], **fields, RECORDS: 0}


def _span_signals(turn: _Turn) -> list[Event]:
    """The feedback the span's events carry, as signals."""
    signals = []
    for event in turn.events:
        at = utc_time(event.nanos) if event.nanos else turn.ended
        if event.name == EVALUATION_EVENT:
            label = str(event.fields.get("gen_ai.evaluation.score.label", "")).strip().lower()
            if label in GOOD_LABELS or label in BAD_LABELS:
                signals.append(_signal(turn, len(signals) + 1, at, "rating", value=5 if label in GOOD_LABELS else 1))
        elif event.name == SIGNAL_EVENT and event.fields.get("signal_type") in SIGNAL_TYPES:
            extra = {k: event.fields[k] for k in ("value", "text") if event.fields.get(k) is not None}
            signals.append(_signal(turn, len(signals) + 1, at, event.fields["signal_type"], **extra))
    return signals


def _unmapped(logs: Iterable[Record]) -> Iterator[Skipped]:
    """Log records whose span is not in the file, or did not map."""
    return (Skipped(log.number, "log_of_unmapped_span") for log in logs)


def read(path: Path, domain: str, config: FlywheelConfig) -> Mapped:
    """The spans at ``path`` as events of ``domain``, and the records that cannot map."""
    settings = config.domain(domain)
    if settings.shape != "assistant":
        raise ConfigError(f"domains.{domain}.shape: GenAI chat spans import into an assistant domain, "
                          f"not {settings.shape!r}")
    if settings.importing is None:
        raise ConfigError(f"domains.{domain}.importing.consent: missing; declare whether imported "
                          f"interactions may be used for training (docs/importing.md)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UnreadableFile(f"{path}: {error}") from None
    has_logs = "resourceLogs" in text or "resource_logs" in text
    logs = logs_by_span(records(text)) if has_logs else {}  # a first pass, to join them to their spans
    turns: list[tuple[_Turn, int]] = []  # with the number of signals its span carried
    for record in records(text):
        if isinstance(record, Rejected):
            yield record
            continue
        if record.log:
            continue
        span_logs = logs.pop(span_ids(record.data), [])
        mapped = _map_span(record, span_logs, domain, settings.importing.consent)
        if not isinstance(mapped, _Turn):
            yield mapped
            yield from _unmapped(span_logs)
            continue
        yield mapped.interaction
        signals = _span_signals(mapped)
        yield from signals
        turns.append((mapped, len(signals)))
    yield from _unmapped(log for leftover in logs.values() for log in leftover)
    yield from _reformulations(turns)


def _reformulations(turns: list[tuple[_Turn, int]]) -> Iterator[Event]:
    """A ``reformulate`` signal on each turn its conversation's next turn re-asks."""
    by_conversation: dict[str, list[tuple[_Turn, int]]] = {}
    for turn, signals in turns:
        by_conversation.setdefault(turn.conversation, []).append((turn, signals))
    for conversation in by_conversation.values():
        conversation.sort(key=lambda pair: pair[0].started)
        for (earlier, signals), (later, _) in pairwise(conversation):
            if _reasks(earlier, later):
                yield _signal(earlier, signals + 1, later.started, "reformulate", text=later.question)
