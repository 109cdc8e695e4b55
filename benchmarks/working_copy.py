"""Working copies under ``warehouse.engine: spark``: what a stage's run for one day loads from the
store, scoped to its days (``sources.Scope``) against the domain's whole history; and what a
deletion loads (``Warehouses.for_deletion``) against every table whole.

    .venv/bin/python benchmarks/working_copy.py [--home /tmp/flywheel-scale] [--store DIR]

Reads a home that ``benchmarks/scale.py`` left (its DuckDB warehouses after accumulate, filter and
label), writes its tables once as the distributed profile's Parquet store (``--store``, default
beside the home), then opens, each in a process of its own (so its peak RSS is its own), the
working copy a run of the last day would make for each of accumulation, labels and the review queue,
the training-set export's over its window and the health audit's from its window on (``--days``):
once with the stage's scope, once whole (the copy every run made before). Then the copies of two
deletions: forgetting the user with the most interactions and one with the median number, and a
retention run that expires the first day. Scoped, a deletion holds one day at a time: its rows
are the largest day's copy, its days how many copies it made, and its seconds include its plan
(the id columns of every day).
Prints rows held, days held, seconds to open and the process's peak RSS (its imports included:
about 300 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

COPIES = ("accumulation", "labels", "review_queue", "training_sets", "health_audit")
DELETIONS = ("forget_top_user", "forget_median", "retention")


def export_store(home: Path, store: Path) -> None:
    """The home's DuckDB warehouses as the store's partitioned Parquet (once)."""
    from flywheel_pipeline import warehouse
    from flywheel_pipeline.object_store import DBT_TABLES, STAGE_TABLES
    from flywheel_pipeline.sources import export_parquet

    if store.exists():
        return
    for path in sorted((home / "warehouse").glob("*.duckdb")):
        with warehouse.connect(path, read_only=True) as con:
            held = {f"{schema}.{name}" for schema, name in con.execute(
                "SELECT table_schema, table_name FROM information_schema.tables").fetchall()}
            export_parquet(con, [table for table in (*STAGE_TABLES, *DBT_TABLES) if table in held], store)


def scope_of(copy: str, last: date, days: int):
    """The scope the stage's run of ``last`` (its window of ``days`` days ending there) holds."""
    from flywheel_pipeline import accumulation, review, training_sets
    from flywheel_pipeline.health import audit
    from flywheel_pipeline.labeling import stage
    from flywheel_pipeline.training import Windows

    windows = Windows(last - timedelta(days=days - 1), last, last + timedelta(days=1), last + timedelta(days=1))
    return {"accumulation": accumulation.copy_scope([last]), "labels": stage.copy_scope([last]),
            "review_queue": review.copy_scope([last]), "training_sets": training_sets.copy_scope(windows),
            "health_audit": audit.copy_scope(windows)}[copy]


def deletion_of(objects, domain: str, copy: str):
    """Forgetting the domain's user with the most interactions, or one with the median number; or
    retention expiring its first day."""
    from flywheel_pipeline import privacy
    from flywheel_pipeline.sources import INTERACTIONS

    if copy.startswith("forget"):
        users = objects.source().read(INTERACTIONS, domain, columns=["user_id"])["user_id"].value_counts(sort=True)
        return privacy.forgetting(users["user_id"][0 if copy == "forget_top_user" else users.height // 2])
    days = sorted(objects.days(INTERACTIONS, domain))
    return privacy.expired(domain, (days[-1] - days[1]).days, days[-1])


def open_deletion(objects, domain: str, copy: str, scoped: bool) -> dict:
    """The child's side for a deletion: the copies ``Warehouses.for_deletion`` opens for it, one per
    day after its plan (timed, and nothing deleted, so nothing is written back); or every day of
    every table in one copy, as deletions made it."""
    from flywheel_pipeline.home import Home
    from flywheel_pipeline.object_store import working_copy
    from flywheel_pipeline.sources import Scope
    from flywheel_pipeline.warehouses import Warehouses

    deletion = deletion_of(objects, domain, copy)
    began, held = time.perf_counter(), []
    if scoped:
        for opened in Warehouses(Home(Path(objects.root)), objects).for_deletion(domain, deletion):
            with opened as con:
                held.append(_rows(con))
    else:
        source = objects.source()
        stored = {table: partitions for table in objects.tables(domain) if not table.startswith("privacy.")
                  and (partitions := source.partitions(table, domain))}
        whole = Scope.since(date.min, [t for t, p in stored.items() if p.day], [t for t, p in stored.items() if not p.day])
        with working_copy(objects, domain, read_only=True, scope=whole, found=stored) as con:
            held.append(_rows(con))
    return {"seconds": time.perf_counter() - began, "rows": max(held), "mib": _peak_mib(),
            "days": len(held) if scoped else "all"}


def open_copy(store: Path, domain: str, copy: str, scoped: bool, last: date, days: int) -> dict:
    """The child's side: open one working copy read-only, count what it holds."""
    from flywheel_pipeline.config import WarehouseSettings
    from flywheel_pipeline.object_store import ObjectStore, working_copy

    objects = ObjectStore.from_settings(WarehouseSettings(engine="spark", root=str(store)))
    if copy in DELETIONS:
        return open_deletion(objects, domain, copy, scoped)
    scope = scope_of(copy, last, days) if scoped else None  # before the clock: it imports the stages
    began = time.perf_counter()
    with working_copy(objects, domain, read_only=True, scope=scope) as con:
        seconds = time.perf_counter() - began
        rows = _rows(con)
    return {"seconds": seconds, "rows": rows, "mib": _peak_mib(), "days": None}


def _rows(con) -> int:
    """The rows a working copy holds, in all its tables."""
    return sum(rows for (rows,) in con.execute("SELECT estimated_size FROM duckdb_tables() WHERE NOT temporary").fetchall())


def _peak_mib() -> float:
    """This process's peak RSS since it started its program (VmHWM: unlike ru_maxrss, not carried
    over from the parent it was forked from)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


def run_child(args: argparse.Namespace, domain: str, copy: str, scoped: bool, last: date) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps([domain, copy, scoped, last.isoformat()]),
               "--store", str(args.store), "--days", str(args.days)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{domain} {copy} failed")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/flywheel-scale"))
    parser.add_argument("--store", type=Path)
    parser.add_argument("--days", type=int, default=7, help="the training-set export's and the audit's window")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.store = (args.store or args.home.parent / f"{args.home.name}-store").resolve()
    if args.child:
        domain, copy, scoped, last = json.loads(args.child)
        print(json.dumps(open_copy(args.store, domain, copy, scoped, date.fromisoformat(last), args.days)))
        return
    generated = json.loads((args.home.parent / f"{args.home.name}-generate.json").read_text())
    export_store(args.home, args.store)
    from flywheel_pipeline.config import WarehouseSettings
    from flywheel_pipeline.object_store import ObjectStore
    from flywheel_pipeline.sources import INTERACTIONS

    objects = ObjectStore.from_settings(WarehouseSettings(engine="spark", root=str(args.store)))
    print(f"store {args.store} from {generated['lines']:,} landing lines; load {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} cores; this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"{'domain':<16}{'copy':<17}{'days':>5}{'scoped rows':>13}{'s':>7}{'MiB':>7}"
          f"{'whole rows':>13}{'s':>7}{'MiB':>7}")
    for domain in sorted(path.name.removeprefix("domain=") for path in
                         Path(args.store, "raw.db", "interactions").iterdir()):
        days = sorted(objects.days(INTERACTIONS, domain))
        for copy in (*COPIES, *DELETIONS):
            scoped, whole = run_child(args, domain, copy, True, days[-1]), run_child(args, domain, copy, False, days[-1])
            held = scoped["days"] or (args.days if copy in ("training_sets", "health_audit") else 1)
            print(f"{domain:<16}{copy:<17}{held:>5}{scoped['rows']:>13,}{scoped['seconds']:>7.1f}{scoped['mib']:>7.0f}"
                  f"{whole['rows']:>13,}{whole['seconds']:>7.1f}{whole['mib']:>7.0f}")


if __name__ == "__main__":
    main()
