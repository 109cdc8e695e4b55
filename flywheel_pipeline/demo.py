"""The closed loop, end to end, on the embedded default.

Each cycle: the simulated product serves a week of traffic with each domain's current champion ->
the domain's cycle job runs (accumulate, filter, label, fine-tune, validate, register) -> approval
(auto domains approve themselves when every gate passes; a manual domain's approver is stood in for,
and the demo says so) -> the approval sensor deploys -> the new champion serves the next week.
Runs go through the persistent Dagster instance and MLflow store in the home folder, so
``dagster dev`` and ``mlflow ui`` show the history afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import mlflow
from rich.console import Console
from rich.table import Table

from flywheel_pipeline import approval, registry, simulation
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.assets import model_keys
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import Scorer, baseline_scorer
from flywheel_pipeline.warehouse import connect

DAYS_PER_CYCLE = 7
# Runs log to the Dagster instance (the UI shows every event); the console only gets errors.
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


@dataclass
class CycleRow:
    cycle: int
    domain: str
    served_by: str
    held_out: str
    gate: str
    champion: str
    true_accuracy: float


def champion_version(domain: str) -> str:
    """The registered champion's version, or "baseline" before the first promotion."""
    return registry.alias_version(mlflow.MlflowClient(), domain, registry.CHAMPION) or "baseline"


def champion_scorer(config: FlywheelConfig, domain: str) -> tuple[Scorer, str]:
    """The domain's serving model: its registered champion, or the day-zero baseline."""
    version = champion_version(domain)
    if version == "baseline":
        return baseline_scorer(config.domain(domain).shape), version
    return mlflow.pyfunc.load_model(registry.alias_uri(mlflow.MlflowClient(), domain, registry.CHAMPION)), version


class Demo:
    def __init__(self, home: Home, config: FlywheelConfig, *, cycles: int, warmup_days: int,
                 per_day: int, seed: int, stand_in_for_approvers: bool, console: Console) -> None:
        self.home, self.config, self.console = home.activate(), config, console
        self.cycles, self.warmup_days, self.per_day, self.seed = cycles, warmup_days, per_day, seed
        self.stand_in = stand_in_for_approvers
        self.instance = dg.DagsterInstance.get()
        self.defs = build_definitions(config, self.home)
        self.end = datetime.now(UTC).date() - timedelta(days=1)
        self.start = self.end - timedelta(days=warmup_days + cycles * DAYS_PER_CYCLE - 1)
        self.sensor_cursor: str | None = None
        self.tool_log = self.home.root / "demo.log"
        logging.getLogger("mlflow").setLevel(logging.ERROR)

    def run(self) -> list[CycleRow]:
        rows: list[CycleRow] = []
        self.console.print(f"[bold]flywheel demo[/] home={self.home.root} days {self.start}..{self.end}")
        self._simulate(self.start, self.warmup_days, note="warm-up traffic served by the baseline")
        for domain in self.config.domains:
            scorer, version = champion_scorer(self.config, domain)
            accuracy = simulation.true_accuracy(self.home, self.config, domain, scorer)
            rows.append(CycleRow(0, domain, version, "", "", version, accuracy))
        for cycle in range(1, self.cycles + 1):
            first = self.start + timedelta(days=self.warmup_days + (cycle - 1) * DAYS_PER_CYCLE)
            self._simulate(first, DAYS_PER_CYCLE, note=f"cycle {cycle}")
            run_from = self.start if cycle == 1 else first - timedelta(days=self.config.max_lateness_days)
            for domain in self.config.domains:
                rows.append(self._cycle(cycle, domain, run_from, first + timedelta(days=DAYS_PER_CYCLE - 1)))
        return rows

    def _simulate(self, first: date, days: int, note: str) -> None:
        scorers, versions = {}, {}
        for domain in self.config.domains:
            scorers[domain], versions[domain] = champion_scorer(self.config, domain)
        started = time.monotonic()
        summary = simulation.simulate(self.home, self.config, first, days, seed=self.seed,
                                      interactions_per_day=self.per_day, bad_row_share=0.01,
                                      scorers=scorers, model_versions=versions)
        served = ", ".join(f"{d}: {v}" for d, v in versions.items())
        self.console.print(f"  simulated {first}..{first + timedelta(days=days - 1)} ({note}; serving {served}; "
                           f"{summary.total_interactions:,} interactions) in {time.monotonic() - started:.1f}s")

    def _cycle(self, cycle: int, domain: str, first: date, last: date) -> CycleRow:
        served_by = champion_version(domain)
        started = time.monotonic()
        with self.console.status(f"cycle {cycle} {domain}: {first}..{last} accumulate -> filter -> label "
                                 f"-> fine-tune -> validate -> register"), self._tool_output():
            result = execute_cycle(self.defs, self.instance, domain, first, last, run_config=QUIET)
        if not result.success:
            raise RuntimeError(f"{domain} cycle {cycle} failed; see the run in the Dagster UI ({result.run_id})")
        report = _metadata(result, model_keys(domain)["validation_report"])
        registration = _metadata(result, model_keys(domain)["registered_candidate"])
        self._approve_if_standing_in(domain, registration)
        self._tick_approval_sensor()
        scorer, champion = champion_scorer(self.config, domain)
        accuracy = simulation.true_accuracy(self.home, self.config, domain, scorer)
        reasons = registration.get("reasons", "")
        gate = "passed" if registration.get("registered") else "failed: " + _reason_codes(reasons)
        self.console.print(f"  cycle {cycle} {domain}: {first}..{last} in {time.monotonic() - started:.0f}s; "
                           f"gate {gate}; champion {champion}; true accuracy {accuracy:.3f}")
        if reasons:
            self.console.print(f"    {reasons}")
        return CycleRow(cycle, domain, served_by, _held_out(report), gate, champion, accuracy)

    @contextmanager
    def _tool_output(self) -> Iterator[None]:
        """dbt's console output goes to demo.log in the home (the Dagster UI has every event)."""
        with self.tool_log.open("a") as log, redirect_stdout(log):
            yield

    def _approve_if_standing_in(self, domain: str, registration: dict) -> None:
        domain_config = self.config.domain(domain)
        if not registration.get("registered") or domain_config.automation == "auto":
            return
        version = str(registration["version"])
        self.console.print(
            f"    {domain} v{version} awaits a person: in `dagster dev` open Jobs > approve_candidate > "
            f"Launchpad, config domain={domain}, version={version}, approver=<you>, decision=approved "
            f"(or: flywheel approve --domain {domain} --version {version} --approver <you>)")
        if self.stand_in and domain_config.approvers:
            approver = domain_config.approvers[0]
            with connect(self.home.warehouse) as con:
                approval.record_decision(con, mlflow.MlflowClient(), self.config, domain, version, "approved",
                                         approver, "approved by the demo standing in for the approver")
            self.console.print(f"    the demo stands in for {approver} and approves v{version}")

    def _tick_approval_sensor(self) -> None:
        """Evaluate the approval sensor once and launch the deployments it asks for."""
        context = dg.build_sensor_context(instance=self.instance, cursor=self.sensor_cursor,
                                          resources={"warehouse": self.defs.resources["warehouse"]})
        result = self.defs.resolve_sensor_def("approval_sensor")(context)
        self.sensor_cursor = result.cursor or self.sensor_cursor
        deploy = self.defs.resolve_job_def("deploy_champion")
        for request in result.run_requests or []:
            deploy.execute_in_process(run_config={**request.run_config, **QUIET}, instance=self.instance,
                                      tags={**request.tags, "dagster/run_key": request.run_key})


def _metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict:
    for event in result.get_asset_materialization_events():
        if event.asset_key == key:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    return {}


def _reason_codes(reasons: str) -> str:
    """``improvement_below_minimum, slice_regression`` from the gate's full reasons."""
    return ", ".join(reason.split(":")[0].strip() for reason in reasons.split(";") if reason.strip())


def _held_out(report: dict) -> str:
    """``auc 0.812 vs 0.655``: the candidate's primary metric against the champion's, held out."""
    metric = report.get("primary_metric")
    if not metric:
        return ""
    return f"{metric} {report['candidate']:.3f} vs {report['champion']:.3f}"


def print_summary(rows: list[CycleRow], console: Console) -> None:
    table = Table(title="flywheel: champion per cycle, scored against the simulator's hidden truth")
    for column in ("cycle", "domain", "served by", "candidate held-out", "gate", "champion after", "true accuracy"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row.cycle), row.domain, row.served_by, row.held_out, row.gate, row.champion,
                      f"{row.true_accuracy:.3f}")
    console.print(table)
