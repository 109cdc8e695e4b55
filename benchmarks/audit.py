"""Audit benchmark: each trap injected alone into the simulated product, at a strength, and what flywheel_health flags.

    .venv/bin/python benchmarks/audit.py                                   # healthy + the 9 traps, seeds 7 8 9
    .venv/bin/python benchmarks/audit.py --runs healthy leakage=0.5 --seeds 7
    .venv/bin/python benchmarks/audit.py --curves 0.25 0.5 --domains recommendation --jobs 2

Each run starts a fresh temporary home. The simulated product, with one trap on at a strength in (0, 1]
(`simulate(..., traps={trap: strength})`, the same switch as `flywheel simulate --trap trap=strength`) or
none, serves a warm-up served by the baseline, then weekly cycles; each cycle runs the domain's cycle job
in process (accumulate, dbt, label, fine-tune, validate, flywheel_health, register) and promotes a
candidate that passed, as the approval sensor would. The last cycle's nine health checks are the run's
row: which checks flagged (and in which domain). A trap is caught when its own check flags; a healthy
run should flag none. The harm of a trap is the healthy run's final champion true accuracy (the
simulator's hidden truth, same seed and world) minus the trapped run's. ``--curves`` adds every trap at
those strengths: its detection curve (the weakest strength flagged in most seeds) beside its harm.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
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
from flywheel_pipeline.health import FAULTS, TRAPS
from flywheel_pipeline.health.report import record_true_accuracy
from flywheel_pipeline.home import Home
from flywheel_pipeline.simulation.oracle import model_true_accuracy
from flywheel_pipeline.simulation.traps import applies_to

DAYS_PER_CYCLE = 7
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
RUNS = ("healthy", *TRAPS, *FAULTS)
# Each check's statistics, as (measure, HealthSettings threshold, "min" or "max"): what the tables show
STATISTICS = {
    "exposure_bias": [("exploration_share", "min_exploration_share", "min")],
    "survivorship": [("min_coverage_ratio", "min_cohort_coverage_ratio", "min")],
    "label_delay": [("immature_share", "max_immature_share", "max"),
                    ("understated_delay_days", "max_understated_delay_days", "max")],
    "leakage": [("max_feature_auc", "max_feature_auc", "max"),
                ("late_interaction_share", "max_late_feature_share", "max")],
    "self_consumption": [("self_consumption_share", "max_self_consumption_share", "max"),
                         ("independent_share", "min_independent_share", "min")],
    "diversity": [("coverage", "min_catalogue_coverage", "min"), ("top_share", "max_top_items_share", "max")],
    "vocal_minority": [("max_representation", "max_reaction_overrepresentation", "max")],
    "popularity": [("head_click_z", "max_popularity_z", "max")],
    "engagement": [("outcome_per_click_ratio_upper", "min_outcome_per_click_ratio", "min")],
    "mislogged_propensity": [("explored_below_floor_share", "max_below_floor_share", "max")],
}


def own_check(trap: str) -> str:
    """The check that must catch ``trap``: its own, or the one a fault (health.FAULTS) belongs to."""
    return FAULTS.get(trap, trap)


def run_name(trap: str | None, strength: float) -> str:
    return "healthy" if trap is None else trap if strength == 1 else f"{trap}={strength:g}"


def parse_run(name: str) -> tuple[str | None, float]:
    trap, _, strength = name.partition("=")
    if trap not in RUNS:
        raise argparse.ArgumentTypeError(f"unknown run {trap}: the runs are {', '.join(RUNS)}")
    return (None if trap == "healthy" else trap), float(strength or 1)


class Run:
    """One run of the loop in its own home: the simulator with ``trap`` on (None: healthy)."""

    def __init__(self, root: Path, config: FlywheelConfig, trap: str | None, strength: float, seed: int,
                 per_day: int, warmup_days: int, cycles: int, domains: list[str]) -> None:
        self.home, self.config = Home(root).activate(), declared(config, trap, strength)
        self.product_config = config  # the simulator applies the trap's strength to flywheel.yaml's settings itself
        self.trap, self.strength = trap, strength
        self.seed, self.per_day, self.warmup_days, self.cycles = seed, per_day, warmup_days, cycles
        self.domains = [d for d in domains if trap is None or applies_to(trap, config.domain(d).shape)]
        self.instance = dg.DagsterInstance.local_temp(str(self.home.dagster))
        self.defs = build_definitions(self.config, self.home)
        end = date.today() - timedelta(days=1)
        self.start = end - timedelta(days=warmup_days + cycles * DAYS_PER_CYCLE - 1)
        mlflow.set_tracking_uri(self.home.mlflow_tracking_uri)
        mlflow.set_registry_uri(self.home.mlflow_tracking_uri)
        self.client = self.home.mlflow_client()

    def serve(self, first: date, days: int) -> None:
        serving = {d: champion_scorer(self.config, d) for d in self.domains}  # this home's MLflow (set above)
        simulation.simulate(self.home, self.product_config, first, days, seed=self.seed, interactions_per_day=self.per_day,
                            bad_row_share=0.01, scorers={d: scorer for d, (scorer, _) in serving.items()},
                            model_versions={d: version for d, (_, version) in serving.items()}, domains=self.domains,
                            traps={} if self.trap is None else {self.trap: self.strength})

    def cycle(self, domain: str, first: date, last: date) -> dict[str, dict]:
        """The cycle's health checks: trap -> {flagged, measured}; promotes a candidate that passed."""
        with redirect_stdout(StringIO()):
            result = execute_cycle(self.defs, self.instance, domain, first, last, run_config=QUIET)
        if not result.success:
            raise RuntimeError(f"{run_name(self.trap, self.strength)} {domain} {first}..{last} failed: "
                               f"run {result.run_id}")
        trained = _metadata(result, dg.AssetKey([domain, "candidate_model"]))
        record_true_accuracy(self.client, trained["model_uri"],
                             model_true_accuracy(self.home, self.config, domain, trained["model_uri"]))
        registered = _metadata(result, dg.AssetKey([domain, "registered_candidate"]))
        if registered:
            registry.promote(self.client, domain, str(registered["version"]))
        return {evaluation.check_name: {
                    "flagged": not evaluation.passed,
                    **{name: value.value for name, value in evaluation.metadata.items()
                       if isinstance(value.value, (str, float, int))}}
                for evaluation in result.get_asset_check_evaluations()
                if evaluation.asset_key == health_key(domain)}

    def champion_accuracy(self, domain: str) -> float:
        """The true accuracy of the domain's champion at the end (the baseline if none was promoted)."""
        scorer, _ = champion_scorer(self.config, domain)
        return simulation.true_accuracy(self.home, self.config, domain, scorer)

    def run(self) -> dict[str, dict]:
        """domain -> the last cycle's health checks and the final champion's true accuracy."""
        self.serve(self.start, self.warmup_days)
        checks: dict[str, dict[str, dict]] = {}
        for cycle in range(self.cycles):
            first = self.start + timedelta(days=self.warmup_days + cycle * DAYS_PER_CYCLE)
            self.serve(first, DAYS_PER_CYCLE)
            run_from = self.start if cycle == 0 else first - timedelta(days=self.config.max_lateness_days)
            for domain in self.domains:
                checks[domain] = self.cycle(domain, run_from, first + timedelta(days=DAYS_PER_CYCLE - 1))
        self.instance.dispose()
        return {domain: {"checks": domain_checks, "champion_true_accuracy": self.champion_accuracy(domain)}
                for domain, domain_checks in checks.items()}


# What the trapped product's domains declare (the rest as flywheel.yaml says):
# - exposure_bias: a product that never explores says so; one that promised exploration and logged
#   none is stopped before any audit, by accumulated_traffic's exploration expectation.
#   At a strength s it explores (1 - s) of what flywheel.yaml says, and declares that.
# - label_delay: backdated outcomes arrive within max_lateness_days (later ones are quarantined as
#   too_late), so a 7-day held-out window absorbs them; a domain with a 3-day one trains on them.
def declared(config: FlywheelConfig, trap: str | None, strength: float) -> FlywheelConfig:
    """The configuration the trapped product runs under."""
    def update(domain):
        if trap == "exposure_bias":
            return {"exploration_share": domain.exploration_share * (1 - strength)}
        return {"holdout_days": 3} if trap == "label_delay" else {}
    domains = {name: domain.model_copy(update=update(domain)) for name, domain in config.domains.items()}
    return config.model_copy(update={"domains": domains})


def _metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict:
    for event in result.get_asset_materialization_events():
        if event.asset_key == key:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    return {}


def one_run(root: Path, config_path: Path, trap: str | None, strength: float, seed: int, per_day: int,
            warmup_days: int, cycles: int, domains: list[str] | None) -> dict:
    """One run in this process (a worker of the pool): its record."""
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    config = load_config(config_path)
    started = time.monotonic()
    result = Run(root, config, trap, strength, seed, per_day, warmup_days, cycles, domains or list(config.domains)).run()
    return {"run": run_name(trap, strength), "trap": trap, "strength": strength, "seed": seed,
            "seconds": round(time.monotonic() - started), "domains": result,
            "thresholds": {name: config.domain(name).health.model_dump(mode="json") for name in result}}


def flagged_checks(domain: dict) -> list[str]:
    return [trap for trap, check in domain["checks"].items() if check["flagged"]]


def statistic(check: dict, trap: str, thresholds: dict) -> str:
    """The check's statistics against their thresholds, e.g. ``0.031 (min 0.02)``."""
    return "; ".join(f"{_number(check.get(measure))} ({bound} {thresholds[setting]:g})"
                     for measure, setting, bound in STATISTICS[trap])


def _number(value) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def latest(records: list[dict]) -> list[dict]:
    """One record per (run, seed): the last one (a rerun replaces its earlier record)."""
    return list({(r["run"], r["seed"]): r for r in records}.values())


def flag_table(records: list[dict]) -> str:
    """Full strength: run x check, per cell the seeds (of all) whose run flagged it in some domain."""
    runs = {r["run"]: [] for r in records if r["strength"] == 1}
    for record in records:
        if record["strength"] == 1:
            runs[record["run"]].append(record)
    lines = [f"| run | seeds | {' | '.join(TRAPS)} | own check |", "|---|---|" + "---|" * (len(TRAPS) + 1)]
    for name, rows in runs.items():
        flagged = [{t for d in r["domains"].values() for t in flagged_checks(d)} for r in rows]
        cells = [(f"**{n}/{len(rows)}**" if (n := sum(t in f for f in flagged)) else "-") for t in TRAPS]
        verdict = ("false alarms: " + ", ".join(sorted(set().union(*flagged))) if any(flagged) else "none flagged") \
            if name == "healthy" else f"caught {sum(own_check(name) in f for f in flagged)}/{len(rows)}"
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in rows)} | {' | '.join(cells)} | {verdict} |")
    return "\n".join(lines)


def value_table(records: list[dict]) -> str:
    """Each trap's own check, per domain and seed: its statistics healthy and trapped at full strength."""
    healthy = {(r["seed"], d): dom for r in records if r["trap"] is None for d, dom in r["domains"].items()}
    lines = ["| trap | domain | seed | healthy | trapped (strength 1) | flagged |", "|---|---|---|---|---|---|"]
    for record in records:
        if record["trap"] is None or record["strength"] != 1:
            continue
        trap, check = record["trap"], own_check(record["trap"])
        for domain, result in record["domains"].items():
            thresholds = record["thresholds"][domain]
            before = healthy.get((record["seed"], domain))
            lines.append(f"| {trap} | {domain} | {record['seed']} | "
                         f"{statistic(before['checks'][check], trap, thresholds) if before else 'not run'} | "
                         f"{statistic(result['checks'][check], trap, thresholds)} | "
                         f"{'yes' if result['checks'][check]['flagged'] else 'no'} |")
    return "\n".join(lines[:2] + sorted(lines[2:], key=lambda line: RUNS.index(line.split(" | ")[0][2:])))


def curve_table(records: list[dict]) -> str:
    """Per trap, domain and strength: seeds flagged by the trap's own check, the mean statistic, and the
    harm (healthy minus trapped final champion true accuracy, mean over seeds); then the weakest strength
    flagged in most seeds."""
    healthy = {(r["seed"], d): dom["champion_true_accuracy"] for r in records if r["trap"] is None
               for d, dom in r["domains"].items()}
    cells: dict[tuple[str, str, float], list[tuple[bool, float, float]]] = {}
    for record in records:
        if record["trap"] is None:
            continue
        for domain, result in record["domains"].items():
            check = result["checks"][own_check(record["trap"])]
            measure = STATISTICS[record["trap"]][0][0]
            harm = healthy.get((record["seed"], domain), float("nan")) - result["champion_true_accuracy"]
            cells.setdefault((record["trap"], domain, record["strength"]), []).append(
                (check["flagged"], check.get(measure, float("nan")), harm))
    lines = ["| trap | domain | strength | flagged seeds | statistic (mean) | harm: true accuracy lost (mean, per seed) |",
             "|---|---|---|---|---|---|"]
    weakest: dict[tuple[str, str], float] = {}
    for (trap, domain, strength), rows in sorted(cells.items(), key=lambda c: (RUNS.index(c[0][0]), c[0][1], c[0][2])):
        flagged = sum(f for f, _, _ in rows)
        if flagged * 2 > len(rows):
            weakest.setdefault((trap, domain), strength)
        harms = [h for _, _, h in rows]
        lines.append(f"| {trap} | {domain} | {strength:g} | {flagged}/{len(rows)} | "
                     f"{_number(statistics.fmean(v for _, v, _ in rows))} | {statistics.fmean(harms):+.3f} "
                     f"({', '.join(f'{h:+.3f}' for h in harms)}) |")
    lines += ["", "| trap | domain | weakest strength flagged in most seeds |", "|---|---|---|"]
    lines += [f"| {trap} | {domain} | {weakest.get((trap, domain), 'not flagged at any strength tried')} |"
              for trap, domain in dict.fromkeys((t, d) for t, d, _ in cells)]
    return "\n".join(lines)


def report(records: list[dict]) -> None:
    records = latest(records)
    print("\n## Which checks flag, at full strength\n\n" + flag_table(records))
    print("\n## Each trap's own check: statistic (threshold), healthy vs trapped\n\n" + value_table(records))
    print("\n## Detection curves and harm\n\n" + curve_table(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", type=parse_run, default=[parse_run(r) for r in RUNS],
                        help="healthy, a trap, or trap=strength")
    parser.add_argument("--curves", nargs="*", type=float, default=[],
                        help="also run every trap at these strengths")
    parser.add_argument("--seeds", nargs="+", type=int, default=[7, 8, 9])
    parser.add_argument("--domains", nargs="+", help="only these domains (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--per-day", type=int, default=600)
    parser.add_argument("--warmup-days", type=int, default=28)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "flywheel.yaml")
    parser.add_argument("--keep", type=Path, help="keep each run's home (its health reports) under this folder")
    parser.add_argument("--records", type=Path, help="append each run's record here as a JSON line")
    parser.add_argument("--report", nargs="+", type=Path, help="only print the tables of --records files")
    args = parser.parse_args()
    if args.report:
        report([json.loads(line) for path in args.report for line in path.read_text().splitlines()])
        return
    runs = list(dict.fromkeys([*args.runs, *((t, s) for s in args.curves for t in (*TRAPS, *FAULTS))]))
    tasks = [(run, seed) for run in runs for seed in args.seeds]
    records = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {}
        for (trap, strength), seed in tasks:
            name = f"{run_name(trap, strength)}-{seed}"
            root = (args.keep / name) if args.keep else Path(tempfile.mkdtemp(prefix=f"audit-{name}-"))
            futures[pool.submit(one_run, root, args.config, trap, strength, seed, args.per_day,
                                args.warmup_days, args.cycles, args.domains)] = name
        for future in as_completed(futures):
            record = future.result()
            records.append(record)
            for domain, result in record["domains"].items():
                print(f"{futures[future]:<24} {domain:<14} {record['seconds']:5d}s champion true accuracy "
                      f"{result['champion_true_accuracy']:.3f} flagged: {', '.join(flagged_checks(result)) or 'none'}",
                      flush=True)
            if args.records:
                with args.records.open("a") as out:
                    out.write(json.dumps(record) + "\n")
    report(records)


if __name__ == "__main__":
    main()
