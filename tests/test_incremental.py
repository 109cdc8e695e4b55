"""dbt incremental per (day, domain) partition: a sequence of partition runs after new rows land
(a late outcome for an earlier day, a session across midnight, a redelivery, a returning user)
leaves intermediate and marts exactly as a build from scratch does."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, date, datetime, time, timedelta

import dagster as dg
import pytest

from flywheel_pipeline import simulation, warehouse
from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.config import load_config
from flywheel_pipeline.defs.partitions import range_tags
from flywheel_pipeline.defs.transform import build_dbt_assets, dbt_resource
from flywheel_pipeline.home import Home
from tests.conftest import REPO
from tests.test_accumulation import interaction

pytestmark = pytest.mark.slow  # dbt builds of partitions, from scratch and one by one

DOMAIN = "assistant"
D0 = date(2026, 11, 2)
D3, D4 = D0 + timedelta(days=3), D0 + timedelta(days=4)
NIGHT_SESSION = "s_across_midnight"  # 20 interactions before midnight, 15 after: 35 > bot_max_interactions


def build(home: Home, config, first: date, last: date) -> None:
    """One Dagster run of the dbt assets over DOMAIN's days first..last."""
    result = dg.materialize([build_dbt_assets(config)], resources={"dbt": dbt_resource(home, config)},
                            tags=range_tags(DOMAIN, first, last), instance=dg.DagsterInstance.ephemeral())
    assert result.success


def accumulate_days(home: Home, config, first: date, last: date) -> None:
    days = [first + timedelta(days=offset) for offset in range((last - first).days + 1)]
    with warehouse.connect(home.warehouse(DOMAIN)) as con:
        accumulate(con, home, config, DOMAIN, days, now=datetime.combine(D4 + timedelta(days=1), time(), UTC))


def rows(home: Home, sql: str) -> list[tuple]:
    with warehouse.connect(home.warehouse(DOMAIN), read_only=True) as con:
        return con.execute(sql).fetchall()


def iso(day: date, seconds: int) -> str:
    return (datetime.combine(day, time(), UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def land(home: Home, day: date, events: list[dict]) -> None:
    """Add events to the product's landing batch of ``day``."""
    with (home.landing / DOMAIN / f"{day}.jsonl").open("a") as batch:
        batch.writelines(json.dumps(event) + "\n" for event in events)


def night_session() -> dict[date, list[dict]]:
    """One user's session from 23:50 to 00:07, an interaction every 30 s, each day under the bot limit."""
    events = [interaction(f"night_{n}", user_id="u_night", session_id=NIGHT_SESSION, interaction_id=f"i_night_{n}",
                          input=f"question number {n}", timestamp=iso(D3, 86400 - 600 + 30 * n))
              for n in range(35)]
    return {D3: events[:20], D4: events[20:]}


def late_arrivals(home: Home) -> list[dict]:
    """A late outcome for a D0 interaction and a redelivery of a D1 interaction, both on D3."""
    [(outcome_for, user, session)] = rows(home, f"""
        SELECT interaction_id, user_id, session_id FROM marts.fct_interactions
        WHERE domain = '{DOMAIN}' AND event_date = DATE '{D0}' AND NOT has_outcome ORDER BY interaction_id LIMIT 1""")
    [(redelivered, redelivered_user, redelivered_session)] = rows(home, f"""
        SELECT interaction_id, user_id, session_id FROM marts.fct_interactions
        WHERE domain = '{DOMAIN}' AND event_date = DATE '{D0 + timedelta(days=1)}' ORDER BY interaction_id LIMIT 1""")
    outcome = {"event_id": "late_outcome", "event_type": "outcome", "domain": DOMAIN, "timestamp": iso(D3, 43200),
               "user_id": user, "session_id": session, "interaction_id": outcome_for, "name": "resolved", "value": 1.0}
    redelivery = interaction("redelivery", interaction_id=redelivered, user_id=redelivered_user,
                             session_id=redelivered_session, timestamp=iso(D3, 3600))
    return [outcome, redelivery]


@pytest.fixture(scope="module")
def incremental(tmp_path_factory):
    """Days D0..D2 built; then D3..D4 land with the special cases; then the runs the pipeline makes:
    D4 alone (a cycle run), then D0..D3 (D0's late outcome, D3's new day)."""
    config = load_config(REPO / "flywheel.yaml")
    home = Home(tmp_path_factory.mktemp("incremental") / "home").ensure()
    simulation.simulate(home, config, D0, 3, seed=5, interactions_per_day=60, domains=[DOMAIN])
    accumulate_days(home, config, D0, D0 + timedelta(days=2))
    build(home, config, D0, D0 + timedelta(days=2))  # the first build: the tables are created

    simulation.simulate(home, config, D3, 2, seed=5, interactions_per_day=60, domains=[DOMAIN])
    land(home, D3, late_arrivals(home))
    for day, events in night_session().items():
        land(home, day, events)
    accumulate_days(home, config, D3, D4)
    build(home, config, D4, D4)
    after_d4 = rows(home, f"""SELECT drop_reason, is_new_user, count(*) FROM intermediate.int_interactions_flagged
                              WHERE session_id = '{NIGHT_SESSION}' GROUP BY ALL""")
    build(home, config, D0, D3)
    return home, config, after_d4


def test_a_session_across_midnight_is_judged_whole_when_only_its_second_day_is_built(incremental):
    _, _, after_d4 = incremental
    assert after_d4 == [("bot_session", False, 15)]  # D3's 20 counted too; u_night was new on D3


def test_a_late_outcome_reaches_its_interactions_day(incremental):
    home, _, _ = incremental
    assert rows(home, """SELECT DISTINCT event_date, outcome_name, outcome_at::DATE FROM marts.fct_impressions
                         WHERE interaction_id = (SELECT interaction_id FROM raw.outcomes
                                                 WHERE event_id = 'late_outcome')""") == [(D0, "resolved", D3)]


def test_partition_runs_leave_what_a_build_from_scratch_leaves(incremental, tmp_path):
    home, config, _ = incremental
    scratch = Home(tmp_path / "scratch").ensure()
    shutil.copy(home.warehouse(DOMAIN), scratch.warehouse(DOMAIN))
    with warehouse.connect(scratch.warehouse(DOMAIN)) as con:
        con.execute("DROP SCHEMA intermediate CASCADE; DROP SCHEMA marts CASCADE")
    build(scratch, config, D0, D4)  # no tables yet: every day in one run
    with warehouse.connect(home.warehouse(DOMAIN), read_only=True) as con:
        con.execute(f"ATTACH '{scratch.warehouse(DOMAIN)}' AS scratch (READ_ONLY)")
        tables = con.execute("""SELECT table_schema, table_name FROM information_schema.tables
                                WHERE table_catalog = current_database() AND table_type = 'BASE TABLE'
                                  AND table_schema IN ('intermediate', 'marts') ORDER BY ALL""").fetchall()
        assert len(tables) == 7
        for schema, table in tables:
            ours, theirs = f"{schema}.{table}", f"scratch.{schema}.{table}"
            assert con.execute(f"SELECT count(*) FROM {ours}").fetchone() == con.execute(
                f"SELECT count(*) FROM {theirs}").fetchone(), ours
            assert con.execute(f"SELECT count(*) FROM ((FROM {ours} EXCEPT ALL FROM {theirs}) UNION ALL "
                               f"(FROM {theirs} EXCEPT ALL FROM {ours}))").fetchone() == (0,), ours


def test_a_redelivery_on_a_later_day_is_a_duplicate(incremental):
    home, _, _ = incremental
    assert rows(home, """SELECT drop_reason FROM intermediate.int_interactions_flagged
                         WHERE interaction_event_id = 'redelivery'""") == [("duplicate_interaction",)]


def parses(home: Home) -> list[str]:
    """How each dbt invocation on DOMAIN's warehouse in ``home`` parsed the project, in order:
    "full", "none" (its last run's parse reused: nothing changed) or "partial", from the dbt.log
    of the domain's target folder."""
    log = dbt_resource(home, load_config(REPO / "flywheel.yaml")).target_folder(DOMAIN) / "dbt.log"
    kinds = []
    for event in map(json.loads, log.read_text().splitlines()):
        name = event["info"]["name"]
        if name == "MainReportVersion":
            kinds.append("partial")
        elif name == "UnableToPartialParse":
            kinds[-1] = "full"
        elif "skipping parsing" in event["info"]["msg"]:
            kinds[-1] = "none"
    return kinds


def test_a_run_for_other_days_reuses_the_parsed_project(incremental):
    """The days reach dbt in the environment, not as --vars: the fixture's second and third runs
    (other days) parse nothing, where each new --vars made dbt parse every file again."""
    home, _, _ = incremental
    assert parses(home)[:3] == ["full", "none", "none"]


def test_dbt_connects_with_the_configured_memory_limit(incremental):
    home, config, _ = incremental
    limited = config.model_copy(update={"warehouse": config.warehouse.model_copy(update={"memory_limit": "1GB"})})
    invocation = dbt_resource(home, limited).cli(
        ["show", "--inline", "select current_setting('memory_limit') as memory_limit"], domain=DOMAIN)
    [preview] = [event.raw_event["data"]["preview"] for event in invocation.stream_raw_events()
                 if event.raw_event["info"]["name"] == "ShowNode"]
    assert "953.6 MiB" in preview  # DuckDB's 1GB
