"""Accumulation + quality filtering on a million simulated interactions.

Prints events/second for accumulation (landing JSONL -> raw tables, contract checks, quarantine)
and for the dbt build (staging -> intermediate -> marts, with dbt tests), and each phase's peak
memory. Every phase runs in its own process (this one stays small), so a peak is that phase's own.

    .venv/bin/python benchmarks/accumulation.py [--interactions 1000000] [--home /tmp/flywheel-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

DAYS = 10
DOMAINS = 2  # flywheel.yaml's assistant and recommendation
PROJECT = Path(__file__).resolve().parent.parent / "dbt_project"


def run_phase(command: list[str], home: Path) -> tuple[float, float, str]:
    """Run one phase; its wall seconds, its peak resident MiB and its stdout."""
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "FLYWHEEL_HOME": str(home)})
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{command[:3]} failed:\n{out}")
    return time.perf_counter() - began, usage.ru_maxrss / 1024, out


def accumulate_everything(first: date) -> None:
    """The accumulation phase (run in its own process): every domain, every day; prints counts."""
    from flywheel_pipeline import warehouse
    from flywheel_pipeline.accumulation import accumulate
    from flywheel_pipeline.config import load_config
    from flywheel_pipeline.home import Home

    home, config = Home.from_env(), load_config()
    days = [first + timedelta(days=i) for i in range(DAYS)]
    accepted = quarantined = 0
    with warehouse.connect(home.warehouse, memory_limit=config.warehouse.memory_limit) as con:
        for domain in config.domains:
            report = accumulate(con, home, config, domain, days)
            accepted += sum(report.accepted.values())
            quarantined += report.quarantined
    print(json.dumps({"accepted": accepted, "quarantined": quarantined}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--home", type=Path, default=Path("/tmp/flywheel-bench"))
    parser.add_argument("--accumulate-from", type=date.fromisoformat, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.accumulate_from:
        return accumulate_everything(args.accumulate_from)

    home = args.home.resolve()
    shutil.rmtree(home, ignore_errors=True)
    per_day = args.interactions // (DAYS * DOMAINS)
    first = date.today() - timedelta(days=DAYS + 1)

    seconds, peak, _ = run_phase(
        [sys.executable, "-m", "flywheel_pipeline.cli", "simulate", "--start", first.isoformat(),
         "--days", str(DAYS), "--per-day", str(per_day), "--bad-rows", "0.01"], home)
    lines = sum(sum(1 for _ in path.open()) for path in (home / "landing").rglob("*.jsonl"))
    print(f"simulated {per_day * DAYS * DOMAINS:,} interactions = {lines:,} landing lines "
          f"in {seconds:.1f}s (peak {peak:,.0f} MiB)")

    seconds, peak, out = run_phase(
        [sys.executable, __file__, "--accumulate-from", first.isoformat()], home)
    counts = json.loads(out.strip().splitlines()[-1])
    total = counts["accepted"] + counts["quarantined"]
    print(f"accumulation: {total:,} lines ({counts['accepted']:,} accepted, "
          f"{counts['quarantined']:,} quarantined) in {seconds:.1f}s = {total / seconds:,.0f} events/s, "
          f"peak {peak:,.0f} MiB")

    dbt = Path(sys.executable).with_name("dbt")
    seconds, peak, _ = run_phase(
        [str(dbt), "build", "--project-dir", str(PROJECT), "--profiles-dir", str(PROJECT), "--quiet"], home)
    print(f"quality filtering (dbt build, models + tests): {seconds:.1f}s = {total / seconds:,.0f} events/s, "
          f"peak {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
