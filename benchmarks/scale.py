"""Scale: N landing events through accumulate -> filter (dbt + GX) -> label, on the real Dagster
assets, against bare DuckDB doing accumulation's work on the same files, in the same run.

    .venv/bin/python benchmarks/scale.py --events 1000000 [--days 10] [--home DIR] [--profile]
        [--stages generate,reference,accumulate]

1. generate: ``simulation.bulk.write_bulk_landing`` writes about N lines over the days, both
   domains (1% bad lines);
2. reference: bare DuckDB on the same files: ``read_ndjson`` with an explicit column schema,
   not-null / enum / timestamp checks, dedup on event_id, impressions unnested, written to a DuckDB
   file, under the warehouse's memory limit;
3. accumulate: ``raw_events``, one run per domain over the days (the range tags a cycle run has);
4. filter: the dbt assets (group ``quality_filtering``) with their dbt tests and the GX checks, and
   the GX checks of ``raw_events``;
5. label: ``labels``, one run per domain.

Each stage runs in its own process, so its peak RSS is its own (the largest process of it: dbt's,
if larger), and times itself around its materializations: wall seconds, and CPU seconds of the
process and its children (steadier on a shared machine); the rest of its wall time (imports,
loading the definitions) is printed as start-up. ``--profile`` runs each stage under cProfile and
prints its 15 top functions by own time (time inside DuckDB shows as the ``execute`` calls; dbt
runs in a process of its own, so the filter stage shows mostly waiting for it).

``--stages`` runs only those stages (in the order above); without ``generate`` they run on the home
an earlier run left (same --events and --days), and the figures of a stage not run this time (the
lines generated, the reference's seconds) come from that run's reports beside the home. The end-to-end
line (accumulate -> filter -> label against the reference) is printed when all four ran together.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

PIPELINE_STAGES = ("accumulate", "filter", "label")
STAGES = ("generate", "reference", *PIPELINE_STAGES)
TOP_FUNCTIONS = 15


# -- the stages, each run in a process of its own ---------------------------------------------------

def generate(home, config, first: date, days: int, events: int) -> dict:
    from flywheel_pipeline.simulation.bulk import write_bulk_landing

    began = time.perf_counter()
    summary = write_bulk_landing(home, config, first, days, events)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "lines": summary.total_events + summary.total_bad_rows,
            "bad": summary.total_bad_rows, "interactions": summary.total_interactions,
            "bytes": sum(path.stat().st_size for path in summary.files)}


def reference(home, config, first: date, days: int, events: int) -> dict:
    """Accumulation's work done by DuckDB alone: read with a schema, check, dedup, unnest, write."""
    import duckdb

    from flywheel_pipeline import events as contract

    target = home.root / "reference.duckdb"
    target.unlink(missing_ok=True)
    files = sorted(str(path) for path in home.landing.rglob("*.jsonl"))
    ids = ("event_id", "user_id", "session_id", "interaction_id")
    columns = {**{name: "VARCHAR" for name in contract.FIELD_NAMES}, "context": "JSON", "value": "DOUBLE",
               "impressions": "STRUCT(item_id VARCHAR, position INTEGER, propensity DOUBLE, content VARCHAR)[]"}

    def listed(values: tuple[str, ...]) -> str:
        return "(" + ", ".join(f"'{v}'" for v in values) + ")"

    began = time.perf_counter()
    with duckdb.connect(str(target), config={"memory_limit": config.warehouse.memory_limit}) as con:
        con.execute(f"""
            CREATE TEMP TABLE checked AS
            SELECT *, CASE
                WHEN {" OR ".join(f"{name} IS NULL" for name in ("event_type", "domain", *ids))} OR ts IS NULL
                    THEN 'missing_field'
                WHEN event_type NOT IN {listed(contract.EVENT_TYPES)} THEN 'invalid_value:event_type'
                WHEN domain NOT IN {listed(tuple(config.domains))} THEN 'unknown_domain'
                WHEN {" OR ".join(f"NOT regexp_full_match({name}, '{contract.ID_PATTERN}')" for name in ids)}
                    THEN 'invalid_id'
                WHEN ts > now() + INTERVAL {contract.CLOCK_SKEW_MINUTES} MINUTE THEN 'future_timestamp'
                WHEN event_type = 'interaction' AND (policy NOT IN {listed(contract.POLICIES)}
                    OR consent NOT IN {listed(contract.CONSENT_STATES)}
                    OR len(impressions) NOT BETWEEN 1 AND {contract.MAX_IMPRESSIONS}) THEN 'invalid_interaction'
                WHEN event_type = 'signal' AND signal_type NOT IN {listed(contract.SIGNAL_TYPES)}
                    THEN 'invalid_value:signal_type'
                WHEN event_type = 'label' AND verdict NOT IN {listed(contract.VERDICTS)} THEN 'invalid_value:verdict'
            END AS reason
            FROM (SELECT *, TRY_CAST(timestamp AS TIMESTAMPTZ) AS ts
                  FROM read_ndjson($files, columns = $columns, ignore_errors = true))
            """, {"files": files, "columns": columns})
        # dedup: the first copy of each event id, in file order (the rows' order)
        con.execute("CREATE TEMP TABLE firsts AS SELECT min(rowid) AS row FROM checked WHERE reason IS NULL "
                    "GROUP BY event_id")
        kept = "rowid IN (SELECT row FROM firsts)"
        con.execute(f"CREATE TABLE interactions AS SELECT * EXCLUDE (impressions, reason) FROM checked "
                    f"WHERE event_type = 'interaction' AND {kept}")
        con.execute(f"CREATE TABLE impressions AS SELECT event_id, domain, interaction_id, "
                    f"unnest(impressions, recursive := true) FROM checked WHERE event_type = 'interaction' AND {kept}")
        for event_type in ("signal", "outcome", "label"):
            con.execute(f"CREATE TABLE {event_type}s AS SELECT * EXCLUDE (impressions, context, reason) "
                        f"FROM checked WHERE event_type = '{event_type}' AND {kept}")
        con.execute("CHECKPOINT")
        [(read, accepted)] = con.execute("SELECT (SELECT count(*) FROM checked), (SELECT count(*) FROM firsts)").fetchall()
    return {"seconds": time.perf_counter() - began, "read": read, "accepted": accepted}


def accumulate(home, config, first: date, days: int, events: int) -> dict:
    import dagster as dg

    from flywheel_pipeline.defs.transform import RAW_EVENTS

    return _per_domain(config, lambda domain: _materialize(
        dg.AssetSelection.assets(RAW_EVENTS).without_checks(), _range_tags(domain, first, days)))


def filter_(home, config, first: date, days: int, events: int) -> dict:
    import dagster as dg

    from flywheel_pipeline.defs.transform import GROUP, RAW_EVENTS

    selection = dg.AssetSelection.groups(GROUP) | dg.AssetSelection.checks_for_assets(RAW_EVENTS)
    return _per_domain(config, lambda domain: _materialize(selection, _range_tags(domain, first, days)))


def label(home, config, first: date, days: int, events: int) -> dict:
    import dagster as dg

    from flywheel_pipeline.defs.assets import LABELS

    return _per_domain(config, lambda domain: _materialize(dg.AssetSelection.assets(LABELS),
                                                          _range_tags(domain, first, days)))


def _per_domain(config, run: Callable[[str], float]) -> dict:
    """``run`` for each domain (a run covers one domain): the seconds of each, and their sum."""
    seconds = {domain: run(domain) for domain in config.domains}
    return {"seconds": sum(seconds.values()), "per_domain": seconds}


def _range_tags(domain: str, first: date, days: int) -> dict[str, str]:
    from flywheel_pipeline.defs.partitions import range_tags

    return range_tags(domain, first, first + timedelta(days=days - 1))


def _materialize(selection, tags: dict[str, str]) -> float:
    """One in-process run of ``selection`` from flywheel's Definitions on the home's instance; its seconds."""
    import dagster as dg

    from flywheel_pipeline.definitions import defs

    with dg.DagsterInstance.get() as instance:
        began = time.perf_counter()
        result = dg.materialize([*defs.assets, *defs.asset_checks], selection=selection, tags=tags,
                                resources=defs.resources, instance=instance, raise_on_error=False)
        seconds = time.perf_counter() - began
    failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
    if not result.success or failed:
        raise SystemExit(f"run {result.run_id} ({tags}) failed; failed checks: {failed}")
    return seconds


STAGE_FUNCTIONS = {"generate": generate, "reference": reference, "accumulate": accumulate, "filter": filter_,
                   "label": label}


def run_in_this_process(stage: str, home_path: Path, first: date, days: int, events: int, profile: bool,
                        report: Path) -> None:
    """The child's side: point this process at the home, run the stage, write its figures (and
    profile) as JSON to ``report`` (stdout and stderr carry Dagster's and dbt's logs)."""
    from flywheel_pipeline.config import load_config
    from flywheel_pipeline.home import Home

    home = Home(home_path).activate()
    config = load_config()
    if stage in PIPELINE_STAGES:
        from flywheel_pipeline.definitions import defs  # noqa: F401  (loaded here: part of start-up)
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    cpu_before = _cpu_seconds()
    result = STAGE_FUNCTIONS[stage](home, config, first, days, events)
    result["cpu_seconds"] = _cpu_seconds() - cpu_before
    if profiler:
        profiler.disable()
        top = io.StringIO()
        pstats.Stats(profiler, stream=top).sort_stats("tottime").print_stats(TOP_FUNCTIONS)
        result["profile"] = top.getvalue()
    report.write_text(json.dumps(result))


def _cpu_seconds() -> float:
    """CPU seconds of this process and its ended children (dbt): on a shared machine, steadier
    than wall seconds."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# -- the parent: one process per stage, the table ---------------------------------------------------

def run_stage(stage: str, args: argparse.Namespace, home: Path, first: date) -> tuple[dict, float, float]:
    """Run ``stage`` in its own process; its figures, wall seconds and peak RSS (MiB). Its output
    goes to ``<home>-<stage>.log`` beside the home."""
    report = home.parent / f"{home.name}-{stage}.json"
    report.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--stage", stage, "--home", str(home), "--first", first.isoformat(),
               "--days", str(args.days), "--events", str(args.events), "--report", str(report),
               *(["--profile"] if args.profile else [])]
    log = home.parent / f"{home.name}-{stage}.log"
    began = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"stage {stage} failed: {log}\n{log.read_text()[-3000:]}")
    return json.loads(report.read_text()), wall, usage.ru_maxrss / 1024


def earlier_report(home: Path, stage: str) -> dict | None:
    """The figures ``stage`` left beside ``home`` in an earlier run, if any."""
    report = home.parent / f"{home.name}-{stage}.json"
    return json.loads(report.read_text()) if report.exists() else None


def selected_stages(text: str) -> list[str]:
    stages = [stage.strip() for stage in text.split(",") if stage.strip()]
    if unknown := sorted(set(stages) - set(STAGES)):
        raise SystemExit(f"--stages: unknown {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    return [stage for stage in STAGES if stage in stages]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--home", type=Path, default=Path("/tmp/flywheel-scale"))
    parser.add_argument("--profile", action="store_true", help="cProfile each stage, print its top functions")
    parser.add_argument("--stages", type=selected_stages, default=list(STAGES),
                        help=f"comma-separated, of {','.join(STAGES)} (default: all)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=date.fromisoformat, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return run_in_this_process(args.stage, args.home, args.first, args.days, args.events, args.profile,
                                   args.report)

    home = args.home.resolve()
    if "generate" in args.stages:
        shutil.rmtree(home, ignore_errors=True)
        for stage in STAGES:  # an earlier run's figures are of other files
            (home.parent / f"{home.name}-{stage}.json").unlink(missing_ok=True)
        first = date.today() - timedelta(days=args.days + 1)  # the last day is over: every batch has landed
    elif not (generated := earlier_report(home, "generate")):
        raise SystemExit(f"no earlier run's home at {home}: run the stage generate first")
    else:
        first = date.fromisoformat(generated["first"])
    print(f"{args.events:,} events over {args.days} days from {first}, home {home}; stages {', '.join(args.stages)}; "
          f"load {os.getloadavg()[0]:.1f}")
    rows = []
    for stage in args.stages:
        result, wall, peak = run_stage(stage, args, home, first)
        if stage == "generate":
            result["first"] = first.isoformat()
            (home.parent / f"{home.name}-generate.json").write_text(json.dumps(result))
            print(f"generated {result['lines']:,} lines ({result['bad']:,} bad, {result['interactions']:,} "
                  f"interactions, {result['bytes'] / 2**20:,.0f} MiB)")
        if stage == "reference":
            print(f"reference read {result['read']:,} events, accepted {result['accepted']:,}")
        if "profile" in result:
            print(f"--- {stage}: top {TOP_FUNCTIONS} functions by own time ---\n{result['profile']}")
        rows.append((stage, result, wall, peak))
    print_table(rows, earlier_report(home, "generate")["lines"], earlier_report(home, "reference"),
                ran_reference="reference" in args.stages)


def print_table(rows: list[tuple[str, dict, float, float]], lines: int, reference: dict | None,
                ran_reference: bool) -> None:
    """Per stage: seconds, events/s, CPU seconds, peak RSS, start-up and the ratio to the reference
    (this run's, else the earlier one's, said so); the end-to-end line when all of it ran."""
    print(f"\nload average {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} cores)"
          + ("" if ran_reference or not reference else "; x reference: the earlier run's reference"))
    print(f"{'stage':<16}{'seconds':>8}{'events/s':>11}{'cpu s':>8}{'peak RSS':>12}{'start-up':>10}"
          f"{'x reference':>13}{'(cpu)':>7}")
    for stage, result, wall, peak in rows:
        seconds, cpu = result["seconds"], result["cpu_seconds"]
        ratio = (f"{seconds / reference['seconds']:>12.1f}x{cpu / reference['cpu_seconds']:>6.1f}x"
                 if stage in PIPELINE_STAGES and reference else "")
        print(f"{stage:<16}{seconds:>8.1f}{lines / seconds:>11,.0f}{cpu:>8.1f}{peak:>8,.0f} MiB"
              f"{wall - seconds:>9.1f}s{ratio}")
        for domain, domain_seconds in result.get("per_domain", {}).items():
            print(f"  {domain:<14}{domain_seconds:>8.1f}")
    pipeline = [result for stage, result, _, _ in rows if stage in PIPELINE_STAGES]
    if len(pipeline) < len(PIPELINE_STAGES) or not ran_reference:
        return
    total, total_cpu = sum(r["seconds"] for r in pipeline), sum(r["cpu_seconds"] for r in pipeline)
    print(f"accumulate -> filter -> label: {total:.1f}s = {lines / total:,.0f} events/s (start-up excluded), "
          f"{total_cpu:.1f} cpu s; {total / reference['seconds']:.1f}x the reference "
          f"({total_cpu / reference['cpu_seconds']:.1f}x cpu)")

if __name__ == "__main__":
    main()
