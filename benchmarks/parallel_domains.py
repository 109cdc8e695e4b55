"""Two domains' cycles side by side vs one after the other, through the Dagster daemon's run queue.

    .venv/bin/python benchmarks/parallel_domains.py                 # 21 days, 1,500 interactions a day
    .venv/bin/python benchmarks/parallel_domains.py --days 14 --per-day 500

The simulator writes the same landing batches for every domain into one home, copied into two:
in the first each domain's cycle is submitted once the other's has ended; in the second both are
submitted at once, and the queue (``flywheel/warehouse`` limit: one run per domain) starts them
together, each writing its own warehouse file. Prints each run's time, how long they overlapped,
the wall time of each way and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import dagster as dg

from flywheel_pipeline import simulation
from flywheel_pipeline.config import load_config
from flywheel_pipeline.home import Home
from flywheel_pipeline.launcher import local_dagster
from flywheel_pipeline.runs import follow_cycle, submit_cycle


def run_cycles(home: Home, domains: list[str], first: date, last: date, together: bool) -> dict[str, object]:
    """Each domain's cycle over first..last in ``home``; the wall time and each run's span."""
    home.activate()
    with home.log.open("a") as log, local_dagster(home, log) as dagster:
        started = time.monotonic()
        if together:
            run_ids = {domain: submit_cycle(dagster, domain, first, last) for domain in domains}
            outcomes = {domain: follow_cycle(dagster, domain, run_id) for domain, run_id in run_ids.items()}
        else:
            outcomes = {}
            for domain in domains:
                outcomes[domain] = follow_cycle(dagster, domain, submit_cycle(dagster, domain, first, last))
        wall = time.monotonic() - started
        spans = {domain: _span(dagster.instance, outcome.run_id) for domain, outcome in outcomes.items()}
    failed = [f"{domain} ({outcome.status.value})" for domain, outcome in outcomes.items() if not outcome.succeeded]
    if failed:
        raise SystemExit(f"cycles failed: {', '.join(failed)}; see {home.log} and the runs in {home.dagster}")
    return {"wall": wall, "spans": spans}


def _span(instance: dg.DagsterInstance, run_id: str) -> tuple[float, float]:
    stats = instance.get_run_stats(run_id)
    return stats.start_time, stats.end_time


def overlap(spans: dict[str, tuple[float, float]]) -> float:
    """Seconds during which every run was in progress."""
    return max(0.0, min(end for _, end in spans.values()) - max(start for start, _ in spans.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--per-day", type=int, default=1500, help="interactions per day per domain")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    config = load_config()
    domains = list(config.domains)
    last = date.today() - timedelta(days=1)
    first = last - timedelta(days=args.days - 1)
    with tempfile.TemporaryDirectory() as folder:
        os.environ.pop("FLYWHEEL_HOME", None)
        made = Home(Path(folder) / "one_after_the_other").ensure()
        began = time.monotonic()
        simulation.simulate(made, config, first, args.days, seed=args.seed, interactions_per_day=args.per_day)
        print(f"simulated {args.days} days x {args.per_day:,} interactions for {', '.join(domains)} "
              f"in {time.monotonic() - began:.0f}s ({os.cpu_count()} cores)")
        shutil.copytree(made.root, Path(folder) / "side_by_side")
        results = {}
        for name, together in (("one after the other", False), ("side by side", True)):
            home = Home(Path(folder) / name.replace(" ", "_"))
            results[name] = result = run_cycles(home, domains, first, last, together)
            runs = ", ".join(f"{domain} {end - start:.0f}s" for domain, (start, end) in result["spans"].items())
            print(f"{name:20} wall {result['wall']:6.0f}s  runs: {runs}; overlapping {overlap(result['spans']):.0f}s")
    speedup = results["one after the other"]["wall"] / results["side by side"]["wall"]
    print(f"speed-up side by side: {speedup:.2f}x")


if __name__ == "__main__":
    main()
