"""Privacy by construction: personal data is redacted on ingest, forgotten on request, expired on time.

Redaction: before accumulation writes a partition, every free-text field of an accepted event
(an interaction's ``input``, its impressions' ``content``, every string in its ``context`` at any
depth; a signal's ``text``) and every quarantined line has its email addresses, phone numbers, card
numbers (every span of a digit run, Luhn-checked), US SSNs, API keys, IBANs (mod 97) and IP
addresses replaced by ``<ENTITY>`` (Presidio's entity names). Ids are not redacted: the contract
quarantines one that holds any of them (``holds_pii``; events.py). The patterns run as DuckDB
regular expressions, vectorised; benchmarks/redaction.py measures them against Presidio's
recognizers on a labelled corpus (docs/privacy.md).

Forgetting (``flywheel forget --user ID``), by the user field only: the user's rows leave every
warehouse table, their lines leave the landing batches (plain or gzip'd, rewritten atomically),
their tasks the review files, and a tombstone (a hash of the id) makes accumulation quarantine
any replayed event of theirs as ``forgotten_user``, with no content.

Retention: ``retention_days`` per domain; ``enforce_retention`` deletes older rows and batches.
Both delete from the warehouse through ``deletion`` (``forgetting``, ``expired``), which reaches
every table, and reach the exported training sets (flywheel_pipeline.training_sets), rewritten
without the records.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from flywheel_pipeline import events, review
from flywheel_pipeline.batches import GZIP_MAGIC, batches_for
from flywheel_pipeline.deletion import Deletion, erase, warehouse_tables
from flywheel_pipeline.home import Home, write_atomically
from flywheel_pipeline.warehouse import ensure_raw_tables, transaction

if TYPE_CHECKING:
    from mlflow import MlflowClient

# a domain's warehouse opened for a deletion (Warehouses.for_deletion): one or more connections in
# turn, each holding what the deletion dooms and the partitions it changes
OpenWarehouse = Callable[[str, Deletion], Iterable[AbstractContextManager[duckdb.DuckDBPyConnection]]]

# IBAN length by country (SWIFT's IBAN registry): a candidate is a country's code, two check digits
# and exactly its length's letters and digits (in groups of four or not), checked by mod 97.
IBAN_LENGTHS = {
    "NO": 15, "BE": 16, "DK": 18, "FI": 18, "FK": 18, "FO": 18, "GL": 18, "NL": 18, "SD": 18, "MK": 19,
    "SI": 19, "AT": 20, "BA": 20, "EE": 20, "KZ": 20, "LT": 20, "LU": 20, "MN": 20, "XK": 20, "CH": 21,
    "HR": 21, "LI": 21, "LV": 21, "BG": 22, "BH": 22, "CR": 22, "DE": 22, "GB": 22, "GE": 22, "IE": 22,
    "ME": 22, "RS": 22, "VA": 22, "AE": 23, "GI": 23, "IL": 23, "IQ": 23, "OM": 23, "SO": 23, "TL": 23,
    "AD": 24, "CZ": 24, "ES": 24, "MD": 24, "PK": 24, "RO": 24, "SA": 24, "SE": 24, "SK": 24, "TN": 24,
    "VG": 24, "LY": 25, "PT": 25, "ST": 25, "IS": 26, "TR": 26, "BI": 27, "DJ": 27, "FR": 27, "GR": 27,
    "IT": 27, "MC": 27, "MR": 27, "SM": 27, "AL": 28, "AZ": 28, "BY": 28, "CY": 28, "DO": 28, "GT": 28,
    "HN": 28, "HU": 28, "LB": 28, "NI": 28, "PL": 28, "SV": 28, "BR": 29, "EG": 29, "PS": 29, "QA": 29,
    "UA": 29, "JO": 30, "KW": 30, "MU": 30, "YE": 30, "LC": 32, "MT": 31, "SC": 31, "RU": 33,
}


def _iban_pattern() -> str:
    """One alternative per IBAN length: its countries' codes, then exactly that many characters, in
    capitals as IBANs are printed (so that a lowercase hex id is never read as one)."""
    by_length: dict[int, list[str]] = {}
    for country, length in IBAN_LENGTHS.items():
        by_length.setdefault(length, []).append(country)
    return r"\b(?:" + "|".join(f"(?:{'|'.join(sorted(countries))})\\d{{2}}(?: ?[A-Z0-9]){{{length - 4}}}"
                                for length, countries in sorted(by_length.items())) + r")\b"


_IPV4 = r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_HEX = "[0-9A-Fa-f]{1,4}"
# card numbers: 12 to 19 digits, whole or in the groups cards are printed in
CARD_FORMATS = (r"\d{12,19}", r"\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,4})?", r"\d{4}[ -]\d{6}[ -]\d{4,5}")
# RE2 patterns by Presidio entity name, replaced in this order: keys and addresses before the digit
# runs in them, SSNs before the card numbers a following group could start.
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
    "IBAN_CODE": (_iban_pattern(),),  # mod-97-valid (iban_valid below)
    "IP_ADDRESS": (
        rf"\b{_IPV4}\b",
        rf"\b(?:{_HEX}:){{7}}{_HEX}\b",  # IPv6 in full
        rf"\b(?:{_HEX}:){{2,6}}(?::{_HEX}){{1,5}}\b|\b{_HEX}:(?::{_HEX}){{2,6}}\b",  # '::', 3 groups or more
        rf"\b(?:{_HEX}:){{3,7}}:\B",  # a trailing '::' (a /64 prefix's zero host)
    ),
    "US_SSN": (  # area not 000, 666 or 9xx; group not 00; serial not 0000
        (r"\b(?:00[1-9]|0[1-9]\d|[1-578]\d\d|6[0-57-9]\d|66[0-57-9])[- ](?:0[1-9]|[1-9]\d)[- ]"
         r"(?:000[1-9]|00[1-9]\d|0[1-9]\d\d|[1-9]\d{3})\b"),
    ),
    # each span of digit groups in one of CARD_FORMATS, Luhn-valid (card_numbers below)
    "CREDIT_CARD": tuple(rf"\b{card}\b" for card in CARD_FORMATS),
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
# Entities whose matches are checked before they are redacted: the macro listing a text's valid ones
CHECKED = {"IBAN_CODE": "iban_codes", "CREDIT_CARD": "card_numbers"}
_DIGIT_GROUPS = r"\b\d+(?:[ -]\d+)*\b"  # a run of digit groups, single separators: where cards are looked for
_JSON_TOKEN = r'"(?:[^"\\]|\\.)*"|[^"]+'  # a JSON text's string literals and what lies between them
TEXT_FIELDS = ("input", "text")  # accepted events' free-text fields beside impressions' content and context
FORGOTTEN_USER = "forgotten_user"  # the quarantine reason of a replayed event of a forgotten user
_USER_ID_IN_LINE = r'"user_id"\s*:\s*"([^"\\]*)"'  # a malformed line's user, where it can be read
_USER_ID_IN_BYTES = re.compile(_USER_ID_IN_LINE.encode())

PRIVACY_DDL = """
CREATE SCHEMA IF NOT EXISTS privacy;
CREATE TABLE IF NOT EXISTS privacy.forgotten_users (
    user_hash VARCHAR PRIMARY KEY, forgotten_at TIMESTAMP NOT NULL
);
"""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _line_user_sql(line: str) -> str:
    """SQL: the user a landing line (text) names in its user field, NULL where none can be read: a
    line that parses, its ``user_id``; one that does not, the first ``"user_id": "..."`` in it."""
    return (f"coalesce(TRY_CAST({line} AS JSON) ->> 'user_id', "
            f"nullif(regexp_extract({line}, {_literal(_USER_ID_IN_LINE)}, 1), ''))")


# A user's rows by their user field: a column ``user_id``, or a quarantined ``line`` naming them
_USER_FIELDS = {frozenset({"user_id"}): "user_id = $user", frozenset({"line"}): f"{_line_user_sql('line')} = $user"}


def _pattern(entity: str) -> str:
    """One entity's patterns as one RE2 alternation (one pass over the text)."""
    return "|".join(f"(?:{pattern})" for pattern in PII_PATTERNS[entity])


def _redacted(text: str) -> str:
    """SQL redacting ``text``, entity after entity in PII_PATTERNS' order. A checked entity's
    matches are found in ``text`` as it came and replaced where the chain has got to: one that an
    earlier entity took (an SSN's last group before a card) is no longer there to replace."""
    expr = text
    for entity in PII_PATTERNS:
        token, pattern = _literal(f"<{entity}>"), _literal(_pattern(entity))
        if entity in CHECKED:
            found = f"CASE WHEN regexp_matches({text}, {pattern}) THEN {CHECKED[entity]}({text}) ELSE [] END"
            expr = f"replaced({expr}, {found}, {token})"
        else:
            expr = f"regexp_replace({expr}, {pattern}, {token}, 'g')"
    return expr


def install_redaction(con: duckdb.DuckDBPyConnection) -> None:
    """Create the connection's ``redact_pii(text)``, ``holds_pii(text)``, ``id_holds_pii(id)``,
    ``id_holds_key(id)`` and ``redact_json(json)`` macros."""
    anything = _literal("|".join(_pattern(entity) for entity in PII_PATTERNS))
    card = _literal("^(?:" + "|".join(CARD_FORMATS) + ")$")
    con.execute(rf"""
        CREATE OR REPLACE TEMP MACRO luhn_valid(digits) AS list_sum(list_transform(
            list_reverse(regexp_extract_all(digits, '\d')),
            lambda d, i: CASE WHEN i % 2 = 0 THEN (2 * d::INT) // 10 + (2 * d::INT) % 10 ELSE d::INT END
        )) % 10 = 0;
        -- ISO 13616: the code's first four characters moved to its end, letters as 10..35, mod 97 is 1
        CREATE OR REPLACE TEMP MACRO iban_valid(code) AS list_reduce(list_transform(
            string_split(upper(substr(replace(code, ' ', ''), 5) || left(replace(code, ' ', ''), 4)), ''),
            lambda ch: CASE WHEN ch BETWEEN '0' AND '9' THEN ascii(ch) - 48 ELSE ascii(ch) - 55 END),
            lambda acc, v: (acc * CASE WHEN v >= 10 THEN 100 ELSE 10 END + v) % 97) = 1;
        CREATE OR REPLACE TEMP MACRO iban_codes(text) AS
            list_filter(regexp_extract_all(text, {_literal(_pattern("IBAN_CODE"))}), lambda code: iban_valid(code));
        -- the spans of a digit run (its tokens: digits, separator, digits...) a card could be: from
        -- each group on, a group of 12 to 19 digits alone, or three, four and five groups after a
        -- group of four (windows of nine tokens: list_zip of the shifted lists; NULL past the end)
        CREATE OR REPLACE TEMP MACRO group_spans(tokens) AS flatten(list_transform(
            list_filter(list_zip(tokens, tokens[2:], tokens[3:], tokens[4:], tokens[5:], tokens[6:], tokens[7:],
                                 tokens[8:], tokens[9:]), lambda w: length(w[1]) = 4 OR length(w[1]) >= 12),
            lambda w: CASE WHEN length(w[1]) >= 12 THEN [w[1]]
                           ELSE [w[1] || w[2] || w[3] || w[4] || w[5], w[1] || w[2] || w[3] || w[4] || w[5] || w[6] || w[7],
                                 w[1] || w[2] || w[3] || w[4] || w[5] || w[6] || w[7] || w[8] || w[9]] END));
        -- the card numbers in a text: each span of digit groups in a card's format, starting as a
        -- card network's numbers do (1 to 6), Luhn-valid, so that a card after another group of
        -- digits (a year, a reference) is found; runs too short to hold 12 digits, and the digits of
        -- what has an IBAN's shape (an IBAN is redacted as one), are passed over
        CREATE OR REPLACE TEMP MACRO card_numbers(text) AS list_filter(flatten(list_transform(
            list_filter(regexp_extract_all(regexp_replace(text, {_literal(_pattern("IBAN_CODE"))}, ' ', 'g'),
                                           {_literal(_DIGIT_GROUPS)}), lambda run: length(run) >= 12),
            lambda run: group_spans(regexp_extract_all(run, '\d+|[ -]')))),
            lambda span: span[1] BETWEEN '1' AND '6' AND regexp_full_match(span, {card})
                         AND length(regexp_replace(span, '[ -]', '', 'g')) <= 19 AND luhn_valid(span));
        -- ``found`` replaced by ``token`` in ``text``, the longest first (a span inside another goes with it)
        CREATE OR REPLACE TEMP MACRO replaced(text, found, token) AS list_reduce(
            list_prepend(text, list_transform(list_sort(list_transform(found, lambda f: {{'n': -length(f), 'f': f}})),
                                              lambda s: s.f)),
            lambda redacted, f: replace(redacted, f, token));
        CREATE OR REPLACE TEMP MACRO redact_pii(text) AS
            CASE WHEN regexp_matches(text, {anything}) THEN {_redacted("text")} ELSE text END;
        CREATE OR REPLACE TEMP MACRO holds_pii(text) AS CASE WHEN regexp_matches(text, {anything})
            THEN {_redacted("text")} <> text ELSE false END;
        -- an id holds personal data when an API key is in it, or anything else once it is read with
        -- underscores as spaces (u_219-09-9999) and each bare run of digits (a counter, a timestamp,
        -- a numeric id: 1730539200 would be a phone number, one 13-digit id in ten a card's) as N;
        -- digits joined by . : - stay (an SSN, a card in groups, an IP address)
        -- (CASE, not AND: DuckDB evaluates both sides of an AND in a projection, CASE only the rows it selects)
        CREATE OR REPLACE TEMP MACRO id_holds_key(id) AS regexp_matches(id, {_literal(_pattern("API_KEY"))});
        CREATE OR REPLACE TEMP MACRO id_holds_pii(id) AS CASE
            WHEN id_holds_key(id) THEN true
            WHEN regexp_full_match(id, {_literal(events.PLAIN_ID_PATTERN)}) THEN false
            WHEN regexp_matches(replace(id, '_', ' '), {anything}) THEN holds_pii(array_to_string(list_transform(
                regexp_extract_all(replace(id, '_', ' '), '\d+(?:[.:-]\d+)+|\w+|\W'),
                lambda part: CASE WHEN regexp_full_match(part, '\d+') THEN 'N' ELSE part END), ''))
            ELSE false END;
        -- JSON text with its escapes (\n, \") read as spaces, so that they do not hide a match
        CREATE OR REPLACE TEMP MACRO unescaped(line) AS
            CASE WHEN contains(line, chr(92)) THEN regexp_replace(line, '\\[bfnrt"/\\]', ' ', 'g') ELSE line END;
        -- false for JSON text none of whose strings can hold a match: most events, spared
        -- rebuilding their JSON (text with a \u escape is always looked at)
        CREATE OR REPLACE TEMP MACRO may_hold_pii(line) AS
            contains(line, '\u') OR regexp_matches(unescaped(line), {anything});
        -- a quarantined line as kept: a valid one re-serialised (which decodes \u escapes); one
        -- that does not parse and has \u escapes, which could hide a match, not at all
        CREATE OR REPLACE TEMP MACRO quarantined_line(line) AS CASE
            WHEN json_valid(line) THEN redact_pii(unescaped(json(line)::VARCHAR))
            WHEN NOT contains(line, '\u') THEN redact_pii(unescaped(line)) END;
        -- JSON with every string redacted, at any depth (keys too): its string literals are each
        -- decoded, redacted and encoded again; what lies between them is kept as it is
        CREATE OR REPLACE TEMP MACRO redact_json(j) AS CASE WHEN may_hold_pii(j::VARCHAR) THEN
            array_to_string(list_transform(regexp_extract_all(j::VARCHAR, {_literal(_JSON_TOKEN)}),
                lambda token: CASE WHEN starts_with(token, '"') AND may_hold_pii(token)
                                   THEN to_json(redact_pii(token::JSON ->> '$'))::VARCHAR ELSE token END), '')::JSON
            ELSE j END;
    """)


def ensure_privacy_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(PRIVACY_DDL)


def user_hash(user_id: str) -> str:
    """What a tombstone keeps of a forgotten user: SHA-256 of the id (DuckDB's sha256 agrees)."""
    return hashlib.sha256(user_id.encode()).hexdigest()


def protect_partition_lines(con: duckdb.DuckDBPyConnection) -> None:
    """Accumulation's last step before writing (temp table ``partition_lines``): a forgotten user's
    lines become empty ``forgotten_user`` quarantine rows; quarantined lines (and their event ids)
    are redacted. Accepted events' free text is redacted as it is written (``redacted_sql``)."""
    ensure_privacy_tables(con)
    install_redaction(con)
    if con.execute("SELECT count(*) FROM privacy.forgotten_users").fetchone()[0]:
        con.execute(f"""
            UPDATE partition_lines SET reason = '{FORGOTTEN_USER}', line = NULL, event_id = NULL, fields = NULL
            WHERE sha256(coalesce(fields.user_id ->> '$', {_line_user_sql("line")}))
                  IN (SELECT user_hash FROM privacy.forgotten_users)""")
    # a line quarantined for an id is read with its underscores as spaces, as the id was checked
    con.execute("""
        UPDATE partition_lines SET
            line = quarantined_line(CASE WHEN starts_with(reason, 'unsafe_id:') OR reason = 'user_id_not_pseudonymous'
                                         THEN replace(line, '_', ' ') ELSE line END),
            event_id = redact_pii(CASE reason WHEN 'unsafe_id:event_id' THEN replace(event_id, '_', ' ')
                                              ELSE event_id END)
        WHERE reason IS NOT NULL""")


def redacted_sql(field: str, text: str, may_hold: str) -> str:
    """SQL: an accepted event's free-text ``field`` (``text``: its value, decoded) as written, redacted
    where ``may_hold`` (``may_hold_pii`` of JSON text holding it, computed once per event): ``input``
    and a signal's ``text`` (TEXT_FIELDS), an impression's ``content``, the ``context`` JSON (every
    string, at any depth)."""
    if field == "context":
        return f"CASE WHEN {may_hold} THEN redact_json({text}) ELSE {text} END"
    if field not in (*TEXT_FIELDS, "content"):
        raise ValueError(f"{field} is no free-text field")
    return f"CASE WHEN {may_hold} THEN redact_pii({text}) ELSE {text} END"


class PrivacyError(RuntimeError):
    """A deletion that cannot be done, or left personal data behind."""


def forgetting(user_id: str) -> Deletion:
    """A user's events, what was derived from them, and every row naming the user in a user field."""
    return Deletion("user_id = $user", {"user": user_id}, _USER_FIELDS)


def expired(domain: str, retention_days: int, today: date) -> Deletion:
    """``domain``'s events of the days before ``retention_days`` back from ``today``, what was
    derived from them, and every row of those days."""
    where = "domain = $domain AND event_date < $cutoff"
    return Deletion(where, {"domain": domain, "cutoff": today - timedelta(days=retention_days)},
                    {frozenset({"domain", "event_date"}): where})


def _tables_holding_user(con: duckdb.DuckDBPyConnection, user_id: str) -> list[str]:
    """Tables with a row of the user by its user field (``_USER_FIELDS``): never by other columns,
    which may hold the same value as another user's item, version or session."""
    found = []
    for table, columns in warehouse_tables(con).items():
        conditions = [condition for needed, condition in _USER_FIELDS.items() if needed <= columns.keys()]
        if conditions and con.execute(f"SELECT count(*) FROM {table} WHERE {' OR '.join(conditions)}",
                                      {"user": user_id}).fetchone()[0]:
            found.append(table)
    return found


def _batch_user(line: bytes) -> str | None:
    """The user a landing line names in its user field, read as accumulation reads it
    (``_line_user_sql``): a JSON object's ``user_id``, else the first ``"user_id": "..."`` in the line."""
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    user = event.get("user_id") if isinstance(event, dict) else None
    if user is None:
        match = _USER_ID_IN_BYTES.search(line)
        return match.group(1).decode(errors="replace") if match else None
    return user if isinstance(user, str) else json.dumps(user)


def _batch_lines(path: Path) -> tuple[bytes, bool]:
    """A landing batch's text and whether it is gzip'd, told by its first bytes as accumulation does."""
    data = path.read_bytes()
    gzipped = data[:2] == GZIP_MAGIC
    return (gzip.decompress(data) if gzipped else data), gzipped


def _rewrite_without_user(path: Path, user_id: str) -> int:
    """Rewrite a landing batch (plain or gzip'd, kept so) without the lines whose user field is the
    user, atomically: a reader sees the old file or the new one. Returns how many lines left it.
    Only a line holding the id or a ``\\u`` escape (which could spell it) is parsed."""
    data, gzipped = _batch_lines(path)
    needle = user_id.encode()
    if needle not in data and b"\\u" not in data:
        return 0
    lines = data.splitlines(keepends=True)  # at \n, \r\n or a lone \r, as accumulation reads them
    kept = [line for line in lines if (needle not in line and b"\\u" not in line) or _batch_user(line) != user_id]
    if len(kept) < len(lines):
        text = b"".join(kept)
        write_atomically(path, gzip.compress(text) if gzipped else text)
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


def forget_user(home: Home, domains: Iterable[str], user_id: str, open_warehouse: OpenWarehouse,
                now: datetime | None = None) -> ForgetReport:
    """Delete a user's rows from every table of every domain's warehouse (opened by
    ``open_warehouse``, e.g. ``Warehouses.for_deletion``), their lines from every
    landing batch and their records from the exported training sets, and tombstone them so that a
    replayed batch cannot bring them back. A warehouse a run is writing raises WarehouseBusy: what
    was done stays done, and running it again finishes the rest."""
    from flywheel_pipeline import training_sets  # MLflow's import is slow; accumulation needs none

    if not user_id.strip():
        raise PrivacyError("forget needs a user id")
    now = (now or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None)
    deleted: Counter[str] = Counter()
    days: dict[str, set[date]] = {}
    for domain in domains:  # a domain without a warehouse yet gets one, holding the tombstone
        for opened in open_warehouse(domain, forgetting(user_id)):
            with opened as con:
                deleted.update({f"{domain}/{table}": n for table, n in _forget_in_warehouse(con, user_id, now, days).items()})
    removed, unreadable = _forget_in_landing(home, user_id)
    review.forget_user(home.root, user_id)
    report = ForgetReport(user_hash(user_id), dict(deleted), removed,
                          {domain: tuple(sorted(held)) for domain, held in days.items()},
                          training_sets.forget_user(home, user_hash(user_id)))
    if unreadable:
        raise PrivacyError(f"the landing batches {', '.join(unreadable)} cannot be read, so the user's lines "
                           "may still be in them (the rest is forgotten): repair or delete them, then run it again")
    return report


def _forget_in_landing(home: Home, user_id: str) -> tuple[dict[str, int], list[str]]:
    """Lines removed per landing batch (``_rewrite_without_user``), and the batches that cannot be
    read (a corrupt gzip): accumulation quarantines those whole, but their bytes stay."""
    removed, unreadable = {}, []
    for path in sorted(home.landing.rglob("*.jsonl")):
        name = str(path.relative_to(home.landing))
        try:
            if count := _rewrite_without_user(path, user_id):
                removed[name] = count
        except (OSError, EOFError, zlib.error):
            unreadable.append(name)
    return removed, unreadable


def _forget_in_warehouse(con: duckdb.DuckDBPyConnection, user_id: str, now: datetime,
                         days: dict[str, set[date]]) -> dict[str, int]:
    """Tombstone the user and delete their rows from a warehouse opened for it (rows deleted per
    table); adds the days of their consented interactions to ``days`` (per domain)."""
    ensure_raw_tables(con)
    ensure_privacy_tables(con)
    for domain, held in con.execute(
            """SELECT domain, list(DISTINCT event_date) FROM raw.interactions
               WHERE user_id = $user AND consent = 'granted' GROUP BY domain""", {"user": user_id}).fetchall():
        days.setdefault(domain, set()).update(held)
    with transaction(con):
        con.execute("""INSERT INTO privacy.forgotten_users SELECT $hash, $now
                       WHERE $hash NOT IN (SELECT user_hash FROM privacy.forgotten_users)""",
                    {"hash": user_hash(user_id), "now": now})
        deleted = erase(con, forgetting(user_id))
    if left := _tables_holding_user(con, user_id):
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


def enforce_retention(home: Home, domain: str, retention_days: int, today: date,
                      open_warehouse: OpenWarehouse) -> RetentionReport:
    """Delete, from ``domain``'s warehouse (opened by ``open_warehouse``, e.g.
    ``Warehouses.for_deletion``), the rows of days older than ``retention_days`` (and what was
    derived from them), then the landing batches of those days and their records in the exported
    training sets."""
    from flywheel_pipeline import training_sets  # MLflow's import is slow; accumulation needs none

    deletion = expired(domain, retention_days, today)
    cutoff = deletion.params["cutoff"]
    deleted: Counter[str] = Counter()
    for opened in open_warehouse(domain, deletion):
        with opened as con:
            with transaction(con):
                deleted.update(erase(con, deletion))
            con.execute("CHECKPOINT")
    batches = batches_for(home, domain, [date.min, cutoff - timedelta(days=1)], 0)
    for path in batches:
        path.unlink()
    review.expire(home.root, domain, cutoff)
    return RetentionReport(domain, cutoff, dict(deleted), [str(path.relative_to(home.landing)) for path in batches],
                           training_sets.expire(home, domain, cutoff))
