"""`flywheel import`: OpenTelemetry GenAI spans and logged bandit feedback, from a file written here
to landing batches, the quarantine, and labelled rows in the warehouse (through Dagster)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import NamedTuple

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml

from flywheel_pipeline import warehouse
from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.cli import main
from flywheel_pipeline.config import BanditLog, ConfigError, FlywheelConfig, Importing, load_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.assets import LABELS
from flywheel_pipeline.defs.transform import RAW_EVENTS, dbt_model_keys
from flywheel_pipeline.home import Home
from flywheel_pipeline.importers import FORMATS, UnreadableFile, import_file, otel
from flywheel_pipeline.sources import ParquetSource
from tests.conftest import REPO

TODAY = datetime.now(UTC).date()
D0 = TODAY - timedelta(days=3)  # the spans' first day
BANDIT_DAYS = 14  # the bandit log's days, ending yesterday: 7 trained on, 7 held out
BANDIT_FIRST = TODAY - timedelta(days=BANDIT_DAYS)
ITEMS, SLOTS, SLATES_PER_DAY = 12, 3, 100
EXAMINATION = (1.0, 0.7, 0.5)  # P(a slot is looked at), top slot first
BAD_ROWS = 2  # a 0 slot in a 1-based log; an empty item

BANDIT_LOG = {"timestamp": "ts", "item": "item_id", "position": "slot", "position_base": 1, "reward": "click",
              "propensity": "pscore", "policy": "explore", "request": "impression_id", "user": "user",
              "context": ["device", "affinity"]}


def project_config(tmp_path: Path, **recommendation_settings: object) -> Path:
    """The repository's flywheel.yaml with both domains set up for importing: assistant spans
    (no exploration: an app's chat spans are all its champion's), a random logger's clicks."""
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    assistant, recommendation = raw["domains"]["assistant"], raw["domains"]["recommendation"]
    assistant.update(exploration_share=0.0, importing={"consent": "granted"})
    recommendation.update(lookback_days=7, holdout_days=7, importing={"consent": "granted", "bandit_log": BANDIT_LOG},
                          **recommendation_settings)
    path = tmp_path / "flywheel.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def nanos(moment: datetime) -> str:
    return str(int(moment.timestamp() * 1e9))


def attribute(key: str, value: object) -> dict:
    kind = "intValue" if isinstance(value, int) else "stringValue"
    return {"key": key, "value": {kind: str(value) if kind == "intValue" else value}}


def message(role: str, text: str) -> dict:
    return {"role": role, "parts": [{"type": "text", "content": text}]}


def chat_span(n: int, start: datetime, history: list[dict], answer: str, conversation: str,
              events: tuple[dict, ...] = (), **extra: str) -> dict:
    attributes = {"gen_ai.operation.name": "chat", "gen_ai.conversation.id": conversation,
                  "gen_ai.response.model": "support-llm-2", "gen_ai.response.id": f"resp_{n}",
                  "gen_ai.input.messages": json.dumps(history),
                  "gen_ai.output.messages": json.dumps([{**message("assistant", answer), "finish_reason": "stop"}]),
                  **extra}
    return {"traceId": f"{n:032x}", "spanId": f"{n:016x}", "name": "chat support-llm-2", "kind": 3,
            "startTimeUnixNano": nanos(start), "endTimeUnixNano": nanos(start + timedelta(seconds=2)),
            "attributes": [attribute(k, v) for k, v in attributes.items()], "events": list(events)}


def evaluation(label: str, at: datetime) -> dict:
    return {"name": "gen_ai.evaluation.result", "timeUnixNano": nanos(at),
            "attributes": [attribute("gen_ai.evaluation.name", "user_thumbs"),
                           attribute("gen_ai.evaluation.score.label", label)]}


def conversations(day: date, count: int) -> list[dict]:
    """``count`` conversations of three turns: the second re-asks the first within a minute (a
    reformulation), the third is a new question whose answer an evaluator passed."""
    spans = []
    for c in range(count):
        start = datetime.combine(day, time(9), UTC) + timedelta(minutes=7 * c)
        first, again, new = (f"how do I reset my password on device {c}",
                             f"reset password on device {c} steps please", f"what is plan {c} pricing")
        turns = [([message("user", first)], f"Open settings {c}."),
                 ([message("user", first), message("assistant", f"Open settings {c}."), message("user", again)],
                  f"Settings > Security > Reset {c}."),
                 ([message("user", again), message("assistant", "..."), message("user", new)], f"Plan {c} is $9.")]
        for t, (history, answer) in enumerate(turns):
            at = start + timedelta(seconds=[0, 30, 200][t])
            events = (evaluation("pass", at + timedelta(seconds=5)),) if t == 2 else ()
            spans.append(chat_span(1000 * (day.toordinal() % 1000) + 10 * c + t, at, history, answer,
                                   f"conv_{day}_{c}", events, **{"user.id": f"u_{c % 4}"}))
    return spans


def otel_file(path: Path, days: list[date], per_day: int) -> Path:
    """An OTLP JSON export, one export per line (the collector's file exporter): chat spans, an
    HTTP span (skipped) and a chat span whose content capture was off (rejected)."""
    http = {"traceId": "f" * 32, "spanId": "e" * 16, "name": "GET /chat", "startTimeUnixNano": nanos(
        datetime.combine(days[0], time(8), UTC)), "endTimeUnixNano": nanos(datetime.combine(days[0], time(8, 1), UTC)),
        "attributes": [attribute("http.request.method", "GET")]}
    blind = chat_span(999_999, datetime.combine(days[0], time(8), UTC), [], "x", "conv_blind")
    blind["attributes"] = [a for a in blind["attributes"] if a["key"] != "gen_ai.input.messages"]
    lines = []
    for n, day in enumerate(days):
        spans = conversations(day, per_day) + ([http, blind] if n == 0 else [])
        lines.append({"resourceSpans": [{"resource": {"attributes": [attribute("service.name", "support")]},
                                         "scopeSpans": [{"scope": {"name": "genai"}, "spans": spans}]}]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def bandit_file(path: Path, first: date, days: int, seed: int = 0) -> Path:
    """A uniformly random logger's click log, one row per slot shown, slots numbered from 1:
    ITEMS items, a click when the slot is examined (EXAMINATION) and the item attracts (item i
    attracts with probability rising with i); then BAD_ROWS rows that cannot map."""
    rng = np.random.default_rng(seed)
    attraction = np.linspace(0.05, 0.6, ITEMS)
    rows = []
    for d in range(days):
        for s in range(SLATES_PER_DAY):
            served = datetime.combine(first + timedelta(days=d), time(8), UTC) + timedelta(seconds=300 * s)
            user = f"user_{rng.integers(300)}"
            for slot, item in enumerate(rng.choice(ITEMS, SLOTS, replace=False)):
                click = int(rng.random() < EXAMINATION[slot] * attraction[item])
                rows.append({"ts": served.strftime("%Y-%m-%d %H:%M:%S"), "impression_id": f"r{d}_{s}",
                             "user": user, "item_id": f"item_{item}", "slot": slot + 1, "click": click,
                             "pscore": 1 / ITEMS, "device": ["ios", "web"][s % 2],
                             "affinity": round(float(rng.random()), 3)})
    bad = dict(rows[0], impression_id="bad_0")
    rows += [dict(bad, slot=0), dict(bad, impression_id="bad_1", item_id="")]
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def rows(home: Home, sql: str, domain: str = "assistant") -> list[tuple]:
    with warehouse.connect(home.warehouse(domain), read_only=True) as con:
        return con.execute(sql).fetchall()


@pytest.fixture
def project(tmp_path, monkeypatch) -> tuple[Home, FlywheelConfig]:
    """A home and the importing config, with the environment pointing at them (as for the CLI)."""
    path = project_config(tmp_path)
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(path))
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    return Home(tmp_path / "home").ensure(), load_config(path)


def test_spans_become_interactions_and_signals_and_a_span_without_messages_is_quarantined(project, tmp_path):
    home, config = project
    path = otel_file(tmp_path / "traces.jsonl", [D0, D0 + timedelta(days=1)], per_day=2)
    report = import_file(home, config, "otel", path, "assistant")
    assert report.events == {"interaction": 12, "signal": 8}  # 4 reformulations, 4 ratings
    assert report.skipped == {"not_a_chat_span": 1} and report.rejected == {"missing_field:gen_ai.input.messages": 1}
    assert report.records == 14 == report.records_mapped + 2
    assert report.batches == [f"assistant/{D0}.otel-traces.jsonl", f"assistant/{D0 + timedelta(days=1)}.otel-traces.jsonl"]

    events = [json.loads(line) for batch in report.batches for line in (home.landing / batch).read_text().splitlines()]
    second_turn = next(e for e in events if e["event_type"] == "interaction" and e["input"].startswith("reset"))
    assert second_turn["impressions"][0]["content"].startswith("Settings > Security")  # the response, not the history
    assert second_turn["session_id"] == f"conv_{D0}_0" and second_turn["user_id"] == "u_0"
    assert second_turn["model_version"] == "support-llm-2" and second_turn["consent"] == "granted"
    [reformulation] = [e for e in events if e.get("signal_type") == "reformulate" and e["session_id"] == f"conv_{D0}_0"]
    assert reformulation["text"] == second_turn["input"]
    assert reformulation["timestamp"] < second_turn["timestamp"]  # when the user re-asked
    assert {e["value"] for e in events if e.get("signal_type") == "rating"} == {5}

    quarantined = "SELECT event_date, source_file, source_line, reason FROM raw.quarantine"
    assert rows(home, quarantined) == [(D0, str(path), 2 * 3 + 2, "missing_field:gen_ai.input.messages")]
    before = {batch: (home.landing / batch).read_bytes() for batch in report.batches}
    again = import_file(home, config, "otel", path, "assistant")  # re-importing changes nothing
    assert {batch: (home.landing / batch).read_bytes() for batch in again.batches} == before
    assert len(rows(home, quarantined)) == 1


def test_a_bandit_log_with_1_based_slots_becomes_slates_and_clicks(project, tmp_path):
    home, config = project
    path = bandit_file(tmp_path / "log.csv", BANDIT_FIRST, days=1)
    report = import_file(home, config, "bandit", path, "recommendation")
    assert report.rejected == {"invalid_value:slot": 1, "missing_field:item_id": 1}
    assert report.records == SLATES_PER_DAY * SLOTS + BAD_ROWS == report.records_mapped + BAD_ROWS
    assert report.events["interaction"] == SLATES_PER_DAY
    [batch] = report.batches
    events = [json.loads(line) for line in (home.landing / batch).read_text().splitlines()]
    first = events[0]
    assert first["interaction_id"] == "bandit-log:r0_0" and first["policy"] == "explore" and first["input"] == ""
    assert [imp["position"] for imp in first["impressions"]] == [0, 1, 2]  # 1-based slots, 0-based positions
    assert {imp["propensity"] for imp in first["impressions"]} == {1 / ITEMS}
    assert first["context"]["device"] == "ios" and set(first["context"]["features"]) == {"affinity"}
    clicks = [e for e in events if e["event_type"] == "signal"]
    assert clicks and {e["signal_type"] for e in clicks} == {"click"}
    assert rows(home, "SELECT source_line, reason FROM raw.quarantine ORDER BY 1", "recommendation") == [
        (SLATES_PER_DAY * SLOTS + 1, "invalid_value:slot"), (SLATES_PER_DAY * SLOTS + 2, "missing_field:item_id")]


def test_an_import_under_engine_spark_keeps_its_quarantine_in_the_store(tmp_path):
    raw = yaml.safe_load(project_config(tmp_path).read_text())
    raw["warehouse"] = {"engine": "spark", "root": str(tmp_path / "tables")}
    (tmp_path / "flywheel.yaml").write_text(yaml.safe_dump(raw))
    home, config = Home(tmp_path / "home").ensure(), load_config(tmp_path / "flywheel.yaml")

    import_file(home, config, "bandit", bandit_file(tmp_path / "log.csv", BANDIT_FIRST, days=1), "recommendation")

    quarantine = ParquetSource(tmp_path / "tables").read("raw.quarantine", "recommendation")
    assert sorted(zip(quarantine["source_line"], quarantine["reason"], strict=True)) == [
        (SLATES_PER_DAY * SLOTS + 1, "invalid_value:slot"), (SLATES_PER_DAY * SLOTS + 2, "missing_field:item_id")]
    assert not home.warehouse("recommendation").exists()  # no DuckDB file under spark


def test_a_slate_with_two_items_in_one_slot_is_rejected_whole(project, tmp_path):
    home, config = project
    path = tmp_path / "dup.csv"
    path.write_text("ts,impression_id,user,item_id,slot,click,pscore,device,affinity\n"
                    f"{BANDIT_FIRST}T08:00:00Z,r1,u1,a,1,1,0.5,ios,0.1\n"
                    f"{BANDIT_FIRST}T08:00:00Z,r1,u1,b,1,0,0.5,ios,0.2\n"
                    f"{BANDIT_FIRST}T08:00:00Z,r2,u1,c,1,0,1.5,ios,0.2\n")
    report = import_file(home, config, "bandit", path, "recommendation")
    assert report.rejected == {"duplicate_position": 2, "invalid_value:pscore": 1} and not report.batches


def test_a_parquet_log_imports_as_its_csv_does(project, tmp_path):
    home, config = project
    csv_path = bandit_file(tmp_path / "log.csv", BANDIT_FIRST, days=1)
    frame = pl.read_csv(csv_path).with_columns(pl.col("ts").str.to_datetime())  # a naive timestamp column
    frame.write_parquet(tmp_path / "log.parquet")
    from_csv = import_file(home, config, "bandit", csv_path, "recommendation")
    from_parquet = import_file(home, config, "bandit", tmp_path / "log.parquet", "recommendation")
    assert (home.landing / from_csv.batches[0]).read_text() == (home.landing / from_parquet.batches[0]).read_text()
    assert from_parquet.rejected == from_csv.rejected


def test_an_import_that_fails_midway_writes_no_batch(project, tmp_path, monkeypatch):
    home, config = project
    path = otel_file(tmp_path / "traces.jsonl", [D0, D0 + timedelta(days=1)], per_day=1)

    def fails_after_the_first_day(path, domain, config):
        for event in otel.read(path, domain, config):
            if isinstance(event, dict) and event["timestamp"].startswith(str(D0 + timedelta(days=1))):
                raise OSError("disk full")
            yield event

    monkeypatch.setitem(FORMATS, "otel", fails_after_the_first_day)
    with pytest.raises(OSError, match="disk full"):
        import_file(home, config, "otel", path, "assistant")
    assert not list((home.landing / "assistant").iterdir())  # neither a batch nor a temporary file


def test_importing_needs_the_domain_to_declare_its_mapping(config, home, tmp_path):
    path = bandit_file(tmp_path / "log.csv", BANDIT_FIRST, days=1)
    with pytest.raises(ConfigError, match=r"domains.recommendation.importing.bandit_log: missing"):
        import_file(home, config, "bandit", path, "recommendation")
    with pytest.raises(ConfigError, match=r"domains.assistant.importing.consent: missing"):
        import_file(home, config, "otel", otel_file(tmp_path / "t.json", [D0], 1), "assistant")
    log = dict(BANDIT_LOG, position="rank")
    importing = {"importing": Importing(consent="granted", bandit_log=BanditLog(**log))}
    declared = config.model_copy(update={"domains": {**config.domains, "recommendation": config.domains[
        "recommendation"].model_copy(update=importing)}})
    with pytest.raises(UnreadableFile, match=r"no column 'rank' \(domains.recommendation.importing.bandit_log.position"):
        import_file(home, declared, "bandit", path, "recommendation")


def test_accumulation_reads_imported_batches_and_keeps_the_import_quarantine(project, tmp_path):
    home, config = project
    path = otel_file(tmp_path / "traces.jsonl", [D0], per_day=1)
    import_file(home, config, "otel", path, "assistant")
    with warehouse.connect(home.warehouse("assistant")) as con:
        report = accumulate(con, home, config, "assistant", [D0])
    assert report.batches_read == [f"{D0}.otel-traces.jsonl"] and report.accepted["interactions"] == 3
    assert rows(home, "SELECT source_file FROM raw.quarantine") == [(str(path),)]  # the importer's row stays


def test_the_cli_prints_the_import_report_and_what_to_run_next(project, tmp_path, capsys):
    _, _ = project
    path = otel_file(tmp_path / "traces.jsonl", [D0], per_day=1)
    main(["import", "otel", str(path), "--domain", "assistant"])
    out = capsys.readouterr().out
    assert "5 records: 3 mapped, 1 rejected, 1 skipped" in out
    assert "missing_field:gen_ai.input.messages" in out and "flywheel run --domain assistant" in out


class Imported(NamedTuple):
    home: Home
    result: dg.ExecuteInProcessResult


@pytest.fixture(scope="module")
def bandit_cycle(tmp_path_factory) -> Iterator[Imported]:
    """A random logger's 1-based click log imported, then the recommendation domain's whole cycle."""
    root = tmp_path_factory.mktemp("bandit")
    with pytest.MonkeyPatch.context() as patch:
        # a uniformly random logger explores always; a click-only log waits for its clicks
        path = project_config(root, exploration_share=1.0, label_maturity={"outcome": "click"})
        patch.setenv("FLYWHEEL_CONFIG", str(path))
        for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
            patch.delenv(name, raising=False)
        home, config = Home(root / "home").activate(), load_config(path)
        import_file(home, config, "bandit", bandit_file(root / "log.csv", BANDIT_FIRST, BANDIT_DAYS),
                    "recommendation")
        instance = dg.DagsterInstance.local_temp(str(home.dagster))
        result = execute_cycle(build_definitions(config, home), instance, "recommendation", BANDIT_FIRST,
                               TODAY - timedelta(days=1))
        yield Imported(home, result)
        instance.dispose()


@pytest.mark.slow
def test_an_imported_click_log_ends_in_labelled_rows(bandit_cycle):
    home = bandit_cycle.home
    [(labelled, good, bad)] = rows(home, """SELECT count(*), count(*) FILTER (p_good > 0.5),
                                                   count(*) FILTER (p_good < 0.5)
                                            FROM labels.impression_labels WHERE domain = 'recommendation'""",
                                   "recommendation")
    assert labelled == BANDIT_DAYS * SLATES_PER_DAY * SLOTS and good > 0 and bad > 0  # "shown, not clicked" votes bad
    assert rows(home, "SELECT reason FROM raw.quarantine ORDER BY source_line", "recommendation") == [
        ("invalid_value:slot",), ("missing_field:item_id",)]


@pytest.mark.slow
def test_a_random_loggers_click_log_trains_and_gets_a_gate_decision(bandit_cycle):
    evaluations = {e.check_name: e for e in bandit_cycle.result.get_asset_check_evaluations()}
    gate = {name: value.value for name, value in evaluations["gate"].metadata.items()}
    assert gate["gate"] in ("passed", "failed", "inconclusive")
    assert "too_few_samples" not in gate["reasons"] and "undefined_metric" not in gate["reasons"], gate


@pytest.mark.slow
def test_imported_spans_end_in_labelled_rows(project, tmp_path):
    home, config = project
    days = [D0, D0 + timedelta(days=1)]
    import_file(home, config, "otel", otel_file(tmp_path / "traces.jsonl", days, per_day=4), "assistant")
    home.activate()
    instance = dg.DagsterInstance.local_temp(str(home.dagster))
    result = execute_cycle(build_definitions(config, home), instance, "assistant", days[0], days[-1],
                           asset_selection=[RAW_EVENTS, *dbt_model_keys(), LABELS])
    instance.dispose()
    assert result.success
    labelled = dict(rows(home, """SELECT CASE WHEN i.input_text LIKE 'how%' THEN 'reformulated'
                                              WHEN i.input_text LIKE 'what%' THEN 'passed' END, avg(l.p_good)
                                  FROM labels.impression_labels l JOIN marts.fct_impressions i
                                  USING (domain, event_date, interaction_id, item_id)
                                  WHERE domain = 'assistant' AND p_good IS NOT NULL GROUP BY 1"""))
    assert labelled["passed"] > 0.5 > labelled["reformulated"]  # re-asked soon: bad; passed: good
