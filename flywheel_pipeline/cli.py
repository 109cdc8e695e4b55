"""`flywheel`: the command line.

    flywheel demo        the closed loop over several simulated weeks (the README's first command)
    flywheel simulate    write simulated landing batches
    flywheel run         run one domain's cycle job over a range of days
    flywheel approve     approve (or --reject) a candidate version
    flywheel rollback    put a domain's previous champion back
    flywheel status      champion, candidate and warehouse row counts per domain
"""

from __future__ import annotations

import argparse
import sys
import warnings
from datetime import UTC, date, datetime, timedelta

from rich.console import Console

from flywheel_pipeline.config import ConfigError, load_config
from flywheel_pipeline.home import Home

# Long paths stay whole (copy and paste); piped output gets room for the summary table.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)


def _yesterday() -> date:
    return datetime.now(UTC).date() - timedelta(days=1)


def cmd_demo(args: argparse.Namespace) -> None:
    from flywheel_pipeline.demo import Demo, print_summary

    demo = Demo(Home.from_env(), load_config(), cycles=args.cycles, warmup_days=args.warmup_days,
                per_day=args.per_day, seed=args.seed, stand_in_for_approvers=not args.leave_manual_pending,
                console=console)
    rows = demo.run()
    print_summary(rows, console)
    _print_status(demo.home)
    console.print("\nBrowse what it made:  [bold]make ui[/] (Dagster: runs, asset partitions, approvals) "
                  "and [bold]make mlflow-ui[/] (runs, registry aliases)")


def cmd_simulate(args: argparse.Namespace) -> None:
    from flywheel_pipeline.simulation import simulate, simulated_through

    home, config = Home.from_env().ensure(), load_config()
    continued = [day for domain in config.domains if (day := simulated_through(home, domain))]
    start = args.start or (max(continued) + timedelta(days=1) if continued
                           else _yesterday() - timedelta(days=args.days - 1))
    summary = simulate(home, config, start, args.days, seed=args.seed,
                       interactions_per_day=args.per_day, bad_row_share=args.bad_rows)
    last = start + timedelta(days=args.days - 1)
    console.print(f"wrote {summary.total_interactions:,} interactions for {start}..{last} to {home.landing}")


def cmd_run(args: argparse.Namespace) -> None:
    import dagster as dg

    from flywheel_pipeline.definitions import build_definitions, execute_cycle

    home, config = Home.from_env().activate(), load_config()
    config.domain(args.domain)
    last = args.end or _yesterday()
    first = args.start or last - timedelta(days=6)
    result = execute_cycle(build_definitions(config, home), dg.DagsterInstance.get(), args.domain, first, last)
    console.print(f"{args.domain} {first}..{last}: {'succeeded' if result.success else 'FAILED'} (run {result.run_id})")
    _print_status(home)
    if not result.success:
        sys.exit(1)


def cmd_approve(args: argparse.Namespace) -> None:
    import mlflow

    from flywheel_pipeline import approval
    from flywheel_pipeline.warehouse import connect

    home, config = Home.from_env().activate(), load_config()
    decision = "rejected" if args.reject else "approved"
    if args.reject and not args.reason:
        raise SystemExit("a rejection needs --reason")
    with connect(home.warehouse) as con:
        record = approval.record_decision(con, mlflow.MlflowClient(), config, args.domain, args.version,
                                          decision, args.approver, args.reason)
    console.print(f"approval {record.approval_id}: {decision} {args.domain} v{args.version} by {args.approver}; "
                  "the approval sensor deploys approvals (dagster dev must be running)")


def cmd_rollback(args: argparse.Namespace) -> None:
    import mlflow

    from flywheel_pipeline import registry

    Home.from_env().activate()
    load_config().domain(args.domain)
    rolled_back, restored = registry.rollback(mlflow.MlflowClient(), args.domain)
    console.print(f"{args.domain}: champion is v{restored} again (v{rolled_back} rolled back)")


def cmd_status(args: argparse.Namespace) -> None:
    _print_status(Home.from_env().activate())


def _print_status(home: Home) -> None:
    import mlflow

    from flywheel_pipeline import registry
    from flywheel_pipeline.warehouse import connect

    console.print(f"\nwarehouse: {home.warehouse}")
    if home.warehouse.exists():
        with connect(home.warehouse, read_only=True) as con:
            tables = con.execute(
                """SELECT table_schema || '.' || table_name FROM information_schema.tables
                   WHERE table_schema IN ('raw', 'marts', 'labels', 'registry') ORDER BY 1"""
            ).fetchall()
            for (table,) in tables:
                count = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                console.print(f"  {table:<32} {count:>10,} rows")
    client = mlflow.MlflowClient()
    for domain in load_config().domains:
        aliases = {alias: registry.alias_version(client, domain, alias)
                   for alias in (registry.CHAMPION, registry.CANDIDATE, registry.PREVIOUS)}
        console.print(f"  {registry.model_name(domain)}: " +
                      ", ".join(f"{alias}=v{v}" if v else f"{alias}=none" for alias, v in aliases.items()))


def _date(text: str) -> date:
    return date.fromisoformat(text)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="flywheel", description=__doc__.splitlines()[0])
    commands = root.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the closed loop over several simulated weeks")
    demo.add_argument("--cycles", type=int, default=4)
    demo.add_argument("--warmup-days", type=int, default=14)
    demo.add_argument("--per-day", type=int, default=1500, help="interactions per day per domain")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--leave-manual-pending", action="store_true",
                      help="do not stand in for the approvers of manual domains")
    demo.set_defaults(func=cmd_demo)

    simulate = commands.add_parser("simulate", help="write simulated landing batches")
    simulate.add_argument("--days", type=int, default=7)
    simulate.add_argument("--start", type=_date,
                          help="first day (default: the day after the last simulated one, else DAYS days ending yesterday)")
    simulate.add_argument("--per-day", type=int, default=1500)
    simulate.add_argument("--bad-rows", type=float, default=0.01, help="share of bad rows")
    simulate.add_argument("--seed", type=int, default=7)
    simulate.set_defaults(func=cmd_simulate)

    run = commands.add_parser("run", help="run one domain's cycle over a range of days")
    run.add_argument("--domain", required=True)
    run.add_argument("--start", type=_date)
    run.add_argument("--end", type=_date)
    run.set_defaults(func=cmd_run)

    approve = commands.add_parser("approve", help="approve or reject a candidate version")
    approve.add_argument("--domain", required=True)
    approve.add_argument("--version", required=True)
    approve.add_argument("--approver", required=True)
    approve.add_argument("--reject", action="store_true")
    approve.add_argument("--reason")
    approve.set_defaults(func=cmd_approve)

    rollback = commands.add_parser("rollback", help="put the previous champion back")
    rollback.add_argument("--domain", required=True)
    rollback.set_defaults(func=cmd_rollback)

    status = commands.add_parser("status", help="champion, candidate and row counts per domain")
    status.set_defaults(func=cmd_status)
    return root


def main(argv: list[str] | None = None) -> None:
    # Dagster flags its beta/preview parameters (backfill policies, partitioned checks) on every load.
    warnings.filterwarnings("ignore", message=r".* is currently in (beta|preview)")
    args = parser().parse_args(argv)
    from flywheel_pipeline.approval import ApprovalError
    from flywheel_pipeline.registry import RegistryError

    try:
        args.func(args)
    except (ConfigError, ApprovalError, RegistryError) as error:
        raise SystemExit(f"flywheel: {error}") from None


if __name__ == "__main__":
    main()
