"""Monitor benchmark: days from a harmful event to the alert and to the rollback, and false alarms
on healthy deployments, against the simulator's hidden truth.

    .venv/bin/python benchmarks/monitor.py                        # 5 seeds, the demo's volume
    .venv/bin/python benchmarks/monitor.py --seeds 1 --watch-days 4  # a quick look

Per seed, one recommendation domain at automation ``full`` (lookback 7, holdout 3, clicks as the
reward), in a fresh home, at the demo's 1,500 interactions a day:

1. 10 days served by the baseline, a cycle: v1 passes and is deployed (the approval sensor's
   path: ``approval.deploy`` of the pending approvals);
2. a scenario (simulation/scenarios.py) from the day after: ``stale_holdout`` (a fad during the next
   10 days, gone after them), or none (a healthy run); 10 days served by v1, a cycle: v2, fitted
   and held out inside the fad, passes and is deployed;
3. ``--watch-days`` days served by the champion, each followed by the domain's monitor job (the real
   ``<domain>_monitor`` run: accumulate, dbt, champion_monitor); a rollback approval the monitor
   records is deployed as the sensor would, and the restored champion serves the next day.

For each run it prints the true values of v1 and v2 after the event (``true_accuracy_on``), the
day the monitor first declared a regression (``live_regression``) or a miss of the forecast
(``live_vs_forecast``), and the day the rollback was deployed; on healthy runs, any regression
declared is a false alarm and any rollback a false rollback.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from datetime import date, timedelta
from io import StringIO
from pathlib import Path

import dagster as dg
import duckdb
import mlflow
import yaml

from flywheel_pipeline import approval, registry, simulation
from flywheel_pipeline.config import load_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.monitor import monitor_job_name
from flywheel_pipeline.defs.partitions import range_tags
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import baseline_scorer
from flywheel_pipeline.warehouse import connect

DOMAIN = "recommendation"
FIRST = date(2026, 6, 1)
WARMUP_DAYS = 10  # lookback 7 + holdout 3
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
REPO = Path(__file__).resolve().parent.parent


def project(root: Path, automation: str, webhook_env: str | None = None) -> Path:
    """flywheel.yaml with the recommendation domain alone, short windows, clicks as the reward."""
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    domain = raw["domains"][DOMAIN]
    domain.update(lookback_days=7, holdout_days=3, automation=automation, label_maturity={"outcome": "click"},
                  approvers=["recsys-lead"])
    raw["domains"] = {DOMAIN: domain}
    if webhook_env:
        raw["alerts"] = {"webhook_url_env": webhook_env}
    path = root / "flywheel.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class Look:
    day: int  # days since the event (0: its first day)
    regressed: bool
    below_forecast: bool
    action: str


class Loop:
    """One seed's home, its Dagster instance and MLflow, and what serves."""

    def __init__(self, root: Path, seed: int, automation: str = "full", per_day: int = 1500,
                 scenario: str | None = None, webhook_env: str | None = None) -> None:
        config_path = project(root, automation, webhook_env)
        self.config, self.seed, self.per_day, self.scenario = load_config(config_path), seed, per_day, scenario
        self.home = Home(root / "home").activate()
        self.instance = dg.DagsterInstance.local_temp(str(self.home.dagster))
        self.defs = build_definitions(self.config, self.home)
        mlflow.set_tracking_uri(self.home.mlflow_tracking_uri)
        mlflow.set_registry_uri(self.home.mlflow_tracking_uri)
        self.client = mlflow.MlflowClient(self.home.mlflow_tracking_uri, self.home.mlflow_tracking_uri)
        self.event = FIRST + timedelta(days=2 * WARMUP_DAYS)  # the fad ends, v2 is deployed

    def champion(self):
        uri = registry.alias_uri(self.client, DOMAIN, registry.CHAMPION)
        return mlflow.pyfunc.load_model(uri) if uri else baseline_scorer("recommendation")

    def serve(self, first: date, days: int) -> None:
        version = registry.alias_version(self.client, DOMAIN, registry.CHAMPION) or "baseline"
        simulation.simulate(self.home, self.config, first, days, seed=self.seed, interactions_per_day=self.per_day,
                            scorers={DOMAIN: self.champion()}, model_versions={DOMAIN: version},
                            scenario=self.scenario, scenario_day=self.event if self.scenario else None,
                            scenario_span_days=WARMUP_DAYS)

    def cycle(self, first: date, last: date) -> str | None:
        """Run the cycle; deploy what it registered (full: approved by the pipeline). The version deployed."""
        with redirect_stdout(StringIO()):
            result = execute_cycle(self.defs, self.instance, DOMAIN, first, last, run_config=QUIET)
        if not result.success:
            raise RuntimeError(f"seed {self.seed}: the cycle over {first}..{last} failed (run {result.run_id})")
        return self.deploy_pending()

    def deploy_pending(self) -> str | None:
        """What the approval sensor does: deploy every approval not deployed yet."""
        deployed = None
        with connect(self.home.approvals) as con:
            for record in approval.decisions_after(con, 0):
                if record.decision == "approved":
                    approval.deploy(con, self.client, self.config, approval.signing_key(self.home), record.approval_id)
                    deployed = record.model_version
        return deployed

    def monitor(self, day: date) -> Look:
        job = self.defs.resolve_job_def(monitor_job_name(DOMAIN))
        with redirect_stdout(StringIO()):
            result = job.execute_in_process(instance=self.instance, tags=range_tags(DOMAIN, day, day),
                                            raise_on_error=False, run_config=QUIET)
        if not result.success:
            raise RuntimeError(f"seed {self.seed}: the monitor of {day} failed (run {result.run_id})")
        with connect(self.home.warehouse(DOMAIN), read_only=True) as con:
            try:
                row = con.execute("SELECT regressed, below_forecast, action, n_interactions, live, live_lo, live_hi, "
                                  "forecast_lo, difference, difference_lo, difference_hi FROM health.champion_monitor "
                                  "WHERE domain = ? AND event_date = ?", [DOMAIN, day]).fetchone()
            except duckdb.CatalogException:  # nothing watched yet
                row = None
        regressed, below, action, *figures = row or (False, False, "nothing to watch")
        if figures:
            n, live, live_lo, live_hi, forecast_lo, d, d_lo, d_hi = figures
            print(f"    day {(day - self.event).days}: {n} interactions; live {live:.4f} [{live_lo:.4f}, {live_hi:.4f}] "
                  f"(forecast from {forecast_lo:.4f}); vs previous {d:+.4f} [{d_lo:+.4f}, {d_hi:+.4f}]", flush=True)
        return Look((day - self.event).days, bool(regressed), bool(below), action)

    def true_value(self, version: str, day: date) -> float:
        model = mlflow.pyfunc.load_model(f"models:/{registry.model_name(DOMAIN)}/{version}")
        return simulation.true_accuracy_on(self.home, self.config, DOMAIN, model, day)


@dataclass
class Outcome:
    seed: int
    scenario: str
    deployed: bool  # v2 passed its gate and was deployed
    true_v1: float = float("nan")
    true_v2: float = float("nan")
    alert_day: int | None = None
    forecast_day: int | None = None
    rollback_day: int | None = None
    looks: int = 0


def run(root: Path, seed: int, scenario: str | None, watch_days: int, per_day: int) -> Outcome:
    loop = Loop(root, seed, per_day=per_day, scenario=scenario)
    loop.serve(FIRST, WARMUP_DAYS)
    v1 = loop.cycle(FIRST, FIRST + timedelta(days=WARMUP_DAYS - 1))
    second = FIRST + timedelta(days=WARMUP_DAYS)
    loop.serve(second, WARMUP_DAYS)
    v2 = loop.cycle(second - timedelta(days=loop.config.max_lateness_days), loop.event - timedelta(days=1))
    outcome = Outcome(seed, scenario or "healthy", deployed=v1 is not None and v2 is not None and v2 != v1)
    if not outcome.deployed:
        return outcome
    outcome.true_v1, outcome.true_v2 = loop.true_value(v1, loop.event), loop.true_value(v2, loop.event)
    for offset in range(watch_days):
        day = loop.event + timedelta(days=offset)
        loop.serve(day, 1)
        look = loop.monitor(day)
        outcome.looks += 1
        if look.regressed and outcome.alert_day is None:
            outcome.alert_day = look.day
        if look.below_forecast and outcome.forecast_day is None:
            outcome.forecast_day = look.day
        if loop.deploy_pending() and outcome.rollback_day is None:
            outcome.rollback_day = look.day
    loop.instance.dispose()
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--watch-days", type=int, default=5)
    parser.add_argument("--per-day", type=int, default=1500)
    parser.add_argument("--scenarios", nargs="+", default=["stale_holdout", "healthy"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    outcomes = []
    for seed in range(1, args.seeds + 1):
        for scenario in args.scenarios:
            started = time.monotonic()
            with tempfile.TemporaryDirectory(prefix="flywheel-monitor-") as tmp:
                outcome = run(Path(tmp), seed, None if scenario == "healthy" else scenario, args.watch_days,
                              args.per_day)
            outcomes.append(outcome)
            print(f"  seed {seed} {outcome.scenario:<14} deployed v2: {outcome.deployed}; true v1 {outcome.true_v1:.3f} "
                  f"v2 {outcome.true_v2:.3f}; regression declared on day {outcome.alert_day}, below forecast on day "
                  f"{outcome.forecast_day}, rolled back on day {outcome.rollback_day} ({outcome.looks} looks, "
                  f"{time.monotonic() - started:.0f}s)", flush=True)
    print("\n| scenario | runs | v2 deployed | true v2 - v1 (mean) | regression declared | days to alert | rolled back | days to rollback |")
    print("|---|---|---|---|---|---|---|---|")
    for scenario in args.scenarios:
        mine = [o for o in outcomes if o.scenario == scenario and o.deployed]
        alerts = [o.alert_day for o in mine if o.alert_day is not None]
        rollbacks = [o.rollback_day for o in mine if o.rollback_day is not None]
        gap = sum(o.true_v2 - o.true_v1 for o in mine) / len(mine) if mine else float("nan")
        print(f"| {scenario} | {len([o for o in outcomes if o.scenario == scenario])} | {len(mine)} | {gap:+.3f} "
              f"| {len(alerts)} | {sorted(alerts)} | {len(rollbacks)} | {sorted(rollbacks)} |")
    print("(days counted from the event's first day, 0 = the first day of traffic after it; on healthy runs any "
          "regression declared is a false alarm and any rollback a false rollback)")


if __name__ == "__main__":
    main()
