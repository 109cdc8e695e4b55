"""PII redaction: recall and precision on a labelled corpus (flywheel's DuckDB patterns against
Presidio's recognizers), and throughput at a million events.

The corpus is generated here with Faker (seeded): each text is a sentence with one planted value,
either personal data of a known kind (email, phone, card, US SSN, API key, IBAN, IPv4/IPv6
address; a third of the cards after another group of four digits: a year, a reference) or a hard
negative that looks like one (order numbers, cards failing Luhn, IBANs failing mod 97, dates,
ISBNs, tracking numbers, UUIDs, MAC addresses, four-part versions, C++ scopes...). A planted value
counts as redacted when it no longer appears in the output: recall is the share of personal values
redacted, precision the share of redacted values that were personal; per entity, recall by the
kind planted and precision by the ``<ENTITY>`` that took the value's place. Each text is also
redacted nested in an interaction's ``context`` at a depth of 1 to 8 (``redact_json``, as on
ingest) and scored the same way.

    .venv/bin/python benchmarks/redaction.py [--texts 4000] [--events 1000000]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import random
import secrets
import string
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
from faker import Faker

from flywheel_pipeline import privacy

ENTITIES = list(privacy.PII_PATTERNS)
DAY = date(2026, 11, 2)


def _token(alphabet: str, length: int, rng: random.Random) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def api_key(rng: random.Random) -> str:
    alnum = string.ascii_letters + string.digits
    return rng.choice([
        lambda: "AKIA" + _token(string.ascii_uppercase + string.digits, 16, rng),
        lambda: "ghp_" + _token(alnum, 36, rng),
        lambda: "sk_live_" + _token(alnum, 24, rng),
        lambda: "sk-proj-" + _token(alnum + "_-", 48, rng),
        lambda: "xoxb-" + _token(string.digits, 12, rng) + "-" + _token(alnum, 24, rng),
        lambda: "AIza" + _token(alnum + "_-", 35, rng),
        lambda: "api_key=" + _token(string.hexdigits.lower()[:16], 32, rng),
    ])()


def luhn_failing(rng: random.Random, fake: Faker) -> str:
    number = fake.credit_card_number()
    return number[:-1] + str((int(number[-1]) + rng.randint(1, 9)) % 10)


def in_fours(code: str) -> str:
    return " ".join(code[i:i + 4] for i in range(0, len(code), 4))


def iban(rng: random.Random, locales: list[Faker]) -> str:
    """A valid IBAN of one of ``locales``' countries, printed in groups of four or not, in either case."""
    code = rng.choice(locales).iban()
    code = rng.choice([code, in_fours(code), in_fours(code)])
    return code.lower() if rng.random() < 0.1 else code


def iban_failing(rng: random.Random, locales: list[Faker]) -> str:
    """An IBAN whose check digits are wrong."""
    code = rng.choice(locales).iban()
    digits = (int(code[2:4]) + rng.randint(1, 96)) % 97 or 98
    return in_fours(f"{code[:2]}{digits:02d}{code[4:]}")


def ipv6(rng: random.Random) -> str:
    """An IPv6 address in full, or compressed (a run of two to four zero groups as ``::``, at the
    end in some: a /64 prefix's zero host)."""
    groups = [rng.randint(1, 0xFFFF) for _ in range(8)]
    if rng.random() < 0.5:
        start, length = rng.randint(1, 4), rng.randint(2, 4)
        groups[start:start + length] = [0] * length
    return ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups)).compressed


def positives(fake: Faker, rng: random.Random) -> dict[str, Callable[[], str]]:
    """Personal values of each kind, in the formats people paste them in. The patterns were
    written against en_US, en_GB and de_DE phone numbers; fr_FR and en_IN ones are held out."""
    gb, de, fr, india = (Faker(locale) for locale in ("en_GB", "de_DE", "fr_FR", "en_IN"))
    for other in (gb, de, fr, india):
        other.seed_instance(rng.random())

    def card() -> str:
        digits = fake.credit_card_number()
        separator = rng.choice(["", " ", "-"])
        return separator.join(digits[i:i + 4] for i in range(0, len(digits), 4))

    banks = [Faker(locale) for locale in ("de_DE", "en_GB", "fr_FR", "nl_NL", "es_ES", "it_IT", "pl_PL", "no_NO")]
    for bank in banks:
        bank.seed_instance(rng.random())
    return {
        "EMAIL_ADDRESS": lambda: rng.choice([fake.email, fake.free_email, fake.company_email])(),
        "PHONE_NUMBER": lambda: rng.choice([fake.phone_number] * 4 + [
            gb.phone_number, de.phone_number, fr.phone_number, india.phone_number])(),
        "CREDIT_CARD": card,
        "US_SSN": lambda: rng.choice([fake.ssn(), fake.ssn().replace("-", " ")]),
        "API_KEY": lambda: api_key(rng),
        "IBAN_CODE": lambda: iban(rng, banks),
        "IP_ADDRESS": lambda: rng.choice([fake.ipv4, fake.ipv4_private, lambda: ipv6(rng)])(),
    }


def negatives(fake: Faker, rng: random.Random) -> dict[str, Callable[[], str]]:
    """Values that look like personal data and are not."""
    return {
        "order_number": lambda: f"#{rng.randint(10**7, 10**12)}",
        "card_failing_luhn": lambda: luhn_failing(rng, fake),
        "date": lambda: fake.date(),
        "time": lambda: fake.time(),
        "price": lambda: f"${rng.randint(1, 99999):,}.{rng.randint(0, 99):02d}",
        "isbn": lambda: fake.isbn13(),
        "tracking_number": lambda: "1Z" + _token(string.ascii_uppercase + string.digits, 16, rng),
        "uuid": lambda: fake.uuid4(),
        "version": lambda: f"v{rng.randint(0, 20)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}",
        "zip_code": lambda: fake.zipcode(),
        "git_sha": lambda: secrets.token_hex(20),
        "amount": lambda: f"{rng.randint(1000, 10**9):,}",
        "iban_failing_mod97": lambda: iban_failing(rng, [Faker(locale) for locale in ("de_DE", "fr_FR")]),
        "reference_in_fours": lambda: in_fours(str(rng.randint(10**19, 10**20 - 1))),
        "mac_address": lambda: fake.mac_address(),
        "four_part_version": lambda: ".".join(str(rng.randint(0, 20)) for _ in range(4)),
        "cpp_scope": lambda: rng.choice(["std::vector<int>", "abc::def", "Foo::Bar::baz()", "fmt::format", "ace::face"]),
        "ipv4_out_of_range": lambda: ".".join(str(rng.randint(256, 999)) for _ in range(4)),
    }


TEMPLATES = [
    "{filler} You can reach it at {value}.",
    "my {label} is {value}, {filler}",
    "{value}",
    "{filler} ({value}) {filler}",
    "Please check {value} - {filler}",
]


GROUP_BEFORE_A_CARD = ["ref {:04d}", "{:04d}", "ssn 219-09-{:04d}", "{:04d}"]  # a reference, a year, an SSN's last group


def corpus(texts: int, seed: int = 7) -> list[tuple[str, str, str, bool]]:
    """(text, planted value, its kind: an entity, or a hard negative's kind, whether the value comes
    after another group of four digits), 60% personal; a third of the card numbers come so."""
    rng, fake = random.Random(seed), Faker("en_US")
    fake.seed_instance(seed)
    kinds = {**positives(fake, rng), **negatives(fake, rng)}
    rows = []
    for _ in range(texts):
        kind = rng.choice(ENTITIES) if rng.random() < 0.6 else rng.choice(list(negatives(fake, rng)))
        value = kinds[kind]()
        shown, after_a_group = value, kind == "CREDIT_CARD" and rng.random() < 1 / 3
        if after_a_group:
            value = value.replace("-", " ")
            shown = f"{rng.choice(GROUP_BEFORE_A_CARD).format(rng.randint(1990, 2030))} {value}"
        text = rng.choice(TEMPLATES).format(value=shown, filler=fake.sentence(), label=kind.lower())
        rows.append((text, value, kind, after_a_group))
    return rows


def duckdb_redact(texts: list[str]) -> list[str]:
    with duckdb.connect() as con:
        privacy.install_redaction(con)
        con.execute("CREATE TABLE texts AS SELECT unnest($texts) AS text, generate_subscripts($texts, 1) AS n",
                    {"texts": texts})
        return [text for (text,) in con.execute("SELECT redact_pii(text) FROM texts ORDER BY n").fetchall()]


def nested(text: str, depth: int) -> dict:
    """An interaction's context holding ``text`` ``depth`` containers deep, objects and lists in turn."""
    value: object = text
    for level in reversed(range(depth)):
        value = [value] if level % 2 else {f"k{level}": value, "n": level}
    return {"segment": "s1", "nested": value}


def duckdb_redact_nested(texts: list[str], seed: int = 11) -> list[str]:
    """Each text redacted inside a context at a depth of 1 to 8 (``redact_json``), read back out."""
    rng = random.Random(seed)
    contexts = [json.dumps(nested(text, rng.randint(1, 8))) for text in texts]
    with duckdb.connect() as con:
        privacy.install_redaction(con)
        con.execute("CREATE TABLE contexts AS SELECT unnest($c)::JSON AS context, generate_subscripts($c, 1) AS n",
                    {"c": contexts})
        redacted = [json.loads(c) for (c,) in con.execute(
            "SELECT redact_json(context)::VARCHAR FROM contexts ORDER BY n").fetchall()]
    out = []
    for context in redacted:
        value = context["nested"]
        while not isinstance(value, str):
            value = value[0] if isinstance(value, list) else next(v for k, v in value.items() if k != "n")
        out.append(value)
    return out


def presidio_recognizers() -> list:
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )

    logging.getLogger("tldextract").setLevel(logging.CRITICAL)  # offline: its bundled suffix list
    api_keys = PatternRecognizer(supported_entity="API_KEY", patterns=[
        Pattern(f"api_key_{n}", pattern, 0.5) for n, pattern in enumerate(privacy.PII_PATTERNS["API_KEY"])])
    return [EmailRecognizer(), PhoneRecognizer(), CreditCardRecognizer(), UsSsnRecognizer(), api_keys,
            IbanRecognizer(), IpRecognizer()]


def presidio_redact(texts: list[str], recognizers: list) -> list[str]:
    """Each recognizer alone (no NLP engine: pattern recognizers need none), spans replaced by <ENTITY>."""
    redacted = []
    for text in texts:
        spans = sorted((result.start, result.end, result.entity_type)
                       for recognizer in recognizers
                       for result in recognizer.analyze(text, recognizer.supported_entities, None)
                       if result.score > 0)
        out, at = [], 0
        for start, end, entity in spans:
            if start >= at:
                out += [text[at:start], f"<{entity}>"]
                at = end
            elif end > at:  # overlapping: extend the replaced span
                at = end
        redacted.append("".join(out) + text[at:])
    return redacted


def score(rows: list[tuple[str, str, str, bool]], redacted: list[str]) -> dict[str, object]:
    """Recall (overall, per entity planted), precision (overall, per entity whose ``<ENTITY>`` took
    the value's place), the hard negatives redacted by kind, and the recall of cards after a group."""
    planted, gone = Counter(kind for _, _, kind, _ in rows), Counter()
    flagged_by, personal_by = Counter(), Counter()
    after_a_group = Counter()  # cards after another group of digits: planted, redacted
    for (_, value, kind, after), out in zip(rows, redacted):
        removed = value not in out
        gone[kind] += removed
        after_a_group.update({"planted": after, "redacted": after and removed})
        for entity in (entity for entity in ENTITIES if removed and f"<{entity}>" in out):
            flagged_by[entity] += 1
            personal_by[entity] += kind in ENTITIES
    true_positives = sum(gone[entity] for entity in ENTITIES)
    false_positives = {kind: n for kind, n in gone.items() if kind not in ENTITIES and n}
    flagged = true_positives + sum(false_positives.values())
    return {
        "recall": round(true_positives / sum(planted[entity] for entity in ENTITIES), 4),
        "precision": round(true_positives / flagged, 4) if flagged else None,
        "recall_by_entity": {entity: round(gone[entity] / planted[entity], 4) for entity in ENTITIES},
        "precision_by_entity": {entity: round(personal_by[entity] / flagged_by[entity], 4) if flagged_by[entity]
                                else None for entity in ENTITIES},
        "recall_card_after_a_group": (round(after_a_group["redacted"] / after_a_group["planted"], 4)
                                      if after_a_group["planted"] else None),
        "negatives_redacted": false_positives,
    }


def throughput_texts(rows: list[tuple[str, str, str, bool]], events: int) -> float:
    """Texts per second of redact_pii over ``events`` corpus texts (60% carry personal data)."""
    with duckdb.connect() as con:
        privacy.install_redaction(con)
        con.execute("CREATE TABLE corpus AS SELECT unnest($texts) AS text", {"texts": [r[0] for r in rows]})
        con.execute(f"""CREATE TABLE texts AS SELECT text FROM corpus, range({events // len(rows) + 1})
                        LIMIT {events}""")
        began = time.perf_counter()
        con.execute("SELECT sum(length(redact_pii(text))) FROM texts").fetchone()
        return events / (time.perf_counter() - began)


def throughput_accumulation(events: int, pii_share: float) -> dict[str, float]:
    """Accumulation of ``events`` landing lines (simulated, ``pii_share`` of inputs carrying an
    email), with and without the privacy step: events/second and the step's share of the time."""
    from flywheel_pipeline import accumulation, simulation, warehouse
    from flywheel_pipeline.config import load_config
    from flywheel_pipeline.home import Home

    config = load_config()
    with tempfile.TemporaryDirectory() as folder:
        home = Home(Path(folder)).ensure()
        simulation.simulate(home, config, DAY, 1, seed=3, interactions_per_day=3000, domains=["assistant"])
        template = [json.loads(line) for line in home.landing_file("assistant", DAY.isoformat()).read_text().splitlines()
                    if line.strip()]
        _replicate(home.landing_file("assistant", DAY.isoformat()), template, events, pii_share)
        days = [DAY - timedelta(days=n) for n in range(config.max_lateness_days + 1)]  # late events too
        timings, protect = {}, privacy.protect_partition_lines
        for label, step in (("without", lambda con: None), ("with", protect)):
            privacy.protect_partition_lines = step  # accumulation calls it through the module
            home.warehouse("assistant").unlink(missing_ok=True)
            try:
                with warehouse.connect(home.warehouse("assistant"), memory_limit=config.warehouse.memory_limit) as con:
                    began = time.perf_counter()
                    report = accumulation.accumulate(con, home, config, "assistant", days,
                                                     now=datetime(2026, 11, 3, tzinfo=UTC))
                    timings[label] = time.perf_counter() - began
            finally:
                privacy.protect_partition_lines = protect
            assert report.reconciles and not report.quarantined
    lines = report.lines_in  # the events, and the review queue's few labels
    return {
        "events": lines,
        "events_per_second_with_redaction": round(lines / timings["with"]),
        "events_per_second_without": round(lines / timings["without"]),
        "redaction_seconds": round(timings["with"] - timings["without"], 1),
    }


def _replicate(path: Path, template: list[dict], events: int, pii_share: float) -> None:
    """Write ``events`` lines: the template's events again and again under fresh ids."""
    rng = random.Random(1)
    with path.open("w") as batch:
        for n in range(events):
            event = dict(template[n % len(template)])
            copy = n // len(template)
            for key in ("event_id", "interaction_id", "session_id"):
                event[key] = f"{event[key]}_{copy}"
            if event["event_type"] == "interaction" and rng.random() < pii_share:
                event["input"] = f"{event['input']} mail me at user{n}@example.com"
            batch.write(json.dumps(event) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=4000, help="labelled corpus size")
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()

    rows = corpus(args.texts)
    texts = [row[0] for row in rows]
    began = time.perf_counter()
    duckdb_out = duckdb_redact(texts)
    duckdb_seconds = time.perf_counter() - began
    nested_out = duckdb_redact_nested(texts)
    recognizers = presidio_recognizers()
    began = time.perf_counter()
    presidio_out = presidio_redact(texts, recognizers)
    presidio_seconds = time.perf_counter() - began
    print(json.dumps({
        "corpus": {"texts": len(rows), "personal": sum(1 for _, _, kind, _ in rows if kind in ENTITIES)},
        "duckdb": {**score(rows, duckdb_out), "texts_per_second_corpus": round(len(rows) / duckdb_seconds)},
        "duckdb_in_context_depth_1_to_8": score(rows, nested_out),
        "presidio": {**score(rows, presidio_out), "texts_per_second": round(len(rows) / presidio_seconds)},
        "duckdb_texts_per_second_at_1M": round(throughput_texts(rows, args.events)),
        "accumulation": throughput_accumulation(args.events, pii_share=0.01),
    }, indent=2))


if __name__ == "__main__":
    main()
