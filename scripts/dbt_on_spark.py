"""The dbt project on DuckDB and on Spark: the same raw events, the same models and tests, the same rows.

    .venv/bin/python scripts/dbt_on_spark.py [--days 2] [--interactions-per-day 60]
        [--domains assistant recommendation] [--home DIR]

Needs the optional extra `spark` (dbt-spark with pyspark) and Java 17+ (docs/warehouse.md: On Spark).

1. a small warehouse in a fresh home (a temporary folder unless --home): the simulator's landing
   batches, accumulated into raw.* (DuckDB);
2. `dbt build` of the whole project on the target `local` (DuckDB);
3. the raw tables exported to Parquet (<home>/spark/raw/<table>/), registered as the Spark tables
   raw.<table> (`dbt run-operation register_raw_tables`), and `dbt build` on the target `spark`;
4. every intermediate model and mart compared: row counts and an order-independent checksum (the sum
   of a hash of each row's canonical text: columns by name, floats rounded, JSON text parsed) of the
   DuckDB table and of the Spark table's Parquet files (<home>/spark/warehouse/<schema>.db/<table>/).

Prints the comparison and the seconds of each engine's build (the dbt process, JVM start included);
exits 1 when a table differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock
from decimal import Decimal
from pathlib import Path

import duckdb
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flywheel_pipeline import simulation, warehouse
from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.config import load_config
from flywheel_pipeline.defs.transform import DOMAIN_ENV
from flywheel_pipeline.home import HOME_ENV, Home

DBT_PROJECT_DIR = REPO / "dbt_project"
DBT_EXECUTABLE = Path(sys.executable).with_name("dbt")
FIRST_DAY = date(2026, 11, 2)
RAW_TABLES = ("interactions", "impressions", "signals", "outcomes", "labels")
COMPARED_SCHEMAS = ("intermediate", "marts")
JSON_COLUMNS = {"context_features"}  # JSON text: the same object, numbers possibly spelt apart
FLOAT_DIGITS = 6
CHECKSUM_MODULUS = 2**64


@dataclass(frozen=True)
class Comparison:
    """One model's rows and checksum on each engine."""

    table: str
    duckdb_rows: int
    spark_rows: int
    duckdb_checksum: int
    spark_checksum: int
    columns_match: bool

    @property
    def matches(self) -> bool:
        return (self.columns_match and self.duckdb_rows == self.spark_rows
                and self.duckdb_checksum == self.spark_checksum)


# -- the warehouse and the two builds ----------------------------------------------------------------

def make_warehouse(home: Home, days: int, interactions_per_day: int, domains: Sequence[str]) -> None:
    """Simulate ``days`` days from FIRST_DAY in ``domains`` (with the cases the simulator never makes
    planted in the first domain's first day) and accumulate them into raw.*."""
    config = load_config(REPO / "flywheel.yaml")
    simulation.simulate(home, config, FIRST_DAY, days, seed=5,
                        interactions_per_day=interactions_per_day, domains=list(domains))
    plant_edge_cases(home, domains[0], FIRST_DAY)
    dates = [FIRST_DAY + timedelta(days=offset) for offset in range(days)]
    now = datetime.combine(dates[-1] + timedelta(days=2), clock(), UTC)
    for domain in domains:
        with warehouse.connect(home.warehouse(domain)) as con:
            accumulate(con, home, config, domain, dates, now=now)


def event(kind: str, event_id: str, domain: str, at: datetime, **fields: object) -> dict:
    """One landing event of user u_edge (session s_edge unless ``fields`` say otherwise)."""
    return {"event_id": event_id, "event_type": kind, "domain": domain,
            "timestamp": at.strftime("%Y-%m-%dT%H:%M:%SZ"), "user_id": "u_edge", "session_id": "s_edge"} | fields


def served(event_id: str, domain: str, at: datetime, content: str = "A machine.", **fields: object) -> dict:
    """An interaction showing one impression, r_edge with ``content``."""
    return event("interaction", event_id, domain, at, **({
        "interaction_id": f"i_{event_id}", "model_version": "baseline", "policy": "champion",
        "consent": "granted", "input": "What is a computer?",
        "impressions": [{"item_id": "r_edge", "position": 0, "propensity": 0.9, "content": content}]} | fields))


def edge_cases(domain: str, day: date) -> tuple[list[dict], list[dict]]:
    """Events of every drop rule and of the reactions the marts pivot, with non-ASCII text and JSON
    features: the product's batch and the reviewers' (label events)."""
    at = datetime.combine(day, clock(10), UTC)
    second = timedelta(seconds=1)
    edited = served("edge_edited", domain, at, content="Réponse initiale",
                    context={"segment": "s1", "features": {"affinity": 1e-05, "visits_7d": 3}})
    react = {"interaction_id": "i_edge_edited", "item_id": "r_edge"}
    product = [
        edited,
        event("signal", "edge_accept", domain, at + 10 * second, signal_type="accept", **react),
        event("signal", "edge_edit", domain, at + 20 * second, signal_type="edit", text="Réponse éditée ✓", **react),
        event("signal", "edge_revert", domain, at + 30 * second, signal_type="revert", **react),
        event("signal", "edge_rating", domain, at + 40 * second, signal_type="rating", value=4,
              interaction_id="i_edge_edited"),
        event("outcome", "edge_outcome", domain, at + 50 * second, name="resolved", value=1.0, **react),
        served("edge_first", domain, at + 60 * second, interaction_id="i_edge_twice"),
        served("edge_again", domain, at + 70 * second, interaction_id="i_edge_twice"),  # a redelivery
        served("edge_denied", domain, at + 80 * second, consent="denied"),
        served("edge_long_input", domain, at + 90 * second, input="x" * 2001),
        served("edge_long_response", domain, at + 100 * second, content="y" * 4001),
        # a bot: six interactions a second apart in a session of its own
        *(served(f"edge_bot_{n}", domain, at + (200 + n) * second, session_id="s_edge_bot") for n in range(6)),
    ]
    reviews = [event("label", "edge_review_audit", domain, at + 3600 * second, reviewer="r1", verdict="bad", **react),
               event("label", "edge_review_picked", domain, at + 7200 * second, reviewer="r2", verdict="good",
                     selection="uncertainty", **react)]
    return product, reviews


def plant_edge_cases(home: Home, domain: str, day: date) -> None:
    """Append ``edge_cases`` to the landing batches of ``domain``'s ``day``."""
    product, reviews = edge_cases(domain, day)
    for path, events in ((home.landing_file(domain, str(day)), product),
                         (simulation.label_batch(home, domain, day), reviews)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as batch:
            batch.writelines(json.dumps(one) + "\n" for one in events)


def dbt(home: Home, target: str, *args: str, domain: str = "") -> float:
    """Run ``dbt <args>`` on ``target`` for ``home`` (the local target: ``domain``'s warehouse);
    its seconds. Its target and log folders are under the home, so the project's
    target/manifest.json (Dagster's) stays as it is."""
    env = {**os.environ, HOME_ENV: str(home.root), DOMAIN_ENV: domain}
    began = time.perf_counter()
    completed = subprocess.run(
        [str(DBT_EXECUTABLE), *args, "--target", target, "--target-path", str(home.root / "dbt" / target),
         "--log-path", str(home.root / "dbt" / target / "logs")],
        cwd=DBT_PROJECT_DIR, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - began
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-6000:] + completed.stderr[-3000:])
        raise RuntimeError(f"dbt {' '.join(args)} failed on target {target}")
    return seconds


def spark_folder(home: Home) -> Path:
    """Where the spark target keeps its metastore and tables (profiles.yml)."""
    return home.root / "spark"


def export_raw(home: Home, domains: Sequence[str]) -> Path:
    """Write each raw table of each domain's warehouse to <home>/spark/raw/<table>/<domain>.parquet
    (JSON columns as text): one Spark table of every domain; the folder."""
    folder = spark_folder(home) / "raw"
    for domain in domains:
        with warehouse.connect(home.warehouse(domain), read_only=True) as con:
            for table in RAW_TABLES:
                (folder / table).mkdir(parents=True, exist_ok=True)
                columns = con.execute("""SELECT column_name, data_type FROM information_schema.columns
                                         WHERE table_schema = 'raw' AND table_name = ? ORDER BY ordinal_position""",
                                      [table]).fetchall()
                select = ", ".join(f"{name}::VARCHAR AS {name}" if kind == "JSON" else name for name, kind in columns)
                con.execute(f"COPY (SELECT {select} FROM raw.{table}) TO '{folder / table / f'{domain}.parquet'}'")
    return folder


def build_both(home: Home, domains: Sequence[str]) -> dict[str, float]:
    """`dbt build` of the whole project on DuckDB (each domain's warehouse), then on Spark over the
    same raw tables (one warehouse of every domain): seconds of each, and of registering the raw
    tables on Spark."""
    seconds = {"duckdb": sum(dbt(home, "local", "build", domain=domain) for domain in domains)}
    folder = export_raw(home, domains)
    seconds["spark_raw"] = dbt(home, "spark", "run-operation", "register_raw_tables",
                               "--args", json.dumps({"folder": str(folder)}))
    seconds["spark"] = dbt(home, "spark", "build")
    return seconds


# -- the comparison ----------------------------------------------------------------------------------

def duckdb_tables(home: Home, domains: Sequence[str]) -> dict[str, pl.DataFrame]:
    """Every table dbt built in the compared schemas of the DuckDB warehouses, every domain's rows."""
    tables: dict[str, list[pl.DataFrame]] = {}
    for domain in domains:
        with warehouse.connect(home.warehouse(domain), read_only=True) as con:
            names = con.execute(f"""SELECT table_schema || '.' || table_name FROM information_schema.tables
                                    WHERE table_type = 'BASE TABLE' AND table_schema IN {COMPARED_SCHEMAS}
                                    ORDER BY ALL""").fetchall()
            for (name,) in names:
                tables.setdefault(name, []).append(con.sql(f"SELECT * FROM {name}").pl())
    return {name: pl.concat(parts, how="vertical_relaxed") for name, parts in sorted(tables.items())}


def spark_table(home: Home, name: str) -> pl.DataFrame | None:
    """The Spark table ``name`` (schema.table) read from its Parquet files, its partition columns
    from their folder names; None when Spark has no such table."""
    schema, table = name.split(".")
    folder = spark_folder(home) / "warehouse" / f"{schema}.db" / table
    if not folder.is_dir():
        return None
    files = f"{folder}/**/*.parquet"
    return duckdb.sql(f"SELECT * FROM read_parquet('{files}', hive_partitioning = true)").pl()


def canonical(value: object, column: str) -> str:
    """The text of one value both engines agree on: floats rounded, JSON parsed, timestamps ISO."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal | float):
        number = round(float(value), FLOAT_DIGITS)
        return "NaN" if math.isnan(number) else repr(number + 0.0)  # -0.0 is 0.0
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None).isoformat() if value.tzinfo else value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if column in JSON_COLUMNS:
        return json.dumps(json.loads(value), sort_keys=True)
    return str(value)


def checksum(frame: pl.DataFrame) -> int:
    """Order-independent: the sum of the first 8 bytes of each row's SHA-256, columns by name."""
    columns = sorted(frame.columns)
    total = 0
    for row in frame.select(columns).iter_rows():
        text = "\x1f".join(canonical(value, column) for value, column in zip(row, columns, strict=True))
        total += int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return total % CHECKSUM_MODULUS


def compare(home: Home, domains: Sequence[str]) -> list[Comparison]:
    """Each DuckDB table of the compared schemas (all domains) against its Spark table."""
    comparisons = []
    for name, ours in duckdb_tables(home, domains).items():
        theirs = spark_table(home, name)
        if theirs is None:
            theirs = pl.DataFrame()
        comparisons.append(Comparison(
            table=name, duckdb_rows=ours.height, spark_rows=theirs.height,
            duckdb_checksum=checksum(ours), spark_checksum=checksum(theirs),
            columns_match=sorted(ours.columns) == sorted(theirs.columns)))
    return comparisons


def compare_engines(home: Home, days: int, interactions_per_day: int,
                    domains: Sequence[str]) -> tuple[list[Comparison], dict[str, float]]:
    """Make the warehouse, build it on both engines, compare: the comparisons and build seconds."""
    make_warehouse(home, days, interactions_per_day, domains)
    seconds = build_both(home, domains)
    return compare(home, domains), seconds


def report(comparisons: Sequence[Comparison], seconds: dict[str, float]) -> str:
    header = (f"{'table':<40} {'rows duckdb':>11} {'rows spark':>10} {'checksum duckdb':>20} "
              f"{'checksum spark':>20}  same")
    lines = [header]
    for row in comparisons:
        same = "yes" if row.matches else ("NO (columns differ)" if not row.columns_match else "NO")
        lines.append(f"{row.table:<40} {row.duckdb_rows:>11} {row.spark_rows:>10} "
                     f"{row.duckdb_checksum:>20} {row.spark_checksum:>20}  {same}")
    lines.append(f"dbt build: DuckDB {seconds['duckdb']:.1f} s, Spark {seconds['spark']:.1f} s "
                 "(whole project, models and tests; the dbt process, Spark's JVM start included); "
                 f"registering the raw tables on Spark {seconds['spark_raw']:.1f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--interactions-per-day", type=int, default=60)
    parser.add_argument("--domains", nargs="+", default=["assistant", "recommendation"])
    parser.add_argument("--home", type=Path, help="an empty folder to build in (kept); default: a temporary one")
    args = parser.parse_args(argv)
    root = args.home or Path(tempfile.mkdtemp(prefix="dbt_on_spark_"))
    try:
        comparisons, seconds = compare_engines(Home(root).ensure(), args.days, args.interactions_per_day,
                                               args.domains)
    finally:
        if args.home is None:
            shutil.rmtree(root, ignore_errors=True)
    print(report(comparisons, seconds))
    return 0 if comparisons and all(row.matches for row in comparisons) else 1


if __name__ == "__main__":
    sys.exit(main())
