"""The event contract (docs/events.md) as data, and its enforcement as one SQL expression.

A landing line is checked in a fixed order; the first rule it breaks becomes its quarantine reason.
Validation runs inside DuckDB, vectorised. Each line is parsed once into its top-level fields, a
STRUCT of JSON fragments (``FIELDS_TYPE``: by DuckDB's JSON reader, ``JSON_COLUMNS``, or from a line's
text, ``fields_sql``), and its impressions once into a list of STRUCTs of fragments (``impressions_sql``).
The rules never parse again: a fragment is minified JSON, so its first character is its type and a
string without a backslash is its own value between the quotes (``kind_sql``, ``text_sql``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EVENT_TYPES = ("interaction", "signal", "outcome", "label")
POLICIES = ("champion", "explore", "candidate", "baseline")
CONSENT_STATES = ("granted", "denied")
VERDICTS = ("good", "bad")
# How a reviewed impression was chosen: at random (the product's audit_share, or the review queue's
# audit slice: gold for validation) or by the label model's uncertainty (the review queue's other part).
SELECTIONS = ("audit", "uncertainty")
SIGNAL_TYPES = (
    "rating", "accept", "reject", "edit", "revert", "copy", "reformulate", "abandon", "dwell", "click",
)
# Delayed outcomes a domain can wait for (flywheel.yaml's label_maturity.outcome). An outcome
# event's `name` may be anything; only these are ones a domain's labels and gate can be built on.
OUTCOME_NAMES = ("resolved", "purchase")
# What a domain's labels can wait for (label_maturity.outcome): one of those outcomes, or, for a
# domain that logs clicks and nothing later, the click itself.
CLICK_MATURITY = "click"
MATURITY_OUTCOMES = (*OUTCOME_NAMES, CLICK_MATURITY)
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
    nullable: bool = False  # an impression's field that may be null (unknown), never absent


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
        Field("selection", "string", required=False),
    ),
}
IMPRESSION_FIELDS = (
    Field("item_id", "string"),
    Field("position", "integer"),
    Field("propensity", "number", nullable=True),  # null: the logger's probability was not logged
    Field("content", "string"),
)

# Ids of some event types (beyond event_id, session_id, interaction_id and the user): safe ids
_TYPED_IDS = (("model_version", ("interaction",)), ("item_id", ("signal", "outcome", "label")),
              ("name", ("outcome",)), ("reviewer", ("label",)))

# An id made of words of up to 15 letters and bare runs of digits joined by underscores (u_2277,
# e_assistant_20261126_3): read as id_holds_pii reads it (underscores as spaces, bare digit runs as N)
# it holds only short words, which no personal-data pattern matches (the shortest all-letter key
# pattern takes 20 characters; the others need digits, '@', ':', '-', '.' or '='). Most ids are
# such, and skip that reading.
PLAIN_ID_PATTERN = r"^(?:[A-Za-z]{1,15}|[0-9]+)(?:_(?:[A-Za-z]{1,15}|[0-9]+))*$"
TIMESTAMP_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})$"


FIELD_NAMES = tuple(dict.fromkeys(
    [f.name for f in COMMON_FIELDS] + [f.name for fields in FIELDS_BY_TYPE.values() for f in fields]))


FIELDS_TYPE = "STRUCT(" + ", ".join(f"{name} JSON" for name in FIELD_NAMES) + ")"


JSON_COLUMNS = "{" + ", ".join(f"'{name}': 'JSON'" for name in FIELD_NAMES) + "}"  # read_json's columns
_IMPRESSION_FRAGMENTS = "[{" + ", ".join(f'"{f.name}": "JSON"' for f in IMPRESSION_FIELDS) + "}]"


def fields_sql(doc: str) -> str:
    """The line's top-level contract fields as a STRUCT of JSON fragments (NULL when absent or
    null), parsed in one pass; the rules and the raw tables read ``fields.<name>``."""
    schema = ", ".join(f'"{name}": "JSON"' for name in FIELD_NAMES)
    return f"from_json({doc}, '{{{schema}}}')"


def fields_of_columns() -> str:
    """``FIELDS_TYPE`` from read_json's ``JSON_COLUMNS``."""
    return "struct_pack(" + ", ".join(f"{name} := {name}" for name in FIELD_NAMES) + ")"


def impressions_sql(fields: str = "fields") -> str:
    """The impressions as a list of STRUCTs of JSON fragments (a non-object item: all NULL), NULL
    when ``impressions`` is not an array; the rules read it as ``imps``."""
    return (f"CASE WHEN {kind_sql(f'{fields}.impressions')} = 'ARRAY' "
            f"THEN from_json({fields}.impressions, '{_IMPRESSION_FRAGMENTS}') END")


def impression_ids_sql(imps: str = "imps") -> str:
    """The text of every impression's item id (``impressions_sql``), NULL where it is no string;
    the rules read it as ``imp_ids``."""
    return f"list_transform({imps}, lambda imp: {text_sql('imp.item_id')})"


def kind_sql(fragment: str) -> str:
    """A JSON fragment's type as ``json_type`` names it, from its first character (no parsing);
    NULL for a NULL fragment (absent, or a null member of a parsed object)."""
    text = f"CAST({fragment} AS VARCHAR)"
    return f"""CASE left({text}, 1) WHEN '"' THEN 'VARCHAR' WHEN '{{' THEN 'OBJECT' WHEN '[' THEN 'ARRAY'
        WHEN 't' THEN 'BOOLEAN' WHEN 'f' THEN 'BOOLEAN' WHEN 'n' THEN 'NULL' WHEN '' THEN NULL
        ELSE CASE WHEN regexp_matches({text}, '[.eE]') THEN 'DOUBLE' WHEN {text} IS NOT NULL THEN 'BIGINT' END END"""


def text_sql(fragment: str) -> str:
    """A JSON string fragment's value (parsed only when it holds an escape); NULL for other types."""
    text = f"CAST({fragment} AS VARCHAR)"
    return f"""CASE WHEN NOT starts_with({text}, '"') THEN NULL WHEN contains({text}, '\\') THEN {fragment} ->> '$'
        ELSE {text}[2:-2] END"""


def _one_of(value: str, values: tuple[str, ...]) -> str:
    """``value IN values`` (NULL for a NULL value), as ``list_position``: DuckDB plans a long IN list
    (and ``list_contains``) as a join, which would not keep the scan's order accumulation numbers
    lines by (accumulation checks the plan)."""
    listed = ", ".join(f"'{v}'" for v in values)
    return f"CASE WHEN {value} IS NOT NULL THEN list_position([{listed}], {value}) IS NOT NULL END"


def _type_of(name: str) -> str:
    return kind_sql(f"fields.{name}")


def _member_types(member: str) -> str:
    """The types of every impression's ``member`` (NULL where absent or null): ``impression_kinds_sql``."""
    return f"imp_{member}_types"


def _present(name: str) -> str:
    return f"fields.{name} IS NOT NULL"


def field_text(name: str) -> str:
    """The text of contract field ``name`` of the ``fields`` column (NULL when it is not a string)."""
    return text_sql(f"fields.{name}")


def _number(name: str) -> str:
    return f"TRY_CAST(CAST(fields.{name} AS VARCHAR) AS DOUBLE)"


def _not_an_id(path: str) -> str:
    return f"NOT regexp_full_match(coalesce({field_text(path)}, ''), '{ID_PATTERN}')"


def _unsafe_id(text: str) -> str:
    """``text`` (an id's value, SQL) is no safe id: outside ID_PATTERN, or holding personal data
    (``id_holds_pii``, a macro privacy.install_redaction creates on the connection: an underscore
    read as a space, so ``u_219-09-9999`` holds an SSN; a bare run of digits is a number, no phone)."""
    return f"(NOT regexp_full_match(coalesce({text}, ''), '{ID_PATTERN}') OR id_holds_pii({text}))"


def _id_rules() -> list[tuple[str, str]]:
    """``unsafe_id:<field>`` for every id an event carries beyond its user (``user_id_not_pseudonymous``):
    ids are kept unredacted in every table, so each must be a safe id."""
    def unsafe(name: str) -> str:
        return f"{_present(name)} AND CASE WHEN plain_ids THEN false ELSE {_unsafe_id(field_text(name))} END"

    return [
        *[(f"unsafe_id:{name}", unsafe(name)) for name in ("event_id", "session_id", "interaction_id")],
        *[(f"unsafe_id:{name}", _for_types(types, unsafe(name))) for name, types in _TYPED_IDS],
        ("unsafe_id:impressions.item_id", _for_types(("interaction",), _unsafe_impression_ids())),
    ]


def _all_plain(ids: str) -> str:
    """Every text of the list ``ids`` is a safe id, told at once: joined by underscores they read as one
    plain id (``PLAIN_ID_PATTERN``; a NULL or empty one breaks it), none is over the length limit and
    no key is in them joined by spaces. False says nothing: each is then checked on its own."""
    return (f"(list_count({ids}) = len({ids}) AND regexp_full_match(array_to_string({ids}, '_'), '{PLAIN_ID_PATTERN}') "
            f"AND list_max(list_transform({ids}, lambda id: length(id))) <= {MAX_ID_LENGTH} "
            f"AND NOT id_holds_key(array_to_string({ids}, ' ')))")


def plain_ids_sql() -> str:
    """Whether every id field of the line (the user's, and those present of the others) is a plain,
    safe id (``_all_plain``); the id rules read it as ``plain_ids`` and check no further where it holds."""
    ids = [f"coalesce({field_text('user_id')}, '')"] + [
        f"CASE WHEN {_present(name)} THEN coalesce({field_text(name)}, '') END"
        for name in ("event_id", "session_id", "interaction_id", *(name for name, _ in _TYPED_IDS))]
    return _all_plain(f"list_filter([{', '.join(ids)}], lambda id: id IS NOT NULL)")


def impression_kinds_sql() -> str:
    """Columns ``imp_<member>_types``: each impression's member's type (``kind_sql``), for the rules."""
    return ", ".join(f"list_transform(imps, lambda imp: {kind_sql(f'imp.{f.name}')}) AS imp_{f.name}_types"
                     for f in IMPRESSION_FIELDS)


def _unsafe_impression_ids() -> str:
    """Some impression's item id (``imp_ids``) is no safe id; all told at once where they are plain."""
    return (f"CASE WHEN {_all_plain('imp_ids')} THEN false "
            f"ELSE list_bool_or(list_transform(imp_ids, lambda id: {_unsafe_id('id')})) END")


def _for_types(types: tuple[str, ...], condition: str) -> str:
    return f"({_one_of('event_type', types)} AND {condition})"


def _event_type_rules() -> list[tuple[str, str]]:
    """The event type first: every other rule is scoped by it, so a line without a string one
    (null, absent, a number, a list...) would match none and be neither accepted nor quarantined."""
    return [("missing_field:event_type", f"NOT {_present('event_type')}"),
            ("wrong_type:event_type", f"NOT {_one_of(_type_of('event_type'), _JSON_TYPES['string'])}"),
            ("invalid_value:event_type", f"event_type IS NULL OR NOT {_one_of('event_type', EVENT_TYPES)}")]


def _field_rules() -> list[tuple[str, str]]:
    """(reason, bad-when) for every missing or mistyped field but the event type
    (``_event_type_rules``), common fields first."""
    missing: list[tuple[str, str]] = []
    mistyped: list[tuple[str, str]] = []
    scoped = [(f, EVENT_TYPES) for f in COMMON_FIELDS if f.name != "event_type"] + [
        (f, (event_type,)) for event_type, fields in FIELDS_BY_TYPE.items() for f in fields
    ]
    for field, types in scoped:
        wrong = f"NOT {_one_of(_type_of(field.name), _JSON_TYPES[field.kind])}"
        if field.required:
            missing.append((f"missing_field:{field.name}", _for_types(types, f"NOT {_present(field.name)}")))
        mistyped.append((f"wrong_type:{field.name}", _for_types(types, f"{_present(field.name)} AND {wrong}")))
    for field in IMPRESSION_FIELDS:
        types = _member_types(field.name)
        missing.append((
            f"missing_field:impressions.{field.name}",
            _for_types(("interaction",), _absent_member(field)),
        ))
        allowed = _one_of("t", _JSON_TYPES[field.kind])
        mistyped.append((
            f"wrong_type:impressions.{field.name}",
            _for_types(("interaction",), f"NOT list_bool_and(list_transform({types}, lambda t: "
                                         f"{f't IS NULL OR {allowed}' if field.nullable else allowed}))"),
        ))
    return missing + mistyped + [_features_rule()]


def _absent_member(field: Field) -> str:
    """Some impression lacks ``field``. The fragments read a null as absent, so for a nullable field
    the impressions holding the key are counted, parsing them again only where a fragment is null."""
    null = f"list_bool_or(list_transform({_member_types(field.name)}, lambda t: t IS NULL))"
    if not field.nullable:
        return null
    return f"{null} AND len(json_extract(fields.impressions, '$[*].{field.name}')) < len(imps)"


def _features_rule() -> tuple[str, str]:
    """``context.features``, when present, is an object of name -> finite number (serving-time
    numeric features: user features, user-item affinities); other context entries are free."""
    features = "(fields.context -> '$.features')"
    values = f"""map_values(from_json({features}, '"MAP(VARCHAR, JSON)"'))"""
    finite = "lambda v: coalesce(isfinite(TRY_CAST(CAST(v AS VARCHAR) AS DOUBLE)), false)"
    return ("wrong_type:context.features", _for_types(("interaction",), f"""{_type_of('context')} = 'OBJECT'
        AND contains(CAST(fields.context AS VARCHAR), '"features"') AND json_type({features}) <> 'NULL'
        AND (json_type({features}) <> 'OBJECT' OR NOT coalesce(list_bool_and(list_transform({values}, {finite})), true))"""))


def _value_rules() -> list[tuple[str, str]]:
    """(reason, bad-when) for values outside the contract, in the order docs/events.md gives."""
    propensities = "list_transform(imps, lambda imp: CAST(CAST(imp.propensity AS VARCHAR) AS DOUBLE))"
    positions = "list_transform(imps, lambda imp: CAST(CAST(imp.position AS VARCHAR) AS BIGINT))"
    value = _number("value")
    signal_type = field_text("signal_type")
    return [
        ("invalid_value:event_id", _not_an_id("event_id")),
        ("invalid_value:timestamp", f"NOT regexp_matches({field_text('timestamp')}, '{TIMESTAMP_PATTERN}') OR event_ts IS NULL"),
        ("invalid_value:session_id", _not_an_id("session_id")),
        ("invalid_value:interaction_id", _not_an_id("interaction_id")),
        ("invalid_value:policy", _for_types(("interaction",), f"NOT {_one_of(field_text('policy'), POLICIES)}")),
        ("invalid_value:consent", _for_types(("interaction",), f"NOT {_one_of(field_text('consent'), CONSENT_STATES)}")),
        ("invalid_value:input", _for_types(("interaction",), f"length({field_text('input')}) > {MAX_INPUT_LENGTH}")),
        ("invalid_value:impressions", _for_types(
            ("interaction",), f"len(imps) NOT BETWEEN 1 AND {MAX_IMPRESSIONS}")),
        ("invalid_value:impressions.propensity", _for_types(  # null: unknown
            ("interaction",), f"NOT list_bool_and(list_transform({propensities}, lambda p: p IS NULL OR (p > 0 AND p <= 1)))")),
        ("invalid_value:impressions.position", _for_types(
            ("interaction",), f"NOT list_bool_and(list_transform({positions}, lambda p: p >= 0))")),
        ("invalid_value:verdict", _for_types(("label",), f"NOT {_one_of(field_text('verdict'), VERDICTS)}")),
        ("invalid_value:selection", _for_types(("label",), f"NOT {_one_of(field_text('selection'), SELECTIONS)}")),
        ("invalid_value:reviewer", _for_types(("label",), f"length({field_text('reviewer')}) NOT BETWEEN 1 AND {MAX_ID_LENGTH}")),
        ("invalid_value:signal_type", _for_types(("signal",), f"NOT {_one_of(signal_type, SIGNAL_TYPES)}")),
        ("missing_field:value", _for_types(("signal",), f"{_one_of(signal_type, ('rating', 'dwell'))} AND {value} IS NULL")),
        ("invalid_value:value", _for_types(("signal",), f"({signal_type} = 'rating' AND {value} NOT BETWEEN 1 AND 5) OR ({signal_type} = 'dwell' AND {value} < 0)")),
        ("missing_field:text", _for_types(("signal",), f"{signal_type} = 'edit' AND {field_text('text')} IS NULL")),
        ("missing_field:item_id", _for_types(("signal",), f"{signal_type} = 'click' AND {field_text('item_id')} IS NULL")),
    ]


def reason_sql(allowed_domains: tuple[str, ...], whole_line: bool = True) -> str:
    """A SQL CASE giving the first broken rule of a landing line, NULL when the line is valid.

    Expects columns ``fields`` (``FIELDS_TYPE``), ``imps`` (``impressions_sql()``), ``imp_ids``
    (``impression_ids_sql()``), ``imp_<member>_types`` (``impression_kinds_sql()``), ``plain_ids``
    (``plain_ids_sql()``), ``event_type``,
    ``event_ts`` (parsed, UTC), ``batch_domain`` (the landing folder's domain), ``latest_allowed_ts``
    and, for a ``whole_line`` check, ``doc`` (the line as JSON, NULL when it does not parse).
    Without ``whole_line`` (fields read by read_json) the line is taken as an object. The ids'
    rules call ``id_holds_pii``: privacy.install_redaction must have run on the connection.
    """
    rules = [
        *([("malformed_json", "doc IS NULL"), ("not_an_object", "json_type(doc) <> 'OBJECT'")] if whole_line else []),
        *_event_type_rules(),
        *_field_rules(),
        *_value_rules(),
        ("unknown_domain", f"NOT {_one_of(field_text('domain'), allowed_domains)}"),
        ("domain_mismatch", f"{field_text('domain')} <> batch_domain"),
        ("future_timestamp", "event_ts > latest_allowed_ts"),
        # an id holding no personal data: no e-mail address, phone or card number, no whitespace
        ("user_id_not_pseudonymous", f"CASE WHEN plain_ids THEN false ELSE {_unsafe_id(field_text('user_id'))} END"),
        *_id_rules(),
    ]
    whens = "\n".join(f"    WHEN {condition} THEN '{reason}'" for reason, condition in rules)
    return f"CASE\n{whens}\n    ELSE NULL\nEND"
