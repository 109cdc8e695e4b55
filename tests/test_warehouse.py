"""One warehouse file per domain: a home kept before in one shared file is split, and refused until it is."""

from __future__ import annotations

from datetime import date

import dagster as dg
import pytest
from dagster._utils.concurrency import ConcurrencySlotStatus
from dagster._utils.tags import TagConcurrencyLimitsCounter

from flywheel_pipeline import approval, warehouse
from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.cli import main
from flywheel_pipeline.config import WarehouseSettings
from flywheel_pipeline.definitions import build_definitions
from flywheel_pipeline.defs.jobs import cycle_job_name
from flywheel_pipeline.defs.sensors import domain_cursors, relabel_requests
from flywheel_pipeline.defs.transform import DBT_POOL, build_dbt_assets
from flywheel_pipeline.home import Home, HomeError
from tests.test_accumulation import DAY, NOW, interaction, write_batch

DOMAINS = ("assistant", "recommendation")


def shared_home(home: Home, config) -> dict[str, int]:
    """A home as flywheel kept it before: every domain's rows and the approvals in warehouse.duckdb.
    Returns the interactions per domain."""
    counts = {"assistant": 3, "recommendation": 2}
    for domain, count in counts.items():
        write_batch(home, DAY.isoformat(), [interaction(f"{domain}_{n}", domain=domain) for n in range(count)],
                    domain=domain)
    with warehouse.connect(home.shared_warehouse) as con:
        for domain in counts:
            assert accumulate(con, home, config, domain, [DAY], now=NOW).reconciles
        approval.ensure_tables(con)
        con.execute("""INSERT INTO registry.approvals (domain, model_version, decision, approver, decided_at)
                       VALUES ('assistant', '1', 'approved', 'a', now()), ('recommendation', '1', 'approved', 'b', now())""")
    return counts


def rows(path, sql: str) -> list[tuple]:
    with warehouse.connect(path, read_only=True) as con:
        return con.execute(sql).fetchall()


def test_a_shared_warehouse_is_refused_until_split_then_each_domain_has_its_own(home, config, capsys,
                                                                                 monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(home.root))
    counts = shared_home(home, config)
    with pytest.raises(HomeError, match="flywheel warehouse split"):
        home.warehouse("assistant")

    main(["warehouse", "split"])

    assert "approvals" in capsys.readouterr().out
    for domain, count in counts.items():
        path = home.warehouse(domain)
        assert rows(path, "SELECT domain, count(*) FROM raw.interactions GROUP BY ALL") == [(domain, count)]
        assert rows(path, "SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'registry'") == [(0,)]
    assert rows(home.approvals, "SELECT domain FROM registry.approvals ORDER BY approval_id") == [
        ("assistant",), ("recommendation",)]
    with warehouse.connect(home.approvals) as con:  # the sequence goes on after the records it kept
        assert con.execute("SELECT nextval('registry.approval_ids')").fetchone() == (3,)
    assert rows(home.approvals, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'raw'") == [(0,)]
    [kept] = home.root.glob("warehouse.duckdb.split-*")
    assert not home.shared_warehouse.exists()
    assert rows(kept, "SELECT count(*) FROM raw.interactions") == [(sum(counts.values()),)]  # never deleted


def test_a_split_that_dies_leaves_the_shared_warehouse_in_use_and_runs_again(home, config, monkeypatch):
    counts = shared_home(home, config)
    copy = warehouse._copy_part

    def dies_on_recommendation(shared, partial, domain):
        if domain == "recommendation":
            raise KeyboardInterrupt  # as a process stopped halfway
        return copy(shared, partial, domain)

    monkeypatch.setattr(warehouse, "_copy_part", dies_on_recommendation)
    with pytest.raises(KeyboardInterrupt):
        warehouse.split_shared_warehouse(home, list(DOMAINS))
    assert home.shared_warehouse.exists() and not (home.warehouses / "assistant.duckdb").exists()

    monkeypatch.setattr(warehouse, "_copy_part", copy)
    report = warehouse.split_shared_warehouse(home, list(DOMAINS))
    assert report.rows["assistant"] > counts["assistant"] and report.rows["approvals"] == 2
    assert rows(home.warehouse("recommendation"), "SELECT count(*) FROM raw.interactions") == [(2,)]


def test_split_refuses_a_home_without_a_shared_warehouse(home):
    with pytest.raises(HomeError, match="no shared warehouse"):
        warehouse.split_shared_warehouse(home, list(DOMAINS))


def test_the_late_label_sensors_cursor_is_kept_per_domain():
    assert domain_cursors(None, DOMAINS) == {"assistant": None, "recommendation": None}
    before = "2026-11-02T12:00:00"  # a cursor from when one warehouse held every domain
    assert domain_cursors(before, DOMAINS) == {"assistant": before, "recommendation": before}
    assert domain_cursors('{"assistant": "2026-11-03T00:00:00"}', DOMAINS) == {
        "assistant": "2026-11-03T00:00:00", "recommendation": None}


def test_the_run_queue_starts_one_run_per_domain_and_domains_side_by_side(home, config):
    """The daemon's own counter over the home instance's limits and the tags flywheel's runs carry."""
    defs = build_definitions(config, home)
    with dg.DagsterInstance.from_config(str(home.dagster)) as instance:
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits  # the daemon's

    def run(tags: dict[str, str]) -> dg.DagsterRun:
        return dg.DagsterRun(job_name="run", tags=tags)

    cycles = {domain: run(defs.resolve_job_def(cycle_job_name(domain)).tags) for domain in DOMAINS}
    relabel = run(relabel_requests([("assistant", date(2026, 11, 2))], "c")[0].tags)
    queue = TagConcurrencyLimitsCounter(limits, [cycles["assistant"]])  # assistant's cycle is running
    assert queue.is_blocked(cycles["assistant"]) and queue.is_blocked(relabel)  # its own runs wait
    assert not queue.is_blocked(cycles["recommendation"])  # another domain's starts beside it
    assert not TagConcurrencyLimitsCounter(limits, []).is_blocked(cycles["assistant"])


def test_under_engine_spark_the_dbt_steps_of_runs_side_by_side_take_turns(home, config):
    """Under spark a domain's days may run as runs at once: their dbt steps share the domain's dbt
    target folder and int_sessions, so each claims a slot of the home instance's dbt pool (one)
    and a second waits for the first's (Dagster's own claims); on DuckDB dbt is in no pool, as
    the run queue keeps a domain's runs apart."""
    spark = config.model_copy(update={"warehouse": WarehouseSettings(engine="spark", root=str(home.root / "tables"))})
    assert build_dbt_assets(spark).op.pool == DBT_POOL and build_dbt_assets(config).op.pool is None

    with dg.DagsterInstance.from_config(str(home.dagster)) as instance:
        claims = instance.event_log_storage
        claims.initialize_concurrency_limit_to_default(DBT_POOL)  # as a run's step does before it claims
        step = "flywheel_dbt_assets"
        assert claims.claim_concurrency_slot(DBT_POOL, "day-1", step).slot_status == ConcurrencySlotStatus.CLAIMED
        assert claims.claim_concurrency_slot(DBT_POOL, "day-2", step).slot_status == ConcurrencySlotStatus.BLOCKED
        claims.free_concurrency_slot_for_step("day-1", step)
        assert claims.claim_concurrency_slot(DBT_POOL, "day-2", step).slot_status == ConcurrencySlotStatus.CLAIMED

