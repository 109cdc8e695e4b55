"""OpenTelemetry GenAI spans (OTLP JSON export) -> assistant interactions and signals.

Reads an OTLP JSON export (``{"resourceSpans": [...]}``): one object per file, or one per line as
the collector's file exporter writes them. Records are spans, numbered from 1 in file order (a line
that is not JSON counts as one record, rejected as ``malformed_json``). Attribute names follow the
GenAI semantic conventions:

- A span whose ``gen_ai.operation.name`` is ``chat`` (or ``generate_content``, ``text_completion``)
  becomes an ``interaction``: its input is the text of the last ``user`` message of
  ``gen_ai.input.messages``, its one impression the text of the first ``assistant`` message of
  ``gen_ai.output.messages`` (messages are JSON ``{"role", "parts": [{"type": "text", "content"}]}``),
  served at the span's end by ``gen_ai.response.model``, policy ``champion``, propensity 1. Other
  spans (HTTP, database, tool, embedding calls), failed calls and responses without text (a
  tool-call request) are skipped, counted but not quarantined: a trace export holds them by design.
  A chat span without its messages (content capture off) is rejected.
- user: ``user.id`` or ``enduser.id`` (span, then resource attributes), else ``anon:<session>``;
  session: ``session.id``, else ``gen_ai.conversation.id``, else the trace id. Consent is what the
  domain declares (``importing.consent``): spans do not carry it.
- Signals: a ``gen_ai.evaluation.result`` span event whose ``gen_ai.evaluation.score.label`` says
  pass or fail (``GOOD_LABELS``, ``BAD_LABELS``) is a ``rating`` of 5 or 1; a ``flywheel.signal``
  span event carries any signal of the contract (attributes ``signal_type``, ``value``, ``text``);
  and the next turn of a conversation re-asking within ``REASK_WINDOW_S`` (its question shares at
  least half the words of the shorter one) is a ``reformulate`` of this one, with the new question.

Ids come from the source: the interaction id is ``otel:<trace id>:<span id>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
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

CHAT_OPERATIONS = ("chat", "generate_content", "text_completion")
GOOD_LABELS = frozenset({"pass", "passed", "correct", "relevant", "good", "positive", "helpful", "thumbs_up", "yes"})
BAD_LABELS = frozenset({"fail", "failed", "incorrect", "not_relevant", "irrelevant", "bad", "negative", "unhelpful",
                        "thumbs_down", "no"})
EVALUATION_EVENT = "gen_ai.evaluation.result"
SIGNAL_EVENT = "flywheel.signal"
REASK_WINDOW_S = 10 * 60  # a re-asked question later than this is a new question
REASK_OVERLAP = 0.5  # share of the shorter question's words the next one repeats
_ERROR_STATUS = (2, "STATUS_CODE_ERROR")
_WORD = re.compile(r"\w+")


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


@dataclass
class _Turn:
    """A chat span mapped to its interaction, awaiting the conversation's next turn."""

    interaction: Event
    conversation: str
    started: datetime
    ended: datetime
    question: str


def _exports(path: Path) -> Iterator[tuple[dict | None, str]]:
    """Each export object of the file (None where a line is not JSON) with its text."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UnreadableFile(f"{path}: {error}") from None
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


def _spans(path: Path) -> Iterator[tuple[int, dict, dict, dict | None]]:
    """(record, span, resource attributes, None) per span; (record, {}, {}, line) for a bad line."""
    record = 0
    for export, text in _exports(path):
        if not isinstance(export, dict) or not isinstance(export.get("resourceSpans"), list):
            record += 1
            yield record, {}, {}, {"reason": "malformed_json" if export is None else "not_an_otlp_export",
                                   "text": text}
            continue
        for resource_spans in export["resourceSpans"]:
            resource = attributes((resource_spans.get("resource") or {}).get("attributes", []))
            for scope in resource_spans.get("scopeSpans", []):
                for span in scope.get("spans", []):
                    record += 1
                    yield record, span, resource, None


def _time(nanos: Any) -> datetime:
    return datetime.fromtimestamp(int(nanos) / 1e9, UTC)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(message: dict) -> str:
    return "\n".join(part.get("content", "") for part in message.get("parts", [])
                     if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("content"), str))


def _messages(raw: Any) -> list[dict] | None:
    """A messages attribute (a JSON string, or already structured) as message objects; None when
    it is not a list of them."""
    try:
        messages = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    return messages


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


def _exchange(record: int, span: dict, attrs: dict, day: date) -> tuple[str, str] | Rejected | Skipped:
    """The span's (question, response): the last user message's text, the first assistant output's."""
    messages = {}
    for key in ("gen_ai.input.messages", "gen_ai.output.messages"):
        if key not in attrs:
            return Rejected.of(record, f"missing_field:{key}", span, day)
        messages[key] = _messages(attrs[key])
        if messages[key] is None:
            return Rejected.of(record, f"invalid_value:{key}", span, day)
    questions = [m for m in messages["gen_ai.input.messages"] if m.get("role") == "user"]
    answers = [m for m in messages["gen_ai.output.messages"] if m.get("role") == "assistant"]
    response = _text(answers[0]) if answers else ""
    if not response.strip():
        return Skipped(record, "no_text_response")
    question = _text(questions[-1]) if questions else ""
    if len(question) > MAX_INPUT_LENGTH:
        return Rejected.of(record, "invalid_value:input", span, day)
    return question, response


def _map_span(record: int, span: dict, resource: dict, domain: str, consent: str) -> _Turn | Rejected | Skipped:
    attrs = attributes(span.get("attributes", []))
    if attrs.get("gen_ai.operation.name") not in CHAT_OPERATIONS:
        return Skipped(record, "not_a_chat_span")
    try:
        trace, span_id = span["traceId"], span["spanId"]
        started, ended = _time(span["startTimeUnixNano"]), _time(span["endTimeUnixNano"])
    except KeyError as error:
        return Rejected.of(record, f"missing_field:{error.args[0]}", span)
    except (TypeError, ValueError, OverflowError):
        return Rejected.of(record, "invalid_value:startTimeUnixNano", span)
    if (span.get("status") or {}).get("code") in _ERROR_STATUS:
        return Skipped(record, "failed_call")
    exchange = _exchange(record, span, attrs, ended.date())
    if not isinstance(exchange, tuple):
        return exchange
    question, response = exchange
    session = str(_first(attrs, resource, "session.id", "gen_ai.conversation.id") or trace)
    user = str(_first(attrs, resource, "user.id", "enduser.id") or f"anon:{session}")
    interaction_id = f"otel:{trace}:{span_id}"
    for value, reason in ((interaction_id, "invalid_value:spanId"), (session, "invalid_value:session.id"),
                          (user, "user_id_not_pseudonymous")):
        if not is_id(value):
            return Rejected.of(record, reason, span, ended.date())
    interaction = {
        "event_id": interaction_id, "event_type": "interaction", "domain": domain, "timestamp": _iso(ended),
        "user_id": user, "session_id": session, "interaction_id": interaction_id,
        "model_version": str(_first(attrs, resource, "gen_ai.response.model", "gen_ai.request.model") or "unknown"),
        "policy": "champion", "consent": consent, "input": question,
        "impressions": [{"item_id": str(attrs.get("gen_ai.response.id") or span_id), "position": 0,
                         "propensity": 1.0, "content": response}],
    }
    conversation = str(_first(attrs, resource, "gen_ai.conversation.id", "session.id") or trace)
    return _Turn(interaction, conversation, started, ended, question)


def _signal(turn: _Turn, n: int, at: datetime, signal_type: str, **fields: Any) -> Event:
    interaction = turn.interaction
    return {"event_id": f"{interaction['interaction_id']}:{n}", "event_type": "signal",
            "domain": interaction["domain"], "timestamp": _iso(max(at, turn.ended)),
            "user_id": interaction["user_id"], "session_id": interaction["session_id"],
            "interaction_id": interaction["interaction_id"], "signal_type": signal_type,
            "item_id": interaction["impressions"][0]["item_id"], **fields, RECORDS: 0}


def _span_signals(turn: _Turn, span: dict) -> list[Event]:
    """The feedback the span's events carry, as signals."""
    signals = []
    for event in span.get("events", []):
        attrs = attributes(event.get("attributes", []))
        at = _time(event.get("timeUnixNano") or span["endTimeUnixNano"])
        if event.get("name") == EVALUATION_EVENT:
            label = str(attrs.get("gen_ai.evaluation.score.label", "")).strip().lower()
            if label in GOOD_LABELS or label in BAD_LABELS:
                signals.append(_signal(turn, len(signals) + 1, at, "rating", value=5 if label in GOOD_LABELS else 1))
        elif event.get("name") == SIGNAL_EVENT and attrs.get("signal_type") in SIGNAL_TYPES:
            extra = {k: attrs[k] for k in ("value", "text") if attrs.get(k) is not None}
            signals.append(_signal(turn, len(signals) + 1, at, attrs["signal_type"], **extra))
    return signals


def read(path: Path, domain: str, config: FlywheelConfig) -> Mapped:
    """The spans at ``path`` as events of ``domain``, and the spans that cannot map."""
    settings = config.domain(domain)
    if settings.shape != "assistant":
        raise ConfigError(f"domains.{domain}.shape: GenAI chat spans import into an assistant domain, "
                          f"not {settings.shape!r}")
    if settings.importing is None:
        raise ConfigError(f"domains.{domain}.importing.consent: missing; declare whether imported "
                          f"interactions may be used for training (docs/importing.md)")
    turns: list[tuple[_Turn, int]] = []  # with the number of signals its span carried
    for record, span, resource, bad in _spans(path):
        if bad is not None:
            yield Rejected.of(record, bad["reason"], bad["text"])
            continue
        mapped = _map_span(record, span, resource, domain, settings.importing.consent)
        if not isinstance(mapped, _Turn):
            yield mapped
            continue
        yield mapped.interaction
        signals = _span_signals(mapped, span)
        yield from signals
        turns.append((mapped, len(signals)))
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
