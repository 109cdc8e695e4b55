"""The messages of a GenAI chat span, in every common GenAI trace dialect.

A span is a chat call when its ``gen_ai.operation.name`` is ``chat`` (or ``generate_content``,
``text_completion``); without it, when its ``llm.request.type`` is ``chat`` or ``completion``
(OpenLLMetry), its ``openinference.span.kind`` is ``LLM`` (OpenInference), or it has
``gen_ai.system`` and carries messages as events (the conventions before ``gen_ai.operation.name``).
Its messages come from the first of DIALECTS that holds them: the GenAI conventions'
``gen_ai.input.messages`` / ``gen_ai.output.messages`` (on the span, or on its
``gen_ai.client.inference.operation.details`` event); the per-message events
``gen_ai.{system,user,assistant,tool}.message`` and ``gen_ai.choice`` (span events, or log records
of the span; fields in attributes, a ``gen_ai.event.content`` JSON object or the body); the span
events ``gen_ai.content.prompt`` / ``gen_ai.content.completion`` (attributes ``gen_ai.prompt`` /
``gen_ai.completion``); OpenLLMetry's ``gen_ai.prompt.N.role|content`` /
``gen_ai.completion.N.role|content``; OpenInference's ``llm.input_messages.N.message.role|content``
/ ``llm.output_messages...``, else ``input.value`` / ``output.value``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flywheel_pipeline.importers.otlp import SpanEvent, mapping, parse_json

CHAT_OPERATIONS = ("chat", "generate_content", "text_completion")
MESSAGE_EVENT_ROLES = {"gen_ai.system.message": "system", "gen_ai.user.message": "user",
                       "gen_ai.assistant.message": "assistant", "gen_ai.tool.message": "tool"}  # -> the role
CHOICE_EVENT = "gen_ai.choice"
INFERENCE_DETAILS_EVENT = "gen_ai.client.inference.operation.details"
PROMPT_EVENT, COMPLETION_EVENT = "gen_ai.content.prompt", "gen_ai.content.completion"

Message = tuple[str, str]  # (role, text)
Sides = tuple[list[Message] | None, list[Message] | None]  # (prompt, response); None: not recorded


class Unreadable(ValueError):
    """A dialect's messages field that holds no list of messages; the argument names the field."""


@dataclass(frozen=True)
class Dialect:
    """Where one way of writing GenAI spans keeps a chat's messages."""

    prompt_field: str  # named in the reason of a span without its prompt
    response_field: str  # and of one without its response
    messages: Callable[[dict[str, Any], list[SpanEvent]], Sides]


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
        parsed = parse_json(raw)
        if isinstance(parsed, list) and parsed and all(isinstance(part, dict) for part in parsed):
            return parsed
    return raw


def _messages(raw: Any) -> list[dict] | None:
    """A messages attribute (a JSON string, or already structured) as message objects; None when
    it is not a list of them."""
    messages = parse_json(raw) if isinstance(raw, str) else raw
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    return messages


def _genai_side(fields: dict[str, Any], key: str) -> list[Message] | None:
    if key not in fields:
        return None
    messages = _messages(fields[key])
    if messages is None:
        raise Unreadable(key)
    return [(str(m.get("role")), _text(m.get("parts"))) for m in messages]


def _genai_conventions(attrs: dict[str, Any], events: list[SpanEvent]) -> Sides:
    """The GenAI conventions: ``gen_ai.input.messages`` / ``gen_ai.output.messages``, messages of
    parts, on the span or on its ``gen_ai.client.inference.operation.details`` event."""
    fields = {**next((e.fields for e in events if e.name == INFERENCE_DETAILS_EVENT), {}), **attrs}
    return _genai_side(fields, "gen_ai.input.messages"), _genai_side(fields, "gen_ai.output.messages")


def _openai_messages(raw: Any, role: str) -> list[Message] | None:
    """OpenAI-style messages (``{"role", "content"}``, or choices ``{"message": {...}}``), as a list
    or its JSON; other text is one message of ``role``."""
    messages = parse_json(raw) if isinstance(raw, str) else raw
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        messages = [m["message"] if isinstance(m.get("message"), dict) else m for m in messages]
        return [(str(m.get("role") or role), _text(_content(m.get("content")))) for m in messages]
    return None if raw is None else [(role, raw if isinstance(raw, str) else "")]


def _prompt_events(attrs: dict[str, Any], events: list[SpanEvent]) -> Sides:
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


def _message_events(attrs: dict[str, Any], events: list[SpanEvent]) -> Sides:
    """The conventions 1.27 to 1.36: an event per message (``gen_ai.user.message``...) and per
    choice (``gen_ai.choice``: ``index``, ``finish_reason``, ``message``)."""
    prompt = [(str(e.fields.get("role") or MESSAGE_EVENT_ROLES[e.name]), _text(_content(e.fields.get("content"))))
              for e in events if e.name in MESSAGE_EVENT_ROLES]
    choices = sorted((e.fields for e in events if e.name == CHOICE_EVENT), key=_choice_index)
    response = [(str(m.get("role") or "assistant"), _text(_content(m.get("content"))))
                for m in (mapping(choice.get("message")) or choice for choice in choices)]
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


def _openllmetry(attrs: dict[str, Any], events: list[SpanEvent]) -> Sides:
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
    return _openai_messages(mapping(raw).get(key), role)


def _openinference(attrs: dict[str, Any], events: list[SpanEvent]) -> Sides:
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


def chat_dialect(attrs: dict[str, Any], events: list[SpanEvent]) -> Dialect | None:
    """The dialect that declares the span a chat call (it names what a chat span without messages
    misses); None when the span is not one."""
    for key, chat, dialect in _CHAT_DECLARATIONS:
        if key in attrs:
            return dialect if attrs[key] in chat else None
    if "gen_ai.system" not in attrs:
        return None
    return next((d for d in (GENAI_MESSAGE_EVENTS, GENAI_PROMPT_EVENTS) if d.messages(attrs, events) != (None, None)),
                None)


def find_messages(attrs: dict[str, Any], events: list[SpanEvent]) -> tuple[Dialect, Sides] | None:
    """The first of DIALECTS that holds the span's messages, with them; None when none does. Raises
    Unreadable when one holds a messages field it cannot read."""
    return next(((d, sides) for d in DIALECTS if (sides := d.messages(attrs, events)) != (None, None)), None)
