"""Bulk landing batches: millions of events in the simulator's shapes, written by DuckDB in seconds.

``simulate`` serves every interaction through a model, one Python object per event: right for the
loop, far too slow for ten million events. ``write_bulk_landing`` writes the same kind of landing
batches (docs/events.md) as set-based SQL over ``range(n)``: every draw is a hash of the event's
number, so each event is computed on its own, and DuckDB streams the lines into the files.

- assistant: one response shown of five ranked candidates (champion: the top one; explore: any),
  the simulator's reactions by whether it was truly good (accept, copy, edit, revert, reject,
  reformulate, abandon), ratings, and a ``resolved`` outcome hours later;
- recommendation: five of twenty ranked candidates shown with their propensities (champion: the
  top five; explore: a random slate), position-biased clicks with dwell, abandons, ratings, and
  ``purchase`` outcomes days later;
- both: sessions of returning users, a few bot sessions, the domain's ``audit_share`` of
  interactions reviewed as ``label`` events in ``labels/<day>.jsonl``, a few events delivered 1-3
  days late, and a ``bad_share`` of bad lines: malformed JSON, not an object, no ``user_id``, a
  numeric or future timestamp, an e-mail address as user id (each replacing a line), and an event
  delivered again the next day, as it was or with other content (each an extra line; a copy with
  other content has both copies quarantined).

Accumulation accepts every other line. Events due after the last day are not written (the
simulator's outbox would hold them), and no hidden truth is kept: this feeds benchmarks, not the gate.
"""

from __future__ import annotations

import hashlib
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import duckdb

from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.home import Home
from flywheel_pipeline.simulation import (
    DayBatch,
    SimulationSummary,
    assistant,
    label_batch,
    recommendation,
)
from flywheel_pipeline.simulation.delivery import LATE_SHARE, LATENESS_DAYS
from flywheel_pipeline.simulation.serving import Audit
from flywheel_pipeline.simulation.world import (
    DAY_S,
    DENIED_CONSENT,
    MEAN_SESSION,
    RATING_NOISE,
    RATING_SHARE,
    day_start,
)

__all__ = ["write_bulk_landing"]

BOT_BLOCK = 999          # each full block of this many interactions of a day opens with a bot session
BOT_SESSION = 42         # this long: about the simulator's bot traffic (both multiples of MEAN_SESSION)
QUERIES = 2000           # assistant queries (about the corpus's), popular ones asked more often
RESPONSES = 1500
QUERY_STRIDE, CANDIDATE_STRIDE = 7, 211  # query q's candidates: responses 7q, 7q + 211, ... (mod RESPONSES)
TOP_GOOD = 0.7           # how often the champion's top candidate is truly good
OTHER_GOOD = 0.2         # how often another candidate is
ITEM_STRIDE = 7          # a request's candidates lie ITEM_STRIDE apart in the catalogue (coprime to ITEMS)
SLATE_STRIDE = 3         # an explore slate shows candidates a, a + 3, a + 6, ... (coprime to CANDIDATES)
REVIEWER_ERROR = 0.05    # simulate's default
MODEL_VERSION = "bulk"
PILOT_INTERACTIONS = 2000  # a day, to measure how many lines an interaction brings
REACTION_SIGNALS = {  # the assistant simulator's reactions as the signals they send, in order
    "accept": ("accept",), "accept_copy": ("accept", "copy"), "copy": ("copy",),
    "light_edit": ("edit",), "nothing": (), "abandon": ("abandon",), "reject": ("reject",),
    "reformulate": ("reformulate",), "heavy_edit": ("edit",), "accept_revert": ("accept", "revert"),
}
_REPLACEMENTS = 6        # bad kinds 0-5 replace a line; 6 and 7 deliver it again the next day,
_CONFLICTING_COPY = 2    # as it was (copy 1) or with other content (copy 2)
_NO_DELIMITER = "\x01"   # never in a JSON line: the CSV writer writes each line as it is


def write_bulk_landing(home: Home, config: FlywheelConfig, first_day: date, days: int, events: int, *,
                       seed: int = 7, bad_share: float = 0.01) -> SimulationSummary:
    """Write about ``events`` landing lines over ``days`` days from ``first_day`` for every domain
    of ``config`` (the same interactions a day in each, as ``simulate``), a ``bad_share`` of them
    bad; returns each batch written, as ``simulate`` does."""
    if days < 1 or events < 1 or seed < 0 or not 0 <= bad_share < 1:
        raise ValueError("need days >= 1, events >= 1, seed >= 0 and 0 <= bad_share < 1")
    shapes = [SHAPES[config.domain(domain).shape](domain, config, first_day, days, seed, bad_share)
              for domain in config.domains]
    with _connect(home, config, first_day, days) as con:
        pilot = sum(shape.count(con, PILOT_INTERACTIONS) for shape in shapes) / (PILOT_INTERACTIONS * days)
        per_day = max(1, round(events / days / pilot))
        return SimulationSummary(tuple(batch for shape in shapes for batch in shape.write(con, home, per_day)))


@contextmanager
def _connect(home: Home, config: FlywheelConfig, first_day: date, days: int) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB under the warehouse's memory limit, spilling into the home, with the
    macros the SQL uses: ``u`` (uniform in [0, 1) from a key and a salt), ``normal``, ``iso``.

    A salt is a large random number (``_Shape.salt``): keys are small, so two draws of different
    names never hash the same number."""
    spill = home.root / ".bulk_spill"
    con = duckdb.connect(config={"memory_limit": config.warehouse.memory_limit, "temp_directory": str(spill)})
    day_texts = _sql_list(tuple((first_day + timedelta(days=n)).isoformat() for n in range(days)))
    two_digits = _sql_list(tuple(f"{n:02d}" for n in range(60)))
    try:
        con.execute("SET preserve_insertion_order = false")
        con.execute("CREATE TEMP MACRO u(k, salt) AS (hash(k + salt) >> 11)::DOUBLE / 9007199254740992.0")
        con.execute("CREATE TEMP MACRO normal(k, salt) AS sqrt(-2 * ln(1 - u(k, salt))) * cos(2 * pi() * u(k, salt + 1))")
        # ts (unix seconds) within the days written -> 2026-11-02T09:15:00Z, without a per-row format string
        con.execute(f"""CREATE TEMP MACRO iso(ts) AS concat(
            {day_texts}[(ts // {DAY_S} - {day_start(first_day) // DAY_S})::INTEGER + 1], 'T',
            {two_digits}[(ts % {DAY_S} // 3600)::INTEGER + 1], ':', {two_digits}[(ts % 3600 // 60)::INTEGER + 1], ':',
            {two_digits}[(ts % 60)::INTEGER + 1], 'Z')""")
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def _number_interactions(con: duckdb.DuckDBPyConnection, interactions: int) -> None:
    """Table ``interaction_numbers`` (i): 0..interactions-1, read in parallel (``range`` is not)."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE interaction_numbers AS SELECT range AS i FROM range({interactions})")


def _sql_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _number(value: float) -> str:
    return repr(round(value, 6))


@dataclass(frozen=True)
class _Slot:
    """One event an interaction may bring: whether it exists, when, what it says.

    ``present``, ``after_s`` and ``k`` are SQL over the interaction's serving and reaction
    attributes; ``fields`` is SQL over its serving attributes and ``k``: the arguments of
    ``concat`` that write the event's own fields, after the common ones."""

    event_type: str  # interaction | signal | outcome | label
    present: str
    after_s: str
    fields: str
    k: str = "NULL"  # the slate position the event is about


class _Shape(ABC):
    """One domain's events as SQL: attributes per interaction, slots, lookup tables of JSON."""

    def __init__(self, domain: str, config: FlywheelConfig, first_day: date, days: int, seed: int,
                 bad_share: float):
        self.domain, self.settings = domain, config.domain(domain)
        self.first_day, self.days, self.seed, self.bad_share = first_day, days, seed, bad_share
        self.latest_late = min(LATENESS_DAYS[1] - 1, config.max_lateness_days)
        self.audit = Audit(self.settings.audit_share, REVIEWER_ERROR)

    # -- what a shape gives ---------------------------------------------------------------------
    @abstractmethod
    def tables(self, con: duckdb.DuckDBPyConnection) -> None:
        """The lookup tables of pre-rendered JSON that ``joins`` joins."""

    @abstractmethod
    def joins(self) -> str:
        """SQL joining the lookup tables to the events being rendered."""

    @abstractmethod
    def serving(self) -> list[list[tuple[str, str]]]:
        """Layers of (name, SQL) the lines are rendered from, after the shared ones."""

    @abstractmethod
    def reactions(self) -> list[list[tuple[str, str]]]:
        """Layers of (name, SQL) that only which events exist, and when, need."""

    @abstractmethod
    def slots(self) -> list[_Slot]:
        """Every event an interaction may bring, in a fixed order (its number is the slot)."""

    # -- shared ---------------------------------------------------------------------------------
    def salt(self, name: str) -> int:
        """The draws called ``name``'s own number, in [2^60, 2^61)."""
        digest = hashlib.blake2b(f"{self.seed}:{self.domain}:{name}".encode(), digest_size=8).digest()
        return 2**60 + int.from_bytes(digest) % 2**60

    def u(self, name: str, key: str = "i") -> str:
        return f"u({key}, {self.salt(name)})"

    def normal(self, name: str, key: str = "i") -> str:
        return f"normal({key}, {self.salt(name)})"

    def _shared(self, per_day: int) -> list[list[tuple[str, str]]]:
        """Who, when, served how: from ``i``, the interaction's number (day after day)."""
        population = max(100, per_day // 2)
        stamps = _sql_list(tuple((self.first_day + timedelta(days=n)).strftime("%Y%m%d") for n in range(self.days)))
        return [
            [("day_n", f"(i // {per_day})::INTEGER"), ("j", f"i % {per_day}")],
            [("bot", f"j % {BOT_BLOCK} < {BOT_SESSION} AND (j // {BOT_BLOCK} + 1) * {BOT_BLOCK} <= {per_day}")],
            [("session", f"CASE WHEN bot THEN j - j % {BOT_BLOCK} ELSE j - j % {MEAN_SESSION} END")],
            [("skey", f"day_n * {per_day} + session"), ("stamp", f"{stamps}[day_n + 1]")],
            [("user", (f"(hash(CASE WHEN bot THEN skey + {self.salt('bot')} "
                      f"ELSE floor({self.u('user', 'skey')} * {population})::BIGINT + {self.salt('user') // 2} END) "
                      f"% 281474976710656)::BIGINT")),
             ("served", (f"{day_start(self.first_day)} + day_n * {DAY_S} "
                        f"+ floor({self.u('start', 'skey')} * {22 * 3600})::BIGINT + (j - session) * "
                        f"CASE WHEN bot THEN 1 + floor(4 * {self.u('gap', 'skey')}) "
                        f"ELSE 10 + floor(70 * {self.u('gap', 'skey')}) END::BIGINT")),
             ("explore", f"{self.u('explore')} < {self.settings.exploration_share}"),
             ("interaction_id", f"concat('i_{self.domain}_', stamp, '_', j)"),
             ("session_id", f"concat('s_{self.domain}_', stamp, '_', session)")],
            [("user_id", "concat('u_', user)"),
             ("consent", (f"CASE WHEN NOT bot AND {self.u('consent', 'user')} < {DENIED_CONSENT} "
                         f"THEN 'denied' ELSE 'granted' END")),
             ("policy", "CASE WHEN explore THEN 'explore' ELSE 'champion' END"),
             ("reviewed", f"{self.u('reviewed')} < {self.audit.share}"),
             ("reviewer", f"concat('reviewer_', floor({self.u('reviewer')} * {self.audit.reviewers})::INTEGER)"),
             ("wrong_review", f"{self.u('review_noise', 'i * 8 + coalesce(k, 0)')} < {self.audit.reviewer_error}")],
        ]

    def _reviewed_after(self) -> str:
        low, high = self.audit.delay_days
        return f"floor({DAY_S} * ({low} + {high - low} * {self.u('reviewed_after')}))"

    def _with(self, source: str, layers: list[list[tuple[str, str]]]) -> str:
        """``source`` with each layer of (name, SQL) added in turn."""
        for layer in layers:
            source = f"SELECT *, {', '.join(f'{expr} AS {name}' for name, expr in layer)} FROM ({source})"
        return source

    def _skeleton(self, per_day: int) -> str:
        """One row per line to write, without its text: (i, slot, k, ts, batch_day, is_label, bad, copy, conflicted)."""
        slots = self.slots()
        mask = " | ".join(f"(CASE WHEN {s.present} THEN {1 << n} ELSE 0 END)" for n, s in enumerate(slots))
        after = " ".join(f"WHEN {n} THEN {s.after_s}" for n, s in enumerate(slots))
        position = " ".join(f"WHEN {n} THEN {s.k}" for n, s in enumerate(slots))
        labels = ", ".join(str(n) for n, s in enumerate(slots) if s.event_type == "label")
        interactions = self._with("SELECT i, NULL::INTEGER AS k FROM interaction_numbers",
                                  self._shared(per_day) + self.serving() + self.reactions())
        key = f"i * {len(slots)} + slot"
        low = LATENESS_DAYS[0]
        return f"""
            SELECT i, slot, k, is_label, ts, batch_day + again AS batch_day,
                CASE WHEN again = 0 AND bad < {_REPLACEMENTS} THEN bad END AS bad,
                (CASE WHEN again = 1 THEN bad - {_REPLACEMENTS - 1} ELSE 0 END)::UTINYINT AS copy,
                -- the first copy of a line delivered again changed: quarantined with it (no copy is trusted)
                again = 0 AND bad = {_REPLACEMENTS + _CONFLICTING_COPY - 1} AND batch_day + 1 < {self.days} AS conflicted
            FROM (
                SELECT i, slot::UTINYINT AS slot, (CASE slot {position} END)::TINYINT AS k,
                    slot IN ({labels}) AS is_label, served + (CASE slot {after} END)::BIGINT AS ts,
                    (ts // {DAY_S} - {day_start(self.first_day) // DAY_S})::INTEGER
                    + CASE WHEN {self.u('late', key)} < {LATE_SHARE}
                           THEN {low} + floor({self.u('lateness', key)} * {self.latest_late - low + 1})::INTEGER
                           ELSE 0 END AS batch_day,
                    CASE WHEN {self.u('bad', key)} < {self.bad_share}
                         THEN floor({self.u('bad_kind', key)} * {_REPLACEMENTS + 2})::UTINYINT END AS bad
                FROM (SELECT *, ({mask}) AS mask FROM ({interactions})), range({len(slots)}) AS slots(slot)
                WHERE (mask >> slot) & 1 = 1
            ), range(2) AS deliveries(again)  -- again = 1: delivered again the next day, as it was or changed
            WHERE batch_day + again < {self.days} AND (again = 0 OR bad >= {_REPLACEMENTS})
            """

    def count(self, con: duckdb.DuckDBPyConnection, per_day: int) -> int:
        """How many lines ``per_day`` interactions a day bring."""
        _number_interactions(con, per_day * self.days)
        [(lines,)] = con.execute(f"SELECT count(*) FROM ({self._skeleton(per_day)})").fetchall()
        return lines

    def write(self, con: duckdb.DuckDBPyConnection, home: Home, per_day: int) -> list[DayBatch]:
        """Every batch of the domain, the product's and the review queue's, one a day each."""
        self.tables(con)
        _number_interactions(con, per_day * self.days)
        con.execute(f"CREATE OR REPLACE TEMP TABLE lines AS {self._skeleton(per_day)}")
        counts = con.execute("SELECT batch_day, is_label, count(*), count(*) FILTER (bad IS NOT NULL OR copy > 0 OR conflicted) "
                             "FROM lines GROUP BY ALL ORDER BY ALL").fetchall()
        batches = []
        for day_n, is_label, lines, bad in counts:
            day = self.first_day + timedelta(days=day_n)
            path = label_batch(home, self.domain, day) if is_label else home.landing_file(self.domain, day.isoformat())
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_batch(con, per_day, f"batch_day = {day_n} AND is_label = {is_label}", path)
            batches.append(DayBatch(self.domain, day, 0 if is_label else per_day, lines - bad, bad, path))
        return batches

    def _write_batch(self, con: duckdb.DuckDBPyConnection, per_day: int, which: str, path: Path) -> None:
        """The lines ``which`` selects into ``path``, each as it is (the CSV writer quotes nothing)."""
        con.execute(f"COPY ({self._lines(per_day, which)}) TO '{path}' "
                    f"(FORMAT csv, HEADER false, QUOTE '', ESCAPE '', DELIMITER '{_NO_DELIMITER}')")

    def _lines(self, per_day: int, which: str) -> str:
        """SQL: the text of the lines ``which`` selects: JSON, or spoilt for the bad ones."""
        slots = self.slots()
        event_type = " ".join(f"WHEN {n} THEN '{s.event_type}'" for n, s in enumerate(slots))
        fields = " ".join(f"WHEN {n} THEN concat({s.fields})" for n, s in enumerate(slots))
        events = self._with(f"SELECT * FROM lines WHERE {which}", self._shared(per_day) + self.serving())
        line = f"""concat('{{"event_id":"e_{self.domain}_', stamp, '_', j, '_', slot, '","event_type":"',
            CASE slot {event_type} END, '","domain":"{self.domain}","timestamp":"', iso(ts), '","user_id":"', user_id,
            '","session_id":"', session_id, '","interaction_id":"', interaction_id, '"', CASE slot {fields} END, '}}')"""
        return f"""
            SELECT CASE
                WHEN copy = {_CONFLICTING_COPY} THEN replace(line, '"session_id":"', '"session_id":"r')
                WHEN bad = 0 THEN left(line, length(line) // 2)
                WHEN bad = 1 THEN concat('[', line, ']')
                WHEN bad = 2 THEN replace(line, concat('"user_id":"', user_id, '",'), '')
                WHEN bad = 3 THEN replace(line, concat('"timestamp":"', iso(ts), '"'), concat('"timestamp":', ts))
                WHEN bad = 4 THEN replace(line, iso(ts), strftime(make_timestamp((ts + {3650 * DAY_S}) * 1000000),
                                                                  '%Y-%m-%dT%H:%M:%SZ'))
                WHEN bad = 5 THEN replace(line, concat('"user_id":"', user_id), '"user_id":"jane.doe@example.com')
                ELSE line END AS line
            FROM (SELECT *, {line} AS line FROM ({events}) {self.joins()})
            """


class _Assistant(_Shape):
    """One response shown of K candidates; reactions by whether it was truly good."""

    def tables(self, con: duckdb.DuckDBPyConnection) -> None:
        share = self.settings.exploration_share
        top, other = _number(1 - share + share / assistant.K), _number(share / assistant.K)
        verbs = _sql_list(("reset", "update", "export", "share", "delete", "rename", "restore"))
        nouns = _sql_list(("password", "profile", "invoice", "calendar", "photos", "account", "settings",
                           "playlist", "contacts", "backup", "subscription"))

        def task(n: str) -> str:
            return f"{verbs}[{n} % 7 + 1], ' my ', {nouns}[{n} % 11 + 1]"

        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE responses AS
            SELECT n AS r, concat('r_', n) AS item_id,
                to_json(concat('To ', {task('n')}, ', open "Settings" and choose option ', n, '. It''s quick.'))
                AS content_json,
                to_json(concat('To ', {task('n')}, ', open "Settings" and choose option ', n, '.')) AS edited_json
            FROM range({RESPONSES}) AS ns(n)
            """)
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE shown AS  -- a heavy edit rewrites it as the next candidate
            SELECT q, c AS shown, item_id AS response_id, content_json, edited_json,
                concat('[{{"item_id":"', item_id, '","position":0,"propensity":', CASE c WHEN 0 THEN '{top}'
                       ELSE '{other}' END, ',"content":', content_json, '}}]') AS impressions_json,
                (SELECT content_json FROM responses AS answer
                 WHERE answer.r = (q * {QUERY_STRIDE} + (c + 1) % {assistant.K} * {CANDIDATE_STRIDE}) % {RESPONSES})
                AS answer_json
            FROM range({QUERIES}) AS qs(q), range({assistant.K}) AS cs(c), responses
            WHERE r = (q * {QUERY_STRIDE} + c * {CANDIDATE_STRIDE}) % {RESPONSES}
            """)
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE queries AS
            SELECT q, to_json(concat('How do I ', {task('q')}, ' (case ', q, ')?')) AS input_json,
                to_json(concat('let me rephrase: how do i ', {task('q')}, '?')) AS rephrased_json,
                concat('[', string_agg(concat('{{"item_id":"', response_id, '","content":', content_json,
                    ',"propensities":[', CASE shown WHEN 0 THEN '{top}' ELSE '{other}' END, ']}}'), ','
                    ORDER BY shown), ']') AS candidates_json
            FROM shown GROUP BY q
            """)

    def joins(self) -> str:
        return "JOIN queries USING (q) JOIN shown USING (q, shown)"

    def serving(self) -> list[list[tuple[str, str]]]:
        def reaction(shares: tuple[float, ...]) -> str:
            bounds = [f"WHEN {self.u('reaction')} < {sum(shares[:n + 1])} THEN {n}" for n in range(len(shares) - 1)]
            return f"CASE {' '.join(bounds)} ELSE {len(shares) - 1} END"

        assert set(REACTION_SIGNALS) == set(assistant.REACTIONS)
        first = _sql_list(tuple((REACTION_SIGNALS[r] + ("",))[0] for r in assistant.REACTIONS))
        second = _sql_list(tuple((REACTION_SIGNALS[r] + ("", ""))[1] for r in assistant.REACTIONS))
        resolved = {good: assistant.RESOLVED[good][0] for good in (True, False)}
        return [
            [("q", (f"floor({QUERIES} * CASE WHEN bot THEN {self.u('query', 'skey')} "
                   f"ELSE pow({self.u('query')}, 2) END)::INTEGER")),
             ("shown", f"CASE WHEN explore THEN floor({assistant.K} * {self.u('pick')})::INTEGER ELSE 0 END")],
            [("good", f"{self.u('good')} < CASE WHEN shown = 0 THEN {TOP_GOOD} ELSE {OTHER_GOOD} END")],
            [("reaction", (f"CASE WHEN good THEN {reaction(assistant.WHEN_GOOD)} "
                          f"ELSE {reaction(assistant.WHEN_BAD)} END")),
             ("resolved", f"{self.u('resolved')} < CASE WHEN good THEN {resolved[True]} ELSE {resolved[False]} END")],
            [("first_signal", f"nullif({first}[reaction + 1], '')"),
             ("second_signal", f"nullif({second}[reaction + 1], '')")],
        ]

    def reactions(self) -> list[list[tuple[str, str]]]:
        outcome = {good: sum(assistant.RESOLVED[good]) for good in (True, False)}
        median_h, sigma = assistant.RESOLVE_DELAY_H
        return [[
            ("outcome", f"{self.u('resolved')} < CASE WHEN good THEN {outcome[True]} ELSE {outcome[False]} END"),
            ("reacted_after", f"3 + floor(57 * {self.u('when')})"),
            ("resolved_after", (f"floor(3600 * least(240, greatest(1, exp(ln({median_h}) + {sigma} * "
                               f"{self.normal('resolved_after')}))))")),
        ]]

    def slots(self) -> list[_Slot]:
        edited = {assistant.REACTIONS.index("light_edit"): "edited_json",
                  assistant.REACTIONS.index("heavy_edit"): "answer_json",
                  assistant.REACTIONS.index("reformulate"): "rephrased_json"}
        text = ("CASE reaction " + " ".join(f"WHEN {n} THEN concat(',\"text\":', {json})" for n, json in edited.items())
                + " END")
        rating = (f"CASE WHEN {self.u('rating_noise')} < {RATING_NOISE} THEN 1 + floor(5 * {self.u('rating')}) "
                  f"WHEN good THEN 5 - floor(3 * pow({self.u('rating')}, 2)) "
                  f"ELSE 1 + floor(3 * pow({self.u('rating')}, 2)) END::INTEGER")
        return [
            _Slot("interaction", "true", "0",
                  f"""',"model_version":"{MODEL_VERSION}","policy":"', policy, '","consent":"', consent,
                  '","input":', input_json, ',"context":{{"candidates":', candidates_json,
                  '}},"impressions":', impressions_json"""),
            _Slot("signal", "bot OR first_signal IS NOT NULL", "CASE WHEN bot THEN 1 ELSE reacted_after END",
                  f"""',"signal_type":"', CASE WHEN bot THEN 'accept' ELSE first_signal END, '"',
                  CASE WHEN NOT bot THEN {text} END"""),
            _Slot("signal", "NOT bot AND second_signal IS NOT NULL",
                  f"reacted_after + 1 + floor(CASE second_signal WHEN 'copy' THEN 19 ELSE 540 END * "
                  f"{self.u('then')})",
                  """',"signal_type":"', second_signal, '"'"""),
            _Slot("signal", f"NOT bot AND {self.u('rated')} < {RATING_SHARE}", f"10 + floor(290 * {self.u('rated_after')})",
                  f"""',"signal_type":"rating","value":', {rating}"""),
            _Slot("outcome", "NOT bot AND outcome", "resolved_after",
                  """',"name":"resolved","value":', CASE WHEN resolved THEN '1.0' ELSE '0.0' END"""),
            _Slot("label", "reviewed", self._reviewed_after(),
                  """',"item_id":"', response_id, '","reviewer":"', reviewer, '","verdict":"',
                  CASE WHEN good <> wrong_review THEN 'good' ELSE 'bad' END, '"'"""),
        ]


class _Recommendation(_Shape):
    """SLATE of CANDIDATES ranked items shown; position-biased clicks, dwell, purchases."""

    def tables(self, con: duckdb.DuckDBPyConnection) -> None:
        share, n, slate, items = (self.settings.exploration_share, recommendation.CANDIDATES,
                                  recommendation.SLATE, recommendation.ITEMS)
        top, other = _number(1 - share + share / n), _number(share / n)
        names = list(recommendation.CATEGORIES)
        titles = [f"{recommendation.CATEGORIES[names[i % len(names)]][i // len(names) % 6]} #{i} "
                  f"({names[i % len(names)]})" for i in range(items)]
        con.execute("CREATE OR REPLACE TEMP TABLE items AS SELECT generate_subscripts($titles, 1) - 1 AS item, "
                    "to_json(unnest($titles)) AS title_json", {"titles": titles})
        propensity = f"CASE WHEN c = p THEN '{top}' ELSE '{other}' END"  # candidate c at position p
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE candidates AS
            SELECT base, concat('[', string_agg(concat('{{"item_id":"item_', item, '","content":', title_json,
                ',"propensities":[', (SELECT string_agg({propensity}, ',' ORDER BY p) FROM range({slate}) AS ps(p)),
                ']}}'), ',' ORDER BY c), ']') AS candidates_json
            FROM range({items}) AS bs(base), range({n}) AS cs(c), items
            WHERE item = (base + {ITEM_STRIDE} * c) % {items}
            GROUP BY base
            """)
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE slates AS
            SELECT base, start, concat('[', string_agg(concat('{{"item_id":"item_', item, '","position":', p,
                ',"propensity":', {propensity}, ',"content":', title_json, '}}'), ',' ORDER BY p), ']')
                AS impressions_json
            FROM (SELECT *, {self._candidate('p')} AS c FROM (SELECT *, start >= 0 AS explore
                  FROM range({items}) AS bs(base), range(-1, {n}) AS ss(start), range({slate}) AS ps(p))), items
            WHERE item = {self._item('p')}
            GROUP BY base, start
            """)

    def joins(self) -> str:
        return "JOIN candidates USING (base) JOIN slates USING (base, start)"

    def _candidate(self, k: str) -> str:
        """Which candidate the slate shows at position ``k``."""
        return f"CASE WHEN explore THEN (start + {SLATE_STRIDE} * {k}) % {recommendation.CANDIDATES} ELSE {k} END"

    def _item(self, k: str) -> str:
        return f"(base + {ITEM_STRIDE} * ({self._candidate(k)})) % {recommendation.ITEMS}"

    def _relevance(self, k: str) -> str:
        """How relevant the item at position ``k`` truly is: mostly below 1/2 as in the simulator,
        more so for what the champion would not have shown."""
        return (f"pow({self.u('relevance', f'i * 8 + {k}')}, "
                f"CASE WHEN {self._candidate(k)} < {recommendation.SLATE} THEN 2 ELSE 4 END)")

    def _dwell(self, k: str, relevance: str) -> str:
        return f"round(exp(ln(15 + 90 * {relevance}) + 0.6 * {self.normal('dwell', f'i * 8 + {k}')}), 1)"

    def serving(self) -> list[list[tuple[str, str]]]:
        return [[
            ("base", (f"floor({recommendation.ITEMS} * CASE WHEN bot THEN {self.u('base', 'skey')} "
                     f"ELSE {self.u('base')} END)::INTEGER")),
            ("start", (f"CASE WHEN explore THEN floor({recommendation.CANDIDATES} * {self.u('start')})::INTEGER "
                      f"ELSE -1 END")),
            ("segment", "user % 6"),
        ]]

    def reactions(self) -> list[list[tuple[str, str]]]:
        slate = range(recommendation.SLATE)
        decay = recommendation.EXAMINATION_DECAY
        return [
            [(f"relevance_{k}", self._relevance(str(k))) for k in slate]
            + [("clicked_from", f"2 + floor(18 * {self.u('first_click')})")],
            [(f"clicked_{k}", (f"CASE WHEN bot THEN {k} = 0 ELSE {self.u('examined', f'i * 8 + {k}')} < "
                              f"{1 / (1 + k) ** decay} AND {self.u('clicked', f'i * 8 + {k}')} < relevance_{k} END"))
             for k in slate],
            [("first_clicked", "CASE " + " ".join(f"WHEN clicked_{k} THEN {k}" for k in slate) + " ELSE 0 END"),
             ("clicks", " OR ".join(f"clicked_{k}" for k in slate))],
        ]

    def slots(self) -> list[_Slot]:
        median, sigma = recommendation.PURCHASE_DELAY_DAYS
        item = f"""'"item_id":"item_', {self._item('k')}, '"'"""
        relevance = self._relevance("k")
        rating = (f"CASE WHEN {self.u('rating_noise')} < {RATING_NOISE} THEN 1 + floor(5 * {self.u('rating')}) "
                  f"ELSE least(5, greatest(1, round(1 + 4 * {relevance} + 2 * ({self.u('rating')} - 0.5)))) END::INTEGER")
        slots = [_Slot(
            "interaction", "true", "0",
            f"""',"model_version":"{MODEL_VERSION}","policy":"', policy, '","consent":"', consent,
            '","input":"{recommendation.REQUEST}","context":{{"segment":"s', segment, '","candidates":',
            candidates_json, '}},"impressions":', impressions_json""")]
        for k in range(recommendation.SLATE):
            clicked_at = f"clicked_from + 45 * {k}"
            bought = f"{self.u('bought', f'i * 8 + {k}')} < {recommendation.PURCHASE_RATE} * relevance_{k}"
            bought_after = (f"floor({DAY_S} * least(14, greatest(1, exp(ln({median}) + "
                            f"{sigma} * {self.normal('bought_after', f'i * 8 + {k}')}))))")
            slots += [
                _Slot("signal", f"clicked_{k}", clicked_at, f"""',"signal_type":"click",', {item}""", str(k)),
                _Slot("signal", f"clicked_{k} AND NOT bot", f"{clicked_at} + ceil({self._dwell(str(k), f'relevance_{k}')})",
                      f"""',"signal_type":"dwell",', {item}, ',"value":', {self._dwell('k', relevance)}""", str(k)),
                _Slot("outcome", f"clicked_{k} AND NOT bot AND {bought}", f"{clicked_at} + {bought_after}",
                      f"""',"name":"purchase","value":1.0,', {item}""", str(k)),
            ]
        return [
            *slots,
            _Slot("signal", "NOT bot AND NOT clicks", f"5 + floor(55 * {self.u('abandoned_after')})",
                  """',"signal_type":"abandon"'"""),
            _Slot("signal", f"NOT bot AND {self.u('rated')} < {RATING_SHARE}", f"60 + floor(240 * {self.u('rated_after')})",
                  f"""',"signal_type":"rating",', {item}, ',"value":', {rating}""", "first_clicked"),
            *(_Slot("label", "reviewed", self._reviewed_after(),
                    f"""',', {item}, ',"reviewer":"', reviewer, '","verdict":"',
                    CASE WHEN ({relevance} >= {recommendation.GOOD_RELEVANCE}) <> wrong_review THEN 'good' ELSE 'bad' END,
                    '"'""", str(k))
              for k in range(recommendation.SLATE)),
        ]


SHAPES: dict[str, type[_Shape]] = {"assistant": _Assistant, "recommendation": _Recommendation}
