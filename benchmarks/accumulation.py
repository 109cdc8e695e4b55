"""Accumulation + quality filtering on a million simulated interactions.

Prints events/second for accumulation (landing JSONL -> raw tables, contract checks, quarantine)
and for the dbt build (staging -> intermediate -> marts, with dbt tests), and the peak memory of
this process (DuckDB runs in it) and of dbt (a child process).

    .venv/bin/python benchmarks/accumulation.py [--interactions 1000000] [--home /tmp/flywheel-bench]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

from flywheel_pipeline import warehouse
from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.config import load_config
from flywheel_pipeline.home import Home
from flywheel_pipeline.simulation import simulate

DAYS = 10


def peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--home", type=Path, default=Path("/tmp/flywheel-bench"))
    args = parser.parse_args()

    shutil.rmtree(args.home, ignore_errors=True)
    home, config = Home(args.home.resolve()).activate(), load_config()
    per_day = args.interactions // (DAYS * len(config.domains))
    start = date.today() - timedelta(days=DAYS + 1)
    days = [start + timedelta(days=i) for i in range(DAYS)]

    began = time.perf_counter()
    simulate(home, config, start, DAYS, interactions_per_day=per_day, bad_row_share=0.01)
    simulated = time.perf_counter() - began
    lines = sum(sum(1 for _ in p.open()) for p in home.landing.rglob("*.jsonl"))
    print(f"simulated {per_day * DAYS * len(config.domains):,} interactions = {lines:,} landing lines "
          f"in {simulated:.1f}s")

    began = time.perf_counter()
    accepted = quarantined = 0
    with warehouse.connect(home.warehouse) as con:
        for domain in config.domains:
            report = accumulate(con, home, config, domain, days)
            accepted += sum(report.accepted.values())
            quarantined += report.quarantined
    accumulation = time.perf_counter() - began
    print(f"accumulation: {accepted + quarantined:,} lines ({accepted:,} accepted, {quarantined:,} quarantined) "
          f"in {accumulation:.1f}s = {(accepted + quarantined) / accumulation:,.0f} events/s")

    began = time.perf_counter()
    dbt = Path(sys.executable).with_name("dbt")
    project = Path(__file__).resolve().parent.parent / "dbt_project"
    subprocess.run([str(dbt), "build", "--project-dir", str(project), "--profiles-dir", str(project), "--quiet"],
                   check=True)
    filtering = time.perf_counter() - began
    print(f"quality filtering (dbt build, models + tests): {filtering:.1f}s = "
          f"{(accepted + quarantined) / filtering:,.0f} events/s")
    print(f"peak memory: this process (DuckDB) {peak_mib(resource.RUSAGE_SELF):,.0f} MiB, "
          f"dbt {peak_mib(resource.RUSAGE_CHILDREN):,.0f} MiB")


if __name__ == "__main__":
    main()
