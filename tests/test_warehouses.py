"""A domain's warehouse under either engine (warehouses.Warehouses): whether it exists and which days
it holds, for the CLI and the sensors; and under engine spark, working copies that write back dbt's
tables only when a deletion must reach them, in the types Spark stored them in, with the forgotten
users kept in the store. The engine spark's tables live in a local folder here (no Spark needed:
the tables dbt builds are written as Spark writes them); tests/test_spark_cycle.py runs the same on
Spark and an S3 server."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from datetime import date, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flywheel_pipeline import privacy, sources
from flywheel_pipeline import warehouses as warehouses_module
from flywheel_pipeline.accumulation import accumulate, copy_scope
from flywheel_pipeline.cli import main
from flywheel_pipeline.config import WarehouseSettings
from flywheel_pipeline.home import Home
from flywheel_pipeline.monitoring import MONITOR_TABLE, latest_watch
from flywheel_pipeline.object_store import ObjectStore, OutOfScope
from flywheel_pipeline.sources import Scope
from flywheel_pipeline.warehouse import ensure_raw_tables
from flywheel_pipeline.warehouses import Warehouses
from tests.conftest import REPO
from tests.test_accumulation import NOW, interaction, with_horizon, write_batch

DOMAIN = "assistant"
DAY = date(2026, 11, 2)
NEXT_DAY = DAY + timedelta(days=1)
RETENTION_TODAY = DAY + timedelta(days=10)  # a retention of 10 days: its cutoff is DAY
SESSIONS = "intermediate.int_sessions"  # dbt's, on Spark one partition per domain
MARTS = "marts.fct_interactions"  # dbt's, partitioned by domain and day
# as Spark stores it: INT96 timestamps (read as nanoseconds), a column declared not null
SESSION_TYPES = pa.schema([pa.field("session_id", pa.string()), pa.field("started_at", pa.timestamp("ns")),
                           pa.field("n_interactions", pa.int64(), nullable=False)])


@pytest.fixture
def spark_warehouses(tmp_path) -> Warehouses:
    """engine spark over a local folder, holding one interaction of u1 and u2 each and dbt's
    sessions table as Spark writes it (a part file and its hidden checksum)."""
    home = Home(tmp_path / "spark_home").ensure()
    warehouses = Warehouses.for_settings(home, WarehouseSettings(engine="spark", root=str(tmp_path / "tables")))
    with warehouses.connect(DOMAIN) as con:
        for user in ("1", "2"):
            add_interaction(con, user, DAY)
    started = datetime(2026, 11, 2, 10)
    as_spark_writes(tmp_path / "tables" / "intermediate.db" / "int_sessions" / f"domain={DOMAIN}", pa.table(
        {"session_id": ["s1", "s2"], "started_at": [started, started], "n_interactions": [1, 1]}, schema=SESSION_TYPES))
    as_spark_writes(tmp_path / "tables" / "marts.db" / "fct_interactions" / f"domain={DOMAIN}" / f"event_date={DAY}",
                    pa.table({"interaction_id": ["i1", "i2"], "user_id": ["u1", "u2"], "session_id": ["s1", "s2"]}))
    return warehouses


def as_spark_writes(folder: Path, rows: pa.Table) -> None:
    """``rows`` as a Spark part file (INT96 timestamps) with its hidden checksum file."""
    folder.mkdir(parents=True)
    pq.write_table(rows, folder / "part-00000-c000.snappy.parquet", use_deprecated_int96_timestamps=True)
    (folder / ".part-00000-c000.snappy.parquet.crc").write_bytes(b"crc")


def test_a_domain_exists_with_its_days_under_either_engine(home, spark_warehouses):
    duckdb_warehouses = Warehouses(home)
    assert not duckdb_warehouses.exists(DOMAIN) and duckdb_warehouses.interaction_days(DOMAIN) == frozenset()
    with duckdb_warehouses.connect(DOMAIN) as con:
        ensure_raw_tables(con)
    assert duckdb_warehouses.exists(DOMAIN) and duckdb_warehouses.interaction_days(DOMAIN) == frozenset()

    assert spark_warehouses.exists(DOMAIN) and not spark_warehouses.exists("recommendation")
    assert spark_warehouses.interaction_days(DOMAIN) == {DAY}
    assert not spark_warehouses.home.warehouse(DOMAIN).exists()  # no DuckDB file under spark


def test_a_stage_run_leaves_dbts_tables_alone_and_a_deletion_rewrites_them_in_sparks_types(spark_warehouses):
    store = spark_warehouses.store
    stored = sources.table_folder(store.root, SESSIONS) + f"/domain={DOMAIN}"
    with spark_warehouses.connect(DOMAIN) as con:  # a stage's run: dbt's marts are read, not written back
        assert SESSIONS not in {f"{schema}.{name}" for schema, name in con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables").fetchall()}
        con.execute(f"DELETE FROM {MARTS} WHERE user_id = 'u1'")
    assert store.source().read(MARTS, DOMAIN)["user_id"].sort().to_list() == ["u1", "u2"]

    [opened] = spark_warehouses.for_deletion(DOMAIN, privacy.forgetting("u1"))  # one day holds u1's rows
    with opened as con:
        con.execute(f"DELETE FROM {SESSIONS} WHERE session_id = 's1'")

    assert store.source().read(SESSIONS, DOMAIN)["session_id"].to_list() == ["s2"]
    written = pq.read_schema(f"{stored}/{sources.PARTITION_FILE}")
    assert written.field("n_interactions") == SESSION_TYPES.field("n_interactions")  # int64, not null
    assert written.field("started_at").type == pa.timestamp("us", "UTC")  # micros: Spark cannot read nanos back
    assert sorted(path.name for path in Path(stored).iterdir()) == [sources.PARTITION_FILE]


def test_forget_reaches_dbts_tables_and_leaves_the_tombstone_in_the_store(spark_warehouses):
    forget = spark_warehouses.for_deletion
    report = privacy.forget_user(spark_warehouses.home, [DOMAIN], "u1", forget)

    assert report.rows_deleted == {f"{DOMAIN}/raw.interactions": 1, f"{DOMAIN}/{SESSIONS}": 1, f"{DOMAIN}/{MARTS}": 1}
    source = spark_warehouses.store.source()
    assert source.read("raw.interactions", DOMAIN)["user_id"].to_list() == ["u2"]
    assert source.read(SESSIONS, DOMAIN)["session_id"].to_list() == ["s2"]
    assert source.read(MARTS, DOMAIN)["user_id"].to_list() == ["u2"]
    assert source.read("privacy.forgotten_users", DOMAIN)["user_hash"].to_list() == [privacy.user_hash("u1")]
    with spark_warehouses.connect(DOMAIN, read_only=True) as con:  # what accumulation checks replays against
        assert con.execute("SELECT user_hash FROM privacy.forgotten_users").fetchall() == [(privacy.user_hash("u1"),)]
    privacy.forget_user(spark_warehouses.home, [DOMAIN], "u1", forget)  # again: one tombstone still
    assert source.read("privacy.forgotten_users", DOMAIN).height == 1


KILLED_AFTER_A_RAW_PARTITION = """
import os, signal, sys
from datetime import date
from flywheel_pipeline import privacy, sources
from flywheel_pipeline.config import WarehouseSettings
from flywheel_pipeline.home import Home
from flywheel_pipeline.warehouses import Warehouses

replace = sources.ParquetSink.replace_partition

def replace_then_die(sink, table, *args, **kwargs):
    replace(sink, table, *args, **kwargs)
    if table.startswith("raw."):
        os.kill(os.getpid(), signal.SIGKILL)

sources.ParquetSink.replace_partition = replace_then_die
warehouses = Warehouses.for_settings(Home(sys.argv[1]), WarehouseSettings(engine="spark", root=sys.argv[2]))
if sys.argv[3] == "forget":
    privacy.forget_user(warehouses.home, ["assistant"], "u1", warehouses.for_deletion)
else:  # retention of 10 days, on the day argv[4] names
    privacy.enforce_retention(warehouses.home, "assistant", 10, date.fromisoformat(sys.argv[4]), warehouses.for_deletion)
"""


def test_a_forget_killed_while_writing_back_is_finished_by_running_it_again(spark_warehouses):
    """kill -9 once the first raw partition is rewritten: the derived tables were written before it
    (raw last), and running forget again finds the rest by the raw rows still there, if any."""
    store = spark_warehouses.store
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_A_RAW_PARTITION, str(spark_warehouses.home.root),
                             store.root, "forget"], check=False, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    privacy.forget_user(spark_warehouses.home, [DOMAIN], "u1", spark_warehouses.for_deletion)

    assert store.source().read(SESSIONS, DOMAIN)["session_id"].to_list() == ["s2"]
    assert store.source().read(MARTS, DOMAIN)["user_id"].to_list() == ["u2"]
    assert store.source().read("raw.interactions", DOMAIN)["user_id"].to_list() == ["u2"]


def test_status_reads_a_domain_in_the_store(spark_warehouses, tmp_path, monkeypatch, capsys):
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    raw["warehouse"] = {"engine": "spark", "root": spark_warehouses.store.root}
    (tmp_path / "flywheel.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(tmp_path / "flywheel.yaml"))
    monkeypatch.setenv("FLYWHEEL_HOME", str(spark_warehouses.home.root))
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    watch(spark_warehouses)

    def no_copy(*args, **kwargs):
        raise AssertionError("status made a working copy of the domain")

    monkeypatch.setattr(warehouses_module, "working_copy", no_copy)  # counts from the footers, the watch read
    main(["status"])

    out = capsys.readouterr().out
    assert f"assistant: warehouse {spark_warehouses.store.root} (domain=assistant partitions)\n" in out
    assert f"recommendation: warehouse {spark_warehouses.store.root} (domain=recommendation partitions) (none yet)" in out
    assert re.search(r"raw.interactions +2 rows", out) and re.search(r"marts.fct_interactions +2 rows", out)
    assert f"monitor: {DAY}: v3 healthy; kept" in out


def watch(warehouses: Warehouses) -> None:
    """A champion monitor's look at the domain on DAY, kept in the store."""
    with warehouses.connect(DOMAIN) as con:
        con.execute("CREATE SCHEMA IF NOT EXISTS health")
        con.execute(f"""CREATE TABLE {MONITOR_TABLE} AS SELECT $domain AS domain, $day AS event_date, '3' AS version,
                        NULL::TIMESTAMP AS deployed_at, false AS regressed, false AS below_forecast,
                        'kept' AS action""", {"domain": DOMAIN, "day": DAY})


def test_the_monitors_watch_is_kept_in_the_store(spark_warehouses):
    """The champion monitor's daily row (after a deployment) outlives its run's working copy."""
    watch(spark_warehouses)
    assert latest_watch(spark_warehouses.store.source(), DOMAIN) == f"{DAY}: v3 healthy; kept"


def test_the_store_lists_only_tables_with_partitions(spark_warehouses):
    store: ObjectStore = spark_warehouses.store
    assert {"raw.interactions", SESSIONS} <= set(store.tables())
    assert "raw.signals" not in store.tables()  # no rows written: no partition folder


def add_interaction(con, n: str, day: date, user: str | None = None, session: str | None = None) -> None:
    """Interaction i<n> (event e<n>) on ``day``, of ``user`` in ``session`` (default u<n>, s<n>)."""
    con.execute("""INSERT INTO raw.interactions BY NAME SELECT
                       $domain AS domain, $day AS event_date, 'e' || $n AS event_id, $day::TIMESTAMP AS event_ts,
                       $user AS user_id, $session AS session_id, 'i' || $n AS interaction_id,
                       'baseline' AS model_version, 'champion' AS policy, 'granted' AS consent,
                       'hello' AS input_text, 'batch.jsonl' AS source_file, 1 AS source_line,
                       $day::TIMESTAMP AS ingested_at""",
                {"domain": DOMAIN, "day": day, "n": n, "user": user or f"u{n}", "session": session or f"s{n}"})


def test_a_run_for_some_days_holds_only_them_and_writes_back_only_them(spark_warehouses):
    """A scoped working copy loads its days of its tables (nothing else: a table it does not hold is
    absent, not empty); the store reads the rest; a change outside its days writes nothing back."""
    store = spark_warehouses.store
    with spark_warehouses.connect(DOMAIN) as con:
        add_interaction(con, "3", NEXT_DAY)

    with spark_warehouses.for_days(DOMAIN, Scope.of([NEXT_DAY], ["raw.interactions"])) as (con, elsewhere):
        assert con.execute("SELECT event_id FROM raw.interactions").fetchall() == [("e3",)]
        with pytest.raises(duckdb.CatalogException, match="signals"):
            con.execute("SELECT * FROM raw.signals")
        assert elsewhere.read("raw.interactions", DOMAIN)["event_id"].sort().to_list() == ["e1", "e2", "e3"]
        add_interaction(con, "4", NEXT_DAY)
    assert store.source().read("raw.interactions", DOMAIN)["event_id"].sort().to_list() == ["e1", "e2", "e3", "e4"]

    with (pytest.raises(OutOfScope, match=f"raw.interactions: a run scoped to {NEXT_DAY} changed its {DAY}"),
          spark_warehouses.for_days(DOMAIN, Scope.of([NEXT_DAY], ["raw.interactions"])) as (con, _)):
        add_interaction(con, "5", NEXT_DAY)
        add_interaction(con, "6", DAY)  # its copy never held DAY: writing DAY back would drop e1 and e2
    assert store.source().read("raw.interactions", DOMAIN)["event_id"].sort().to_list() == ["e1", "e2", "e3", "e4"]


def test_accumulation_of_one_day_finds_a_duplicate_kept_on_another(tmp_path, config):
    """Accumulating a day under spark holds that day only; an event already kept in another day's
    partition is still a duplicate (read from the store)."""
    home = Home(tmp_path / "home").ensure()
    warehouses = Warehouses.for_settings(home, WarehouseSettings(engine="spark", root=str(tmp_path / "tables")))
    write_batch(home, str(DAY), [interaction("a")])
    write_batch(home, str(NEXT_DAY), [interaction("a", timestamp=f"{NEXT_DAY}T09:00:00Z"),
                                      interaction("b", timestamp=f"{NEXT_DAY}T09:00:00Z")])
    for day in (DAY, NEXT_DAY):
        with warehouses.for_days(DOMAIN, copy_scope([day])) as (con, elsewhere):
            report = accumulate(con, home, config, DOMAIN, [day], now=NOW, elsewhere=elsewhere)

    assert report.reasons == {"duplicate_event_id": 1}
    kept = warehouses.store.source().read("raw.interactions", DOMAIN).sort("event_id")
    assert list(zip(kept["event_id"], kept["event_date"], strict=True)) == [("a", DAY), ("b", NEXT_DAY)]


def test_accumulation_under_a_duplicate_horizon_reads_only_the_ids_of_its_days(tmp_path, config, monkeypatch):
    """With landing.duplicate_horizon_days a day's run reads the kept ids of the days within it
    from the store, not the domain's every day; the duplicate is found as without it."""
    home = Home(tmp_path / "home").ensure()
    warehouses = Warehouses.for_settings(home, WarehouseSettings(engine="spark", root=str(tmp_path / "tables")))
    bounded = with_horizon(config, 1)
    far = DAY - timedelta(days=10)
    for day, event in ((far, "old"), (DAY, "a")):
        write_batch(home, str(day), [interaction(event, timestamp=f"{day}T09:00:00Z")])
    write_batch(home, str(NEXT_DAY), [interaction("a", timestamp=f"{NEXT_DAY}T09:00:00Z")])
    for day in (far, DAY):
        with warehouses.for_days(DOMAIN, copy_scope([day])) as (con, elsewhere):
            accumulate(con, home, bounded, DOMAIN, [day], now=NOW, elsewhere=elsewhere)
    reads = []
    read = sources.ParquetSource.read
    monkeypatch.setattr(sources.ParquetSource, "read", lambda self, table, domain, first=None, last=None, columns=None:
                        reads.append((table, first, last, columns)) or read(self, table, domain, first, last, columns))

    with warehouses.for_days(DOMAIN, copy_scope([NEXT_DAY])) as (con, elsewhere):
        report = accumulate(con, home, bounded, DOMAIN, [NEXT_DAY], now=NOW, elsewhere=elsewhere)

    assert report.reasons == {"duplicate_event_id": 1}
    id_reads = [(first, last) for table, first, last, columns in reads if columns == ["event_id", "event_date"]]
    assert id_reads and set(id_reads) == {(DAY, NEXT_DAY + timedelta(days=1))}


def planted_history(con) -> None:
    """Four days of a domain: u0's session s0 on D0 (interaction i0), u1's session s1 from D0 into
    D1 (i1, i2), a signal on i1 landing on D2, a quarantined line of u1's on D2, and u2's
    interaction i3 on D3; dbt's marts beside them (a row per interaction)."""
    ensure_raw_tables(con)
    d0 = DAY - timedelta(days=1)
    for n, user, session, day in (("0", "u0", "s0", d0), ("1", "u1", "s1", d0), ("2", "u1", "s1", DAY),
                                  ("3", "u2", "s3", NEXT_DAY + timedelta(days=1))):
        add_interaction(con, n, day, user, session)
    con.execute("""INSERT INTO raw.signals BY NAME SELECT $domain AS domain, $day AS event_date, 'e9' AS event_id,
                       $day::TIMESTAMP AS event_ts, 'u1' AS user_id, 's1' AS session_id, 'i1' AS interaction_id,
                       'click' AS signal_type, 'batch.jsonl' AS source_file, 2 AS source_line,
                       $day::TIMESTAMP AS ingested_at""", {"domain": DOMAIN, "day": NEXT_DAY})
    con.execute("""INSERT INTO raw.quarantine VALUES ($domain, $day, 'assistant/batch.jsonl', 3, NULL,
                       'missing_field:event_id', '{"user_id": "u1"}', $day::TIMESTAMP)""", {"domain": DOMAIN, "day": NEXT_DAY})
    con.execute("CREATE SCHEMA IF NOT EXISTS marts")
    con.execute("""CREATE TABLE marts.fct_interactions AS SELECT domain, event_date, interaction_id, user_id, session_id
                   FROM raw.interactions""")


def as_both_profiles(tmp_path) -> tuple[Warehouses, Warehouses]:
    """The planted history in a DuckDB file and, as the spark profile keeps it, in a store (dbt's
    sessions as Spark writes them: one partition per domain)."""
    duckdb_warehouses = Warehouses(Home(tmp_path / "duckdb_home").ensure())
    with duckdb_warehouses.connect(DOMAIN) as con:
        planted_history(con)
        con.execute("CREATE SCHEMA intermediate")
        con.execute(f"CREATE TABLE {SESSIONS} AS SELECT $domain AS domain, * FROM (VALUES ('s0', 1), ('s1', 2), ('s3', 1)) "
                    "AS t(session_id, n_interactions)", {"domain": DOMAIN})
        spark_warehouses = Warehouses.for_settings(Home(tmp_path / "spark_home").ensure(),
                                                   WarehouseSettings(engine="spark", root=str(tmp_path / "tables")))
        sources.export_parquet(con, [*(f"raw.{table}" for table in ("interactions", "signals", "quarantine")), MARTS],
                               tmp_path / "tables")
    as_spark_writes(tmp_path / "tables" / "intermediate.db" / "int_sessions" / f"domain={DOMAIN}",
                    pa.table({"session_id": ["s0", "s1", "s3"], "n_interactions": [1, 2, 1]}))
    return duckdb_warehouses, spark_warehouses


def rows_of(warehouses: Warehouses, table: str) -> list[tuple]:
    """``table``'s rows, sorted, in the columns both profiles share (but when a row was written)."""
    if warehouses.store is None:
        with warehouses.connect(DOMAIN, read_only=True) as con:
            rows = con.sql(f"SELECT * FROM {table}").pl()
    else:
        rows = warehouses.store.source().read(table, DOMAIN)
    columns = sorted(name for name in rows.columns if name not in ("ingested_at", "quarantined_at", "event_ts"))
    return sorted(rows.select(columns).rows(), key=str)


@pytest.mark.parametrize("deletion", ["retention", "forget"])
def test_a_deletion_holds_a_day_at_a_time_and_leaves_what_the_duckdb_profile_leaves(tmp_path, monkeypatch, deletion):
    """Under spark a deletion finds what it dooms and where from the id columns of every day, then
    holds one day's partitions at a time, only the days it deletes from, the latest first (a row
    refers to its own day or an earlier one: stopped between days, a rerun still finds the rest);
    every table ends as the DuckDB profile's deletion leaves it. Retention with its cutoff at DAY:
    i0, i1 (D0) and i1's signal (D2) go, and s0, but not s1, which goes on in i2 (DAY): a copy of
    D0 alone, deciding the session itself, would delete it. Forget u1: all of s1 and u1's
    quarantined line go."""
    duckdb_warehouses, spark_warehouses = as_both_profiles(tmp_path)
    scopes = []
    copy = warehouses_module.working_copy
    monkeypatch.setattr(warehouses_module, "working_copy",
                        lambda *args, scope=None, **kwargs: scopes.append(scope) or copy(*args, scope=scope, **kwargs))

    for warehouses in (duckdb_warehouses, spark_warehouses):
        if deletion == "retention":
            privacy.enforce_retention(warehouses.home, DOMAIN, 10, RETENTION_TODAY, warehouses.for_deletion)
        else:
            privacy.forget_user(warehouses.home, [DOMAIN], "u1", warehouses.for_deletion)

    d0 = DAY - timedelta(days=1)
    days = {"retention": [NEXT_DAY, d0], "forget": [NEXT_DAY, DAY, d0]}[deletion]  # never D3, u2's alone
    assert [(sorted(scope.days), scope.whole) for scope in scopes] == [
        ([day], (SESSIONS,) if n == 0 else ()) for n, day in enumerate(days)]
    for table in ("raw.interactions", "raw.signals", "raw.quarantine", MARTS, SESSIONS):
        assert rows_of(spark_warehouses, table) == rows_of(duckdb_warehouses, table), table
    kept = {"retention": ["i2", "i3"], "forget": ["i0", "i3"]}[deletion]
    assert [row["interaction_id"] for row in spark_warehouses.store.source().read(MARTS, DOMAIN).to_dicts()] == kept
    assert rows_of(spark_warehouses, SESSIONS) == ([(DOMAIN, 1, "s3"), (DOMAIN, 2, "s1")] if deletion == "retention"
                                                   else [(DOMAIN, 1, "s0"), (DOMAIN, 1, "s3")])


def test_a_retention_killed_after_its_latest_day_is_finished_by_running_it_again(tmp_path):
    """kill -9 once the first copy (the latest day, NEXT_DAY: i1's signal) wrote its raw partition:
    D0's interactions, not done yet, still doom the signal's interaction, so running retention again
    leaves every table as the DuckDB profile's retention does. Earliest first, D0's interactions
    would be gone first, and with them what dooms the signal on NEXT_DAY."""
    duckdb_warehouses, spark_warehouses = as_both_profiles(tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_A_RAW_PARTITION, str(spark_warehouses.home.root),
                             spark_warehouses.store.root, "retention", RETENTION_TODAY.isoformat()],
                            cwd=REPO, check=False, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    source = spark_warehouses.store.source()
    assert source.read("raw.signals", DOMAIN).is_empty() and "i1" in source.read("raw.interactions", DOMAIN)["interaction_id"]

    for warehouses in (spark_warehouses, duckdb_warehouses):
        privacy.enforce_retention(warehouses.home, DOMAIN, 10, RETENTION_TODAY, warehouses.for_deletion)

    for table in ("raw.interactions", "raw.signals", "raw.quarantine", MARTS, SESSIONS):
        assert rows_of(spark_warehouses, table) == rows_of(duckdb_warehouses, table), table
