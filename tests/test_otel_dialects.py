"""`flywheel import otel`: one conversation, recorded with the OpenTelemetry SDK in each common GenAI
trace dialect and written as the collector's file exporter (hex ids) or protobuf's JSON printer
(base64 ids) would, lands the same interactions and signals."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from google.protobuf.json_format import MessageToDict, MessageToJson
from google.protobuf.message import Message as Protobuf
from opentelemetry import _logs, trace
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from opentelemetry.sdk._logs import Logger, LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource as SdkResource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator

from flywheel_pipeline.cli import main
from flywheel_pipeline.config import FlywheelConfig, load_config
from flywheel_pipeline.home import Home
from flywheel_pipeline.importers import ImportReport, import_file
from tests.conftest import REPO

START = datetime.now(UTC).replace(hour=9, minute=0, second=0, microsecond=0) - timedelta(days=2)
MODEL = "support-llm-2"
SYSTEM = "You are the support assistant."
Messages = list[tuple[str, str]]  # (role, text)
TURNS: list[tuple[Messages, str, int]] = [  # (the prompt's messages, the answer, seconds after START)
    ([("system", SYSTEM), ("user", "how do I reset my password on my phone")], "Open Settings > Account.", 0),
    ([("system", SYSTEM), ("user", "how do I reset my password on my phone"), ("assistant", "Open Settings > Account."),
      ("user", "reset password on phone, there is no button")], "Use Security > Reset password.", 30),
    ([("system", SYSTEM), ("user", "what does the pro plan cost")], "The pro plan is $9 a month.", 200),
]


def nanos(moment: datetime) -> int:
    return int(moment.timestamp()) * 10**9


class SeededIds(IdGenerator):
    """Ids from a seeded generator: the conversation gets the same ids in every dialect."""

    def __init__(self) -> None:
        self.random = random.Random(7)

    def generate_span_id(self) -> int:
        return self.random.getrandbits(64)

    def generate_trace_id(self) -> int:
        return self.random.getrandbits(128)


class Dialect(NamedTuple):
    """How an instrumentation writes a chat span: attributes it always sets, and its messages (with
    content capture on)."""

    attributes: dict[str, str]
    messages: Callable[[trace.Span, Logger, Messages, str, int], None]


def genai_messages(span: trace.Span, logger: Logger, prompt: Messages, answer: str, at: int) -> None:
    """Messages of parts in gen_ai.input.messages / gen_ai.output.messages."""
    span.set_attributes({
        "gen_ai.input.messages": json.dumps([{"role": r, "parts": [{"type": "text", "content": t}]} for r, t in prompt]),
        "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": answer}],
                                               "finish_reason": "stop"}])})


def inference_details_event(span: trace.Span, logger: Logger, prompt: Messages, answer: str, at: int) -> None:
    """The same messages on a gen_ai.client.inference.operation.details log record of the span."""
    logger.emit(event_name="gen_ai.client.inference.operation.details", timestamp=at, attributes={
        "gen_ai.input.messages": json.dumps([{"role": r, "parts": [{"type": "text", "content": t}]} for r, t in prompt]),
        "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": answer}]}])})


def message_span_events(span: trace.Span, logger: Logger, prompt: Messages, answer: str, at: int) -> None:
    """A span event per message, its fields as attributes or (Azure AI Inference) as the JSON of
    gen_ai.event.content."""
    for role, text in prompt:
        span.add_event(f"gen_ai.{role}.message", {"gen_ai.system": "openai", "content": text}, at)
    choice = {"index": 0, "finish_reason": "stop", "message": {"content": answer}}
    span.add_event("gen_ai.choice", {"gen_ai.system": "openai", "gen_ai.event.content": json.dumps(choice)}, at)


def message_log_events(span: trace.Span, logger: Logger, prompt: Messages, answer: str, at: int) -> None:
    """A log record of the span per message, the message in the body (the OpenAI instrumentation)."""
    for role, text in prompt:
        logger.emit(event_name=f"gen_ai.{role}.message", body={"content": text}, timestamp=at,
                    attributes={"gen_ai.system": "openai"})
    logger.emit(event_name="gen_ai.choice", timestamp=at, attributes={"gen_ai.system": "openai"},
                body={"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}})


def prompt_events(span: trace.Span, logger: Logger, prompt: Messages, answer: str, at: int) -> None:
    """The span events gen_ai.content.prompt / gen_ai.content.completion, messages as JSON."""
    span.add_event("gen_ai.content.prompt",
                   {"gen_ai.prompt": json.dumps([{"role": r, "content": t} for r, t in prompt])}, at)
    span.add_event("gen_ai.content.completion",
                   {"gen_ai.completion": json.dumps([{"role": "assistant", "content": answer}])}, at)


def openllmetry_messages(span: trace.Span, logger: Logger, prompt: Messages, answer: str, at: int) -> None:
    """Indexed gen_ai.prompt.N / gen_ai.completion.N attributes."""
    span.set_attributes({"gen_ai.completion.0.role": "assistant", "gen_ai.completion.0.content": answer,
                         "gen_ai.completion.0.finish_reason": "stop"})
    for n, (role, text) in enumerate(prompt):
        span.set_attributes({f"gen_ai.prompt.{n}.role": role, f"gen_ai.prompt.{n}.content": text})


def openinference_messages(span: trace.Span, logger: Logger, prompt: Messages, answer: str, at: int) -> None:
    """Indexed llm.input_messages / llm.output_messages attributes."""
    span.set_attributes({"llm.output_messages.0.message.role": "assistant",
                         "llm.output_messages.0.message.content": answer})
    for n, (role, text) in enumerate(prompt):
        span.set_attributes({f"llm.input_messages.{n}.message.role": role,
                             f"llm.input_messages.{n}.message.content": text})


def openinference_values(span: trace.Span, logger: Logger, prompt: Messages, answer: str, at: int) -> None:
    """Only input.value / output.value: the OpenAI request and response as JSON."""
    request = {"model": MODEL, "messages": [{"role": r, "content": t} for r, t in prompt]}
    response = {"model": MODEL, "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}
    span.set_attributes({"input.value": json.dumps(request), "input.mime_type": "application/json",
                         "output.value": json.dumps(response), "output.mime_type": "application/json"})


CHAT = {"gen_ai.operation.name": "chat", "gen_ai.system": "openai", "gen_ai.response.model": MODEL}
OPENINFERENCE = {"openinference.span.kind": "LLM", "llm.model_name": MODEL}
GENAI_CONVENTIONS = Dialect({"gen_ai.operation.name": "chat", "gen_ai.response.model": MODEL}, genai_messages)
DIALECTS = {
    "inference_details_event": Dialect(GENAI_CONVENTIONS.attributes, inference_details_event),  # the conventions, as an event
    "message_span_events": Dialect(CHAT, message_span_events),  # conventions 1.27-1.36
    "message_log_events": Dialect(CHAT, message_log_events),
    "prompt_events": Dialect({"gen_ai.system": "openai", "gen_ai.request.model": MODEL}, prompt_events),  # to 1.26
    "openllmetry": Dialect({"llm.request.type": "chat", "gen_ai.system": "openai", "gen_ai.response.model": MODEL},
                           openllmetry_messages),
    "openinference": Dialect(OPENINFERENCE, openinference_messages),
    "openinference_values": Dialect(OPENINFERENCE, openinference_values),
}


def recorded(dialect: Dialect, content: bool = True) -> tuple[list[ReadableSpan], list[_logs.LogRecord]]:
    """The conversation's chat spans (the last one rated by an evaluator) and an HTTP span, as the
    SDK records them in ``dialect``; with content capture off, without the messages."""
    spans, logs = InMemorySpanExporter(), InMemoryLogRecordExporter()
    tracers = TracerProvider(resource=SdkResource({"service.name": "support"}), id_generator=SeededIds(),
                             shutdown_on_exit=False)
    tracers.add_span_processor(SimpleSpanProcessor(spans))
    loggers = LoggerProvider(shutdown_on_exit=False)
    loggers.add_log_record_processor(SimpleLogRecordProcessor(logs))
    tracer, logger = tracers.get_tracer("genai"), loggers.get_logger("genai")
    http = tracer.start_span("GET /chat", start_time=nanos(START - timedelta(seconds=5)), attributes={"http.method": "GET"})
    http.end(end_time=nanos(START - timedelta(seconds=4)))
    for n, (prompt, answer, offset) in enumerate(TURNS):
        at = nanos(START + timedelta(seconds=offset))
        with tracer.start_as_current_span(f"chat {MODEL}", kind=trace.SpanKind.CLIENT, start_time=at,
                                          end_on_exit=False) as span:
            span.set_attributes({**dialect.attributes, "session.id": "conv_1", "user.id": "u_7"})
            if content:
                dialect.messages(span, logger, prompt, answer, at)
            if n == len(TURNS) - 1:
                span.add_event("gen_ai.evaluation.result", {"gen_ai.evaluation.name": "user_thumbs",
                                                            "gen_ai.evaluation.score.label": "pass"}, at + 5 * 10**9)
            span.end(end_time=at + 2 * 10**9)
    return list(spans.get_finished_spans()), [finished.log_record for finished in logs.get_finished_logs()]


def any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, dict):
        return AnyValue(kvlist_value=KeyValueList(values=key_values(value)))
    if isinstance(value, list | tuple):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    return AnyValue(string_value=value)


def key_values(mapping: Any) -> list[KeyValue]:
    return [KeyValue(key=key, value=any_value(value)) for key, value in (mapping or {}).items()]


def traces(spans: list[ReadableSpan]) -> ExportTraceServiceRequest:
    """The spans as an OTLP export request, as the SDK's OTLP exporter encodes them."""
    encoded = [Span(trace_id=s.context.trace_id.to_bytes(16, "big"), span_id=s.context.span_id.to_bytes(8, "big"),
                    name=s.name, kind=s.kind.value + 1, start_time_unix_nano=s.start_time,
                    end_time_unix_nano=s.end_time, attributes=key_values(s.attributes),
                    events=[Span.Event(time_unix_nano=e.timestamp, name=e.name, attributes=key_values(e.attributes))
                            for e in s.events],
                    status=Status(code=s.status.status_code.value)) for s in spans]
    resource = Resource(attributes=key_values(spans[0].resource.attributes))
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=resource, scope_spans=[ScopeSpans(scope=InstrumentationScope(name="genai"), spans=encoded)])])


def log_records(logs: list[_logs.LogRecord]) -> ExportLogsServiceRequest:
    """The log records as an OTLP export request."""
    encoded = [LogRecord(time_unix_nano=r.timestamp, observed_time_unix_nano=r.observed_timestamp,
                         trace_id=r.trace_id.to_bytes(16, "big"), span_id=r.span_id.to_bytes(8, "big"),
                         event_name=r.event_name, body=any_value(r.body), attributes=key_values(r.attributes))
               for r in logs]
    return ExportLogsServiceRequest(resource_logs=[ResourceLogs(
        scope_logs=[ScopeLogs(scope=InstrumentationScope(name="genai"), log_records=encoded)])])


def hex_ids(export: Any, upper: bool = False) -> Any:
    """OTLP JSON's ids: hex where protobuf's JSON printer writes base64."""
    if isinstance(export, dict):
        return {key: hex_id(v, upper) if key in ("traceId", "spanId", "parentSpanId") else hex_ids(v, upper)
                for key, v in export.items()}
    if isinstance(export, list):
        return [hex_ids(v, upper) for v in export]
    return export


def hex_id(base64_id: str, upper: bool) -> str:
    hex_id = base64.b64decode(base64_id).hex()
    return hex_id.upper() if upper else hex_id


def numeric_nanos(export: Any) -> Any:
    """int64 times as JSON numbers, not strings."""
    if isinstance(export, dict):
        return {key: int(v) if key.endswith("UnixNano") else numeric_nanos(v) for key, v in export.items()}
    if isinstance(export, list):
        return [numeric_nanos(v) for v in export]
    return export


ENCODINGS: dict[str, Callable[[Protobuf], str]] = {
    "collector": lambda m: json.dumps(hex_ids(MessageToDict(m, use_integers_for_enums=True))),  # OTLP JSON
    "hex_uppercase": lambda m: json.dumps(hex_ids(MessageToDict(m), upper=True)),
    "numeric_nanos": lambda m: json.dumps(numeric_nanos(hex_ids(MessageToDict(m)))),
    "protobuf": lambda m: MessageToJson(m, indent=None),  # base64 ids, enums by name
    "protobuf_field_names": lambda m: MessageToJson(m, indent=None, preserving_proto_field_name=True),
}


def write(path: Path, dialect: Dialect, encoding: str = "collector", content: bool = True) -> Path:
    """The conversation in ``dialect``, one export per line: its spans, then its log records."""
    spans, logs = recorded(dialect, content)
    exports = [traces(spans)] + ([log_records(logs)] if logs else [])
    path.write_text("".join(ENCODINGS[encoding](export) + "\n" for export in exports))
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Home, FlywheelConfig]:
    """The repository's flywheel.yaml with the assistant domain importing, and the CLI's environment."""
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    raw["domains"]["assistant"].update(exploration_share=0.0, importing={"consent": "granted"})
    path = tmp_path / "flywheel.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(path))
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    return Home(tmp_path / "home").ensure(), load_config(path)


def landed(home: Home, report: ImportReport) -> list[dict]:
    return sorted((json.loads(line) for batch in report.batches
                   for line in (home.landing / batch).read_text().splitlines()), key=lambda e: e["event_id"])


@pytest.fixture
def genai_conventions(project, tmp_path) -> list[dict]:
    """What the conversation lands as written in the current GenAI conventions."""
    home, config = project
    report = import_file(home, config, "otel", write(tmp_path / "genai_conventions.jsonl", GENAI_CONVENTIONS), "assistant")
    assert report.events == {"interaction": 3, "signal": 2} and report.skipped == {"not_a_chat_span": 1}
    return landed(home, report)


def test_the_genai_conventions_land_the_conversation(genai_conventions):
    interactions = [e for e in genai_conventions if e["event_type"] == "interaction"]
    assert sorted(e["input"] for e in interactions) == sorted(prompt[-1][1] for prompt, _, _ in TURNS)
    assert {e["impressions"][0]["content"] for e in interactions} == {answer for _, answer, _ in TURNS}
    assert {(e["session_id"], e["user_id"], e["model_version"]) for e in interactions} == {("conv_1", "u_7", MODEL)}
    signals = sorted(e["signal_type"] for e in genai_conventions if e["event_type"] == "signal")
    assert signals == ["rating", "reformulate"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_each_dialect_lands_what_the_genai_conventions_land(dialect, genai_conventions, project, tmp_path):
    home, config = project
    report = import_file(home, config, "otel", write(tmp_path / f"{dialect}.jsonl", DIALECTS[dialect]), "assistant")
    assert landed(home, report) == genai_conventions
    assert not report.rejected and report.skipped == {"not_a_chat_span": 1}
    assert report.records == report.records_mapped + 1  # log records count with their span's interaction


@pytest.mark.parametrize("dialect", ["genai_conventions", "message_log_events"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_ids_in_hex_or_base64_and_keys_in_either_case_land_the_same_events(dialect, encoding, genai_conventions,
                                                                           project, tmp_path):
    home, config = project
    path = write(tmp_path / f"{encoding}.jsonl", GENAI_CONVENTIONS if dialect == "genai_conventions" else DIALECTS[dialect], encoding)
    report = import_file(home, config, "otel", path, "assistant")
    assert landed(home, report) == genai_conventions
    assert not report.rejected and report.skipped == {"not_a_chat_span": 1}


def test_protobufs_json_of_one_export_indented_imports(genai_conventions, project, tmp_path):
    home, config = project
    path = tmp_path / "export.json"
    path.write_text(MessageToJson(traces(recorded(GENAI_CONVENTIONS)[0])))
    assert landed(home, import_file(home, config, "otel", path, "assistant")) == genai_conventions


@pytest.mark.parametrize(("dialect", "rejected", "skipped"), [
    ("genai_conventions", {"missing_field:gen_ai.input.messages": 3}, {"not_a_chat_span": 1}),
    ("message_log_events", {"missing_field:gen_ai.input.messages": 3}, {"not_a_chat_span": 1}),
    ("openllmetry", {"missing_field:gen_ai.prompt.0.content": 3}, {"not_a_chat_span": 1}),
    ("openinference", {"missing_field:llm.input_messages": 3}, {"not_a_chat_span": 1}),
    ("prompt_events", {}, {"not_a_chat_span": 4}),  # before gen_ai.operation.name: only its messages tell
])
def test_a_chat_span_without_its_messages_is_rejected_in_every_dialect(dialect, rejected, skipped, project,
                                                                       tmp_path):
    home, config = project
    path = write(tmp_path / "blind.jsonl", GENAI_CONVENTIONS if dialect == "genai_conventions" else DIALECTS[dialect], content=False)
    report = import_file(home, config, "otel", path, "assistant")
    assert report.rejected == rejected and report.skipped == skipped and not report.batches


def test_an_import_that_maps_no_record_exits_non_zero_with_the_reasons(project, tmp_path, capsys):
    spans = [{"traceId": "5b8efff798038103d269b633813fc60d", "spanId": f"span {n}", "name": "chat",
              "startTimeUnixNano": str(nanos(START)), "endTimeUnixNano": str(nanos(START) + 10**9),
              "attributes": [{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}}]} for n in range(8)]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}) + "\n")
    with pytest.raises(SystemExit) as stopped:
        main(["import", "otel", str(path), "--domain", "assistant"])
    assert stopped.value.code == f"flywheel: no record of {path} could be mapped: invalid_value:spanId 8"
    assert "8 records: 0 mapped, 8 rejected, 0 skipped" in capsys.readouterr().out

    path.write_text("")
    with pytest.raises(SystemExit) as stopped:
        main(["import", "otel", str(path), "--domain", "assistant"])
    assert stopped.value.code == f"flywheel: no record of {path} could be mapped: it holds none"
