"""Accumulation: the contract on ingest, quarantine with reasons, reconciliation, idempotency."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pytest

from flywheel_pipeline import events, warehouse
from flywheel_pipeline.accumulation import accumulate

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
DAY = date(2026, 11, 2)


def interaction(event_id: str, **overrides: object) -> dict:
    event = {
        "event_id": event_id, "event_type": "interaction", "domain": "assistant",
        "timestamp": "2026-11-02T09:15:00Z", "user_id": "u_1", "session_id": "s_1",
        "interaction_id": f"i_{event_id}", "model_version": "baseline", "policy": "champion",
        "consent": "granted", "input": "What is a computer?",
        "impressions": [{"item_id": "r_1", "position": 0, "propensity": 0.9, "content": "A machine."}],
    }
    event.update(overrides)
    return event


def signal(event_id: str, **overrides: object) -> dict:
    event = {
        "event_id": event_id, "event_type": "signal", "domain": "assistant",
        "timestamp": "2026-11-02T09:16:00Z", "user_id": "u_1", "session_id": "s_1",
        "interaction_id": "i_a", "signal_type": "copy",
    }
    event.update(overrides)
    return event


def label(event_id: str, **overrides: object) -> dict:
    event = {
        "event_id": event_id, "event_type": "label", "domain": "assistant",
        "timestamp": "2026-11-03T10:00:00Z", "user_id": "u_1", "session_id": "s_1",
        "interaction_id": "i_a", "item_id": "r_1", "reviewer": "reviewer_1", "verdict": "good",
    }
    event.update(overrides)
    return event


def write_batch(home, day: str, lines: list[object], domain: str = "assistant", folder: str = "") -> None:
    path = home.landing / domain / folder / f"{day}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def run(home, config, dates=(DAY,), now=NOW):
    with warehouse.connect(home.warehouse("assistant")) as con:
        return accumulate(con, home, config, "assistant", list(dates), now=now)


def table(home, sql: str, domain: str = "assistant") -> list[tuple]:
    with warehouse.connect(home.warehouse(domain), read_only=True) as con:
        return con.execute(sql).fetchall()


BAD_LINES = {
    "malformed_json": '{"event_id": "x", "event_type": ',
    "not_an_object": "[1, 2, 3]",
    "missing_field:policy": {k: v for k, v in interaction("m1").items() if k != "policy"},
    "wrong_type:timestamp": interaction("w1", timestamp=1730539200),
    "wrong_type:impressions.position": interaction(
        "w2", impressions=[{"item_id": "r", "position": "0", "propensity": 0.5, "content": "c"}]),
    "invalid_value:impressions.propensity": interaction(
        "v1", impressions=[{"item_id": "r", "position": 0, "propensity": 0.0, "content": "c"}]),
    "invalid_value:value": signal("v2", signal_type="rating", value=9),
    "invalid_value:verdict": label("v4", verdict="maybe"),
    "missing_field:reviewer": {k: v for k, v in label("m3").items() if k != "reviewer"},
    "missing_field:text": signal("v3", signal_type="edit"),
    "unknown_domain": interaction("d1", domain="search"),
    "domain_mismatch": interaction("d2", domain="recommendation"),
    "future_timestamp": interaction("f1", timestamp="2026-12-25T00:00:00Z"),
    "user_id_not_pseudonymous": interaction("p1", user_id="ada@example.com"),
}


def test_review_labels_come_in_their_own_batch_and_land_in_raw_labels(home, config):
    write_batch(home, "2026-11-02", [interaction("a")])
    write_batch(home, "2026-11-03", [label("l1"), label("l2", verdict="bad", item_id="r_2"),
                                     label("l3", verdict="maybe")], folder="labels")

    report = run(home, config, dates=(DAY, DAY + timedelta(days=1)))

    assert report.accepted == {"interactions": 1, "signals": 0, "outcomes": 0, "labels": 2}
    assert report.batches_read == ["2026-11-02.jsonl", "2026-11-03.jsonl"] and report.reconciles
    assert table(home, "SELECT event_date, item_id, reviewer, verdict FROM raw.labels ORDER BY 2") == [
        (DAY + timedelta(days=1), "r_1", "reviewer_1", "good"),
        (DAY + timedelta(days=1), "r_2", "reviewer_1", "bad"),
    ]
    assert table(home, "SELECT reason, source_file FROM raw.quarantine") == [
        ("invalid_value:verdict", "assistant/labels/2026-11-03.jsonl")]


def test_bad_batch_is_quarantined_with_reasons_and_nothing_is_lost(home, config):
    good = [interaction("a"), signal("s1"), signal("s2", signal_type="rating", value=5)]
    write_batch(home, "2026-11-02", [*good, *BAD_LINES.values(), interaction("a")])

    report = run(home, config)

    assert report.lines_in == len(good) + len(BAD_LINES) + 1
    assert report.accepted == {"interactions": 1, "signals": 2, "outcomes": 0, "labels": 0}
    assert report.lines_in == sum(report.accepted.values()) + report.quarantined
    quarantined = dict(table(home, "SELECT reason, count(*) FROM raw.quarantine GROUP BY 1"))
    assert quarantined == {**{reason: 1 for reason in BAD_LINES}, "duplicate_event_id": 1}
    lines = table(home, "SELECT source_file, source_line, line FROM raw.quarantine WHERE reason = 'malformed_json'")
    assert lines == [("assistant/2026-11-02.jsonl", 4, BAD_LINES["malformed_json"])]


def test_every_row_keeps_its_line_in_batches_read_in_parallel(home, config):
    """Batches large enough (25 MB) for the JSON reader's threads to share: every accepted row and
    every quarantined line still names its own line (rows are numbered in the scan's order)."""
    days = [DAY + timedelta(days=offset) for offset in range(2)]
    expected = {}
    for day in days:
        lines: list[object] = []
        for n in range(1, 25_001):
            event_id, stamp = f"e_{day:%d}_{n}", f"{day}T09:15:00Z"
            if n % 997 == 0:
                lines.append("")  # blank: not an event, but a line
            elif n % 1013 == 0:
                lines.append(signal(event_id, timestamp=stamp, signal_type="shrug"))
                expected[(f"assistant/{day}.jsonl", n)] = ("quarantine", "invalid_value:signal_type")
            elif n % 3 == 0:
                lines.append(signal(event_id, timestamp=stamp, signal_type=("copy", "accept", "reject")[n % 9 // 3]))
                expected[(f"assistant/{day}.jsonl", n)] = ("signals", event_id)
            else:
                lines.append(interaction(event_id, timestamp=stamp, input=f"question {n} " + "x" * 1000))
                expected[(f"assistant/{day}.jsonl", n)] = ("interactions", event_id)
        write_batch(home, f"{day}", lines)

    report = run(home, config, dates=days)

    found = {(file, line): (table_, what) for table_, sql in (
        ("interactions", "SELECT source_file, source_line, event_id FROM raw.interactions"),
        ("signals", "SELECT source_file, source_line, event_id FROM raw.signals"),
        ("quarantine", "SELECT source_file, source_line, reason FROM raw.quarantine"),
    ) for file, line, what in table(home, sql)}
    assert report.lines_in == len(expected) > 45_000
    assert found == expected


def test_a_check_planned_as_a_join_is_refused_rather_than_misnumbered(home, config, monkeypatch):
    """A rule written as a long IN list becomes a join in DuckDB's plan, which need not keep the
    scan's order: accumulation refuses it before any row is written."""
    write_batch(home, "2026-11-02", [interaction("a"), signal("s1")])
    monkeypatch.setattr(events, "_one_of", lambda value, values: f"{value} IN ({', '.join(repr(v) for v in values)})")

    with pytest.raises(AssertionError, match="plan joins"):
        run(home, config)
    assert table(home, "SELECT count(*) FROM raw.interactions") == [(0,)]


def test_rerun_and_redelivery_change_nothing_not_even_ingestion_times(home, config):
    write_batch(home, "2026-11-02", [interaction("a"), interaction("b"), signal("s1")])
    run(home, config)
    before = table(home, "SELECT event_id, event_date, source_line, ingested_at FROM raw.interactions ORDER BY 1")

    later = NOW + timedelta(hours=1)
    run(home, config, now=later)
    write_batch(home, "2026-11-03", [interaction("a"), signal("s1")])  # the same events delivered again
    report = run(home, config, dates=(DAY, date(2026, 11, 3)), now=later)

    after = table(home, "SELECT event_id, event_date, source_line, ingested_at FROM raw.interactions ORDER BY 1")
    assert after == before
    assert table(home, "SELECT count(*) FROM raw.impressions") == [(2,)]
    assert report.reasons == {"duplicate_event_id": 2}


def with_horizon(config, days: int | None):
    return config.model_copy(update={"landing": config.landing.model_copy(update={"duplicate_horizon_days": days})})


@pytest.mark.parametrize(("horizon", "kept_twice"), [(None, False), (5, False), (4, True)])
def test_an_id_kept_on_another_day_is_a_duplicate_within_the_horizon(home, config, horizon, kept_twice):
    """The same event id five days later (a retry stamped anew): a duplicate of the kept one on any
    day (no horizon) or within a horizon of five days, kept again beyond a horizon of four."""
    later = DAY + timedelta(days=5)
    write_batch(home, str(DAY), [interaction("a")])
    write_batch(home, str(later), [interaction("a", timestamp=f"{later}T09:00:00Z")])
    run(home, config)

    report = run(home, with_horizon(config, horizon), dates=(later,))

    assert report.reasons == ({} if kept_twice else {"duplicate_event_id": 1})
    assert table(home, "SELECT event_date FROM raw.interactions ORDER BY 1") == (
        [(DAY,), (later,)] if kept_twice else [(DAY,)])


def test_a_rerun_keeps_unchanged_rows_where_they_are_and_rewrites_only_what_changed(home, config):
    write_batch(home, "2026-11-02", [interaction("a"), interaction("b"), signal("s1"), BAD_LINES["malformed_json"]])
    assert run(home, config).written == 4
    rows = "SELECT event_id, ingested_at, input_text FROM raw.interactions ORDER BY 1"
    before = table(home, rows)
    quarantined = table(home, "SELECT source_line, quarantined_at FROM raw.quarantine")

    later = NOW + timedelta(hours=1)
    assert run(home, config, now=later).written == 0
    write_batch(home, "2026-11-02", [interaction("a"), interaction("b", input="Changed?"), signal("s1"),
                                     BAD_LINES["malformed_json"]])
    assert run(home, config, now=later).written == 1

    assert table(home, rows) == [before[0], ("b", before[1][1], "Changed?")]
    assert table(home, "SELECT source_line, quarantined_at FROM raw.quarantine") == quarantined  # kept, not rewritten
    assert table(home, "SELECT event_id, count(*) FROM raw.impressions GROUP BY 1 ORDER BY 1") == [("a", 1), ("b", 1)]


def test_late_event_lands_in_its_own_day(home, config):
    write_batch(home, "2026-11-04", [interaction("late", timestamp="2026-11-02T23:59:00+00:00")])
    run(home, config, dates=(DAY,))
    assert table(home, "SELECT event_id, event_date FROM raw.interactions") == [("late", DAY)]


def test_event_older_than_the_lateness_limit_is_quarantined_in_its_batch_day(home, config):
    old = interaction("old", timestamp="2026-10-01T10:00:00Z")
    write_batch(home, "2026-11-02", [old])
    report = run(home, config)
    assert report.reasons == {"too_late": 1}
    assert table(home, "SELECT event_date FROM raw.quarantine") == [(DAY,)]


def test_crash_mid_write_keeps_the_previous_partition(home, config, monkeypatch):
    write_batch(home, "2026-11-02", [interaction("a")])
    run(home, config)
    write_batch(home, "2026-11-02", [interaction("a"), interaction("b")])

    from flywheel_pipeline import accumulation

    broken = dict(accumulation._ROWS, quarantine="SELECT * FROM raw.no_such_table")
    monkeypatch.setattr(accumulation, "_ROWS", broken)
    with pytest.raises(Exception, match="no_such_table"):
        run(home, config)

    assert table(home, "SELECT event_id FROM raw.interactions") == [("a",)]


def test_unknown_domain_is_a_clear_error(home, config):
    with warehouse.connect(home.warehouse("assistant")) as con, pytest.raises(Exception, match="unknown domain 'search'"):
        accumulate(con, home, config, "search", [DAY], now=NOW)


def test_the_warehouse_connection_takes_the_configured_memory_limit(home, config):
    assert config.warehouse.memory_limit == "2GB"
    with warehouse.connect(home.warehouse("assistant"), memory_limit=config.warehouse.memory_limit) as con:
        [(limit,)] = con.execute("SELECT current_setting('memory_limit')").fetchall()
    assert limit == "1.8 GiB"  # DuckDB reports 2 GB (10^9 bytes) in GiB
