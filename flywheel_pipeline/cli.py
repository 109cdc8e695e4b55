"""`flywheel`: the command line.

    flywheel demo        the closed loop over several simulated weeks (the README's first command)
    flywheel simulate    write simulated landing batches
    flywheel import      a file other tools wrote (OpenTelemetry spans, a bandit log, reviews) as landing batches
    flywheel run         run one domain's cycle job over a range of days
    flywheel approve     approve (or --reject) a candidate, signed with your SSH key; the approval sensor deploys it
    flywheel rollback    put a domain's previous champion back
    flywheel status      champion, candidate and warehouse row counts per domain; the registry against the deployment log
    flywheel keys        the approvers' declared keys; the statement a decision's signature signs
    flywheel forget      delete a user's data everywhere; list the models trained on it
    flywheel report      a domain's health report (one HTML page per cycle): write it again, --open it
    flywheel warehouse split   give each domain its own warehouse file (a home kept before in one)
    flywheel ui          the Dagster UI with its daemon (`make ui`), until Ctrl-C or SIGTERM

Runs go through the home's Dagster instance and daemon (``flywheel_pipeline.launcher``), so they
show in the Dagster UI like runs launched there. Tool output (dbt, the daemon) goes to the home's
flywheel.log; ``--verbose`` shows it here instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING

from rich.console import Console

from flywheel_pipeline.config import ConfigError, FlywheelConfig, load_config
from flywheel_pipeline.health import FAULTS, TRAPS
from flywheel_pipeline.home import Home, HomeError
from flywheel_pipeline.run_range import ACCUMULATE, RunRefused, cycle_refusals, expiring, run_range

if TYPE_CHECKING:
    from flywheel_pipeline.runs import CycleOutcome

# Long paths stay whole (copy and paste); piped output gets room for the summary table.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)


def _today() -> date:
    return datetime.now(UTC).date()


def _yesterday() -> date:
    return _today() - timedelta(days=1)


@contextmanager
def tool_output(home: Home, verbose: bool) -> Iterator[IO[str] | None]:
    """Where the tools' output goes: the home's flywheel.log, or this terminal with --verbose."""
    if verbose:
        yield None
        return
    home.log.parent.mkdir(parents=True, exist_ok=True)
    with home.log.open("a") as log:
        yield log


def cmd_demo(args: argparse.Namespace) -> None:
    from flywheel_pipeline.demo import Demo, print_pending_approvals, print_summary

    home, config = Home.from_env(), load_config()
    demo = Demo(home, config, cycles=args.cycles, warmup_days=args.warmup_days, per_day=args.per_day,
                seed=args.seed, stand_in_for_approvers=args.stand_in_for_approvers, console=console)
    with tool_output(home, args.verbose) as log:
        rows = demo.run(log)
    print_summary(rows, demo.oracles, console)
    _print_status(demo.home, config)
    print_pending_approvals(demo, console)


def _trap(text: str) -> tuple[str, float]:
    """--trap NAME[=STRENGTH]: a trap of health.TRAPS and its strength in (0, 1] (default 1)."""
    name, _, strength = text.partition("=")
    if name not in (*TRAPS, *FAULTS):
        raise argparse.ArgumentTypeError(f"unknown trap {name}: the traps are {', '.join([*TRAPS, *FAULTS])}")
    try:
        value = float(strength or 1)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a trap's strength is a number in (0, 1]")
    return name, value


def cmd_simulate(args: argparse.Namespace) -> None:
    from flywheel_pipeline.simulation import simulate, simulated_through

    home, config = Home.from_env().ensure(), load_config()
    domains = args.domain or list(config.domains)
    continued = [day for domain in domains if (day := simulated_through(home, domain))]
    start = args.start or (max(continued) + timedelta(days=1) if continued
                           else _yesterday() - timedelta(days=args.days - 1))
    try:
        summary = simulate(home, config, start, args.days, seed=args.seed,
                           interactions_per_day=args.per_day, bad_row_share=args.bad_rows,
                           domains=domains, traps=dict(args.trap), scenario=args.scenario,
                           scenario_day=args.scenario_day, scenario_span_days=args.scenario_span)
    except ValueError as error:
        raise SystemExit(f"flywheel: {error}") from None
    last = start + timedelta(days=args.days - 1)
    traps = f" with the traps {', '.join(f'{name}={strength:g}' for name, strength in args.trap)}" if args.trap else ""
    if args.scenario:
        traps += f" through the {args.scenario} scenario from {args.scenario_day}"
    console.print(f"wrote {summary.total_interactions:,} interactions for {start}..{last}{traps} "
                  f"to {home.landing}")


def _scenario_day(text: str) -> date | int:
    """A scenario's day: a date, or a number of days from the simulated world's first day."""
    if text.isdigit():
        return int(text)
    return _date(text)


def cmd_import(args: argparse.Namespace) -> None:
    """Import the file and print its report; a file none of whose records mapped fails, naming the
    top reasons."""
    from flywheel_pipeline.importers import UnreadableFile, import_file

    home, config = Home.from_env().ensure(), load_config()
    report = import_file(home, config, args.format, args.path, args.domain)
    console.print(f"imported {report.path} ({report.format}) into {report.domain}: {report.records:,} records: "
                  f"{report.records_mapped:,} mapped, {report.rejected.total():,} rejected, "
                  f"{report.skipped.total():,} skipped")
    console.print("  events written: " + (", ".join(f"{kind} {n:,}" for kind, n in sorted(report.events.items()))
                                          or "none"))
    if report.catalogue_items is not None:
        console.print(f"  catalogue: {report.catalogue_items:,} items kept in {home.catalogue(report.domain)}")
    if report.batches:
        shown = report.batches if len(report.batches) <= 3 else [report.batches[0], "...", report.batches[-1]]
        console.print(f"  batches: {len(report.batches)} in {home.landing} ({', '.join(shown)})")
    for title, counts in (("rejected (raw.quarantine)", report.rejected), ("skipped", report.skipped)):
        for reason, n in counts.most_common():
            console.print(f"  {title}: {reason} {n:,}")
    if not report.records_mapped:
        reasons = (report.rejected + report.skipped).most_common(3)
        raise UnreadableFile(f"no record of {report.path} could be mapped: "
                             + (", ".join(f"{reason} {n:,}" for reason, n in reasons) or "it holds none"))
    if report.days:
        _print_after_import(report.domain, report.days[0], report.days[-1],
                            reviews=set(report.events) == {"label"})


def _print_after_import(domain: str, first: date, last: date, reviews: bool) -> None:
    """The next steps after an import: load its days without training (first, for reviews), or
    the whole cycle over the windows ending on its last day; then what `flywheel run` would refuse
    in that cycle (e.g. windows longer than the days held) and what retention will delete, with the
    settings to change."""
    load = (f"flywheel run --domain {domain} --start {first} --end {last} --only {ACCUMULATE}   "
            f"(accumulates the batches and labels their days; no training)")
    cycle = (f"flywheel run --domain {domain} --end {last}   (the whole cycle over the domain's "
             f"windows ending {last}: the gate decision prints at the end)")
    steps = [load, cycle] if reviews else [cycle, load]
    console.print(f"next: {steps[0]}\n  or: {steps[1]}")
    config = load_config()
    for refusal in cycle_refusals(Home.from_env(), config, domain, last, _today()):
        console.print(f"  until changed, `flywheel run` refuses the cycle: {refusal}")
    if note := expiring(config, domain, first, _today()):
        console.print(f"  note: {note}")


def cmd_run(args: argparse.Namespace) -> None:
    from flywheel_pipeline.defs.ui import run_url
    from flywheel_pipeline.launcher import local_dagster
    from flywheel_pipeline.runs import run_cycle

    home, config = Home.existing().activate(), load_config()
    config.domain(args.domain)
    first, last = run_range(home, config, args.domain, args.start, args.end, _today(),
                            accumulate_only=args.only is not None)  # refused before anything starts
    steps = "accumulate -> filter -> label" + (
        "" if args.only else " -> fine-tune -> validate -> register")
    console.print(f"{args.domain} {first}..{last}: {steps} "
                  f"(tool output: {'here' if args.verbose else home.log})")
    if note := expiring(config, args.domain, first, _today()):
        console.print(f"  note: {note}")
    with tool_output(home, args.verbose) as log, local_dagster(home, log) as dagster:
        outcome = run_cycle(
            dagster, args.domain, first, last, only=args.only,
            on_step=lambda step: console.print(f"  {_mark(step.status)} {step.name} {step.status}"
                                               + (f": {step.detail}" if step.detail else "")),
            on_submit=lambda run_id: console.print(f"  run {run_id} ({run_url(config, run_id)})"),
        )
    _print_outcome(config, outcome)
    if not outcome.succeeded:
        sys.exit(1)


def _print_outcome(config: FlywheelConfig, outcome: CycleOutcome) -> None:
    """How a cycle's run ended, what its gate decided (a whole cycle), and the next step."""
    from flywheel_pipeline.runs import next_step_for_person

    status = f"{outcome.domain}: run {outcome.status.value.lower()}"
    if outcome.only:
        console.print(status)
    else:
        held_out = outcome.held_out()
        console.print(f"{status}; gate [bold]{outcome.gate or 'not reached'}[/]"
                      + (f" ({held_out})" if held_out else ""))
    if outcome.reasons and outcome.gate != "passed":
        console.print(f"  {outcome.reasons}")
    for check in outcome.failed_checks:
        console.print(f"  [yellow]check[/] {check}", markup=True, highlight=False)
    if outcome.revisit:
        console.print(f"  revisited the previous inconclusive candidate: {outcome.revisit}")
    if outcome.version:
        console.print(f"  registered {outcome.domain} v{outcome.version}")
    console.print(f"next: {next_step_for_person(config, outcome)}")


def _mark(status: str) -> str:
    return {"succeeded": "[green]ok[/]", "skipped": "[yellow]--[/]"}.get(status, "[red]!![/]")


def cmd_approve(args: argparse.Namespace) -> None:
    from flywheel_pipeline import approval, registry
    from flywheel_pipeline.defs.ui import APPROVE_JOB, APPROVE_OP
    from flywheel_pipeline.launcher import failure, local_dagster
    from flywheel_pipeline.runs import wait_for_deployment

    home, config = Home.existing().activate(), load_config()
    config.domain(args.domain)
    decision = "rejected" if args.reject else "approved"
    if args.reject and not (args.reason or "").strip():
        raise SystemExit("flywheel: a rejection needs --reason")
    client = home.mlflow_client()
    version = args.version or registry.alias_version(client, args.domain, registry.CANDIDATE)
    if version is None:
        raise SystemExit(f"flywheel: {args.domain} has no candidate waiting; name one with --version")
    key = approval.signing_key(home)
    approval.check_decision(client, config, key, args.domain, version, decision, args.approver, args.reason)  # fail fast
    signature = _signature(args, config, _statement(home, client, args.domain, version, decision))
    run_config = {"ops": {APPROVE_OP: {"config": {"domain": args.domain, "version": version,
                                                  "approver": args.approver, "decision": decision,
                                                  "reason": args.reason or "", "signature": signature}}}}
    with tool_output(home, args.verbose) as log, local_dagster(home, log) as dagster:
        run = dagster.wait(dagster.submit(APPROVE_JOB, run_config=run_config))
        if not run.is_success:
            raise SystemExit(f"flywheel: the {decision} decision was not recorded: "
                             f"{failure(dagster.instance, run.run_id)}")
        console.print(f"{decision} {args.domain} v{version} by {args.approver}")
        if decision == "approved":
            deploy = wait_for_deployment(dagster, config, args.domain, version, client)
            champion = registry.alias_version(client, args.domain, registry.CHAMPION)
            if not deploy.is_success:
                raise SystemExit(f"flywheel: the deployment of {args.domain} v{version} was refused: "
                                 f"{failure(dagster.instance, deploy.run_id)} (champion: {registry.shown_champion(champion)})")
            console.print(f"deployed: {args.domain} champion is v{champion}")


def _statement(home: Home, client, domain: str, version: str, decision: str):
    """The statement a person's decision on ``version`` signs now (approval.statement)."""
    from flywheel_pipeline import approval
    from flywheel_pipeline.warehouse import connect

    with connect(home.approvals) as con:
        return approval.statement(con, client, domain, version, decision)


def _signature(args: argparse.Namespace, config: FlywheelConfig, statement) -> str:
    """The approver's signature of ``statement``: made now with --sign-with's key, or read from
    --signature's file; checked here first, so a wrong one is refused before anything starts."""
    from flywheel_pipeline import approval, signatures

    if args.sign_with:
        try:
            signature = signatures.sign(args.sign_with.expanduser(), statement.text)
        except signatures.SignatureError as error:
            raise SystemExit(f"flywheel: {error}") from None
    elif args.signature:
        signature = args.signature.read_text()
    else:
        raise SystemExit(f"flywheel: a decision counts only with your signature: add --sign-with ~/.ssh/id_ed25519 "
                         f"(your key, declared under approver_keys in flywheel.yaml), or --signature FILE with your "
                         f"signature of this statement:\n{statement.text}{approval.how_to_sign(statement)}")
    approval.check_signature(config, args.approver, statement, signature)
    return signature


def cmd_rollback(args: argparse.Namespace) -> None:
    from flywheel_pipeline import registry
    from flywheel_pipeline.launcher import failure, local_dagster

    home, config = Home.existing().activate(), load_config()
    config.domain(args.domain)
    client = home.mlflow_client()
    if registry.alias_version(client, args.domain, registry.PREVIOUS) is None:  # fail fast
        raise SystemExit(f"flywheel: {registry.model_name(args.domain)} has no previous champion to roll back to")
    run_config = {"ops": {"restore_previous": {"config": {"domain": args.domain}}}}
    with tool_output(home, args.verbose) as log, local_dagster(home, log) as dagster:
        run = dagster.wait(dagster.submit("rollback_champion", run_config=run_config))
        if not run.is_success:
            raise SystemExit(f"flywheel: rollback failed: {failure(dagster.instance, run.run_id)}")
    console.print(f"{args.domain}: champion is v{registry.alias_version(client, args.domain, registry.CHAMPION)} again")


def cmd_forget(args: argparse.Namespace) -> None:
    from flywheel_pipeline import privacy
    from flywheel_pipeline.warehouses import Warehouses

    home, config = Home.existing().activate(), load_config()
    warehouses = Warehouses.for_settings(home, config.warehouse)
    report = privacy.forget_user(home, config.domains, args.user, warehouses.for_deletion)
    console.print(f"forgot the user (tombstone {report.user_hash[:12]}...): "
                  f"{sum(report.rows_deleted.values()):,} rows from {len(report.rows_deleted)} tables, "
                  f"{sum(report.landing_lines_removed.values()):,} lines from "
                  f"{len(report.landing_lines_removed)} landing batches")
    for table, count in report.rows_deleted.items():
        console.print(f"  {table:<40} {count:>8,} rows")
    for dataset, count in report.dataset_records_removed.items():
        console.print(f"  datasets/{dataset:<31} {count:>8,} records")
    models = privacy.trained_on(home.mlflow_client(), report.user_days)
    if not models:
        console.print("no registered model was trained on their data")
        return
    console.print("registered models trained on their data (the next cycle trains without it; retrain "
                  "or roll back now if that cannot wait):")
    for model in models:
        console.print(f"  {model.summary()}")


def cmd_status(args: argparse.Namespace) -> None:
    _print_status(Home.existing().activate(), load_config())


def _print_status(home: Home, config: FlywheelConfig) -> None:
    """Per domain: its warehouse's tables and row counts, its model's aliases (``champion=baseline``
    before the first deployment: the product serves its baseline), how the champion got there (a
    rollback says so), the holdback while one lasts and the monitor's latest look."""
    from flywheel_pipeline import registry
    from flywheel_pipeline.monitoring import latest_watch
    from flywheel_pipeline.warehouses import Warehouses

    console.print(f"\nhome: {home.root}")
    client, warehouses = home.mlflow_client(), Warehouses.for_settings(home, config.warehouse)
    for domain in config.domains:
        exists = warehouses.exists(domain)
        console.print(f"{domain}: warehouse {warehouses.where(domain)}" + ("" if exists else " (none yet)"))
        watched = "not run yet"
        if exists:
            for table, count in warehouses.row_counts(domain).items():
                console.print(f"  {table:<32} {count:>10,} rows")
            with warehouses.reader(domain) as source:
                watched = latest_watch(source, domain)
        champion = registry.shown_champion(registry.alias_version(client, domain, registry.CHAMPION))
        others = {alias: registry.alias_version(client, domain, alias)
                  for alias in (registry.CANDIDATE, registry.PREVIOUS)}
        console.print(f"  {registry.model_name(domain)}: champion={champion}, "
                      + ", ".join(f"{alias}=v{v}" if v else f"{alias}=none" for alias, v in others.items()))
        console.print(f"  champion: {registry.champion_summary(client, domain)}")
        console.print(f"  holdback: {registry.holdback_summary(client, domain)}")
        console.print(f"  registry: {_registry_state(home, config, client, domain)}")
        console.print(f"  monitor: {watched}")


def _registry_state(home: Home, config: FlywheelConfig, client, domain: str) -> str:
    """The domain's serving aliases against the signed deployment log, and the last revert."""
    from flywheel_pipeline import approval, deployment_log
    from flywheel_pipeline.warehouse import connect

    if not home.approvals.exists():  # nothing was ever deployed (a reader makes no empty file)
        found = {alias: version for alias, version in deployment_log.aliases(client, domain).items() if version}
        return ("nothing deployed" if not found else f"[bold red]MISMATCH[/] {deployment_log.shown(found)} set "
                f"outside flywheel: flywheel never deployed {domain}")
    with connect(home.approvals) as con:
        found = deployment_log.mismatch(con, client, approval.signing_key(home), domain)
        if deployment_log.deployed_before_the_log(con, domain):
            return deployment_log.UNLOGGED
        reverted = deployment_log.last_revert(con, domain)
    state = ("matches the signed deployment log" if found is None
             else f"[bold red]MISMATCH[/] {found.summary()} (registry_watch: {config.registry_watch})")
    return state + (f"; last put back: {reverted.summary()}" if reverted else "")


def cmd_keys_list(args: argparse.Namespace) -> None:
    """Each domain's approvers and the fingerprints of the keys flywheel.yaml declares for them."""
    from flywheel_pipeline.signatures import fingerprint

    config = load_config()
    for domain, settings in config.domains.items():
        console.print(f"{domain} (automation {settings.automation}):" + ("" if settings.approvers else " no approvers"))
        for approver in settings.approvers:
            keys = config.approver_keys.get(approver, [])
            shown = ", ".join(f"{line.split()[0]} {fingerprint(line)}" for line in keys)
            console.print(f"  {approver}: {shown or f'no key: cannot decide until approver_keys.{approver} is set'}",
                          highlight=False)


def cmd_keys_statement(args: argparse.Namespace) -> None:
    """The statement a decision's signature signs, on standard output alone (to pipe into
    ssh-keygen -Y sign); how to sign it, on standard error."""
    from flywheel_pipeline import approval, registry

    home, config = Home.existing().activate(), load_config()
    config.domain(args.domain)
    client = home.mlflow_client()
    version = args.version or registry.alias_version(client, args.domain, registry.CANDIDATE)
    if version is None:
        raise SystemExit(f"flywheel: {args.domain} has no candidate waiting; name one with --version")
    statement = _statement(home, client, args.domain, version, "rejected" if args.reject else "approved")
    sys.stdout.write(statement.text)
    print(approval.how_to_sign(statement), file=sys.stderr)


def cmd_warehouse_split(args: argparse.Namespace) -> None:
    from flywheel_pipeline.warehouse import split_shared_warehouse

    home, config = Home.from_env(), load_config()
    report = split_shared_warehouse(home, list(config.domains))
    for name, rows in report.rows.items():
        console.print(f"  {name:<20} {rows:>12,} rows")
    console.print(f"each domain has its own warehouse in {home.warehouses}, the approvals are in "
                  f"{home.approvals}; the shared file is kept as {report.kept_as} (delete it when you are sure)")


def cmd_report(args: argparse.Namespace) -> None:
    import webbrowser

    from flywheel_pipeline.health.report import (
        ReportMissing,
        render_stored,
        report_paths,
        stored_report,
    )
    from flywheel_pipeline.home import write_atomically
    from flywheel_pipeline.warehouses import Warehouses

    home = Home.existing()
    try:
        report, html = render_stored(Warehouses.for_settings(home, load_config().warehouse),
                                     stored_report(home, args.domain, args.as_of))
    except ReportMissing as error:
        raise SystemExit(f"flywheel: {error}") from None
    page = args.output or report_paths(home, args.domain, report.as_of)[0]
    page.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(page, html.encode())
    console.print(str(page.resolve()), highlight=False)
    if args.open:
        webbrowser.open(page.resolve().as_uri())


def cmd_ui(args: argparse.Namespace) -> None:
    from flywheel_pipeline.launcher import serve_ui

    home = Home.from_env().activate()
    console.print(f"starting the Dagster code server, daemon and webserver for {home.root} "
                  f"(tool output: {'here' if args.verbose else home.log})")
    with tool_output(home, args.verbose) as log:
        serve_ui(home, log, args.port, on_ready=lambda url: console.print(
            f"Dagster UI on {url}, its daemon running the sensors and the run queue; "
            "Ctrl-C stops them all"))
    console.print("stopped the Dagster UI, its daemon and its code server")


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="flywheel", description=__doc__.splitlines()[0])
    commands = root.add_subparsers(dest="command", required=True)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", action="store_true", help="show tool output (dbt, Dagster) here")

    demo = commands.add_parser("demo", parents=[verbose], help="run the closed loop over several simulated weeks")
    demo.add_argument("--cycles", type=int, default=4)
    demo.add_argument("--warmup-days", type=int, default=14)
    demo.add_argument("--per-day", type=int, default=1500, help="interactions per day per domain")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--stand-in-for-approvers", action="store_true",
                      help="approve the candidates of domains below automation full too (by default they wait for a person)")
    demo.set_defaults(func=cmd_demo)

    simulate = commands.add_parser("simulate", help="write simulated landing batches")
    simulate.add_argument("--days", type=int, default=35,
                          help="days of traffic (default 35: a training window of 28 days and a held-out week)")
    simulate.add_argument("--start", type=_date,
                          help="first day (default: the day after the last simulated one, else DAYS days ending yesterday)")
    simulate.add_argument("--per-day", type=int, default=1500)
    simulate.add_argument("--bad-rows", type=float, default=0.01, help="share of bad rows")
    simulate.add_argument("--seed", type=int, default=7)
    simulate.add_argument("--domain", action="append", metavar="DOMAIN",
                          help="simulate this domain only (repeatable; default: every domain)")
    simulate.add_argument("--trap", action="append", default=[], type=_trap, metavar="NAME[=STRENGTH]",
                          help="make the product commit this trap on purpose (repeatable), at a strength "
                               "in (0, 1] (default 1, the blatant trap): " + ", ".join([*TRAPS, *FAULTS]))
    from flywheel_pipeline.simulation.scenarios import SCENARIOS, STALE_SPAN_DAYS

    simulate.add_argument("--scenario", choices=SCENARIOS, metavar="NAME",
                          help="make the world change on purpose from --scenario-day on "
                               "(docs/simulation-scenarios.md): " + ", ".join(SCENARIOS))
    simulate.add_argument("--scenario-day", type=_scenario_day, metavar="N",
                          help="the scenario's day: YYYY-MM-DD, or N days after the world's first day")
    simulate.add_argument("--scenario-span", type=int, default=STALE_SPAN_DAYS, metavar="DAYS",
                          help=f"stale_holdout: how long the fad lasts before the day (default {STALE_SPAN_DAYS})")
    simulate.set_defaults(func=cmd_simulate)

    from flywheel_pipeline.importers import FORMATS

    importing = commands.add_parser("import", help="write a file other tools wrote as landing batches "
                                                   "(docs/importing.md)")
    importing.add_argument("format", choices=sorted(FORMATS))
    importing.add_argument("path", help="the file: OTLP JSON (otel), CSV or Parquet (bandit), a Label Studio "
                                        "JSON export (label-studio), Argilla records (argilla)")
    importing.add_argument("--domain", required=True, help="whose landing folder (its importing: mapping "
                                                           "in flywheel.yaml)")
    importing.set_defaults(func=cmd_import)

    run = commands.add_parser("run", parents=[verbose], help="run one domain's cycle over a range of days")
    run.add_argument("--domain", required=True)
    run.add_argument("--start", type=_date,
                     help="first day (default: the first day of the domain's windows, "
                          "lookback_days + holdout_days ending --end; no earlier than the home's "
                          "first day of traffic)")
    run.add_argument("--end", type=_date, help="last day (default: yesterday)")
    run.add_argument("--only", choices=[ACCUMULATE],
                     help="accumulate: accumulate -> filter -> label only, no training (e.g. after "
                          "`flywheel import` of reviews)")
    run.set_defaults(func=cmd_run)

    approve = commands.add_parser("approve", parents=[verbose],
                                  help="approve or reject a candidate; waits for the deployment")
    approve.add_argument("--domain", required=True)
    approve.add_argument("--version", help="default: the version the `candidate` alias names")
    approve.add_argument("--approver", required=True)
    approve.add_argument("--reject", action="store_true")
    approve.add_argument("--reason")
    signing = approve.add_mutually_exclusive_group()
    signing.add_argument("--sign-with", type=Path, metavar="KEY",
                         help="your SSH key (declared under approver_keys in flywheel.yaml), e.g. ~/.ssh/id_ed25519; "
                              "a .pub file signs through ssh-agent")
    signing.add_argument("--signature", type=Path, metavar="FILE",
                         help="your signature of the decision's statement, made elsewhere (`flywheel keys statement`)")
    approve.set_defaults(func=cmd_approve)

    rollback = commands.add_parser("rollback", parents=[verbose], help="put the previous champion back")
    rollback.add_argument("--domain", required=True)
    rollback.set_defaults(func=cmd_rollback)

    status = commands.add_parser("status", help="champion, candidate and row counts per domain; the registry "
                                                "against the signed deployment log")
    status.set_defaults(func=cmd_status)

    keys = commands.add_parser("keys", help="approvers' signing keys and the statements they sign (docs/security.md)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    keys_commands.add_parser("list", help="each domain's approvers and their declared keys' fingerprints"
                             ).set_defaults(func=cmd_keys_list)
    statement = keys_commands.add_parser("statement", help="print the statement a decision signs (pipe it into "
                                                           "ssh-keygen -Y sign -n flywheel-approval -f KEY)")
    statement.add_argument("--domain", required=True)
    statement.add_argument("--version", help="default: the version the `candidate` alias names")
    statement.add_argument("--reject", action="store_true", help="the statement of a rejection")
    statement.set_defaults(func=cmd_keys_statement)

    forget = commands.add_parser("forget", help="delete a user's data everywhere and keep it out (docs/privacy.md)")
    forget.add_argument("--user", required=True, help="the pseudonymous user_id their events carry")
    forget.set_defaults(func=cmd_forget)

    report = commands.add_parser("report", help="write a domain's health report again (latest cycle) and print its path")
    report.add_argument("--domain", required=True)
    report.add_argument("--as-of", type=_date, help="the cycle's last held-out day (default: the latest report)")
    report.add_argument("--output", type=Path, help="where to write the page (default: beside its stored data "
                                                    "in <home>/reports/<domain>/)")
    report.add_argument("--open", action="store_true", help="open the page in the browser")
    report.set_defaults(func=cmd_report)

    warehouse = commands.add_parser("warehouse", help="the warehouse files")
    warehouse_commands = warehouse.add_subparsers(dest="warehouse_command", required=True)
    split = warehouse_commands.add_parser("split", help="give each domain its own warehouse file, from the one "
                                                        "file a home kept before (docs/warehouse.md)")
    split.set_defaults(func=cmd_warehouse_split)

    ui = commands.add_parser("ui", parents=[verbose], help="the Dagster UI with its daemon (`make ui`), "
                                                           "until Ctrl-C or SIGTERM")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)
    return root


def main(argv: list[str] | None = None) -> None:
    # Dagster flags its beta/preview parameters (backfill policies, partitioned checks) on every load;
    # MLflow announces creating its tables. Neither helps a person at the terminal.
    warnings.filterwarnings("ignore", message=r".* is currently in (beta|preview)")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a model's files, hashed (lineage)
    args = parser().parse_args(argv)
    from flywheel_pipeline.approval import ApprovalError
    from flywheel_pipeline.deployment_log import LogError
    from flywheel_pipeline.importers import UnreadableFile
    from flywheel_pipeline.launcher import LaunchError
    from flywheel_pipeline.privacy import PrivacyError
    from flywheel_pipeline.registry import RegistryError
    from flywheel_pipeline.warehouse import WarehouseBusy

    try:
        args.func(args)
    except (ConfigError, HomeError, ApprovalError, RegistryError, LaunchError, PrivacyError,
            WarehouseBusy, UnreadableFile, RunRefused, LogError) as error:
        raise SystemExit(f"flywheel: {error}") from None
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM, while services run): stopped, no traceback
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
