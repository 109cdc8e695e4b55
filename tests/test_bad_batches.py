"""Bad batches are quarantined, never fatal: oversized, non-UTF-8, gzip'd, unreadable and future-dated
batches, conflicting duplicates, unsafe ids, and a day that delivered too little traffic."""

from __future__ import annotations

import gzip
import json
from datetime import date, timedelta

import dagster as dg
import pytest

from flywheel_pipeline import quality, warehouse
from flywheel_pipeline.accumulation import QUARANTINED_PREFIX_CHARS, accumulate
from flywheel_pipeline.definitions import build_definitions
from flywheel_pipeline.defs.partitions import partition_key, range_tags
from flywheel_pipeline.defs.transform import RAW_EVENTS
from tests.test_accumulation import DAY, NOW, interaction, run, signal, table, write_batch

NEXT_DAY = DAY + timedelta(days=1)
MB = 1024 * 1024


def dumps(event: dict) -> bytes:
    return json.dumps(event).encode()


def write_bytes(home, day: date, lines: list[bytes], compress: bool = False) -> None:
    path = home.landing / "assistant" / f"{day}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    content = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(content) if compress else content)


def accumulate_under_the_memory_limit(home, config, dates):
    with warehouse.connect(home.warehouse("assistant"), memory_limit=config.warehouse.memory_limit) as con:
        return accumulate(con, home, config, "assistant", list(dates), now=NOW)


@pytest.fixture
def hostile_batches(home):
    """Day 1: a BOM, a 20 MB line, a latin-1 line, six 0.9 MB lines (under the limit) and good lines;
    day 2: gzip'd under a .jsonl name."""
    big_context = {"notes": "x" * (9 * MB // 10)}
    write_bytes(home, DAY, [
        b"\xef\xbb\xbf" + dumps(interaction("a")),
        dumps(interaction("b", input="y" * (20 * MB))),
        '{"event_id": "c", "input": "café"}'.encode("latin-1"),
        dumps(interaction("d")),
        b"",
        *(dumps(interaction(f"big{i}", context=big_context)) for i in range(6)),
        dumps(signal("s1")),
    ])
    write_bytes(home, NEXT_DAY, [dumps(interaction("g1", timestamp="2026-11-03T08:00:00Z")),
                                 dumps(interaction("g2", timestamp="2026-11-03T09:00:00Z"))], compress=True)
    return home


def test_a_hostile_batch_lands_every_good_line_and_quarantines_the_rest(hostile_batches, config):
    home = hostile_batches
    report = accumulate_under_the_memory_limit(home, config, (DAY, NEXT_DAY))

    assert report.reasons == {"line_too_long": 1, "invalid_utf8": 1}
    assert report.accepted["interactions"] == 2 + 6 + 2 and report.accepted["signals"] == 1
    assert table(home, "SELECT source_line, reason, length(line) FROM raw.quarantine ORDER BY 1") == [
        (2, "line_too_long", QUARANTINED_PREFIX_CHARS), (3, "invalid_utf8", 34)]
    assert table(home, "SELECT event_id, source_line FROM raw.interactions WHERE event_id IN ('a', 'd', 'g2')"
                       " ORDER BY 1") == [("a", 1), ("d", 4), ("g2", 2)]
    assert report.days[DAY].lines_in == 11 and report.days[NEXT_DAY].lines_in == 2
    assert all(day.lines_in == day.accepted + day.quarantined for day in report.days.values())
    assert report.reconciles and report.batch_problems == {}


def test_a_batch_that_cannot_be_read_is_quarantined_whole_and_the_others_land(home, config):
    write_batch(home, "2026-11-02", [interaction("a")])
    (home.landing / "assistant" / "2026-11-03.jsonl").write_bytes(b"\x1f\x8b" + b"not gzip at all")

    report = accumulate_under_the_memory_limit(home, config, (DAY, NEXT_DAY))

    assert table(home, "SELECT event_id FROM raw.interactions") == [("a",)]
    [(event_date, line, reason, why)] = table(home, "SELECT event_date, source_line, reason, line FROM raw.quarantine")
    assert (event_date, line, reason) == (NEXT_DAY, 0, "unreadable_file")
    assert why.startswith("assistant/2026-11-03.jsonl cannot be read: ")
    assert report.batch_problems == {"assistant/2026-11-03.jsonl": why}
    assert report.metadata()["batch_problems"] == why and report.reconciles


def test_when_batches_are_read_one_at_a_time_each_keeps_its_line_numbers(home, config):
    write_batch(home, "2026-11-02", [interaction("a"), "", interaction("b")])
    write_batch(home, "2026-11-03", [interaction("c", timestamp="2026-11-03T10:00:00Z"), "",
                                     interaction("d", timestamp="2026-11-03T10:00:00Z")])
    (home.landing / "assistant" / "2026-11-04.jsonl").write_bytes(b"\x1f\x8b" + b"not gzip at all")

    report = run(home, config, dates=(DAY, NEXT_DAY))

    assert list(report.batch_problems) == ["assistant/2026-11-04.jsonl"]
    assert table(home, "SELECT event_id, source_line FROM raw.interactions ORDER BY 1") == [
        ("a", 1), ("b", 3), ("c", 1), ("d", 3)]


def test_a_batch_that_runs_out_of_memory_is_quarantined_line_by_line_and_named(home, config):
    write_batch(home, "2026-11-02", [interaction(f"b{i}", context={"notes": "x" * (9 * MB // 10)}) for i in range(6)])
    write_batch(home, "2026-11-03", [interaction("ok", timestamp="2026-11-03T10:00:00Z")])

    with warehouse.connect(home.warehouse("assistant"), memory_limit="64MB") as con:
        con.execute("SET threads = 1")
        report = accumulate(con, home, config, "assistant", [DAY, NEXT_DAY], now=NOW)

    assert report.reasons == {"out_of_memory": 6} and report.accepted["interactions"] == 1
    assert report.batch_problems["assistant/2026-11-02.jsonl"].startswith(
        "assistant/2026-11-02.jsonl ran out of memory while checked, its lines are quarantined "
        "(raise warehouse.memory_limit or lower landing.max_line_bytes): Out of Memory Error")
    assert table(home, "SELECT DISTINCT length(line) FROM raw.quarantine") == [(QUARANTINED_PREFIX_CHARS,)]


def test_a_batch_dated_in_the_future_is_rejected(home, config):
    tomorrow = (NOW + timedelta(days=1)).date()
    write_batch(home, tomorrow.isoformat(), [interaction("a", timestamp="2026-11-19T10:00:00Z")])

    report = run(home, config, dates=(date(2026, 11, 19),))

    assert report.reasons == {"future_batch": 1} and report.accepted["interactions"] == 0


def test_conflicting_copies_are_all_quarantined_and_exact_ones_deduplicated(home, config):
    """Two valid copies of event a that differ: neither is kept (file order cannot say which is right), both wait in
    the quarantine; an exact copy of b is a plain duplicate; a copy of c that breaks the contract never beats c."""
    exact = json.dumps(interaction("b"), indent=1).replace("\n", "")  # the same event, spaced differently
    broken = {**interaction("c"), "impressions": None}
    write_batch(home, "2026-11-02", [interaction("a"), interaction("b"), broken, interaction("a", input="changed"),
                                     exact, interaction("c")])

    report = run(home, config)

    assert report.reasons == {"conflicting_duplicate": 2, "duplicate_event_id": 1, "missing_field:impressions": 1}
    assert table(home, "SELECT source_line, reason FROM raw.quarantine ORDER BY 1") == [
        (1, "conflicting_duplicate"), (3, "missing_field:impressions"), (4, "conflicting_duplicate"),
        (5, "duplicate_event_id")]
    assert table(home, "SELECT event_id, source_line FROM raw.interactions ORDER BY 1") == [("b", 2), ("c", 6)]
    assert report.day_metadata(DAY)["quarantine_reasons"] == (
        "conflicting_duplicate: 2, duplicate_event_id: 1, missing_field:impressions: 1")


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("event_id", "a\u0000b", "invalid_value:event_id"),
    ("event_id", "admin\u202egpj.exe", "invalid_value:event_id"),
    ("session_id", "s 1", "invalid_value:session_id"),
    ("interaction_id", "i\u200b1", "invalid_value:interaction_id"),
    ("user_id", "u\u00001", "user_id_not_pseudonymous"),
])
def test_ids_outside_the_safe_character_set_are_quarantined(home, config, field, value, reason):
    write_batch(home, "2026-11-02", [interaction("ok"), {**interaction("x"), field: value}])
    assert run(home, config).reasons == {reason: 1}


@pytest.mark.parametrize(("event_type", "reason"), [
    (None, "missing_field:event_type"), ("absent", "missing_field:event_type"), (7, "wrong_type:event_type"),
    (["interaction"], "wrong_type:event_type"), ({"a": 1}, "wrong_type:event_type"),
    ("purchase", "invalid_value:event_type"),
])
def test_a_line_without_a_known_string_event_type_is_quarantined_and_the_rest_lands(home, config, event_type, reason):
    """Every other rule is scoped by the event type: a line without a string one used to be neither
    accepted nor quarantined, and the domain's run failed to reconcile."""
    bad = interaction("x")
    if event_type == "absent":
        del bad["event_type"]
    else:
        bad["event_type"] = event_type
    write_batch(home, "2026-11-02", [interaction("ok"), bad])
    report = run(home, config)
    assert report.reasons == {reason: 1} and report.reconciles


def test_a_day_without_traffic_and_a_day_with_far_too_little_are_flagged(home, config):
    days = [DAY + timedelta(days=i) for i in range(5)]
    for day, n in zip(days, (10, 12, 0, 1, 11)):
        if n:
            stamp = f"{day}T09:00:00Z"
            write_batch(home, day.isoformat(), [interaction(f"{day}-{i}", timestamp=stamp) for i in range(n)])
    run(home, config, dates=days)

    with warehouse.connect(home.warehouse("assistant")) as con:
        frame, median_day = quality.daily_traffic(con, "assistant", days[0], days[-1])
    suite = quality.daily_traffic_suite(median_day, config.landing.min_daily_traffic_share)
    result = quality.run_suite("daily_traffic", frame, suite, index_column="day")

    assert median_day == 10.5 and frame.height == 5
    [failure] = result.failures
    assert failure == ("expect_column_values_to_be_between(interactions): observed 2026-11-04: 0, 2026-11-05: 1, "
                       "expected >= 2.1")


def test_materializing_a_range_with_a_hostile_batch_lands_the_other_days(hostile_batches, config, monkeypatch):
    home = hostile_batches
    for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    home.activate()
    write_batch(home, "2026-11-05", [interaction("later", timestamp="2026-11-05T10:00:00Z")])
    defs = build_definitions(config, home)
    daily_traffic = [c for c in defs.asset_checks if "daily_traffic" in {s.name for s in c.check_specs}]
    with dg.instance_for_test() as instance:
        result = dg.materialize([defs.get_assets_def(RAW_EVENTS), *daily_traffic], instance=instance,
                                resources=defs.resources,
                                tags=range_tags("assistant", DAY, DAY + timedelta(days=3)))

    assert result.success
    days = {e.partition: {k: v.value for k, v in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()}
    assert days[partition_key("assistant", DAY)]["quarantine_reasons"] == "invalid_utf8: 1, line_too_long: 1"
    assert days[partition_key("assistant", DAY)]["reconciles"]
    assert days[partition_key("assistant", NEXT_DAY)]["accepted"] == 2
    assert days[partition_key("assistant", DAY + timedelta(days=2))]["lines_in"] == 0  # nothing came
    assert days[partition_key("assistant", DAY + timedelta(days=3))]["accepted"] == 1
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == "daily_traffic" and not check.passed
    assert check.metadata["failures"].value.endswith("observed 2026-11-04: 0, expected >= 1")


def test_a_batch_mixing_good_lines_with_every_kind_of_bad_line_keeps_reasons_and_line_numbers(home, config):
    from tests.test_accumulation import BAD_LINES

    bad = {reason: (line if isinstance(line, str) else json.dumps(line)).encode() for reason, line in BAD_LINES.items()}
    lines = [b"\xef\xbb\xbf" + dumps(interaction("first")), b"", *bad.values(), b"   ",
             dumps(interaction("big", input="y" * (2 * MB))), b'{"event_id": "c", "input": "caf\xe9"}',
             dumps(interaction("first", input="changed")), dumps(signal("s1")), dumps(signal("s1")), dumps(signal("last"))]
    write_bytes(home, DAY, lines)

    report = run(home, config)

    expected = {**{reason: 1 for reason in BAD_LINES}, "line_too_long": 1, "invalid_utf8": 1,
                "conflicting_duplicate": 2, "duplicate_event_id": 1}
    assert report.reasons == expected and report.reconciles
    assert report.lines_in == len(lines) - 2  # blank lines carry nothing
    where = {line: number for number, line in enumerate(lines, start=1)}
    quarantined = table(home, "SELECT reason, source_line, line FROM raw.quarantine")
    assert {(r, n) for r, n, _ in quarantined if r in bad} == {(r, where[line]) for r, line in bad.items()}
    assert all(text for _, _, text in quarantined)  # each keeps its (redacted) text
    assert {(r, n) for r, n, _ in quarantined if "duplicate" in r} == {
        ("conflicting_duplicate", 1), ("conflicting_duplicate", len(lines) - 3), ("duplicate_event_id", len(lines) - 1)}
    assert table(home, "SELECT event_id, source_line FROM raw.interactions") == []
    assert table(home, "SELECT event_id, source_line FROM raw.signals ORDER BY 2") == [
        ("s1", len(lines) - 2), ("last", len(lines))]


def test_a_batch_with_lone_carriage_returns_lands_with_its_line_numbers(home, config):
    write_bytes(home, DAY, [dumps(interaction("a")) + b"\r" + dumps(interaction("b")), dumps(signal("s1"))])

    report = run(home, config)

    assert report.reconciles and report.reasons == {}
    assert table(home, "SELECT event_id, source_line FROM raw.interactions ORDER BY 1") == [("a", 1), ("b", 2)]
    assert table(home, "SELECT source_line FROM raw.signals") == [(3,)]


def test_a_duplicate_of_an_event_kept_in_another_partition_is_quarantined_with_its_text(home, config):
    write_batch(home, "2026-11-02", [interaction("a")])
    run(home, config)
    again = interaction("a", timestamp="2026-11-03T09:00:00Z")
    write_batch(home, "2026-11-03", [again])

    report = run(home, config, dates=(NEXT_DAY,))

    assert report.reasons == {"duplicate_event_id": 1}
    assert table(home, "SELECT source_line, line FROM raw.quarantine") == [(1, json.dumps(again, separators=(",", ":")))]


def test_a_warehouse_made_with_primary_keys_keeps_accumulating(home, config):
    with warehouse.connect(home.warehouse("assistant")) as con:
        old = "event_id VARCHAR {}, domain VARCHAR NOT NULL, event_date DATE NOT NULL,\n    event_ts"
        con.execute(warehouse.RAW_DDL.replace(old.format("NOT NULL"), old.format("PRIMARY KEY")))
    write_batch(home, "2026-11-02", [interaction("a"), signal("s1")])

    run(home, config)
    report = run(home, config)

    assert report.accepted["interactions"] == 1 and report.reconciles
    assert table(home, "SELECT count(*) FROM duckdb_constraints() "
                       "WHERE schema_name = 'raw' AND constraint_type = 'PRIMARY KEY'") == [(4,)]
