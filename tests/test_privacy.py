"""Privacy: redaction on ingest, consent-denied text kept out of the models, `flywheel forget`,
retention. The end-to-end tests run one real cycle (DuckDB file, dbt, MLflow store, Dagster
instance) with canaries planted in every field at any depth, then forget users and expire old days."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import mlflow
import pytest

from flywheel_pipeline import groups, privacy, registry
from flywheel_pipeline.cli import main
from flywheel_pipeline.definitions import execute_cycle
from flywheel_pipeline.defs.transform import RAW_EVENTS
from flywheel_pipeline.home import Home
from flywheel_pipeline.warehouse import connect
from flywheel_pipeline.warehouses import Warehouses
from tests.test_accumulation import interaction, label, run, signal, table, write_batch
from tests.test_pipeline import DOMAIN, simulated_cycle

CANARIES = {  # what a user may paste into a product, and how it reads after redaction
    "EMAIL_ADDRESS": "canary.ada@example.com",
    "PHONE_NUMBER": "(415) 555-0199",
    "CREDIT_CARD": "4111 1111 1111 1111",
    "API_KEY": "sk_live_CANARY0123456789abcdef",
    "US_SSN": "219-09-9999",
    "IBAN_CODE": "GB82 WEST 1234 5698 7654 32",
    "IP_ADDRESS": "203.0.113.42",
}
AFTER_A_GROUP = "4539 1488 0343 6467"  # a card number after another group of four digits
IPV6 = "2001:db8:85a3::8a2e:370:7334"
PLANTED = " / ".join(CANARIES.values()) + f" / ref 1234 {AFTER_A_GROUP} / {IPV6}"
REDACTED = " / ".join(f"<{entity}>" for entity in CANARIES) + " / ref 1234 <CREDIT_CARD> / <IP_ADDRESS>"
NEEDLES = (*CANARIES.values(), AFTER_A_GROUP, IPV6)


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
    # a card after another group of digits (a reference, a year, an SSN's last group): every span is tried
    ("ref 1234 4539 1488 0343 6467, paid 2026 4111 1111 1111 1111", "ref 1234 <CREDIT_CARD>, paid 2026 <CREDIT_CARD>"),
    ("ssn 219-09-9999 4111 1111 1111 1111", "ssn <US_SSN> <CREDIT_CARD>"),
    ("iban DE89370400440532013000 or GB82 WEST 1234 5698 7654 32", "iban <IBAN_CODE> or <IBAN_CODE>"),
    ("from 192.168.1.10, 2001:0db8:0000:0000:0000:8a2e:0370:7334 and 2001:db8::1",
     "from <IP_ADDRESS>, <IP_ADDRESS> and <IP_ADDRESS>"),
    # an IBAN failing mod 97 (a letter in it), times, C++ scopes, versions, an address out of range stay
    ("GB82 WEST 1234 5698 7654 33 at 10:30:45 in std::vector or abc::def, v1.2.3, 256.1.1.1",
     "GB82 WEST 1234 5698 7654 33 at 10:30:45 in std::vector or abc::def, v1.2.3, 256.1.1.1"),
    # what is not personal stays: a number failing Luhn, an impossible SSN, dates, prices, ids
    ("order 4111 1111 1111 1112 on 2026-11-02 09:15, 3 items at $19.99, ref e_assistant_20261101_0000001",
     "order 4111 1111 1111 1112 on 2026-11-02 09:15, 3 items at $19.99, ref e_assistant_20261101_0000001"),
    ("ssn 666-12-3456 is not issued", "ssn 666-12-3456 is not issued"),
    (None, None),
])
def test_redaction_replaces_each_kind_of_personal_data_and_nothing_else(text, expected):
    assert redact(text) == expected


def forget(home: Home, config, user: str) -> privacy.ForgetReport:
    """``flywheel forget``'s deletion, without its printing."""
    warehouses = Warehouses.for_settings(home, config.warehouse)
    return privacy.forget_user(home, config.domains, user, warehouses.for_deletion)


def canary_events(user: str = "u_canary", day: str = "2026-11-02", session: str = "s_1") -> list[object]:
    """An interaction, its edit and a malformed line, with every canary in every free-text field,
    context's at any depth."""
    candidates = [{"item_id": "r_1", "content": f"reply {PLANTED}", "propensities": [1.0]}]
    deep = {"a": [{"b": {"c": [{"d": f"deep {PLANTED}"}]}}]}
    return [
        interaction("c1", user_id=user, session_id=session, timestamp=f"{day}T09:15:00Z", input=f"help {PLANTED}",
                    context={"segment": f"s1 {PLANTED}", "candidates": candidates, "deep": deep},
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
    assert table(home, "SELECT input_text, context->>'segment', context->'$.candidates[0]'->>'content', "
                       "context->'$.deep.a[0].b.c[0]'->>'d' FROM raw.interactions") == [
        (f"help {REDACTED}", f"s1 {REDACTED}", f"reply {REDACTED}", f"deep {REDACTED}")]
    assert table(home, "SELECT content FROM raw.impressions") == [(f"reply {REDACTED}",)]
    assert table(home, "SELECT text FROM raw.signals") == [(f"edited {REDACTED}",)]
    [(reason, line)] = table(home, "SELECT reason, line FROM raw.quarantine")
    assert reason == "malformed_json" and REDACTED in line
    assert not tables_holding(home, *NEEDLES)


def unsafe_ids(user: str = "u_ids", day: str = "2026-11-02") -> list[tuple[str, dict]]:
    """Events whose ids hold personal data, each with the reason it is quarantined with."""
    at, item = f"{day}T09:20:00Z", {"position": 0, "propensity": 1.0, "content": "ok"}
    common = {"user_id": user, "timestamp": at}
    outcome = {**signal("x", **common), "event_type": "outcome", "name": CANARIES["IBAN_CODE"].replace(" ", ""),
               "value": 1.0}
    del outcome["signal_type"]
    return [
        ("unsafe_id:model_version", interaction("x1", **common, model_version=CANARIES["US_SSN"])),
        ("unsafe_id:impressions.item_id", interaction("x2", **common, impressions=[
            {**item, "item_id": CANARIES["EMAIL_ADDRESS"]}])),
        ("unsafe_id:item_id", signal("x3", **common, signal_type="click", item_id=CANARIES["IP_ADDRESS"])),
        ("unsafe_id:reviewer", label("x4", **common, reviewer=CANARIES["CREDIT_CARD"].replace(" ", "-"))),
        ("unsafe_id:name", {**outcome, "event_id": "x5"}),
        ("unsafe_id:session_id", interaction("x6", **common, session_id="415-555-0199")),
        ("unsafe_id:interaction_id", signal("x7", **common, interaction_id=IPV6)),
        ("unsafe_id:event_id", interaction(CANARIES["US_SSN"], **common, interaction_id="i_x9")),
        ("user_id_not_pseudonymous", interaction("x8", **{**common, "user_id": CANARIES["US_SSN"]})),
        ("user_id_not_pseudonymous", interaction("x10", **{**common, "user_id": f"u_{CANARIES['US_SSN']}"})),
    ]


def test_an_id_holding_personal_data_is_quarantined_and_counted_and_kept_nowhere(home, config):
    safe = [interaction("ok", model_version="3"), interaction("ok2", user_id="item_090", session_id="1.2.3"),
            # numbers are no phone or card numbers in an id: a timestamp (Luhn-valid), a counter, an order
            interaction("1730539200007", user_id="order-4155550132", session_id="e_assistant_d0000_0000007_100")]
    write_batch(home, "2026-11-02", [*(event for _, event in unsafe_ids()), *safe])

    report = run(home, config)

    assert report.reasons == Counter(reason for reason, _ in unsafe_ids()) and report.reconciles
    assert report.accepted["interactions"] == len(safe)
    assert ("<US_SSN>", "unsafe_id:event_id") in table(home, "SELECT event_id, reason FROM raw.quarantine")
    assert not tables_holding(home, *NEEDLES, CANARIES["IBAN_CODE"].replace(" ", ""), "415-555-0199")


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
    forgotten = forget(home, config, "u_canary")
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


def test_forget_finds_the_user_in_a_gzipped_batch_which_stays_a_batch_accumulation_reads(home, config):
    theirs = [interaction("g1", user_id="u_gone"), signal("g2", user_id="u_gone", interaction_id="i_g1"),
              '{"event_id": "g3", "user_id": "u_gone", "input": ']  # malformed: its user is still read
    others = [interaction("g4", user_id="u_kept"), interaction("g5", user_id="u_kept", input='"u_gone" asked this')]
    lines = [json.dumps(line) if isinstance(line, dict) else line for line in (*theirs, *others)]
    batch = home.landing / "assistant" / "2026-11-02.jsonl"
    batch.parent.mkdir(parents=True)
    batch.write_bytes(gzip.compress("\n".join(lines[i] for i in (0, 3, 1, 4, 2)).encode() + b"\n"))
    assert run(home, config).accepted["interactions"] == 3

    forgotten = forget(home, config, "u_gone")

    assert forgotten.landing_lines_removed == {"assistant/2026-11-02.jsonl": 3}
    assert batch.read_bytes()[:2] == b"\x1f\x8b"  # still gzip
    assert gzip.decompress(batch.read_bytes()).decode().splitlines() == lines[3:]  # the others' lines as they were
    report = run(home, config)
    assert report.accepted["interactions"] == 2 and report.lines_in == 2 and report.reconciles
    assert table(home, "SELECT DISTINCT user_id FROM raw.interactions") == [("u_kept",)]


def test_a_user_whose_id_is_another_users_item_or_version_is_forgotten_and_no_one_else(home, config):
    shows_them = {"item_id": "item_090", "position": 0, "propensity": 1.0, "content": "an item"}
    write_batch(home, "2026-11-02", [
        interaction("a1", user_id="item_090"), interaction("a2", user_id="3"),
        interaction("b1", user_id="u_other", session_id="3", model_version="3", impressions=[shows_them]),
        signal("b2", user_id="u_other", session_id="3", interaction_id="i_b1", signal_type="click", item_id="item_090"),
        '{"event_id": "b3", "user_id": "u_other", "item_id": "item_090", ',  # malformed, quarantined
    ])
    run(home, config)
    others = "SELECT * FROM raw.{} WHERE user_id = 'u_other'"
    before = {name: table(home, others.format(name)) for name in ("interactions", "signals")}
    quarantined = table(home, "SELECT line FROM raw.quarantine")

    for user in ("item_090", "3"):
        forget(home, config, user)  # raised PrivacyError: "3" is in other rows

    assert table(home, "SELECT DISTINCT user_id FROM raw.interactions") == [("u_other",)]
    assert {name: table(home, others.format(name)) for name in before} == before
    assert table(home, "SELECT line FROM raw.quarantine") == quarantined
    assert [json.loads(line)["event_id"] for line in (home.landing / "assistant" / "2026-11-02.jsonl").read_text()
            .splitlines()[:2]] == ["b1", "b2"]


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
HELD_OUT_DAY = LAST - timedelta(days=6)  # the held-out window's first day
SEGMENT = "Ada Lovelace, segment canary"  # a segment's text: no personal data a pattern finds
SHOWN: dict[str, str] = {}  # an item the simulated users were shown on CANARY_DAY (set by plant)


def planted_events(shown_item: str) -> list[object]:
    """Canaries in every field of a kept interaction (ids: each in its own quarantined event), a
    consent-denied interaction (context too), and one of a user whose id is an item others were shown."""
    day = CANARY_DAY.isoformat()
    denied = [
        interaction("d1", user_id="u_denied", session_id="s_denied", timestamp=f"{day}T10:00:00Z",
                    consent="denied", input=f"please {DENIED}", context={"segment": DENIED, "deep": {"x": [DENIED]}},
                    impressions=[{"item_id": "r_1", "position": 0, "propensity": 1.0, "content": DENIED}]),
        signal("d2", user_id="u_denied", session_id="s_denied", timestamp=f"{day}T10:01:00Z",
               interaction_id="i_d1", signal_type="edit", text=DENIED),
    ]
    item_user = interaction("n1", user_id=shown_item, session_id="s_item_user", timestamp=f"{day}T11:00:00Z",
                            input="How do I reset my password?")
    return [*canary_events(day=day, session="s_canary"), *(event for _, event in unsafe_ids(day=day)), *denied,
            item_user]


def first_item_shown(batch: Path) -> str:
    """The item of a simulated batch's first impression."""
    return next(event["impressions"][0]["item_id"] for event in map(json.loads, batch.read_text().splitlines())
                if event.get("event_type") == "interaction")


@pytest.fixture(scope="module")
def cycle(tmp_path_factory):
    """One assistant cycle over 24 simulated days with the planted events in one day's batch."""
    def plant(home: Home) -> None:
        path = home.landing_file(DOMAIN, CANARY_DAY.isoformat())
        SHOWN["item"] = first_item_shown(path)
        with path.open("a") as batch:
            batch.writelines((line if isinstance(line, str) else json.dumps(line)) + "\n"
                             for line in planted_events(SHOWN["item"]))
        held_out = interaction("h1", user_id="u_segment", session_id="s_segment", input="What is a computer?",
                               timestamp=f"{HELD_OUT_DAY}T09:00:00Z", context={"segment": SEGMENT})
        with home.landing_file(DOMAIN, HELD_OUT_DAY.isoformat()).open("a") as batch:
            batch.write(json.dumps(held_out) + "\n")

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
    assert not tables_holding(home, *NEEDLES)
    [(kept,)] = rows(home, "SELECT input_text FROM marts.fct_impressions WHERE interaction_id = 'i_c1'")
    assert kept == f"help {REDACTED}"  # the planted interaction went all the way, redacted
    quarantined = rows(home, "SELECT reason FROM raw.quarantine WHERE contains(line, 'u ids') "  # read as a space
                             "OR (reason = 'user_id_not_pseudonymous' AND contains(line, 'US_SSN'))")
    assert Counter(reason for (reason,) in quarantined) == Counter(reason for reason, _ in unsafe_ids())

    assert not files_holding(home.mlflow, *NEEDLES)
    examples = list(home.mlflow.rglob("input_example.json"))
    assert examples  # made up: no simulated user's id or query in it
    for example in examples:
        assert "u_" not in example.read_text() and "example user_id" in example.read_text()

    assert not files_holding(home.dagster, *NEEDLES)
    outside_landing = [path for path in home.root.iterdir() if path.name not in ("landing", "simulator")]
    assert not [found for path in outside_landing for found in files_holding(path, *NEEDLES)]
    logs = [str(entry) for run in instance.get_runs() for entry in instance.all_logs(run.run_id)]
    assert len(logs) > 100 and not [entry for entry in logs if any(c in entry for c in NEEDLES)]


@pytest.mark.slow
def test_a_segment_names_a_validation_slice_by_its_hash_never_its_text(cycle):
    home, instance = cycle.home, cycle.instance
    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    slice_name = f"segment_{groups.anonymous(SEGMENT)}"
    assert any(key.startswith(f"{slice_name}/") for run in runs for key in run.data.metrics)  # it was a slice
    assert not files_holding(home.mlflow, SEGMENT, SEGMENT.replace(" ", "_"))
    assert not files_holding(home.dagster, SEGMENT, SEGMENT.replace(" ", "_"))
    logs = [str(entry) for run in instance.get_runs() for entry in instance.all_logs(run.run_id)]
    assert not [entry for entry in logs if SEGMENT.replace(" ", "_") in entry or SEGMENT in entry]


@pytest.mark.slow
def test_consent_denied_text_stays_in_the_raw_layer(cycle):
    home = cycle.home
    assert tables_holding(home, DENIED) == ["raw.impressions", "raw.interactions", "raw.signals"]
    assert rows(home, "SELECT drop_reason, input_text, segment, context_features "
                      "FROM intermediate.int_interactions_flagged WHERE interaction_id = 'i_d1'") == [
        ("consent_denied", None, None, "{}")]


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
def test_forget_a_user_whose_id_is_an_item_others_were_shown(cycle, monkeypatch):
    home, item = cycle.home, SHOWN["item"]
    shown_to_others = f"SELECT count(*) FROM marts.fct_impressions WHERE item_id = '{item}' AND user_id <> '{item}'"
    [(before,)] = rows(home, shown_to_others)
    assert before and rows(home, f"SELECT count(*) FROM raw.interactions WHERE user_id = '{item}'") == [(1,)]
    monkeypatch.setenv("FLYWHEEL_HOME", str(home.root))

    main(["forget", "--user", item])  # returns: exit 0 (a PrivacyError exits 1)

    assert rows(home, f"SELECT count(*) FROM raw.interactions WHERE user_id = '{item}'") == [(0,)]
    assert rows(home, shown_to_others) == [(before,)]
    users = landing_users(home.landing_file(DOMAIN, CANARY_DAY.isoformat()))
    assert item not in users and len(users) > 100


def landing_users(batch: Path) -> list[object]:
    """The user field of each line of a landing batch that parses as an object."""
    def parsed(line: str) -> object:
        try:
            return json.loads(line)
        except ValueError:
            return None

    return [event.get("user_id") for event in map(parsed, batch.read_text().splitlines()) if isinstance(event, dict)]


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
