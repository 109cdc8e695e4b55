"""The event contract (docs/events.md) as data, and its enforcement as one SQL expression.

A landing line is checked in a fixed order; the first rule it breaks becomes its quarantine reason.
Validation runs inside DuckDB (vectorised JSON functions), so a million lines take seconds. Each line
is parsed once into its top-level fields (``fields_sql``); every rule reads those small fragments,
never the whole line again, so a long line costs its size a few times over, not once per rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EVENT_TYPES = ("interaction", "signal", "outcome", "label")
POLICIES = ("champion", "explore", "candidate", "baseline")
CONSENT_STATES = ("granted", "denied")
VERDICTS = ("good", "bad")
SIGNAL_TYPES = (
    "rating", "accept", "reject", "edit", "revert", "copy", "reformulate", "abandon", "dwell", "click",
)
# Delayed outcomes a domain can wait for (flywheel.yaml's label_maturity.outcome). An outcome
# event's `name` may be anything; only these are ones a domain's labels and gate can be built on.
OUTCOME_NAMES = ("resolved", "purchase")
MAX_ID_LENGTH = 128
ID_PATTERN = rf"^[A-Za-z0-9_.:-]{{1,{MAX_ID_LENGTH}}}$"  # no control, invisible or right-to-left characters
MAX_INPUT_LENGTH = 4000
MAX_IMPRESSIONS = 50
CLOCK_SKEW_MINUTES = 5

Kind = Literal["string", "number", "integer", "timestamp", "object", "array"]

_JSON_TYPES: dict[str, tuple[str, ...]] = {
    "string": ("VARCHAR",),
    "timestamp": ("VARCHAR",),
    "number": ("BIGINT", "UBIGINT", "DOUBLE"),
    "integer": ("BIGINT", "UBIGINT"),
    "object": ("OBJECT",),
    "array": ("ARRAY",),
}


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    required: bool = True


COMMON_FIELDS = (
    Field("event_id", "string"),
    Field("event_type", "string"),
    Field("domain", "string"),
    Field("timestamp", "timestamp"),
    Field("user_id", "string"),
    Field("session_id", "string"),
)
FIELDS_BY_TYPE: dict[str, tuple[Field, ...]] = {
    "interaction": (
        Field("interaction_id", "string"),
        Field("model_version", "string"),
        Field("policy", "string"),
        Field("consent", "string"),
        Field("input", "string"),
        Field("context", "object", required=False),
        Field("impressions", "array"),
    ),
    "signal": (
        Field("interaction_id", "string"),
        Field("signal_type", "string"),
        Field("item_id", "string", required=False),
        Field("value", "number", required=False),
        Field("text", "string", required=False),
    ),
    "outcome": (
        Field("interaction_id", "string"),
        Field("name", "string"),
        Field("value", "number"),
        Field("item_id", "string", required=False),
    ),
    "label": (
        Field("interaction_id", "string"),
        Field("item_id", "string"),
        Field("reviewer", "string"),
        Field("verdict", "string"),
    ),
}
IMPRESSION_FIELDS = (
    Field("item_id", "string"),
    Field("position", "integer"),
    Field("propensity", "number"),
    Field("content", "string"),
)

TIMESTAMP_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})$"


FIELD_NAMES = tuple(dict.fromkeys(
    [f.name for f in COMMON_FIELDS] + [f.name for fields in FIELDS_BY_TYPE.values() for f in fields]))


FIELDS_TYPE = "STRUCT(" + ", ".join(f"{name} JSON" for name in FIELD_NAMES) + ")"


def fields_sql(doc: str) -> str:
    """The line's top-level contract fields as a STRUCT of JSON fragments (NULL when absent or
    null), parsed in one pass; the rules and the raw tables read ``fields.<name>``."""
    schema = ", ".join(f'"{name}": "JSON"' for name in FIELD_NAMES)
    return f"from_json({doc}, '{{{schema}}}')"


def _sql_list(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def _field(path: str) -> tuple[str, str]:
    """``impressions[*].position`` -> (``fields.impressions``, ``'$[*].position'``)."""
    name, _, rest = path.partition("[")
    name, _, member = name.partition(".")
    return f"fields.{name}", "'$" + ("[" + rest if rest else "") + (f".{member}" if member else "") + "'"


def _type_of(path: str) -> str:
    return "json_type({}, {})".format(*_field(path))


def _present(path: str) -> str:
    return f"coalesce({_type_of(path)}, 'NULL') <> 'NULL'"


def _text(path: str) -> str:
    return "json_extract_string({}, {})".format(*_field(path))


def _number(path: str) -> str:
    return f"TRY_CAST({_field(path)[0]} AS DOUBLE)"


def _not_an_id(path: str) -> str:
    return f"NOT regexp_full_match(coalesce({_text(path)}, ''), '{ID_PATTERN}')"


def _for_types(types: tuple[str, ...], condition: str) -> str:
    return f"(event_type IN {_sql_list(types)} AND {condition})"


def _field_rules() -> list[tuple[str, str]]:
    """(reason, bad-when) for every missing or mistyped field, common fields first."""
    missing: list[tuple[str, str]] = []
    mistyped: list[tuple[str, str]] = []
    scoped = [(f, EVENT_TYPES) for f in COMMON_FIELDS] + [
        (f, (event_type,)) for event_type, fields in FIELDS_BY_TYPE.items() for f in fields
    ]
    for field, types in scoped:
        wrong = f"{_type_of(field.name)} NOT IN {_sql_list(_JSON_TYPES[field.kind])}"
        if field.required:
            missing.append((f"missing_field:{field.name}", _for_types(types, f"NOT {_present(field.name)}")))
        mistyped.append((f"wrong_type:{field.name}", _for_types(types, f"{_present(field.name)} AND {wrong}")))
    for field in IMPRESSION_FIELDS:
        path = f"impressions[*].{field.name}"
        count = f"len({_type_of(path)})"
        missing.append((
            f"missing_field:impressions.{field.name}",
            _for_types(("interaction",), f"{count} <> json_array_length(fields.impressions)"),
        ))
        allowed = _sql_list(_JSON_TYPES[field.kind])
        mistyped.append((
            f"wrong_type:impressions.{field.name}",
            _for_types(("interaction",), f"NOT list_bool_and(list_transform({_type_of(path)}, lambda t: t IN {allowed}))"),
        ))
    return missing + mistyped


def _value_rules() -> list[tuple[str, str]]:
    """(reason, bad-when) for values outside the contract, in the order docs/events.md gives."""
    propensities = "list_transform(json_extract(fields.impressions, '$[*].propensity'), lambda p: p::DOUBLE)"
    positions = "list_transform(json_extract(fields.impressions, '$[*].position'), lambda p: p::BIGINT)"
    value = _number("value")
    signal_type = _text("signal_type")
    return [
        ("invalid_value:event_type", f"event_type NOT IN {_sql_list(EVENT_TYPES)}"),
        ("invalid_value:event_id", _not_an_id("event_id")),
        ("invalid_value:timestamp", f"NOT regexp_matches({_text('timestamp')}, '{TIMESTAMP_PATTERN}') OR event_ts IS NULL"),
        ("invalid_value:session_id", _not_an_id("session_id")),
        ("invalid_value:interaction_id", _not_an_id("interaction_id")),
        ("invalid_value:policy", _for_types(("interaction",), f"{_text('policy')} NOT IN {_sql_list(POLICIES)}")),
        ("invalid_value:consent", _for_types(("interaction",), f"{_text('consent')} NOT IN {_sql_list(CONSENT_STATES)}")),
        ("invalid_value:input", _for_types(("interaction",), f"length({_text('input')}) > {MAX_INPUT_LENGTH}")),
        ("invalid_value:impressions", _for_types(
            ("interaction",), f"json_array_length(fields.impressions) NOT BETWEEN 1 AND {MAX_IMPRESSIONS}")),
        ("invalid_value:impressions.propensity", _for_types(
            ("interaction",), f"NOT list_bool_and(list_transform({propensities}, lambda p: p > 0 AND p <= 1))")),
        ("invalid_value:impressions.position", _for_types(
            ("interaction",), f"NOT list_bool_and(list_transform({positions}, lambda p: p >= 0))")),
        ("invalid_value:verdict", _for_types(("label",), f"{_text('verdict')} NOT IN {_sql_list(VERDICTS)}")),
        ("invalid_value:reviewer", _for_types(("label",), f"length({_text('reviewer')}) NOT BETWEEN 1 AND {MAX_ID_LENGTH}")),
        ("invalid_value:signal_type", _for_types(("signal",), f"{signal_type} NOT IN {_sql_list(SIGNAL_TYPES)}")),
        ("missing_field:value", _for_types(("signal",), f"{signal_type} IN ('rating', 'dwell') AND {value} IS NULL")),
        ("invalid_value:value", _for_types(("signal",), f"({signal_type} = 'rating' AND {value} NOT BETWEEN 1 AND 5) OR ({signal_type} = 'dwell' AND {value} < 0)")),
        ("missing_field:text", _for_types(("signal",), f"{signal_type} = 'edit' AND {_text('text')} IS NULL")),
        ("missing_field:item_id", _for_types(("signal",), f"{signal_type} = 'click' AND {_text('item_id')} IS NULL")),
    ]


def reason_sql(allowed_domains: tuple[str, ...]) -> str:
    """A SQL CASE giving the first broken rule of a landing line, NULL when the line is valid.

    Expects columns ``doc`` (the line as JSON, NULL when it does not parse), ``fields`` (``fields_sql(doc)``),
    ``event_type``, ``event_ts`` (parsed, UTC), ``batch_domain`` (the landing folder's domain) and
    ``latest_allowed_ts``.
    """
    rules = [
        ("malformed_json", "doc IS NULL"),
        ("not_an_object", "json_type(doc) <> 'OBJECT'"),
        *_field_rules(),
        *_value_rules(),
        ("unknown_domain", f"{_text('domain')} NOT IN {_sql_list(allowed_domains)}"),
        ("domain_mismatch", f"{_text('domain')} <> batch_domain"),
        ("future_timestamp", "event_ts > latest_allowed_ts"),
        ("user_id_not_pseudonymous", _not_an_id("user_id")),  # so no e-mail address, no whitespace
    ]
    whens = "\n".join(f"    WHEN {condition} THEN '{reason}'" for reason, condition in rules)
    return f"CASE\n{whens}\n    ELSE NULL\nEND"
