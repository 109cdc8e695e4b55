"""Privacy: redaction on ingest, consent-denied text kept out of the models, `flywheel forget`,
retention. The end-to-end tests run one real cycle (DuckDB file, dbt, MLflow store, Dagster
instance) with canaries planted in every free-text field, then forget a user and expire old days."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from flywheel_pipeline import privacy, registry
from flywheel_pipeline.cli import main
from flywheel_pipeline.definitions import execute_cycle
from flywheel_pipeline.defs.transform import RAW_EVENTS
from flywheel_pipeline.home import Home
from flywheel_pipeline.warehouse import connect
from tests.test_accumulation import interaction, run, signal, table, write_batch
from tests.test_pipeline import DOMAIN, simulated_cycle

CANARIES = {  # what a user may paste into a product, and how it reads after redaction
    "EMAIL_ADDRESS": "canary.ada@example.com",
    "PHONE_NUMBER": "(415) 555-0199",
    "CREDIT_CARD": "4111 1111 1111 1111",
    "API_KEY": "sk_live_CANARY0123456789abcdef",
    "US_SSN": "219-09-9999",
}
PLANTED = " / ".join(CANARIES.values())
REDACTED = " / ".join(f"<{entity}>" for entity in CANARIES)


def redact(text: str | None) -> str | None:
    with duckdb.connect() as con:
        privacy.install_redaction(con)
        return con.execute("SELECT redact_pii(?)", [text]).fetchone()[0]


@pytest.mark.parametrize("text, expected", [
    (f"mail {CANARIES['EMAIL_ADDRESS']} now", "mail <EMAIL_ADDRESS> now"),
    ("call +1-780-563-6083x7783 or 415.555.0132 or +44 20 7946 0958",
     "call <PHONE_NUMBER> or <PHONE_NUMBER> or <PHONE_NUMBER>"),
    ("card 4111-1111-1111-1111, amex 3782 822463 10005", "card <CREDIT_CARD>, amex <CREDIT_CARD>"),
    ("ssn 219-09-9999", "ssn <US_SSN>"),
    ("AKIAIOSFODNN7EXAMPLE ghp_abcdefghijklmnopqrstuvwxyz0123456789 password: hunter2hunter2",
     "<API_KEY> <API_KEY> <API_KEY>"),
    (PLANTED, REDACTED),
    # what is not personal stays: a number failing Luhn, an impossible SSN, dates, prices, ids
    ("order 4111 1111 1111 1112 on 2026-11-02 09:15, 3 items at $19.99, ref e_assistant_20261101_0000001",
     "order 4111 1111 1111 1112 on 2026-11-02 09:15, 3 items at $19.99, ref e_assistant_20261101_0000001"),
    ("ssn 666-12-3456 is not issued", "ssn 666-12-3456 is not issued"),
    (None, None),
])
def test_redaction_replaces_each_kind_of_personal_data_and_nothing_else(text, expected):
    assert redact(text) == expected


def canary_events(user: str = "u_canary", day: str = "2026-11-02", session: str = "s_1") -> list[object]:
    """An interaction, its edit and a malformed line, with every canary in every free-text field."""
    candidates = [{"item_id": "r_1", "content": f"reply {PLANTED}", "propensities": [1.0]}]
    return [
        interaction("c1", user_id=user, session_id=session, timestamp=f"{day}T09:15:00Z", input=f"help {PLANTED}",
                    context={"segment": f"s1 {PLANTED}", "candidates": candidates},
                    impressions=[{"item_id": "r_1", "position": 0, "propensity": 1.0,
                                  "content": f"reply {PLANTED}"}]),
        signal("c2", user_id=user, session_id=session, timestamp=f"{day}T09:16:00Z", interaction_id="i_c1", signal_type="edit",
               text=f"edited {PLANTED}"),
        json.dumps(interaction("c3", user_id=user, input=PLANTED))[:-40],  # malformed: cut short
    ]


def test_accumulation_redacts_every_free_text_field_and_the_quarantined_line(home, config):
    write_batch(home, "2026-11-02", canary_events())

    report = run(home, config)

    assert report.accepted["interactions"] == 1 and report.accepted["signals"] == 1 and report.reconciles
    assert table(home, "SELECT input_text, context->>'segment', context->'$.candidates[0]'->>'content' "
                       "FROM raw.interactions") == [(f"help {REDACTED}", f"s1 {REDACTED}", f"reply {REDACTED}")]
    assert table(home, "SELECT content FROM raw.impressions") == [(f"reply {REDACTED}",)]
    assert table(home, "SELECT text FROM raw.signals") == [(f"edited {REDACTED}",)]
    [(reason, line)] = table(home, "SELECT reason, line FROM raw.quarantine")
    assert reason == "malformed_json" and REDACTED in line
    assert not tables_holding(home, *CANARIES.values())


def test_json_escapes_hide_nothing(home, config):
    escaped = json.dumps(interaction("e1", input="call\n415-555-0199 or ada@example.com"))
    write_batch(home, "2026-11-02", [escaped.replace("@", "\\u0040"),  # accepted
                                     escaped.replace("e1", "e2")[:-5],  # malformed: kept, redacted
                                     escaped.replace("@", "\\u0040").replace("e1", "e3")[:-5]])  # not kept

    run(home, config)

    assert table(home, "SELECT input_text FROM raw.interactions") == [("call\n<PHONE_NUMBER> or <EMAIL_ADDRESS>",)]
    assert [line is None for (line,) in table(home, "SELECT line FROM raw.quarantine ORDER BY source_line")] == [
        False, True]
    assert not tables_holding(home, "555-0199", "ada@", "ada\\u0040")


def test_a_forgotten_users_replayed_events_are_quarantined_empty_and_counted(home, config):
    write_batch(home, "2026-11-02", [*canary_events(), interaction("other")])
    run(home, config)
    forgotten = privacy.forget_user(home, config.domains, "u_canary")
    with connect(home.warehouse("recommendation"), read_only=True) as con:  # no warehouse before: one now
        assert con.execute("SELECT user_hash FROM privacy.forgotten_users").fetchall() == [
            (privacy.user_hash("u_canary"),)]
    assert forgotten.landing_lines_removed == {"assistant/2026-11-02.jsonl": 3}
    assert "u_canary" not in (home.landing / "assistant" / "2026-11-02.jsonl").read_text()
    write_batch(home, "2026-11-03", canary_events(day="2026-11-02"))  # the same events delivered again

    report = run(home, config, dates=(date(2026, 11, 2), date(2026, 11, 3)))

    assert report.accepted["interactions"] == 1 and report.reconciles
    assert report.reasons == {"forgotten_user": 3}  # the malformed line too: its user_id is readable
    assert table(home, "SELECT event_id, line FROM raw.quarantine") == [(None, None)] * 3
    assert not tables_holding(home, "u_canary")


def tables_holding(home: Home, *needles: str) -> list[str]:
    """Warehouse tables with a row whose text (any column, as text) contains a needle."""
    found = []
    params = {f"n{n}": needle for n, needle in enumerate(needles)}
    with connect(home.warehouse("assistant"), read_only=True) as con:
        tables = con.execute("""SELECT table_schema || '.' || table_name, list(column_name)
                                FROM information_schema.columns WHERE table_catalog = current_database()
                                GROUP BY ALL ORDER BY 1""").fetchall()
        for name, columns in tables:
            matches = " OR ".join(f'contains(CAST("{column}" AS VARCHAR), ${needle})'
                                  for column in columns for needle in params)
            if con.execute(f"SELECT count(*) FROM {name} WHERE {matches}", params).fetchone()[0]:
                found.append(name)
    return found


DAYS = 24
LAST = datetime.now(UTC).date() - timedelta(days=1)
FIRST = LAST - timedelta(days=DAYS - 1)
CANARY_DAY = FIRST + timedelta(days=8)  # in the training window
DENIED = "consent-denied-marker-7f3a"  # text a user did not consent to have used


def planted_events() -> list[object]:
    """Canaries in every free-text field of a kept interaction, and a consent-denied one."""
    day = CANARY_DAY.isoformat()
    denied = [
        interaction("d1", user_id="u_denied", session_id="s_denied", timestamp=f"{day}T10:00:00Z",
                    consent="denied", input=f"please {DENIED}",
                    impressions=[{"item_id": "r_1", "position": 0, "propensity": 1.0, "content": DENIED}]),
        signal("d2", user_id="u_denied", session_id="s_denied", timestamp=f"{day}T10:01:00Z",
               interaction_id="i_d1", signal_type="edit", text=DENIED),
    ]
    return [*canary_events(day=day, session="s_canary"), *denied]


@pytest.fixture(scope="module")
def cycle(tmp_path_factory):
    """One assistant cycle over 24 simulated days with the planted events in one day's batch."""
    def plant(home: Home) -> None:
        with home.landing_file(DOMAIN, CANARY_DAY.isoformat()).open("a") as batch:
            batch.writelines((line if isinstance(line, str) else json.dumps(line)) + "\n"
                             for line in planted_events())

    with simulated_cycle(tmp_path_factory.mktemp("privacy"), FIRST, LAST, before=plant) as cycle:
        yield cycle


def files_holding(where: Path, *needles: str) -> list[str]:
    """Files at or under ``where`` whose bytes hold a needle."""
    files = sorted(where.rglob("*")) if where.is_dir() else [where]
    return [str(path) for path in files
            if path.is_file() and any(needle.encode() in path.read_bytes() for needle in needles)]


@pytest.mark.slow
def test_canaries_reach_no_table_no_mlflow_artifact_and_no_dagster_event(cycle):
    home, _, _, instance, result = cycle
    assert result.success
    assert not tables_holding(home, *CANARIES.values())
    [(kept,)] = rows(home, "SELECT input_text FROM marts.fct_impressions WHERE interaction_id = 'i_c1'")
    assert kept == f"help {REDACTED}"  # the planted interaction went all the way, redacted

    assert not files_holding(home.mlflow, *CANARIES.values())
    examples = list(home.mlflow.rglob("input_example.json"))
    assert examples  # made up: no simulated user's id or query in it
    for example in examples:
        assert "u_" not in example.read_text() and "example user_id" in example.read_text()

    assert not files_holding(home.dagster, *CANARIES.values())
    outside_landing = [path for path in home.root.iterdir() if path.name not in ("landing", "simulator")]
    assert not [found for path in outside_landing for found in files_holding(path, *CANARIES.values())]
    logs = [str(entry) for run in instance.get_runs() for entry in instance.all_logs(run.run_id)]
    assert len(logs) > 100 and not [entry for entry in logs if any(c in entry for c in CANARIES.values())]


@pytest.mark.slow
def test_consent_denied_text_stays_in_the_raw_layer(cycle):
    home = cycle.home
    assert tables_holding(home, DENIED) == ["raw.impressions", "raw.interactions", "raw.signals"]
    assert rows(home, "SELECT drop_reason, input_text FROM intermediate.int_interactions_flagged "
                      "WHERE interaction_id = 'i_d1'") == [("consent_denied", None)]


@pytest.mark.slow
def test_forget_deletes_the_user_everywhere_and_a_replay_does_not_bring_them_back(cycle, monkeypatch, capsys):
    home, _, defs, instance, _ = cycle
    batch = home.landing_file(DOMAIN, CANARY_DAY.isoformat())
    theirs = [line for line in batch.read_text().splitlines() if "u_canary" in line]
    monkeypatch.setenv("FLYWHEEL_HOME", str(home.root))

    main(["forget", "--user", "u_canary"])

    printed = capsys.readouterr().out
    assert "3 lines from 1 landing batches" in printed
    assert f"{registry.model_name(DOMAIN)} v1" in printed  # its training window holds the user's day
    assert not tables_holding(home, "u_canary", "i_c1", f"help {REDACTED}")
    assert not files_holding(home.landing, "u_canary")
    assert rows(home, "SELECT user_hash FROM privacy.forgotten_users") == [(privacy.user_hash("u_canary"),)]

    replay = home.landing_file(DOMAIN, (CANARY_DAY + timedelta(days=1)).isoformat())
    with replay.open("a") as late:
        late.writelines(line + "\n" for line in theirs)
    again = execute_cycle(defs, instance, DOMAIN, CANARY_DAY, CANARY_DAY + timedelta(days=1),
                          asset_selection=[RAW_EVENTS])
    assert again.success
    assert not tables_holding(home, "u_canary")
    reasons = " ".join(str(e.materialization.metadata["quarantine_reasons"].value)
                       for e in again.get_asset_materialization_events())
    assert "forgotten_user: 2" in reasons and "forgotten_user: 1" in reasons  # malformed line: batch day


@pytest.mark.slow
def test_retention_deletes_the_days_past_it_from_every_table_and_the_landing_batches(cycle):
    home, config, defs, instance, _ = cycle
    retention = config.domain(DOMAIN).retention_days
    cutoff = FIRST + timedelta(days=5)
    today = cutoff + timedelta(days=retention)
    schedule = defs.resolve_schedule_def("retention_daily")
    # as a context manager: it enters an instance of its own, which must not outlive the test
    with dg.build_schedule_context(instance=instance,
                                   scheduled_execution_time=datetime(today.year, today.month, today.day, 4)) as context:
        requests = {request.tags["flywheel/warehouse"]: request for request in schedule.evaluate_tick(context).run_requests}
    assert sorted(requests) == sorted(config.domains)  # one run per domain's warehouse
    request = requests[DOMAIN]

    job = defs.resolve_job_def("enforce_retention")
    assert job.execute_in_process(run_config=request.run_config, instance=instance).success

    with connect(home.warehouse("assistant")) as con:
        dated = con.execute("""SELECT table_schema || '.' || table_name FROM information_schema.columns
                               WHERE column_name = 'event_date' AND table_schema <> 'staging'""").fetchall()
        for (name,) in dated:
            oldest = con.execute(f"SELECT min(event_date) FROM {name} WHERE domain = 'assistant'").fetchone()[0]
            assert oldest is None or oldest >= cutoff, name
        orphans = con.execute("""SELECT count(*) FROM intermediate.int_impression_signals
                                 WHERE interaction_id NOT IN (SELECT interaction_id FROM raw.interactions)""")
        assert orphans.fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM raw.interactions WHERE domain = 'assistant'").fetchone()[0] > 0
    batches = sorted(path.stem for path in (home.landing / DOMAIN).glob("*.jsonl"))
    assert batches[0] == cutoff.isoformat() and batches[-1] == LAST.isoformat()
    assert len(list((home.landing / "recommendation").glob("*.jsonl"))) == DAYS  # its 365 days reach back


def rows(home: Home, sql: str) -> list[tuple]:
    with connect(home.warehouse("assistant"), read_only=True) as con:
        return con.execute(sql).fetchall()
