"""The distributed profile (warehouse.engine spark): a whole domain cycle, accumulate to registered
candidate, with every table partitioned by domain and day in an S3-compatible object store (moto's
server, started here) and dbt building on a local Spark session, gives the same labels, gate outcome
and registered lineage as the DuckDB profile on the same simulated events; and a domain's days run
as separate runs at once leave each day's partitions as one run of both days does.

Spark reaches the bucket through an s3fs-fuse mount (Spark's s3a:// needs the hadoop-aws jars, which
come from Maven, not PyPI: docs/deploying.md); the Python stages reach it as s3:// directly.
Needs the optional extra spark (with moto's server), Java 17+ and Debian's s3fs; skipped without them."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import mlflow
import polars as pl
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
import yaml
from polars.testing import assert_frame_equal

from flywheel_pipeline import privacy, registry, simulation, sources
from flywheel_pipeline.accumulation import accumulate, copy_scope
from flywheel_pipeline.cli import main
from flywheel_pipeline.config import WarehouseSettings, load_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.home import Home
from flywheel_pipeline.launcher import free_port
from flywheel_pipeline.monitoring import MONITOR_TABLE
from flywheel_pipeline.object_store import DBT_TABLES, STAGE_TABLES, ObjectStore
from flywheel_pipeline.warehouse import connect
from flywheel_pipeline.warehouses import Warehouses
from tests.conftest import REPO

MISSING = [name for name, present in (
    ("pyspark", importlib.util.find_spec("pyspark") is not None),
    ("dbt-spark", importlib.util.find_spec("dbt.adapters.spark") is not None),
    ("moto[server]", importlib.util.find_spec("moto") is not None),
    ("java", shutil.which("java") is not None),
    ("s3fs (Debian's s3fs-fuse)", shutil.which("s3fs") is not None),
    ("/dev/fuse", Path("/dev/fuse").exists()),
) if not present]

pytestmark = [
    pytest.mark.spark,
    pytest.mark.skipif(bool(MISSING), reason=f"the distributed profile: {', '.join(MISSING)} missing; it needs "
                       "`pip install -e '.[spark]'`, Java 17+ and `apt-get install s3fs`"),
    pytest.mark.timeout(900),
]

DOMAIN = "assistant"
DAYS = 8
LAST = datetime.now(UTC).date() - timedelta(days=3)
FIRST = LAST - timedelta(days=DAYS - 1)
BUCKET = "flywheel-warehouse"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "flywheel-test", "AWS_SECRET_ACCESS_KEY": "flywheel-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
LABEL_COLUMNS = ["event_date", "interaction_id", "item_id", "p_good", "label", "n_votes", "label_model_version"]
# the monitor's table is written after a deployment, which a cycle does not reach
COMPARED_TABLES = tuple(table for table in (*STAGE_TABLES, *DBT_TABLES) if table != MONITOR_TABLE)
INTERMEDIATE_MODELS = ("intermediate.int_impression_signals", "intermediate.int_interactions_flagged",
                       "intermediate.int_reactions", "intermediate.int_sessions")
JSON_TEXT_COLUMNS = ("context_features",)
# when a row was written, and the candidate's run (its model URI): different in any two cycles
PER_RUN_COLUMNS = ("ingested_at", "quarantined_at", "labelled_at", "queued_at", "audited_at", "candidate_model_uri")
EMPTY_IN_THIS_CYCLE = ("raw.outcomes", "raw.labels")  # the assistant's simulated days carry neither
DBT_STEP = "flywheel_dbt_assets"  # the dbt assets' step in a run
# lineage tags that name a run, a time, a file or a signature: they differ between any two cycles
PER_RUN_TAGS = ("run_id", "model_uri", "model_id", "signature", "signed", "registered_at", "dagster", "source")


@pytest.fixture(scope="module")
def bucket() -> Iterator[str]:
    """moto's S3 server on a free port with an empty bucket BUCKET, the credentials in the
    environment: the server's endpoint."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in CREDENTIALS.items():
                patch.setenv(name, value)
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint)
            _wait(lambda: client.list_buckets())
            client.create_bucket(Bucket=BUCKET)
            yield endpoint
    finally:
        server.terminate()
        server.wait()


@pytest.fixture(scope="module")
def object_store(bucket, tmp_path_factory) -> Iterator[dict]:
    """The bucket mounted with s3fs for Spark: the distributed profile's warehouse settings."""
    folder = tmp_path_factory.mktemp("object_store")
    mount = folder / "mount"
    mount.mkdir()
    secrets = folder / "passwd"
    secrets.write_text(f"{CREDENTIALS['AWS_ACCESS_KEY_ID']}:{CREDENTIALS['AWS_SECRET_ACCESS_KEY']}")
    secrets.chmod(0o600)
    options = f"passwd_file={secrets},url={bucket},use_path_request_style,dbglevel=warn"
    subprocess.run(["s3fs", BUCKET, str(mount), "-o", options], check=True, timeout=60)
    try:
        yield {"engine": "spark", "root": f"s3://{BUCKET}/flywheel", "spark_root": str(mount / "flywheel"),
               "endpoint_url": bucket}
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _wait(call, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            call()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def small_config(folder: Path, warehouse: dict | None = None) -> Path:
    """flywheel.yaml with the assistant's windows shortened to DAYS days (and its gate loosened to
    fit so few samples), under ``warehouse`` settings when given."""
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    assistant = raw["domains"]["assistant"]
    assistant.update(lookback_days=5, holdout_days=3)
    # a gate this small a sample can pass: the test compares what is registered, not the model's gain
    assistant["gate"].update(min_samples=50, min_ess=5, min_improvement=-1.0, max_slice_regression=1.0)
    if warehouse:
        raw["warehouse"] = {**raw.get("warehouse", {}), **warehouse}
    path = folder / "flywheel.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@contextmanager
def cycle_home(root: Path, landing: Path, config_file: Path):
    """A home with ``landing``'s batches, the process pointed at it and ``config_file``."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
            patch.delenv(name, raising=False)
        patch.setenv("FLYWHEEL_CONFIG", str(config_file))
        home = Home(root).activate()
        shutil.copytree(landing, home.root / "landing", dirs_exist_ok=True)
        config = load_config(config_file)
        instance = dg.DagsterInstance.local_temp(str(home.dagster))
        try:
            yield home, config, build_definitions(config, home), instance
        finally:
            instance.dispose()


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> Path:
    """DAYS days of simulated traffic of both domains (2% bad rows): one home's landing folder."""
    home = Home(tmp_path_factory.mktemp("simulated")).ensure()
    simulation.simulate(home, load_config(REPO / "flywheel.yaml"), FIRST, DAYS, seed=11, interactions_per_day=120,
                        bad_row_share=0.02)
    product, reviews = edge_cases(FIRST)
    for path, planted in ((home.landing_file(DOMAIN, str(FIRST)), product),
                          (simulation.label_batch(home, DOMAIN, FIRST), reviews)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as batch:
            batch.writelines(json.dumps(one) + "\n" for one in planted)
    return home.root / "landing"


def edge_cases(day) -> tuple[list[dict], list[dict]]:
    """Events of every drop rule and of every reaction the marts pivot, with non-ASCII text and JSON
    features, which the simulator does not make: the product's batch and the reviewers'."""
    at = datetime.combine(day, datetime.min.time(), UTC) + timedelta(hours=10)

    def event(kind: str, event_id: str, seconds: int, **fields: object) -> dict:
        return {"event_id": event_id, "event_type": kind, "domain": DOMAIN,
                "timestamp": (at + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "user_id": "u_edge", "session_id": "s_edge"} | fields

    def served(event_id: str, seconds: int, content: str = "A machine.", **fields: object) -> dict:
        return event("interaction", event_id, seconds, **({
            "interaction_id": f"i_{event_id}", "model_version": "baseline", "policy": "champion",
            "consent": "granted", "input": "What is a computer?",
            "impressions": [{"item_id": "r_edge", "position": 0, "propensity": 0.9, "content": content}]} | fields))

    react = {"interaction_id": "i_edge_edited", "item_id": "r_edge"}
    product = [
        served("edge_edited", 0, content="Réponse initiale",
               context={"segment": "s1", "features": {"affinity": 1e-05, "visits_7d": 3}}),
        event("signal", "edge_accept", 10, signal_type="accept", **react),
        event("signal", "edge_edit", 20, signal_type="edit", text="Réponse éditée ✓", **react),
        event("signal", "edge_revert", 30, signal_type="revert", **react),
        event("signal", "edge_rating", 40, signal_type="rating", value=4, interaction_id="i_edge_edited"),
        event("outcome", "edge_outcome", 50, name="resolved", value=1.0, **react),
        served("edge_first", 60, interaction_id="i_edge_twice"),
        served("edge_again", 70, interaction_id="i_edge_twice"),  # a redelivery
        served("edge_denied", 80, consent="denied"),
        served("edge_long_input", 90, input="x" * 2001),
        served("edge_long_response", 100, content="y" * 4001),
        # a bot: six interactions a second apart in a session of its own
        *(served(f"edge_bot_{n}", 200 + n, session_id="s_edge_bot") for n in range(6)),
    ]
    reviews = [event("label", "edge_review_audit", 3600, reviewer="r1", verdict="bad", **react),
               event("label", "edge_review_picked", 7200, reviewer="r2", verdict="good", selection="uncertainty",
                     **react)]
    return product, reviews


def cycle_outcome(home: Home, result: dg.ExecuteInProcessResult, labels: pl.DataFrame) -> dict:
    """What the two profiles must agree on: the labels, the gate, the registered version's lineage."""
    gate = [e for e in result.get_asset_check_evaluations() if e.check_name == "gate"]
    client = mlflow.MlflowClient(home.mlflow_tracking_uri)
    version = registry.alias_version(client, DOMAIN, registry.CANDIDATE)
    tags = client.get_model_version(registry.model_name(DOMAIN), version).tags if version else {}
    record = json.loads(tags.pop("lineage.record", "{}"))  # the signed record: tags' values, run ids, the artifact's hash
    training = client.get_run(tags["training.run_id"]).data.metrics if tags else {}  # fit_seconds: a clock, not the model
    return {
        "labels": labels.select(LABEL_COLUMNS).with_columns(pl.col("p_good").round(9)).sort(LABEL_COLUMNS[:3]),
        "gate": [(e.passed, e.metadata["gate"].value) for e in gate],
        "lineage": {name: value for name, value in tags.items() if not _per_run(name)},
        "lineage_record": {name: value for name, value in record.items() if not _per_run(name)},
        "training_metrics": {name: round(value, 9) for name, value in training.items() if name != "fit_seconds"},
    }


def _per_run(name: str) -> bool:
    """A lineage entry naming a run, a logged model, a time or a file's hash: different in any two
    cycles (the model artifact's hash too, since MLflow writes its run id and time into it)."""
    return name == "artifact" or any(part in name for part in PER_RUN_TAGS)


@pytest.fixture(scope="module")
def both_profiles(landing, object_store, tmp_path_factory):
    """The same DOMAIN cycle over FIRST..LAST on the DuckDB profile and on the distributed one."""
    outcomes, seconds = {}, {}
    for name, warehouse in (("duckdb", None), ("spark", object_store)):
        folder = tmp_path_factory.mktemp(name)
        with cycle_home(folder / "home", landing, small_config(folder, warehouse)) as (home, config, defs, instance):
            began = time.perf_counter()
            result = execute_cycle(defs, instance, DOMAIN, FIRST, LAST)
            seconds[name] = time.perf_counter() - began
            assert result.success, [e.message for e in result.all_events if e.is_failure]
            if name == "duckdb":
                with connect(home.warehouse(DOMAIN), read_only=True) as con:
                    tables = {table: con.sql(f"SELECT * FROM {table} WHERE domain = ?", params=[DOMAIN]).pl()
                              for table in (*COMPARED_TABLES, *INTERMEDIATE_MODELS)}
                assert not (home.root / "spark").exists()
            else:
                store = ObjectStore.from_settings(config.warehouse)
                tables = {table: store.source().read(table, DOMAIN) for table in COMPARED_TABLES}
                tables |= {table: bucket_rows(store, table) for table in INTERMEDIATE_MODELS}
                assert not home.warehouse(DOMAIN).exists()  # no DuckDB file: every table is in the bucket
            outcomes[name] = {**cycle_outcome(home, result, tables[sources.LABELS]), "tables": tables, "folder": folder}
    print(f"cycle seconds: {seconds}")
    return outcomes


def test_the_distributed_cycle_labels_gates_and_registers_as_duckdb_does(both_profiles):
    duck, spark = both_profiles["duckdb"], both_profiles["spark"]
    assert duck["labels"].height > 500 and duck["labels"]["p_good"].is_not_null().any()
    assert_frame_equal(spark["labels"], duck["labels"])
    assert spark["gate"] == duck["gate"]
    assert spark["lineage"] == duck["lineage"]
    assert spark["lineage_record"] == duck["lineage_record"] != {}
    assert spark["training_metrics"] == duck["training_metrics"] != {}  # the same model, fitted alike
    assert duck["gate"] == [(True, "passed")]  # a candidate registered: its lineage compared
    assert {"training.label_model_version", "training.train_end", "validation.gate"} <= set(duck["lineage"])


@pytest.mark.parametrize("table", (*COMPARED_TABLES, *INTERMEDIATE_MODELS))
def test_every_table_holds_the_same_rows_on_both_profiles(both_profiles, table):
    """Table by table, what accumulation, dbt on Spark (its intermediate models and marts) and the
    Python stages wrote to the bucket is what the DuckDB profile holds, but for when a row was
    written and the candidate's run; JSON text compared as the objects it spells."""
    duck, spark = (comparable(both_profiles[name]["tables"][table]) for name in ("duckdb", "spark"))
    assert duck.height > 0 or table in EMPTY_IN_THIS_CYCLE
    assert_frame_equal(spark.select(duck.columns).cast(dict(duck.schema)).sort(duck.columns), duck.sort(duck.columns))


def test_every_drop_rule_is_judged_alike_on_spark(both_profiles):
    rules = both_profiles["spark"]["tables"]["marts.rpt_quality_filter"]["rule"].unique().sort().to_list()
    assert {"bot_session", "consent_denied", "duplicate_interaction", "input_too_long", "response_too_long",
            "kept"} <= set(rules)  # the planted cases' rules, compared row by row above


def comparable(rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` without the per-run columns, JSON text re-serialised (Spark spells 1e-05 as 1.0E-5)."""
    rows = rows.drop([column for column in rows.columns if column in PER_RUN_COLUMNS])
    return rows.with_columns(pl.col(column).map_elements(lambda text: json.dumps(json.loads(text), sort_keys=True),
                                                         return_dtype=pl.String)
                             for column in JSON_TEXT_COLUMNS if column in rows.columns)


def bucket_rows(store: ObjectStore, table: str) -> pl.DataFrame:
    """The domain's rows of a table dbt keeps in the bucket, however it partitions it."""
    rows = ds.dataset(sources.table_folder(store.root, table), filesystem=store.filesystem, format="parquet",
                      partitioning="hive")
    rows = pl.from_arrow(rows.to_table(filter=ds.field("domain") == DOMAIN))
    days_as_text = rows.schema.get("event_date") == pl.String  # a partition folder's name: event_date=2026-11-26
    return rows.with_columns(pl.col("event_date").str.to_date()) if days_as_text else rows


def test_the_tables_are_partitioned_by_domain_and_day_in_the_bucket(both_profiles, object_store):
    store = ObjectStore.from_settings(load_config(REPO / "flywheel.yaml").warehouse.model_copy(update=object_store))
    days = {f"event_date={FIRST + timedelta(days=offset)}" for offset in range(DAYS)}
    for table in ("raw.interactions", "marts.fct_impressions", "labels.impression_labels"):
        folder = f"{sources.table_folder(store.root, table)}/domain={DOMAIN}"
        written = {info.base_name for info in store.filesystem.get_file_info(pafs.FileSelector(folder))}
        assert written == days, table


def test_a_domains_days_accumulate_as_parallel_runs_as_in_one_run(landing, bucket, tmp_path):
    """Three runs of one day each, at once (as run pods would), leave the raw partitions one run
    of the three days leaves; each run wrote only its own day's objects."""
    config = load_config(small_config(tmp_path, {"engine": "spark", "root": f"s3://{BUCKET}/parallel",
                                                 "endpoint_url": bucket}))
    home = Home(tmp_path / "home").ensure()
    shutil.copytree(landing, home.root / "landing", dirs_exist_ok=True)
    days = [FIRST + timedelta(days=offset) for offset in range(3)]

    def run(settings: WarehouseSettings, dates: list) -> None:  # as raw_events runs: its days' copy
        with Warehouses.for_settings(home, settings).for_days(DOMAIN, copy_scope(dates)) as (con, elsewhere):
            accumulate(con, home, config, DOMAIN, dates, elsewhere=elsewhere)

    with ThreadPoolExecutor(len(days)) as pool:
        list(pool.map(lambda day: run(config.warehouse, [day]), days))
    together = config.warehouse.model_copy(update={"root": f"s3://{BUCKET}/together"})
    run(together, days)
    parallel, together = ObjectStore.from_settings(config.warehouse), ObjectStore.from_settings(together)
    raw = [table for table in STAGE_TABLES if table.startswith("raw.")]
    for table in raw:
        ours, theirs = (store.source().read(table, DOMAIN).drop("ingested_at", "quarantined_at", strict=False)
                        for store in (parallel, together))
        assert ours.height > 0 or table in ("raw.outcomes", "raw.labels"), table
        assert_frame_equal(ours.sort(ours.columns), theirs.sort(theirs.columns), check_column_order=False)
    assert set(parallel.source().read("raw.interactions", DOMAIN)["event_date"]) == set(days)


RUN_OF_ONE_DAY = """
import sys
from datetime import date

import dagster as dg

from flywheel_pipeline.definitions import defs
from flywheel_pipeline.defs.assets import LABELS
from flywheel_pipeline.defs.partitions import range_tags
from flywheel_pipeline.defs.transform import DBT_MODELS, RAW_EVENTS

day = date.fromisoformat(sys.argv[1])
with dg.DagsterInstance.get() as instance:
    result = dg.materialize([*defs.assets, *defs.asset_checks], selection=dg.AssetSelection.assets(RAW_EVENTS, LABELS)
                            | DBT_MODELS, instance=instance, tags=range_tags("assistant", day, day),
                            resources=defs.resources, raise_on_error=False)
print(result.run_id)
sys.exit(0 if result.success else 1)
"""


def test_a_domains_day_runs_side_by_side_take_turns_at_dbt(landing, object_store, tmp_path):
    """Two runs of one day each (accumulate -> dbt -> labels), started at once as processes of
    their own on the home's instance (as run workers are): both succeed, their dbt steps ran one
    after the other (the flywheel_dbt pool's one slot: they share the domain's dbt target folder and
    int_sessions' partition), and the store holds each day's marts and labels, and the sessions of
    both days."""
    days = [FIRST + timedelta(days=offset) for offset in (3, 4)]
    mount = Path(object_store["spark_root"]).parent
    config_file = small_config(tmp_path, {**object_store, "root": f"s3://{BUCKET}/days_at_once",
                                          "spark_root": str(mount / "days_at_once")})
    with cycle_home(tmp_path / "home", landing, config_file) as (_, config, _, instance):
        runs = [subprocess.Popen([sys.executable, "-c", RUN_OF_ONE_DAY, day.isoformat()], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for day in days]
        outputs = [run.communicate(timeout=600) for run in runs]
        assert all(run.returncode == 0 for run in runs), [err[-3000:] for _, err in outputs]
        dbt_steps = sorted(_step_interval(instance, out.split()[-1], DBT_STEP) for out, _ in outputs)
        store = ObjectStore.from_settings(config.warehouse)

    assert dbt_steps[0][1] <= dbt_steps[1][0], f"the dbt steps overlapped: {dbt_steps}"
    for table in (sources.IMPRESSIONS, sources.LABELS):
        assert store.days(table, DOMAIN) == set(days), table
    sessions = bucket_rows(store, "intermediate.int_sessions")
    assert set(sessions["started_at"].dt.date()) >= set(days)  # the last dbt run saw both days' raw


def _step_interval(instance: dg.DagsterInstance, run_id: str, step: str) -> tuple[float, float]:
    """When ``step`` of the run started and succeeded (the event log's timestamps)."""
    events = {entry.dagster_event.event_type: entry.timestamp for entry in instance.all_logs(run_id)
              if entry.is_dagster_event and entry.step_key == step}
    return events[dg.DagsterEventType.STEP_START], events[dg.DagsterEventType.STEP_SUCCESS]


def test_forget_and_retention_reach_every_table_in_the_bucket_and_spark_reads_on(both_profiles, object_store,
                                                                                  landing, tmp_path):
    """Under the distributed profile `flywheel forget` deletes a user from every table in the
    bucket, dbt's intermediate models and marts too (rewritten in the types Spark stored them in),
    and keeps their tombstone there: the next cycle, dbt on Spark reading the rewritten partitions,
    quarantines their replayed events. The retention job deletes the expired day from every table."""
    store = ObjectStore.from_settings(load_config(both_profiles["spark"]["folder"] / "flywheel.yaml").warehouse)
    copied = {**object_store, "root": f"{object_store['root']}-forget", "spark_root": f"{object_store['spark_root']}-forget"}
    pafs.copy_files(store.root, f"{store.root}-forget", source_filesystem=store.filesystem,
                    destination_filesystem=store.filesystem)
    with cycle_home(tmp_path / "home", landing, small_config(tmp_path, copied)) as (home, config, defs, instance):
        store = ObjectStore.from_settings(config.warehouse)
        interactions = store.source().read("raw.interactions", DOMAIN).filter(pl.col("consent") == "granted")
        user = interactions["user_id"].mode().sort()[0]
        theirs = interactions.filter(pl.col("user_id") == user)
        marks = {"user_id": {user}, "interaction_id": set(theirs["interaction_id"]), "session_id": set(theirs["session_id"])}
        tables = store.tables()
        assert {"intermediate.int_sessions", "intermediate.int_reactions", "marts.fct_impressions"} <= set(tables)
        assert rows_marked(store, tables, marks)  # the user is everywhere before

        main(["forget", "--user", user])

        assert rows_marked(store, tables, marks) == {}
        assert store.source().read("privacy.forgotten_users", DOMAIN)["user_hash"].to_list() == [privacy.user_hash(user)]
        replayed = [line for path in sorted((landing / DOMAIN).glob("*.jsonl")) for line in path.read_text().splitlines()
                    if user_of(line) == user]
        with home.landing_file(DOMAIN, str(LAST)).open("a") as batch:
            batch.writelines(line + "\n" for line in replayed)
        assert execute_cycle(defs, instance, DOMAIN, FIRST, LAST).success  # dbt on Spark reads the rewritten tables
        assert rows_marked(store, store.tables(), marks) == {}
        quarantine = store.source().read("raw.quarantine", DOMAIN)
        assert quarantine.filter(pl.col("reason") == privacy.FORGOTTEN_USER).height == len(replayed) > 0

        today = FIRST + timedelta(days=1 + config.domain(DOMAIN).retention_days)  # FIRST's rows expire
        run_config = {"ops": {"delete_expired": {"config": {"domain": DOMAIN, "today": today.isoformat()}}}}
        assert defs.resolve_job_def("enforce_retention").execute_in_process(run_config=run_config,
                                                                             instance=instance).success
        for table in store.tables():
            kept = store.source().read(table, DOMAIN)
            day = next((column for column in ("event_date", "as_of") if column in kept.columns), None)
            assert day is None or kept.is_empty() or kept[day].min() > FIRST, table
        first_sessions = set(interactions.filter(pl.col("event_date") == FIRST)["session_id"])
        assert not set(store.source().read("intermediate.int_sessions", DOMAIN)["session_id"]) & first_sessions


def rows_marked(store: ObjectStore, tables: list[str], marks: dict[str, set[str]]) -> dict[str, int]:
    """Per table in the bucket, its rows of DOMAIN holding one of ``marks``' values in that column."""
    found = {}
    for table in tables:
        rows = store.source().read(table, DOMAIN)
        hits = [pl.col(column).is_in(list(values)) for column, values in marks.items() if column in rows.columns]
        if hits and (count := rows.filter(pl.any_horizontal(hits)).height):
            found[table] = count
    return found


def user_of(line: str) -> str | None:
    """A landing line's user, None for a line that is no JSON object."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event.get("user_id") if isinstance(event, dict) else None
