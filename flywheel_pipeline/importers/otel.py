"""OpenTelemetry GenAI spans (OTLP JSON export) -> assistant interactions and signals, in every common
GenAI trace dialect.

Reads an OTLP JSON export (``{"resourceSpans": [...]}``, and ``{"resourceLogs": [...]}`` for events
sent as log records): one object per file, or one per line as the collector's file exporter writes
them. Keys may be camelCase (OTLP JSON) or snake_case (protobuf's JSON printer keeping the proto field
names), int64s strings or numbers, trace and span ids hex (OTLP JSON) or base64 (protobuf's JSON
printer, for bytes); ids are normalised to lowercase hex, so each form lands the same events.
Records are spans and log records, numbered from 1 in file order (a line that is not JSON counts as
one record, rejected as ``malformed_json``).

- A chat span becomes an ``interaction``: one whose ``gen_ai.operation.name`` is ``chat`` (or
  ``generate_content``, ``text_completion``); without it, one whose ``llm.request.type`` is ``chat``
  or ``completion`` (OpenLLMetry), whose ``openinference.span.kind`` is ``LLM`` (OpenInference), or
  that has ``gen_ai.system`` and carries messages as events (the conventions before
  ``gen_ai.operation.name``). Its messages come from the first of DIALECTS that holds them: the
  GenAI conventions' ``gen_ai.input.messages`` / ``gen_ai.output.messages`` (on the span, or on its
  ``gen_ai.client.inference.operation.details`` event); the per-message events
  ``gen_ai.{system,user,assistant,tool}.message`` and ``gen_ai.choice`` (span events, or log records
  of the span; fields in attributes, a ``gen_ai.event.content`` JSON object or the body); the span
  events ``gen_ai.content.prompt`` / ``gen_ai.content.completion`` (attributes ``gen_ai.prompt`` /
  ``gen_ai.completion``); OpenLLMetry's ``gen_ai.prompt.N.role|content`` /
  ``gen_ai.completion.N.role|content``; OpenInference's ``llm.input_messages.N.message.role|content``
  / ``llm.output_messages...``, else ``input.value`` / ``output.value``. Its input is the text of the
  last ``user`` message, its one impression the text of the first ``assistant`` output, served at the
  span's end by ``gen_ai.response.model`` (else ``gen_ai.request.model``, ``llm.model_name``),
  policy ``champion``, propensity 1. Other spans (HTTP, database, tool, embedding calls), failed
  calls and responses without text (a tool-call request) are skipped, counted but not quarantined: a
  trace export holds them by design. A chat span without its messages (content capture off) is
  rejected. A log record counts with its span's interaction, else it is skipped.
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

import base64
import binascii
import json
import re
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

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

CHAT_OPERATIONS = ("chat", "generate_content", "text_completion")
GOOD_LABELS = frozenset({"pass", "passed", "correct", "relevant", "good", "positive", "helpful", "thumbs_up", "yes"})
BAD_LABELS = frozenset({"fail", "failed", "incorrect", "not_relevant", "irrelevant", "bad", "negative", "unhelpful",
                        "thumbs_down", "no"})
EVALUATION_EVENT = "gen_ai.evaluation.result"
SIGNAL_EVENT = "flywheel.signal"
MESSAGE_EVENT_ROLES = {"gen_ai.system.message": "system", "gen_ai.user.message": "user",
                       "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool"}  # -> the role
CHOICE_EVENT = "gen_ai.choice"
INFERENCE_DETAILS_EVENT = "gen_ai.client.inference.operation.details"
PROMPT_EVENT, COMPLETION_EVENT = "gen_ai.content.prompt", "gen_ai.content.completion"
REASK_WINDOW_S = 10 * 60  # a re-asked question later than this is a new question
REASK_OVERLAP = 0.5  # share of the shorter question's words the next one repeats
TRACE_ID_BYTES, SPAN_ID_BYTES = 16, 8
_ERROR_STATUS = (2, "STATUS_CODE_ERROR")
_WORD = re.compile(r"\w+")
_SNAKE = re.compile(r"_([a-z0-9])")
_SIGNALS = (("resourceSpans", "scopeSpans", "spans"), ("resourceLogs", "scopeLogs", "logRecords"))

Message = tuple[str, str]  # (role, text)
Sides = tuple[list[Message] | None, list[Message] | None]  # (prompt, response); None: not recorded


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
    return {pair["key"]: value(pair.get("value") or {}) for pair in pairs}


class _Record(NamedTuple):
    """A span or a log record of the file, with its number and its resource's attributes."""

    number: int
    data: dict[str, Any]
    resource: dict[str, Any]
    log: bool


@dataclass(frozen=True)
class _SpanEvent:
    """A span event, or a log record of the span, with its fields: the attributes, with a
    ``gen_ai.event.content`` JSON object and the body merged in."""

    name: str
    fields: dict[str, Any]
    nanos: int  # when it happened; 0 when not recorded


@dataclass
class _Turn:
    """A chat span mapped to its interaction, awaiting the conversation's next turn."""

    interaction: Event
    conversation: str
    started: datetime
    ended: datetime
    question: str
    events: list[_SpanEvent]


class _Unreadable(ValueError):
    """A dialect's messages field that holds no list of messages; the argument names the field."""


@dataclass(frozen=True)
class Dialect:
    """Where one way of writing GenAI spans keeps a chat's messages."""

    prompt_field: str  # named in the reason of a span without its prompt
    response_field: str  # and of one without its response
    messages: Callable[[dict[str, Any], list[_SpanEvent]], Sides]


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _mapping(raw: Any) -> dict[str, Any]:
    """A map as written: a dict, or a JSON object in a string; else empty."""
    parsed = _json(raw) if isinstance(raw, str) else raw
    return parsed if isinstance(parsed, dict) else {}


def _camel_case(raw: Any) -> Any:
    """protobuf's JSON with the proto field names kept (``resource_spans``) in OTLP JSON's camelCase."""
    if isinstance(raw, dict):
        return {_SNAKE.sub(lambda m: m[1].upper(), key): _camel_case(v) for key, v in raw.items()}
    if isinstance(raw, list):
        return [_camel_case(v) for v in raw]
    return raw


def _hex_id(raw: Any, size: int) -> str | None:
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


def _ids(data: dict[str, Any]) -> tuple[str | None, str | None]:
    """The (trace id, span id) of a span or log record, as hex."""
    return _hex_id(data.get("traceId"), TRACE_ID_BYTES), _hex_id(data.get("spanId"), SPAN_ID_BYTES)


def _nanos(raw: Any) -> int:
    try:
        return int(raw or 0)
    except (TypeError, ValueError):
        return 0


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


def _records(text: str) -> Iterator[_Record | Rejected]:
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
                        yield _Record(number, item, resource, items == "logRecords")


def _events(span: dict[str, Any], logs: list[_Record]) -> list[_SpanEvent]:
    """The span's events, then the log records of the span (events sent as logs)."""
    events = []
    for event in span.get("events", []):
        attrs = attributes(event.get("attributes", []))
        events.append(_SpanEvent(event.get("name", ""), {**attrs, **_mapping(attrs.get("gen_ai.event.content"))},
                                 _nanos(event.get("timeUnixNano"))))
    for log in logs:
        attrs = attributes(log.data.get("attributes", []))
        fields = {**attrs, **_mapping(attrs.get("gen_ai.event.content")), **_mapping(value(log.data.get("body") or {}))}
        events.append(_SpanEvent(log.data.get("eventName") or attrs.get("event.name", ""), fields,
                                 _nanos(log.data.get("timeUnixNano")) or _nanos(log.data.get("observedTimeUnixNano"))))
    return events


def _time(nanos: Any) -> datetime:
    return datetime.fromtimestamp(int(nanos) / 1e9, UTC)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts (``{"type": "text",
    "content"}``, or ``"text"`` as OpenAI writes them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "\n".join(text for part in content if isinstance(part, dict) and part.get("type") == "text"
                     and isinstance(text := part.get("content", part.get("text")), str))


def _content(raw: Any) -> Any:
    """Message content as written: text, or a list of parts (OpenLLMetry writes one as JSON)."""
    if isinstance(raw, str) and raw.startswith("["):
        parsed = _json(raw)
        if isinstance(parsed, list) and parsed and all(isinstance(part, dict) for part in parsed):
            return parsed
    return raw


def _messages(raw: Any) -> list[dict] | None:
    """A messages attribute (a JSON string, or already structured) as message objects; None when
    it is not a list of them."""
    messages = _json(raw) if isinstance(raw, str) else raw
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    return messages


def _genai_side(fields: dict[str, Any], key: str) -> list[Message] | None:
    if key not in fields:
        return None
    messages = _messages(fields[key])
    if messages is None:
        raise _Unreadable(key)
    return [(str(m.get("role")), _text(m.get("parts"))) for m in messages]


def _genai_conventions(attrs: dict[str, Any], events: list[_SpanEvent]) -> Sides:
    """The GenAI conventions: ``gen_ai.input.messages`` / ``gen_ai.output.messages``, messages of
    parts, on the span or on its ``gen_ai.client.inference.operation.details`` event."""
    fields = {**next((e.fields for e in events if e.name == INFERENCE_DETAILS_EVENT), {}), **attrs}
    return _genai_side(fields, "gen_ai.input.messages"), _genai_side(fields, "gen_ai.output.messages")


def _openai_messages(raw: Any, role: str) -> list[Message] | None:
    """OpenAI-style messages (``{"role", "content"}``, or choices ``{"message": {...}}``), as a list
    or its JSON; other text is one message of ``role``."""
    messages = _json(raw) if isinstance(raw, str) else raw
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        messages = [m["message"] if isinstance(m.get("message"), dict) else m for m in messages]
        return [(str(m.get("role") or role), _text(_content(m.get("content")))) for m in messages]
    return None if raw is None else [(role, raw if isinstance(raw, str) else "")]


def _prompt_events(attrs: dict[str, Any], events: list[_SpanEvent]) -> Sides:
    """The conventions up to 1.26: the span events ``gen_ai.content.prompt`` (attribute
    ``gen_ai.prompt``) and ``gen_ai.content.completion`` (``gen_ai.completion``), or those
    attributes on the span."""
    fields = {event.name: event.fields for event in events}
    prompt = fields.get(PROMPT_EVENT, attrs).get("gen_ai.prompt")
    completion = fields.get(COMPLETION_EVENT, attrs).get("gen_ai.completion")
    return _openai_messages(prompt, "user"), _openai_messages(completion, "assistant")


def _choice_index(fields: dict[str, Any]) -> int:
    try:
        return int(fields.get("index", 0))
    except (TypeError, ValueError):
        return 0


def _message_events(attrs: dict[str, Any], events: list[_SpanEvent]) -> Sides:
    """The conventions 1.27 to 1.36: an event per message (``gen_ai.user.message``...) and per
    choice (``gen_ai.choice``: ``index``, ``finish_reason``, ``message``)."""
    prompt = [(str(e.fields.get("role") or MESSAGE_EVENT_ROLES[e.name]), _text(_content(e.fields.get("content"))))
              for e in events if e.name in MESSAGE_EVENT_ROLES]
    choices = sorted((e.fields for e in events if e.name == CHOICE_EVENT), key=_choice_index)
    response = [(str(m.get("role") or "assistant"), _text(_content(m.get("content"))))
                for m in (_mapping(choice.get("message")) or choice for choice in choices)]
    return prompt or None, response or None


def _indexed_text(attrs: dict[str, Any], base: str) -> str:
    """The text of an indexed message: ``<base>content``, else its ``<base>contents.M.message_content.text``."""
    if f"{base}content" in attrs:
        return _text(_content(attrs[f"{base}content"]))
    part = re.compile(rf"{re.escape(base)}contents\.(\d+)\.message_content\.text$")
    parts = sorted((int(m[1]), text) for key, text in attrs.items() if (m := part.match(key)) and isinstance(text, str))
    return "\n".join(text for _, text in parts)


def _indexed(attrs: dict[str, Any], prefix: str, message: str = "") -> list[Message] | None:
    """Messages flattened into attributes ``<prefix>.N.<message>role`` / ``content``, by N; None
    when there are none."""
    key = re.compile(rf"{re.escape(prefix)}\.(\d+)\.{re.escape(message)}(role|content)")
    numbers = sorted({int(m[1]) for name in attrs if (m := key.match(name))})
    bases = [f"{prefix}.{n}.{message}" for n in numbers]
    return [(str(attrs.get(f"{base}role", "")), _indexed_text(attrs, base)) for base in bases] or None


def _openllmetry(attrs: dict[str, Any], events: list[_SpanEvent]) -> Sides:
    """OpenLLMetry (Traceloop): ``gen_ai.prompt.N.role|content``, ``gen_ai.completion.N.role|content``."""
    return _indexed(attrs, "gen_ai.prompt"), _indexed(attrs, "gen_ai.completion")


def _value_messages(attrs: dict[str, Any], side: str, key: str, role: str) -> list[Message] | None:
    """OpenInference's ``<side>.value``: text, or (``<side>.mime_type`` JSON) an OpenAI request's
    ``messages`` or response's ``choices``."""
    raw = attrs.get(f"{side}.value")
    if not isinstance(raw, str):
        return None
    if attrs.get(f"{side}.mime_type") != "application/json":
        return [(role, raw)]
    return _openai_messages(_mapping(raw).get(key), role)


def _openinference(attrs: dict[str, Any], events: list[_SpanEvent]) -> Sides:
    """OpenInference (Arize Phoenix): ``llm.input_messages.N.message.role|content`` and
    ``llm.output_messages...``, else ``input.value`` / ``output.value``."""
    return (_indexed(attrs, "llm.input_messages", "message.") or _value_messages(attrs, "input", "messages", "user"),
            _indexed(attrs, "llm.output_messages", "message.")
            or _value_messages(attrs, "output", "choices", "assistant"))


GENAI_CONVENTIONS = Dialect("gen_ai.input.messages", "gen_ai.output.messages", _genai_conventions)
GENAI_MESSAGE_EVENTS = Dialect("gen_ai.user.message", "gen_ai.choice", _message_events)
GENAI_PROMPT_EVENTS = Dialect("gen_ai.prompt", "gen_ai.completion", _prompt_events)
OPENLLMETRY = Dialect("gen_ai.prompt.0.content", "gen_ai.completion.0.content", _openllmetry)
OPENINFERENCE = Dialect("llm.input_messages", "llm.output_messages", _openinference)
DIALECTS = (GENAI_CONVENTIONS, GENAI_MESSAGE_EVENTS, GENAI_PROMPT_EVENTS, OPENLLMETRY, OPENINFERENCE)  # first found wins
_CHAT_DECLARATIONS = (("gen_ai.operation.name", CHAT_OPERATIONS, GENAI_CONVENTIONS),
                      ("llm.request.type", ("chat", "completion"), OPENLLMETRY),
                      ("openinference.span.kind", ("LLM",), OPENINFERENCE))


def _chat_dialect(attrs: dict[str, Any], events: list[_SpanEvent]) -> Dialect | None:
    """The dialect that declares the span a chat call (it names what a chat span without messages
    misses); None when the span is not one."""
    for key, chat, dialect in _CHAT_DECLARATIONS:
        if key in attrs:
            return dialect if attrs[key] in chat else None
    if "gen_ai.system" not in attrs:
        return None
    return next((d for d in (GENAI_MESSAGE_EVENTS, GENAI_PROMPT_EVENTS) if d.messages(attrs, events) != (None, None)),
                None)


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


def _exchange(record: int, span: dict, attrs: dict, events: list[_SpanEvent], declared: Dialect,
              day: date) -> tuple[str, str] | Rejected | Skipped:
    """The span's (question, response): the last user message's text, the first assistant output's,
    from the first dialect that holds the span's messages."""
    try:
        found = next(((d, sides) for d in DIALECTS if (sides := d.messages(attrs, events)) != (None, None)), None)
    except _Unreadable as error:
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
        started, ended = _time(span["startTimeUnixNano"]), _time(span["endTimeUnixNano"])
    except KeyError as error:
        return Rejected.of(record, f"missing_field:{error.args[0]}", span)
    except (TypeError, ValueError, OverflowError):
        return Rejected.of(record, "invalid_value:startTimeUnixNano", span)
    trace, span_id = _hex_id(raw_ids[0], TRACE_ID_BYTES), _hex_id(raw_ids[1], SPAN_ID_BYTES)
    if trace is None or span_id is None:
        return Rejected.of(record, f"invalid_value:{'traceId' if trace is None else 'spanId'}", span, ended.date())
    return trace, span_id, started, ended


def _map_span(record: _Record, logs: list[_Record], domain: str, consent: str) -> _Turn | Rejected | Skipped:
    span, resource = record.data, record.resource
    attrs = attributes(span.get("attributes", []))
    events = _events(span, logs)
    declared = _chat_dialect(attrs, events)
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
    for value, reason in ((session, "invalid_value:session.id"), (user, "user_id_not_pseudonymous")):
        if not is_id(value):
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
        at = _time(event.nanos) if event.nanos else turn.ended
        if event.name == EVALUATION_EVENT:
            label = str(event.fields.get("gen_ai.evaluation.score.label", "")).strip().lower()
            if label in GOOD_LABELS or label in BAD_LABELS:
                signals.append(_signal(turn, len(signals) + 1, at, "rating", value=5 if label in GOOD_LABELS else 1))
        elif event.name == SIGNAL_EVENT and event.fields.get("signal_type") in SIGNAL_TYPES:
            extra = {k: event.fields[k] for k in ("value", "text") if event.fields.get(k) is not None}
            signals.append(_signal(turn, len(signals) + 1, at, event.fields["signal_type"], **extra))
    return signals


def _logs_by_span(records: Iterable[_Record | Rejected]) -> dict[tuple[str | None, str | None], list[_Record]]:
    by_span: dict[tuple[str | None, str | None], list[_Record]] = {}
    for record in records:
        if isinstance(record, _Record) and record.log:
            by_span.setdefault(_ids(record.data), []).append(record)
    return by_span


def _unmapped(logs: Iterable[_Record]) -> Iterator[Skipped]:
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
    logs = _logs_by_span(_records(text)) if has_logs else {}  # a first pass, to join them to their spans
    turns: list[tuple[_Turn, int]] = []  # with the number of signals its span carried
    for record in _records(text):
        if isinstance(record, Rejected):
            yield record
            continue
        if record.log:
            continue
        span_logs = logs.pop(_ids(record.data), [])
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
