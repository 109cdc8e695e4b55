"""Where a cycle's time goes: each run of a home's Dagster instance, from its event log.

    python benchmarks/cycle_time.py --home .flywheel        # after `make demo` (or any runs)

Per run: the start-up (created -> its process started: the queue, the code server's new process
importing the definitions), each step's own seconds, and the time between steps (the executor's
bookkeeping, check evaluations, event writes). Then the totals per step across all runs, longest
first. It only reads the instance; run it while nothing runs, or it reads the runs so far.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path

import dagster as dg

STEP_EVENTS = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS,
               dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.STEP_SKIPPED}


def step_seconds(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    """Each step's seconds from its start to its end."""
    started, seconds = {}, {}
    for record in instance.get_records_for_run(run_id, of_type=STEP_EVENTS, limit=10_000).records:
        entry = record.event_log_entry
        if entry.dagster_event.event_type == dg.DagsterEventType.STEP_START:
            started[entry.step_key] = entry.timestamp
        elif entry.step_key in started:
            seconds[entry.step_key] = entry.timestamp - started[entry.step_key]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(".flywheel"))
    args = parser.parse_args()
    os.environ["DAGSTER_HOME"] = str((args.home / "dagster").resolve())
    totals: dict[str, list[float]] = defaultdict(list)
    with dg.DagsterInstance.get() as instance:
        records = sorted(instance.get_run_records(), key=lambda r: r.create_timestamp)
        print(f"{'run':<10} {'job':<28} {'status':<8} {'start-up':>9} {'steps':>7} {'between':>8} {'total':>7}")
        for record in records:
            run = record.dagster_run
            if record.start_time is None or record.end_time is None:
                continue
            startup = record.start_time - record.create_timestamp.timestamp()
            steps = step_seconds(instance, run.run_id)
            total = record.end_time - record.start_time
            print(f"{run.run_id[:8]:<10} {run.job_name:<28} {run.status.value[:7]:<8} {startup:>8.1f}s "
                  f"{sum(steps.values()):>6.1f}s {total - sum(steps.values()):>7.1f}s {total:>6.1f}s")
            totals["(run start-up)"].append(startup)
            totals["(between steps)"].append(total - sum(steps.values()))
            for step, seconds in steps.items():
                totals[step].append(seconds)
    print(f"\n{'step':<48} {'runs':>5} {'total':>8} {'mean':>7}")
    for step, values in sorted(totals.items(), key=lambda item: -sum(item[1])):
        print(f"{step:<48} {len(values):>5} {sum(values):>7.1f}s {sum(values) / len(values):>6.1f}s")


if __name__ == "__main__":
    main()
