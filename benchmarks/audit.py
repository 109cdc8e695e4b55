"""Audit benchmark: each trap injected alone into the simulated product, and what flywheel_health flags.

    .venv/bin/python benchmarks/audit.py                          # healthy + the 6 traps
    .venv/bin/python benchmarks/audit.py --runs healthy leakage   # some of them

Each run starts a fresh temporary home. The simulated product, with one trap on (`simulate(...,
traps=...)`, the same switch as `flywheel simulate --trap`) or none, serves a warm-up served by the
baseline, then weekly cycles; each cycle runs the domain's cycle job in process (accumulate, dbt,
label, fine-tune, validate, flywheel_health, register) and promotes a candidate that passed, as the
approval sensor would. The last cycle's six health checks are the run's row of the table: which
checks flagged (and in which domain). A trap is caught when its own check flags; the healthy run
should flag none. Each candidate's true accuracy (the simulator's hidden truth) is tagged on its
logged model, so the health report of each run plots it beside the held-out evidence.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from datetime import date, timedelta
from io import StringIO
from pathlib import Path

import dagster as dg
import mlflow

from flywheel_pipeline import registry, simulation
from flywheel_pipeline.config import FlywheelConfig, load_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.health import health_key
from flywheel_pipeline.demo import champion_scorer
from flywheel_pipeline.health import TRAPS
from flywheel_pipeline.health.report import record_true_accuracy
from flywheel_pipeline.home import Home
from flywheel_pipeline.simulation.oracle import model_true_accuracy
from flywheel_pipeline.simulation.traps import applies_to

DAYS_PER_CYCLE = 7
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
RUNS = ("healthy", *TRAPS)


class Run:
    """One run of the loop in its own home: the simulator with ``trap`` on (None: healthy)."""

    def __init__(self, root: Path, config: FlywheelConfig, trap: str | None, seed: int, per_day: int,
                 warmup_days: int, cycles: int) -> None:
        self.home, self.config, self.trap = Home(root).activate(), declared(config, trap), trap
        self.seed, self.per_day, self.warmup_days, self.cycles = seed, per_day, warmup_days, cycles
        self.domains = [d for d in config.domains if trap is None or applies_to(trap, config.domain(d).shape)]
        self.instance = dg.DagsterInstance.local_temp(str(self.home.dagster))
        self.defs = build_definitions(self.config, self.home)
        end = date.today() - timedelta(days=1)
        self.start = end - timedelta(days=warmup_days + cycles * DAYS_PER_CYCLE - 1)
        mlflow.set_tracking_uri(self.home.mlflow_tracking_uri)
        mlflow.set_registry_uri(self.home.mlflow_tracking_uri)
        self.client = mlflow.MlflowClient(self.home.mlflow_tracking_uri, self.home.mlflow_tracking_uri)

    def serve(self, first: date, days: int) -> None:
        serving = {d: champion_scorer(self.config, d) for d in self.domains}  # this home's MLflow (set above)
        simulation.simulate(self.home, self.config, first, days, seed=self.seed, interactions_per_day=self.per_day,
                            bad_row_share=0.01, scorers={d: scorer for d, (scorer, _) in serving.items()},
                            model_versions={d: version for d, (_, version) in serving.items()}, domains=self.domains,
                            traps=() if self.trap is None else (self.trap,))

    def cycle(self, domain: str, first: date, last: date) -> dict[str, dict]:
        """The cycle's health checks: trap -> {flagged, measured}; promotes a candidate that passed."""
        with redirect_stdout(StringIO()):
            result = execute_cycle(self.defs, self.instance, domain, first, last, run_config=QUIET)
        if not result.success:
            raise RuntimeError(f"{self.trap or 'healthy'} {domain} {first}..{last} failed: run {result.run_id}")
        trained = _metadata(result, dg.AssetKey([domain, "candidate_model"]))
        record_true_accuracy(self.client, trained["model_uri"],
                             model_true_accuracy(self.home, self.config, domain, trained["model_uri"]))
        registered = _metadata(result, dg.AssetKey([domain, "registered_candidate"]))
        if registered:
            registry.promote(self.client, domain, str(registered["version"]))
        return {evaluation.check_name: {"flagged": not evaluation.passed,
                                        "measured": evaluation.metadata["measured"].value}
                for evaluation in result.get_asset_check_evaluations()
                if evaluation.asset_key == health_key(domain)}

    def run(self) -> dict[str, dict[str, dict]]:
        """domain -> the last cycle's health checks."""
        self.serve(self.start, self.warmup_days)
        checks: dict[str, dict[str, dict]] = {}
        for cycle in range(self.cycles):
            first = self.start + timedelta(days=self.warmup_days + cycle * DAYS_PER_CYCLE)
            self.serve(first, DAYS_PER_CYCLE)
            run_from = self.start if cycle == 0 else first - timedelta(days=self.config.max_lateness_days)
            for domain in self.domains:
                checks[domain] = self.cycle(domain, run_from, first + timedelta(days=DAYS_PER_CYCLE - 1))
        self.instance.dispose()
        return checks


# What the trapped product's domains declare (the rest as flywheel.yaml says):
# - exposure_bias: a product that never explores says so; one that promised exploration and logged
#   none is stopped before any audit, by accumulated_traffic's exploration expectation.
# - label_delay: backdated outcomes arrive within max_lateness_days (later ones are quarantined as
#   too_late), so a 7-day held-out window absorbs them; a domain with a 3-day one trains on them.
DECLARED = {"exposure_bias": {"exploration_share": 0.0}, "label_delay": {"holdout_days": 3}}


def declared(config: FlywheelConfig, trap: str | None) -> FlywheelConfig:
    """The configuration the trapped product runs under (DECLARED)."""
    update = DECLARED.get(trap or "", {})
    domains = {name: domain.model_copy(update=update) for name, domain in config.domains.items()}
    return config.model_copy(update={"domains": domains})


def _metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict:
    for event in result.get_asset_materialization_events():
        if event.asset_key == key:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    return {}


def table(results: dict[str, dict[str, dict[str, dict]]]) -> str:
    """The run x check table: per cell, the domains where the check flagged ("-": none)."""
    lines = [f"| run | {' | '.join(TRAPS)} | trap caught |", "|---|" + "---|" * (len(TRAPS) + 1)]
    for run, domains in results.items():
        cells = []
        for trap in TRAPS:
            flagged = [d for d, checks in domains.items() if checks[trap]["flagged"]]
            cells.append("**FLAG** " + ", ".join(flagged) if flagged else "-")
        flagged_any = {t for checks in domains.values() for t, c in checks.items() if c["flagged"]}
        verdict = ("none flagged" if not flagged_any else "FALSE ALARM") if run == "healthy" else (
            "yes" if run in flagged_any else "MISSED")
        lines.append(f"| {run} | {' | '.join(cells)} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--per-day", type=int, default=600)
    parser.add_argument("--warmup-days", type=int, default=28)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "flywheel.yaml")
    parser.add_argument("--keep", type=Path, help="keep each run's home (its health reports) under this folder")
    parser.add_argument("--records", type=Path, help="append each run's checks here as JSON lines")
    parser.add_argument("--report", type=Path, help="only print the tables of a --records file")
    args = parser.parse_args()
    if args.report:
        report({(entry := json.loads(line))["run"]: entry["checks"] for line in args.report.read_text().splitlines()})
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    config = load_config(args.config)
    results: dict[str, dict[str, dict[str, dict]]] = {}
    for name in args.runs:
        started = time.monotonic()
        root = (args.keep / name) if args.keep else Path(tempfile.mkdtemp(prefix=f"audit-{name}-"))
        trap = None if name == "healthy" else name
        results[name] = Run(root, config, trap, args.seed, args.per_day, args.warmup_days, args.cycles).run()
        for domain, checks in results[name].items():
            flagged = [f"{t}: {c['measured']}" for t, c in checks.items() if c["flagged"]]
            print(f"{name:<17} {domain:<14} {time.monotonic() - started:5.0f}s flagged: "
                  + ("; ".join(flagged) or "none"), flush=True)
        if args.records:
            with args.records.open("a") as out:
                out.write(json.dumps({"run": name, "checks": results[name]}) + "\n")
    report(results)


def report(results: dict[str, dict[str, dict[str, dict]]]) -> None:
    """The run x check table, then every check's measured line per run and domain."""
    print("\n" + table(results))
    for name, domains in results.items():
        for domain, checks in domains.items():
            print(f"\n{name} / {domain}")
            for trap, check in checks.items():
                print(f"  {'FLAG' if check['flagged'] else 'ok  '} {trap}: {check['measured']}")


if __name__ == "__main__":
    main()
