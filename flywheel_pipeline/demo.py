"""The closed loop, end to end, on the embedded default, run the way a deployment runs it.

Each cycle: the simulated product serves a week of traffic with each domain's current champion ->
the domain's cycle job is submitted to the Dagster instance and run by the daemon (accumulate,
filter, label, fine-tune, validate, register) -> domains at automation full approve themselves when
the gate passes and the approval sensor deploys -> the new champion serves the next week. An oversight
domain's candidate waits for a person (the demo prints what to click), unless the demo is told to stand in.
Everything lives in the home's Dagster instance and MLflow store, so ``make ui`` and
``make mlflow-ui`` show the history afterwards. While the daemon runs, the late-label sensor may
re-label older days between cycles, as it would in production.
"""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import IO

import mlflow
from rich.console import Console
from rich.table import Table

from flywheel_pipeline import registry, simulation
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.defs.ui import (
    APPROVE_JOB,
    APPROVE_OP,
    approval_launchpad_url,
    approval_run_config,
)
from flywheel_pipeline.health.report import record_true_accuracy
from flywheel_pipeline.home import Home
from flywheel_pipeline.launcher import Dagster, LaunchError, daemon_running, failure, local_dagster
from flywheel_pipeline.runs import CycleOutcome, follow_cycle, submit_cycle, wait_for_deployment
from flywheel_pipeline.scoring import Scorer, baseline_scorer
from flywheel_pipeline.simulation.oracle import model_true_accuracy, oracle_accuracy
from flywheel_pipeline.training import Windows

DAYS_PER_CYCLE = 7


@dataclass
class CycleRow:
    cycle: int
    domain: str
    served_by: str
    held_out: str
    gate: str
    registered: str
    champion: str
    true_accuracy: float
    candidate_true_accuracy: float | None = None


def champion_version(domain: str) -> str:
    """The registered champion's version, or "baseline" before the first promotion."""
    return registry.alias_version(mlflow.MlflowClient(), domain, registry.CHAMPION) or "baseline"


def shown(version: str) -> str:
    """``v3`` (or ``baseline``), as a person reads a model version."""
    return version if version == "baseline" else f"v{version}"


def champion_scorer(config: FlywheelConfig, domain: str) -> tuple[Scorer, str]:
    """The domain's serving model: its registered champion, or the day-zero baseline."""
    version = champion_version(domain)
    if version == "baseline":
        return baseline_scorer(config.domain(domain).shape), version
    return mlflow.pyfunc.load_model(registry.alias_uri(mlflow.MlflowClient(), domain, registry.CHAMPION)), version


def holdback_scorer(domain: str) -> simulation.Holdback | None:
    """The version a new champion replaced, with its share of requests, while its holdback lasts
    (registry.active_holdback: what a serving system routes)."""
    held = registry.active_holdback(mlflow.MlflowClient(), domain)
    if held is None:
        return None
    version, share = held
    return simulation.Holdback(mlflow.pyfunc.load_model(f"models:/{registry.model_name(domain)}/{version}"),
                               version, share)


def previous_demo(home: Home) -> str | None:
    """What a demo already in ``home`` left (``simulated through 2026-11-28``), or None."""
    folders = home.simulator.iterdir() if home.simulator.exists() else []
    days = [day for folder in folders if (day := simulation.simulated_through(home, folder.name))]
    if days:
        return f"simulated through {max(days)}"
    if home.shared_warehouse.exists() or (home.warehouses.exists() and any(home.warehouses.iterdir())):
        return "a warehouse"
    return None


class Demo:
    def __init__(self, home: Home, config: FlywheelConfig, *, cycles: int, warmup_days: int,
                 per_day: int, seed: int, stand_in_for_approvers: bool, console: Console) -> None:
        self.home, self.config, self.console = home, config, console
        self.cycles, self.warmup_days, self.per_day, self.seed = cycles, warmup_days, per_day, seed
        self.stand_in = stand_in_for_approvers
        self.end = datetime.now(UTC).date() - timedelta(days=1)
        self.start = self.end - timedelta(days=warmup_days + cycles * DAYS_PER_CYCLE - 1)
        self.pending: dict[str, str] = {}  # oversight domain -> the version waiting for a person
        self.oracles: dict[str, float] = {}  # domain -> its trainer fitted on the last cycle's hidden truth

    def run(self, log: IO[str] | None) -> list[CycleRow]:
        self._make_room()
        self.home.activate()
        rows: list[CycleRow] = []
        self.console.print(f"[bold]flywheel demo[/] home={self.home.root} days {self.start}..{self.end} "
                           f"(tool output: {self.home.log if log else 'here'})")
        with ExitStack() as stack:
            with self.console.status("starting Dagster (code server and daemon)"):
                dagster = stack.enter_context(local_dagster(self.home, log))
            self._simulate(self.start, self.warmup_days, note="warm-up traffic served by the baseline")
            for domain in self.config.domains:
                rows.append(self._row(0, domain, "baseline", None))
            for cycle in range(1, self.cycles + 1):
                first = self.start + timedelta(days=self.warmup_days + (cycle - 1) * DAYS_PER_CYCLE)
                self._simulate(first, DAYS_PER_CYCLE, note=f"cycle {cycle}")
                run_from = self.start if cycle == 1 else first - timedelta(days=self.config.max_lateness_days)
                last = first + timedelta(days=DAYS_PER_CYCLE - 1)
                started = time.monotonic()
                # Every domain's cycle at once: each writes its own warehouse.
                run_ids = {domain: submit_cycle(dagster, domain, run_from, last) for domain in self.config.domains}
                for domain, run_id in run_ids.items():
                    rows.append(self._cycle(dagster, cycle, domain, run_from, last, run_id, started))
            with self.console.status("waiting for runs the sensors launched"):
                dagster.wait_for_idle()
        return rows

    def _make_room(self) -> None:
        """A home that holds an earlier demo is moved aside (never deleted); the new demo starts fresh."""
        found = previous_demo(self.home)
        if found is None:
            return
        if (self.home.dagster / "dagster.yaml").exists():
            import dagster as dg

            with dg.DagsterInstance.from_config(str(self.home.dagster)) as instance:
                if daemon_running(instance):
                    raise LaunchError(f"{self.home.root} holds a demo and a Dagster daemon is running on it "
                                      "(make ui?): stop it first, or set FLYWHEEL_HOME to another folder")
        kept = self.home.root.with_name(f"{self.home.root.name}-{datetime.now():%Y%m%d-%H%M%S}")
        shutil.move(self.home.root, kept)
        self.console.print(f"a demo already lives in {self.home.root} ({found}): moved it to {kept} "
                           "(delete that folder when you no longer need it); starting a fresh demo")

    def _simulate(self, first: date, days: int, note: str) -> None:
        scorers, versions, holdbacks = {}, {}, {}
        for domain in self.config.domains:
            scorers[domain], versions[domain] = champion_scorer(self.config, domain)
            if (held := holdback_scorer(domain)) is not None:
                holdbacks[domain] = held
        started = time.monotonic()
        summary = simulation.simulate(self.home, self.config, first, days, seed=self.seed,
                                      interactions_per_day=self.per_day, bad_row_share=0.01,
                                      scorers=scorers, model_versions=versions, holdbacks=holdbacks)
        served = ", ".join(f"{d}: {shown(v)}" for d, v in versions.items())
        self.console.print(f"  simulated {first}..{first + timedelta(days=days - 1)} ({note}; serving {served}; "
                           f"{summary.total_interactions:,} interactions) in {time.monotonic() - started:.1f}s")

    def _cycle(self, dagster: Dagster, cycle: int, domain: str, first: date, last: date, run_id: str,
               started: float) -> CycleRow:
        served_by = champion_version(domain)
        label = f"cycle {cycle} {domain}: {first}..{last}"
        with self.console.status(f"{label}: queued") as status:
            outcome = follow_cycle(dagster, domain, run_id,
                                   on_step=lambda step: status.update(f"{label}: {step.name} {step.status}"))
            if not outcome.succeeded:
                raise LaunchError(f"{domain} cycle {cycle} {outcome.status.value.lower()}: {outcome.failure}")
            status.update(f"{label}: {outcome.gate}; deploying")
            self._approve(dagster, outcome, status)
        self.console.print(f"  {label} in {time.monotonic() - started:.0f}s; gate {outcome.gate}"
                           + (f" ({outcome.held_out()})" if outcome.evidence else "")
                           + (f"; registered v{outcome.version}" if outcome.version else "")
                           + f"; champion {shown(champion_version(domain))}")
        if outcome.gate != "passed":
            self.console.print(f"    {outcome.reasons}")
        if outcome.revisit:
            self.console.print(f"    revisited the previous inconclusive candidate: {outcome.revisit}")
        for check in outcome.failed_checks:
            self.console.print(f"    check failed: {check}")
        return self._row(cycle, domain, served_by, outcome)

    def _approve(self, dagster: Dagster, outcome: CycleOutcome, status) -> None:
        """Domains at automation full are deployed by the approval sensor; others wait for a person, unless
        the demo stands in (it launches approve_candidate, as a person would in the Launchpad)."""
        domain, version = outcome.domain, outcome.version
        if version is None:
            return
        domain_config = self.config.domain(domain)
        if domain_config.automation != "full":
            if not self.stand_in:
                self.pending[domain] = version
                return
            approver = domain_config.approvers[0]
            run_config = {"ops": {APPROVE_OP: {"config": {
                "domain": domain, "version": version, "approver": approver, "decision": "approved",
                "reason": "the demo stood in for the approver"}}}}
            status.update(f"{domain}: the demo stands in for {approver} and approves v{version}")
            run = dagster.wait(dagster.submit(APPROVE_JOB, run_config=run_config))
            if not run.is_success:  # it holds no approver's key: their decision needs their signature
                self.console.print(f"    the demo cannot stand in for {approver}: {failure(dagster.instance, run.run_id)}")
                self.pending[domain] = version
                return
        status.update(f"{domain}: waiting for the approval sensor to deploy v{version}")
        wait_for_deployment(dagster, self.config, domain, version, mlflow.MlflowClient())
        self.pending.pop(domain, None)

    def _row(self, cycle: int, domain: str, served_by: str, outcome: CycleOutcome | None) -> CycleRow:
        scorer, champion = champion_scorer(self.config, domain)
        accuracy = simulation.true_accuracy(self.home, self.config, domain, scorer)
        if outcome is None:
            return CycleRow(cycle, domain, shown(served_by), "", "", "", shown(champion), accuracy)
        gate = outcome.gate or "not reached"  # its reasons are in the cycle's lines above the table
        candidate_accuracy = None
        if "model_uri" in outcome.candidate:
            candidate_accuracy = model_true_accuracy(self.home, self.config, domain, outcome.candidate["model_uri"])
            record_true_accuracy(mlflow.MlflowClient(), outcome.candidate["model_uri"], candidate_accuracy)
            self.oracles[domain] = oracle_accuracy(self.home, self.config, domain,
                                                   Windows.from_params(outcome.candidate))
        return CycleRow(cycle, domain, shown(served_by), outcome.held_out(detail=False), gate,
                        f"v{outcome.version}" if outcome.version else "", shown(champion), accuracy,
                        candidate_accuracy)


def print_summary(rows: list[CycleRow], oracles: dict[str, float], console: Console) -> None:
    """Each cycle's row, then each domain's oracle; rates to 3 decimals, as the cycle lines say them."""
    table = Table(title="flywheel: each cycle's candidate and champion, scored against the simulator's hidden truth",
                  caption="held out: candidate vs champion on the primary metric; true: accuracy against the "
                          f"hidden truth; {registry.BASELINE}: no model deployed yet, the product serves its "
                          "baseline")
    for column in ("cycle", "domain", "served by", "held out", "gate", "candidate true", "registered",
                   "champion", "champion true"):
        table.add_column(column, no_wrap=column in ("domain", "held out", "gate"), overflow="fold")
    for row in rows:
        candidate = "" if row.candidate_true_accuracy is None else f"{row.candidate_true_accuracy:.3f}"
        table.add_row(str(row.cycle), row.domain, row.served_by, row.held_out, row.gate, candidate,
                      row.registered, row.champion, f"{row.true_accuracy:.3f}")
    console.print(table)
    for domain, accuracy in oracles.items():
        console.print(f"oracle {domain}: {accuracy:.3f} (the same trainer fitted on the hidden truth of the last "
                      "cycle's training days: what the labels could have taught it)")


def print_pending_approvals(demo: Demo, console: Console) -> None:
    """Exactly what a person clicks to approve each candidate the demo left waiting."""
    if not demo.pending:
        console.print("\nNothing waits for approval. Browse what the demo made: [bold]make ui[/] and "
                      "[bold]make mlflow-ui[/]")
        return
    for domain, version in demo.pending.items():
        console.print(
            f"\n[bold]{domain} v{version} waits for a person[/] (automation: oversight). Approve it in the "
            f"Dagster UI: run [bold]make ui[/], then either\n"
            f"  - open Assets > {domain}/registered_candidate and click the [bold]approve[/] link of its latest "
            f"materialization, or open\n    {approval_launchpad_url(demo.config, domain, version)}\n"
            f"  - or open Jobs > approve_candidate > Launchpad and paste\n"
            + "\n".join(f"      {line}" for line in approval_run_config(demo.config, domain, version).splitlines())
            + f"\n  then click Launch Run. Within {demo.config.daemon.approval_sensor_seconds}s the approval_sensor "
            f"launches deploy_champion, and `champion` moves to v{version} when that run ends, about half a minute later\n"
            f"  (check: flywheel status).\n"
            f"  From a shell instead: flywheel approve --domain {domain} --approver "
            f"{demo.config.domain(domain).approvers[0]} --sign-with ~/.ssh/id_ed25519\n"
            f"  Either way the decision is signed with the approver's SSH key, declared under approver_keys in "
            f"flywheel.yaml (docs/security.md).")
