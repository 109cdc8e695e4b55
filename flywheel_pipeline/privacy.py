"""Privacy by construction: personal data is redacted on ingest, forgotten on request, expired on time.

Redaction: before accumulation writes a partition, every free-text field of an accepted event
(an interaction's ``input``, its impressions' ``content``, every string in its ``context``; a
signal's ``text``) and every quarantined line has its email addresses, phone numbers, card numbers
(Luhn-checked), US SSNs and API keys replaced by ``<ENTITY>`` (Presidio's entity names). The
patterns run as DuckDB regular expressions, vectorised; benchmarks/redaction.py measures them
against Presidio's recognizers on a labelled corpus (docs/privacy.md).

Forgetting (``flywheel forget --user ID``): the user's rows leave every warehouse table, their
lines leave the landing batches (rewritten atomically), their tasks the review files, and a tombstone (a hash of the id) makes
accumulation quarantine any replayed event of theirs as ``forgotten_user``, with no content.

Retention: ``retention_days`` per domain; ``enforce_retention`` deletes older rows and batches.
Both reach the exported training sets (flywheel_pipeline.training_sets), rewritten without the records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from flywheel_pipeline import accumulation, review
from flywheel_pipeline.home import Home, write_atomically
from flywheel_pipeline.warehouse import connect, ensure_raw_tables, transaction

if TYPE_CHECKING:
    from mlflow import MlflowClient

# RE2 patterns by Presidio entity name, replaced in this order (keys before the digit runs in them).
PII_PATTERNS: dict[str, tuple[str, ...]] = {
    "API_KEY": (
        r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key id
        r"\bgh[pousr]_[A-Za-z0-9]{36,}",  # GitHub token
        r"\b[rsp]k_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe key
        r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}",  # OpenAI / Anthropic style key
        r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack token
        r"\bAIza[0-9A-Za-z_-]{35}",  # Google API key
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
        r"(?i:\b(?:api[_-]?key|secret|token|password|passwd)\b\s*[:=]\s*)[^\s,;]{8,}",  # key=value
    ),
    "EMAIL_ADDRESS": (r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",),
    "CREDIT_CARD": (  # 12 to 19 digits, Luhn-valid (luhn_valid below)
        r"\b\d{12,19}\b",
        r"\b\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,4})?\b",  # in fours: 4111 1111 1111 1111
        r"\b\d{4}[ -]\d{6}[ -]\d{4,5}\b",  # American Express, Diners: 3782 822463 10005
    ),
    "US_SSN": (  # area not 000, 666 or 9xx; group not 00; serial not 0000
        (r"\b(?:00[1-9]|0[1-9]\d|[1-578]\d\d|6[0-57-9]\d|66[0-57-9])[- ](?:0[1-9]|[1-9]\d)[- ]"
         r"(?:000[1-9]|00[1-9]\d|0[1-9]\d\d|[1-9]\d{3})\b"),
    ),
    "PHONE_NUMBER": (
        # North American: +1 (415) 555-0132, 415.555.0132, 4155550132, with an extension
        (r"(?:\+?\b1[ .-]?|\b001[ .-]?)?(?:\(\d{3}\)\s?|\b\d{3}[ .-]?)\d{3}[ .-]?\d{4}"
         r"(?:\s?(?:x|ext\.?)\s?\d{1,6})?\b"),
        # international: +44 20 7946 0958, +49-30-123456
        r"\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){2,5}\b",
        # national, with a trunk 0: (0113) 496 0498, 01154 299690, 020 7946 0958
        r"(?:\(0\d{2,4}\)\s?|\b0\d{2,4}[ -]?)\d{2,4}[ -]?\d{3,4}\b",
    ),
}
FORGOTTEN_USER = "forgotten_user"  # the quarantine reason of a replayed event of a forgotten user
_USER_ID_IN_LINE = r'"user_id"\s*:\s*"([^"\\]*)"'  # a malformed line's user, where it can be read

PRIVACY_DDL = """
CREATE SCHEMA IF NOT EXISTS privacy;
CREATE TABLE IF NOT EXISTS privacy.forgotten_users (
    user_hash VARCHAR PRIMARY KEY, forgotten_at TIMESTAMP NOT NULL
);
"""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _pattern(entity: str) -> str:
    """One entity's patterns as one RE2 alternation (one pass over the text)."""
    return "|".join(f"(?:{pattern})" for pattern in PII_PATTERNS[entity])


def _redacted(expr: str) -> str:
    """SQL redacting ``expr``, entity after entity in PII_PATTERNS' order."""
    for entity in PII_PATTERNS:
        expr = (f"redact_cards({expr})" if entity == "CREDIT_CARD"
                else f"regexp_replace({expr}, {_literal(_pattern(entity))}, '<{entity}>', 'g')")
    return expr


def install_redaction(con: duckdb.DuckDBPyConnection) -> None:
    """Create the connection's ``redact_pii(text)`` and ``redact_json(json)`` macros."""
    card = _literal(_pattern("CREDIT_CARD"))
    anything = _literal("|".join(_pattern(entity) for entity in PII_PATTERNS))
    con.execute(rf"""
        CREATE OR REPLACE TEMP MACRO luhn_valid(digits) AS list_sum(list_transform(
            list_reverse(regexp_extract_all(digits, '\d')),
            lambda d, i: CASE WHEN i % 2 = 0 THEN (2 * d::INT) // 10 + (2 * d::INT) % 10 ELSE d::INT END
        )) % 10 = 0;
        CREATE OR REPLACE TEMP MACRO redact_cards(text) AS CASE WHEN regexp_matches(text, {card}) THEN
            list_reduce(list_prepend(text, list_filter(regexp_extract_all(text, {card}), lambda c: luhn_valid(c))),
                        lambda redacted, c: replace(redacted, c, '<CREDIT_CARD>'))
            ELSE text END;
        CREATE OR REPLACE TEMP MACRO redact_pii(text) AS
            CASE WHEN regexp_matches(text, {anything}) THEN {_redacted("text")} ELSE text END;
        -- JSON text with its escapes (\n, \") read as spaces, so that they do not hide a match
        CREATE OR REPLACE TEMP MACRO unescaped(line) AS regexp_replace(line, '\\[bfnrt"/\\]', ' ', 'g');
        -- false for JSON text none of whose strings can hold a match: most events, spared
        -- rebuilding their JSON (text with a \u escape is always looked at)
        CREATE OR REPLACE TEMP MACRO may_hold_pii(line) AS
            contains(line, '\u') OR regexp_matches(unescaped(line), {anything});
        -- a quarantined line as kept: a valid one re-serialised (which decodes \u escapes); one
        -- that does not parse and has \u escapes, which could hide a match, not at all
        CREATE OR REPLACE TEMP MACRO quarantined_line(line) AS CASE
            WHEN json_valid(line) THEN redact_pii(unescaped(json(line)::VARCHAR))
            WHEN NOT contains(line, '\u') THEN redact_pii(unescaped(line)) END;
        CREATE OR REPLACE TEMP MACRO redact_json_0(j) AS
            CASE WHEN json_type(j) = 'VARCHAR' THEN to_json(redact_pii(j ->> '$')) ELSE j END;
    """)
    for depth in (1, 2, 3):  # context -> candidates -> candidate -> content: three containers deep
        inner = f"redact_json_{depth - 1}"
        con.execute(f"""
            CREATE OR REPLACE TEMP MACRO redact_json_{depth}(j) AS CASE json_type(j)
                WHEN 'OBJECT' THEN to_json(map_from_entries(list_transform(
                    map_entries(from_json(j, '"MAP(VARCHAR, JSON)"')),
                    lambda e: {{'key': e.key, 'value': {inner}(e.value)}})))
                WHEN 'ARRAY' THEN to_json(list_transform(from_json(j, '["JSON"]'), lambda v: {inner}(v)))
                ELSE redact_json_0(j) END""")
    con.execute("CREATE OR REPLACE TEMP MACRO redact_json(j) AS redact_json_3(j)")


def ensure_privacy_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(PRIVACY_DDL)


def user_hash(user_id: str) -> str:
    """What a tombstone keeps of a forgotten user: SHA-256 of the id (DuckDB's sha256 agrees)."""
    return hashlib.sha256(user_id.encode()).hexdigest()


def protect_partition_lines(con: duckdb.DuckDBPyConnection) -> None:
    """Accumulation's last step before writing (temp table ``partition_lines``): a forgotten user's
    lines become empty ``forgotten_user`` quarantine rows; quarantined lines and accepted events'
    free text are redacted."""
    ensure_privacy_tables(con)
    install_redaction(con)
    if con.execute("SELECT count(*) FROM privacy.forgotten_users").fetchone()[0]:
        con.execute(f"""
            UPDATE partition_lines SET reason = '{FORGOTTEN_USER}', line = NULL, event_id = NULL, fields = NULL
            WHERE sha256(coalesce(fields.user_id ->> '$', regexp_extract(line, {_literal(_USER_ID_IN_LINE)}, 1)))
                  IN (SELECT user_hash FROM privacy.forgotten_users)""")
    con.execute("UPDATE partition_lines SET line = quarantined_line(line) WHERE reason IS NOT NULL")
    con.execute("""
        UPDATE partition_lines SET fields = struct_update(fields,
            input := to_json(redact_pii(fields.input ->> '$')),
            impressions := to_json(list_transform(json_extract(fields.impressions, '$[*]'),
                lambda imp: json_merge_patch(imp, json_object('content', redact_pii(imp ->> 'content'))))),
            context := redact_json(fields.context))
        WHERE reason IS NULL AND event_type = 'interaction'
          AND may_hold_pii(concat_ws(' ', fields.input, fields.impressions, fields.context))""")
    con.execute("""
        UPDATE partition_lines SET fields = struct_update(fields, text := to_json(redact_pii(fields.text ->> '$')))
        WHERE reason IS NULL AND event_type = 'signal' AND may_hold_pii(fields.text)""")


class PrivacyError(RuntimeError):
    """A deletion that cannot be done, or left personal data behind."""


def _tables(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, str]]:
    """Every base table of the warehouse but the tombstones: its columns and their types."""
    rows = con.execute("""
        SELECT c.table_schema || '.' || c.table_name, map(list(c.column_name), list(c.data_type))
        FROM information_schema.columns AS c
        JOIN information_schema.tables AS t USING (table_catalog, table_schema, table_name)
        WHERE t.table_type = 'BASE TABLE' AND c.table_catalog = current_database()
          AND c.table_schema <> 'privacy'
        GROUP BY 1 ORDER BY 1""").fetchall()
    return {table: dict(columns) for table, columns in rows}


def _execute(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, object]) -> list[tuple]:
    """Run ``sql`` with those of ``params`` it names (DuckDB refuses the others)."""
    return con.execute(sql, {k: v for k, v in params.items() if f"${k}" in sql}).fetchall()


def _doom(con: duckdb.DuckDBPyConnection, where: str, params: dict[str, object]) -> None:
    """Temp tables of what goes: the raw events matching ``where``, their interactions, and the
    sessions left with no interaction."""
    events = " UNION ALL ".join(
        f"SELECT '{table}' AS source, event_id, domain, interaction_id, session_id FROM raw.{table} WHERE {where}"
        for table in ("interactions", "signals", "outcomes", "labels"))
    _execute(con, f"CREATE OR REPLACE TEMP TABLE doomed_events AS {events}", params)
    con.execute("""CREATE OR REPLACE TEMP TABLE doomed_interactions AS
                   SELECT DISTINCT domain, interaction_id FROM doomed_events WHERE source = 'interactions'""")
    _execute(con, f"""CREATE OR REPLACE TEMP TABLE doomed_sessions AS
                      SELECT domain, session_id FROM doomed_events WHERE source = 'interactions'
                      EXCEPT SELECT domain, session_id FROM raw.interactions WHERE NOT ({where})""", params)


def _erase(con: duckdb.DuckDBPyConnection, where: str, params: dict[str, object],
           also: dict[frozenset[str], str]) -> dict[str, int]:
    """Delete, from every warehouse table, the rows of the raw events matching ``where`` and of
    what was derived from them (by event id, interaction, session), plus the rows ``also`` names
    (a condition for each table that has those columns). Returns rows deleted per table."""
    _doom(con, where, params)
    deleted = {}
    for table, columns in _tables(con).items():
        conditions = [f"{column} IN (SELECT event_id FROM doomed_events)"
                      for column in columns if column == "event_id" or column.endswith("_event_id")]
        if {"domain", "interaction_id"} <= columns.keys():
            conditions.append("(domain, interaction_id) IN (SELECT * FROM doomed_interactions)")
        elif {"domain", "session_id"} <= columns.keys():
            conditions.append("(domain, session_id) IN (SELECT * FROM doomed_sessions)")
        conditions += [condition for needed, condition in also.items() if needed <= columns.keys()]
        if conditions:
            sql = f"DELETE FROM {table} WHERE " + " OR ".join(f"({c})" for c in conditions)
            [(count,)] = _execute(con, sql, params)
            if count:
                deleted[table] = count
    return deleted


def _tables_mentioning(con: duckdb.DuckDBPyConnection, value: str) -> list[str]:
    """Tables with a text column equal to ``value``."""
    found = []
    for table, columns in _tables(con).items():
        text = [column for column, kind in columns.items() if kind == "VARCHAR"]
        if text and con.execute(f"SELECT count(*) FROM {table} WHERE $value IN ({', '.join(text)})",
                                {"value": value}).fetchone()[0]:
            found.append(table)
    return found


def _line_user(line: bytes) -> str | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event.get("user_id") if isinstance(event, dict) else None


def _rewrite_without_user(path: Path, user_id: str) -> int:
    """Rewrite a landing batch without the user's lines (atomically: a reader sees the old file or
    the new one); returns how many lines left it. A line that does not parse goes when it names them."""
    quoted = json.dumps(user_id).encode()
    data = path.read_bytes()
    if quoted not in data:
        return 0
    lines = data.splitlines(keepends=True)
    kept = [line for line in lines if quoted not in line or _line_user(line) not in (user_id, None)]
    write_atomically(path, b"".join(kept))
    return len(lines) - len(kept)


@dataclass(frozen=True)
class TrainedOn:
    """A registered model version whose training window holds days of a forgotten user's data."""

    model: str
    version: str
    aliases: tuple[str, ...]
    train_start: date
    train_end: date
    user_days: tuple[date, ...]

    def summary(self) -> str:
        aliases = f" ({', '.join(self.aliases)})" if self.aliases else ""
        return (f"{self.model} v{self.version}{aliases}: trained on {self.train_start}..{self.train_end}, "
                f"which holds {len(self.user_days)} of the user's days")


@dataclass(frozen=True)
class ForgetReport:
    user_hash: str
    rows_deleted: dict[str, int]
    landing_lines_removed: dict[str, int]
    user_days: dict[str, tuple[date, ...]]  # per domain, the days of the user's consented interactions
    dataset_records_removed: dict[str, int]  # per exported training set folder


def forget_user(home: Home, domains: Iterable[str], user_id: str, now: datetime | None = None,
                memory_limit: str | None = None) -> ForgetReport:
    """Delete a user's rows from every table of every domain's warehouse, their lines from every
    landing batch and their records from the exported training sets, and tombstone them so that a
    replayed batch cannot bring them back. A warehouse a run is writing raises WarehouseBusy: what
    was done stays done, and running it again finishes the rest."""
    from flywheel_pipeline import training_sets  # MLflow's import is slow; accumulation needs none

    if not user_id.strip():
        raise PrivacyError("forget needs a user id")
    now = (now or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None)
    deleted, days = {}, {}
    for domain in domains:  # a domain without a warehouse yet gets one, holding the tombstone
        with connect(home.warehouse(domain), memory_limit=memory_limit) as con:
            for table, count in _forget_in_warehouse(con, user_id, now, days).items():
                deleted[f"{domain}/{table}"] = count
    removed = {str(path.relative_to(home.landing)): count for path in sorted(home.landing.rglob("*.jsonl"))
               if (count := _rewrite_without_user(path, user_id))}
    review.forget_user(home.root, user_id)
    return ForgetReport(user_hash(user_id), deleted, removed, days,
                        training_sets.forget_user(home, user_hash(user_id)))


def _forget_in_warehouse(con: duckdb.DuckDBPyConnection, user_id: str, now: datetime,
                         days: dict[str, tuple[date, ...]]) -> dict[str, int]:
    """Tombstone the user and delete their rows from one warehouse's tables (rows deleted per table);
    adds the days of their consented interactions to ``days`` (per domain)."""
    ensure_raw_tables(con)
    ensure_privacy_tables(con)
    days.update((domain, tuple(d)) for domain, d in con.execute(
        """SELECT domain, list(DISTINCT event_date ORDER BY event_date) FROM raw.interactions
           WHERE user_id = $user AND consent = 'granted' GROUP BY domain""", {"user": user_id}).fetchall())
    with transaction(con):
        con.execute("INSERT OR IGNORE INTO privacy.forgotten_users VALUES ($hash, $now)",
                    {"hash": user_hash(user_id), "now": now})
        deleted = _erase(con, "user_id = $user", {"user": user_id, "quoted": json.dumps(user_id)},
                         also={frozenset({"user_id"}): "user_id = $user",
                               frozenset({"line"}): "contains(line, $quoted)"})
    if left := _tables_mentioning(con, user_id):
        raise PrivacyError(f"the user is still in {', '.join(left)} after deletion")
    con.execute("CHECKPOINT")
    return deleted


def trained_on(client: MlflowClient, user_days: dict[str, tuple[date, ...]]) -> list[TrainedOn]:
    """The registered model versions whose training window (lineage tags) holds a user's days."""
    from flywheel_pipeline import registry  # MLflow's import is slow; accumulation needs none of it

    found = []
    for domain, days in user_days.items():
        name = registry.model_name(domain)
        for version in client.search_model_versions(f"name = '{name}'"):
            start, end = (version.tags.get(f"training.{bound}") for bound in ("train_start", "train_end"))
            if start is None or end is None:
                continue
            start, end = date.fromisoformat(start), date.fromisoformat(end)
            if hit := tuple(day for day in days if start <= day <= end):
                found.append(TrainedOn(name, str(version.version), tuple(version.aliases), start, end, hit))
    return sorted(found, key=lambda t: (t.model, int(t.version)))


@dataclass(frozen=True)
class RetentionReport:
    domain: str
    cutoff: date  # rows and batches of days before this are gone
    rows_deleted: dict[str, int]
    batches_deleted: list[str]
    dataset_records_deleted: dict[str, int]  # per exported training set folder

    def metadata(self) -> dict[str, object]:
        return {f"{self.domain}_cutoff": self.cutoff.isoformat(),
                f"{self.domain}_rows_deleted": sum(self.rows_deleted.values()),
                f"{self.domain}_batches_deleted": len(self.batches_deleted),
                f"{self.domain}_dataset_records_deleted": sum(self.dataset_records_deleted.values())}


def enforce_retention(con: duckdb.DuckDBPyConnection, home: Home, domain: str, retention_days: int,
                      today: date) -> RetentionReport:
    """Delete, from ``domain``'s warehouse (``con``), the rows of days older than ``retention_days``
    (and what was derived from them), then the landing batches of those days and their records in
    the exported training sets."""
    from flywheel_pipeline import training_sets

    ensure_raw_tables(con)
    cutoff = today - timedelta(days=retention_days)
    expired = "domain = $domain AND event_date < $cutoff"
    with transaction(con):
        deleted = _erase(con, expired, {"domain": domain, "cutoff": cutoff},
                         also={frozenset({"domain", "event_date"}): expired})
    con.execute("CHECKPOINT")
    batches = accumulation.batches_for(home, domain, [date.min, cutoff - timedelta(days=1)], 0)
    for path in batches:
        path.unlink()
    review.expire(home.root, domain, cutoff)
    return RetentionReport(domain, cutoff, deleted, [str(path.relative_to(home.landing)) for path in batches],
                           training_sets.expire(home, domain, cutoff))
