"""dbt's fixed cost per run: Dagster runs of the dbt assets on a tiny warehouse, a day each.

    .venv/bin/python benchmarks/dbt_run_cost.py [--runs 4] [--interactions-per-day 20]

One domain's few simulated interactions per day are accumulated, then each run builds one day
(a different day each time, as a cycle's runs do) through the real ``dbt`` resource and the dbt
assets, with their dbt tests as asset checks. The rows are so few that what a run costs is dbt's own:
starting, parsing, compiling, its DuckDB connection, and the events it writes to Dagster. Prints
each run's wall seconds and CPU seconds (this process, Dagster's side, and its dbt), whether dbt re-parsed the
project (a full parse, a partial one, or none), and the events the run wrote to the event log.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import dagster as dg

from flywheel_pipeline import simulation, warehouse
from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.config import load_config
from flywheel_pipeline.defs.partitions import range_tags
from flywheel_pipeline.defs.transform import build_dbt_assets, dbt_project, dbt_resource
from flywheel_pipeline.home import Home

DOMAIN = "assistant"
FIRST = date(2026, 11, 2)


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process (Dagster's side) and of its ended children (dbt)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def parse_kind(home: Home) -> str:
    """How the newest dbt invocation parsed, from the dbt.log of its target folder (the domain's in
    the home, or one of its own in the project's)."""
    logs = [*Path(home.root).rglob("dbt.log"), *dbt_project.target_path.rglob("dbt.log")]
    text = max(logs, key=lambda path: path.stat().st_mtime).read_text().splitlines() if logs else []
    started = max((n for n, line in enumerate(text) if '"MainReportVersion"' in line), default=0)
    text = "\n".join(text[started:])
    if "Unable to do partial parsing" in text:
        return "full parse"
    if "no changes found, skipping parsing" in text:
        return "no parse"
    return "partial parse" if "Partial parsing enabled" in text else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--interactions-per-day", type=int, default=20)
    args = parser.parse_args()
    config = load_config()
    with tempfile.TemporaryDirectory() as folder:
        home = Home(Path(folder) / "home").activate()
        simulation.simulate(home, config, FIRST, args.runs, seed=1, interactions_per_day=args.interactions_per_day,
                            domains=[DOMAIN])
        days = [FIRST + timedelta(days=n) for n in range(args.runs)]
        with warehouse.connect(home.warehouse(DOMAIN)) as con:
            accumulate(con, home, config, DOMAIN, days)
        assets, resources = build_dbt_assets(config), {"dbt": dbt_resource(home, config)}
        print(f"{args.runs} runs of the dbt assets, one day of {args.interactions_per_day} interactions each")
        with dg.DagsterInstance.get() as instance:  # the home's, as the pipeline's runs have
            for day in days:
                began, (own, dbt) = time.perf_counter(), cpu_seconds()
                result = dg.materialize([assets], resources=resources, tags=range_tags(DOMAIN, day, day),
                                        instance=instance, raise_on_error=True)
                seconds, (own_after, dbt_after) = time.perf_counter() - began, cpu_seconds()
                events = len(instance.all_logs(result.run_id))
                print(f"  {day}: {seconds:5.1f} s wall, cpu {own_after - own:4.1f} s Dagster + "
                      f"{dbt_after - dbt:4.1f} s dbt, {parse_kind(home):<13} {events} events logged")


if __name__ == "__main__":
    main()
