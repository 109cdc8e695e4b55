"""Reviews back from the review tools: a Label Studio JSON export and Argilla records -> ``label`` events.

The tasks and records come from the review queue's files (``flywheel_pipeline.review``), so each
carries the reviewed impression's ids (task ``data``, record ``metadata``): interaction_id, item_id,
the interaction's user_id and session_id, and the selection (audit or uncertainty). Each answer of a
reviewer becomes one ``label`` event (docs/events.md): its reviewer, its verdict, and when it was
given as the timestamp. An answer that cannot be one is rejected with the reason: ``not_reviewed``
(a task or record nobody answered), ``cancelled`` (a skipped Label Studio task, a discarded Argilla
response), ``not_submitted`` (an Argilla draft), ``missing_field:<id>`` (not a task of the queue:
the impression is unknown), ``missing_field:verdict`` / ``invalid_value:verdict`` (no choice, or
one that is not good or bad), ``invalid_value:selection``, ``invalid_value:timestamp``,
``domain_mismatch``, ``not_an_object``, ``malformed_json`` (the whole file, record 0).

The event id is a hash of the tool, the task or record, the reviewer and the answer's time, so
importing the same export twice lands each review once, and a changed answer lands as a later review
(the last one counts).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.events import SELECTIONS, VERDICTS
from flywheel_pipeline.importers.base import Event, Mapped, Rejected
from flywheel_pipeline.review import VERDICT_CONTROL

REVIEWED_IDS = ("interaction_id", "item_id", "user_id", "session_id")
ARGILLA_TIME_KEYS = ("updated_at", "inserted_at")  # on a response, else on its record


def read_label_studio(path: Path, domain: str, config: FlywheelConfig) -> Mapped:
    """A Label Studio JSON export (a list of tasks, each with ``annotations``): one event per
    annotation."""
    config.domain(domain)
    tasks = _load(path)
    if isinstance(tasks, Rejected):
        yield tasks
        return
    for number, task in enumerate(tasks, start=1):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            yield Rejected.of(number, "not_an_object", task)
            continue
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
        if not annotations:
            yield Rejected.of(number, "not_reviewed", task)
        for annotation in annotations:
            yield _label_studio_review(number, task, annotation, domain)


def _label_studio_review(number: int, task: dict, annotation: dict, domain: str) -> Event | Rejected:
    if annotation.get("was_cancelled"):
        return Rejected.of(number, "cancelled", task)
    choices = [choice for result in annotation.get("result") or []
               if isinstance(result, dict) and result.get("from_name") == VERDICT_CONTROL
               for choice in (result.get("value") or {}).get("choices") or []]
    reviewer = annotation.get("completed_by")
    if isinstance(reviewer, dict):  # some exports expand the user: {"id": 7, "email": ...}
        reviewer = reviewer.get("id")
    when = annotation.get("updated_at") or annotation.get("created_at")
    key = f"label-studio:{task.get('id')}:{annotation.get('id')}:{reviewer}:{when}"
    return _review(number, task, task["data"], choices, f"label-studio:{reviewer}", when, key, domain)


def read_argilla(path: Path, domain: str, config: FlywheelConfig) -> Mapped:
    """Argilla 2.x records as ``dataset.records.to_json`` (nested: ``metadata``, ``responses``) or
    ``to_list(flatten=True)`` writes them, a JSON list or JSONL: one event per submitted response to
    the ``verdict`` question. Records hold no answer time in every Argilla version: without
    ``updated_at``/``inserted_at`` the export file's modification time stands for it."""
    config.domain(domain)
    records = _load(path)
    if isinstance(records, Rejected):
        yield records
        return
    exported_at = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat()
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            yield Rejected.of(number, "not_an_object", record)
            continue
        yield from _argilla_reviews(number, record, domain, exported_at)


def _argilla_reviews(number: int, record: dict, domain: str, exported_at: str) -> Iterator[Event | Rejected]:
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else record
    responses = _argilla_responses(record)
    if not responses:
        yield Rejected.of(number, "not_reviewed", record)
    for response in responses:
        status = response.get("status") or "submitted"  # to_json keeps no status: only submitted ones
        if status != "submitted":
            yield Rejected.of(number, "cancelled" if status == "discarded" else "not_submitted", record)
            continue
        when = next((source[k] for source in (response, record) for k in ARGILLA_TIME_KEYS if source.get(k)),
                    exported_at)
        user = response.get("user_id")
        key = f"argilla:{record.get('id')}:{record.get('_server_id')}:{user}:{when}"
        value = response.get("value")
        yield _review(number, record, metadata, [] if value is None else [value], f"argilla:{user}", when, key,
                      domain)


def _argilla_responses(record: dict) -> list[dict[str, Any]]:
    """The responses to the verdict question, nested (``responses.verdict``) or flattened
    (``verdict.responses`` with ``.users`` and ``.status``)."""
    nested = (record.get("responses") or {}).get(VERDICT_CONTROL) if isinstance(record.get("responses"), dict) else None
    if nested is not None:
        return [response for response in nested if isinstance(response, dict)]
    flat = f"{VERDICT_CONTROL}.responses"
    values = record.get(flat) or []
    users = record.get(f"{flat}.users") or [None] * len(values)
    statuses = record.get(f"{flat}.status") or [None] * len(values)
    return [{"value": value, "user_id": user, "status": status}
            for value, user, status in zip(values, users, statuses, strict=False)]


def _review(number: int, record: object, ids: dict, choices: list, reviewer: str, when: object, key: str,
            domain: str) -> Event | Rejected:
    """The label event of one answer, or why there is none."""
    for name in REVIEWED_IDS:
        if not isinstance(ids.get(name), str) or not ids[name]:
            return Rejected.of(number, f"missing_field:{name}", record)
    if ids.get("domain", domain) != domain:
        return Rejected.of(number, "domain_mismatch", record)
    if not choices:
        return Rejected.of(number, "missing_field:verdict", record)
    if len(choices) > 1 or choices[0] not in VERDICTS:
        return Rejected.of(number, "invalid_value:verdict", record)
    selection = ids.get("selection")
    if selection is not None and selection not in SELECTIONS:
        return Rejected.of(number, "invalid_value:selection", record)
    timestamp = _utc(when)
    if timestamp is None:
        return Rejected.of(number, "invalid_value:timestamp", record)
    key = ":".join([key, ids["interaction_id"], ids["item_id"]])
    event = {
        "event_id": "review-" + hashlib.sha256(key.encode()).hexdigest()[:32],
        "event_type": "label", "domain": domain, "timestamp": timestamp,
        **{name: ids[name] for name in REVIEWED_IDS}, "reviewer": reviewer, "verdict": choices[0],
    }
    return event if selection is None else {**event, "selection": selection}


def _utc(value: object) -> str | None:
    """An ISO-8601 time as the contract's UTC timestamp (a time without offset is taken as UTC)."""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _load(path: Path) -> list | Rejected:
    """A JSON list, or JSON Lines (one object a line); the whole file rejected when it is neither."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        document = json.loads(text)
        return document if isinstance(document, list) else [document]
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return Rejected.of(0, "malformed_json", text)
