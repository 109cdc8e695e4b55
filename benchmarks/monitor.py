"""Monitor benchmark: days from a harmful event to the alert and to the rollback, and false alarms
on healthy deployments, against the simulator's hidden truth.

    .venv/bin/python benchmarks/monitor.py       # 20 healthy seeds, 5 improvements, 5 per scenario
    .venv/bin/python benchmarks/monitor.py --healthy-seeds 1 --seeds 1 --scenarios stale_holdout --verbose

Per seed, one recommendation domain at automation ``full`` (lookback 7, holdout 3, clicks as the
reward), in a fresh home, at the demo's 1,500 interactions a day, served as a serving system reads
the registry: the champion, and for a week after a first deployment over another version the
holdback (``monitor.holdback`` of requests, 20% unless ``--holdback`` says otherwise):

1. 10 days served by the baseline, a cycle: v1 passes and is deployed (the approval sensor's
   path: ``approval.deploy`` of the pending approvals); the monitor watches v1's 10 days (a healthy
   deployment: no scenario strikes before the event but stale_holdout's fad);
2. a second cycle at the event day: v2 is deployed if it passes;
3. the event (simulation/scenarios.py): ``stale_holdout`` (a fad during the 10 days before it, gone
   from it: v2, fitted and held out inside the fad, loses live to v1), ``preference_shift`` (2
   segments swap tastes) or ``new_items`` (60 unseen items, a quarter of the candidates);
4. ``--watch-days`` days served by the champion, then the domain's monitor job over them (the real
   ``<domain>_monitor`` run: accumulate, dbt, and champion_monitor's looks, one a day in order, as
   daily runs make them); a rollback approval it records is deployed as the sensor would; and what
   the drift sensor measures on each of those days.

An ``improvement`` run is healthy too: two segments swap tastes from day 10, after v1's windows, so
the second cycle's v2 truly beats v1 and is deployed over it with its holdback; its watch checks
that a better champion, compared with the version it replaced, is not declared regressed.

A healthy run (no scenario) is one deployment per version: v1 watched through both periods when
no v2 passed, else v1 and then v2 (over v1, with its holdback); a scenario's days before its event
are those of the healthy run of the same seed, so only its days after the event are reported.

It prints, per watched deployment, the true gap (stale_holdout: v2 - v1 after the event; the other
scenarios: the champion's true value after - before), the day the monitor first declared a
regression (``live_regression``) or a miss of the forecast (``live_vs_forecast``), the day of the
rollback, and the first day drift passed its thresholds; on healthy deployments any declaration is
a false alarm and any rollback a false rollback.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
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
from flywheel_pipeline.demo import holdback_scorer
from flywheel_pipeline.health.drift import domain_drift
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import baseline_scorer
from flywheel_pipeline.warehouse import connect

DOMAIN = "recommendation"
FIRST = date(2026, 6, 1)
WARMUP_DAYS = 10  # lookback 7 + holdout 3
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
REPO = Path(__file__).resolve().parent.parent


def project(root: Path, automation: str, webhook_env: str | None = None, holdback: float | None = None,
            **settings: object) -> Path:
    """flywheel.yaml with the recommendation domain alone, short windows, clicks as the reward
    (``holdback``: the monitor's, else flywheel.yaml's; ``settings``: more of the domain's)."""
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    domain = raw["domains"][DOMAIN]
    domain.update(lookback_days=7, holdout_days=3, automation=automation, label_maturity={"outcome": "click"},
                  approvers=["recsys-lead"])
    domain.update(settings)
    if holdback is not None:
        domain.setdefault("monitor", {})["holdback"] = holdback
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
                 scenario: str | None = None, webhook_env: str | None = None, verbose: bool = False,
                 holdback: float | None = None, **settings: object) -> None:
        config_path = project(root, automation, webhook_env, holdback, **settings)
        os.environ["FLYWHEEL_CONFIG"] = str(config_path)  # what the runs' resources read
        self.config, self.seed, self.per_day, self.scenario = load_config(config_path), seed, per_day, scenario
        self.verbose = verbose
        self.home = Home(root / "home").activate()
        self.instance = dg.DagsterInstance.local_temp(str(self.home.dagster))
        self.defs = build_definitions(self.config, self.home)
        mlflow.set_tracking_uri(self.home.mlflow_tracking_uri)
        mlflow.set_registry_uri(self.home.mlflow_tracking_uri)
        self.client = self.home.mlflow_client()
        self.event = FIRST + timedelta(days=2 * WARMUP_DAYS)  # the fad ends, v2 is deployed

    def reconfigure(self, **settings: object) -> None:
        """Change the domain's settings in flywheel.yaml; the next runs use them."""
        path = Path(os.environ["FLYWHEEL_CONFIG"])
        raw = yaml.safe_load(path.read_text())
        raw["domains"][DOMAIN].update(settings)
        path.write_text(yaml.safe_dump(raw))
        self.config = load_config(path)
        self.defs = build_definitions(self.config, self.home)

    def champion(self):
        uri = registry.alias_uri(self.client, DOMAIN, registry.CHAMPION)
        return mlflow.pyfunc.load_model(uri) if uri else baseline_scorer("recommendation")

    def serve(self, first: date, days: int) -> None:
        """Serve ``days`` days with the champion, and the holdback while the registry has one
        (as a serving system reads them: registry.active_holdback)."""
        version = registry.alias_version(self.client, DOMAIN, registry.CHAMPION) or "baseline"
        held = holdback_scorer(DOMAIN)
        simulation.simulate(self.home, self.config, first, days, seed=self.seed, interactions_per_day=self.per_day,
                            scorers={DOMAIN: self.champion()}, model_versions={DOMAIN: version}, holdbacks={DOMAIN: held} if held else None,
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

    def monitor(self, first: date, last: date) -> list[Look]:
        """The domain's monitor job over first..last: one look a day, in order, as daily runs would
        make them (a rollback it records is deployed after it, by ``deploy_pending``)."""
        job = self.defs.resolve_job_def(monitor_job_name(DOMAIN))
        with redirect_stdout(StringIO()):
            result = job.execute_in_process(instance=self.instance, tags=range_tags(DOMAIN, first, last),
                                            raise_on_error=False, run_config=QUIET)
        if not result.success:
            failures = [event.message for event in result.all_events if event.is_failure]
            raise RuntimeError(f"seed {self.seed}: the monitor of {first}..{last} failed (run {result.run_id}): "
                               f"{failures[:2]}")
        with connect(self.home.warehouse(DOMAIN), read_only=True) as con:
            try:
                rows = con.execute("SELECT event_date, regressed, below_forecast, action, n_interactions, live, "
                                   "live_lo, live_hi, forecast_lo, difference, difference_lo, difference_hi "
                                   "FROM health.champion_monitor WHERE domain = ? AND event_date BETWEEN ? AND ? "
                                   "ORDER BY event_date", [DOMAIN, first, last]).fetchall()
            except duckdb.CatalogException:  # nothing watched
                rows = []
        looks = []
        for day, regressed, below, action, n, live, live_lo, live_hi, forecast_lo, d, d_lo, d_hi in rows:
            if self.verbose:
                print(f"    day {(day - first).days}: {n} interactions; live {live:.4f} [{live_lo:.4f}, {live_hi:.4f}] "
                      f"(forecast from {forecast_lo:.4f}); vs previous {d:+.4f} [{d_lo:+.4f}, {d_hi:+.4f}]", flush=True)
            looks.append(Look((day - first).days, bool(regressed), bool(below), action))
        return looks

    def true_value(self, version: str, day: date) -> float:
        model = mlflow.pyfunc.load_model(f"models:/{registry.model_name(DOMAIN)}/{version}")
        return simulation.true_accuracy_on(self.home, self.config, DOMAIN, model, day)


@dataclass
class Watched:
    """One deployment watched: the scenario its days lived through, what was declared and when."""

    seed: int
    scenario: str  # healthy, or the scenario that struck while it served
    version: str
    true_gap: float  # stale_holdout: true value of v2 - v1; others: the champion's true value after - before
    looks: int
    alert_day: int | None = None  # live_regression declared
    forecast_day: int | None = None  # live_vs_forecast declared
    rollback_day: int | None = None  # the rollback's approval recorded (full), deployed by the sensor right after
    drift_day: int | None = None  # the drift sensor's measure beyond its thresholds


def watched(loop: Loop, looks: list[Look], scenario: str, version: str, gap: float) -> Watched:
    record = Watched(loop.seed, scenario, version, gap, len(looks))
    record.alert_day = next((look.day for look in looks if look.regressed), None)
    record.forecast_day = next((look.day for look in looks if look.below_forecast), None)
    record.rollback_day = next((look.day for look in looks if look.action.startswith("rollback")), None)
    return record


def drift_day(loop: Loop, version: str, first: date, days: int) -> int | None:
    """The first of ``days`` days from ``first`` whose recent traffic drifted from the champion's
    training window (what the drift sensor measures on its tick)."""
    settings = loop.config.domain(DOMAIN)
    tags = registry.version_tags(loop.client, DOMAIN, version)
    with connect(loop.home.warehouse(DOMAIN), read_only=True) as con:
        for offset in range(days):
            report = domain_drift(con, settings, DOMAIN, version, tags, as_of=first + timedelta(days=offset))
            if report is not None and report.drifted:
                return offset
    return None


def run(root: Path, seed: int, scenario: str | None, watch_days: int, per_day: int,
        verbose: bool = False, holdback: float | None = None) -> list[Watched]:
    """Deploy v1 and watch it on the 10 days before the next cycle (healthy: no scenario strikes
    before the event but stale_holdout's fad); run the second cycle (v2 deployed if it passes) and
    watch the champion then serving ``watch_days`` days after the event."""
    loop = Loop(root, seed, per_day=per_day, scenario=scenario, verbose=verbose, holdback=holdback)
    loop.serve(FIRST, WARMUP_DAYS)
    v1 = loop.cycle(FIRST, FIRST + timedelta(days=WARMUP_DAYS - 1))
    second = FIRST + timedelta(days=WARMUP_DAYS)
    loop.serve(second, WARMUP_DAYS)
    out, first_looks = [], []
    if v1 is None:
        loop.instance.dispose()
        return out
    if scenario != "stale_holdout":  # v1's days are untouched but by stale_holdout's fad
        first_looks = loop.monitor(second, loop.event - timedelta(days=1))
    if scenario is None:  # (a scenario's days before its event are the healthy run's of its seed)
        out.append(watched(loop, first_looks, "healthy", v1, float("nan")))
    v2 = loop.cycle(second - timedelta(days=loop.config.max_lateness_days), loop.event - timedelta(days=1))
    serving = v2 or v1
    if scenario == "stale_holdout" and serving == v1:
        loop.instance.dispose()
        return out  # the fad's candidate did not pass: nothing was deployed to lose live
    before = loop.event - timedelta(days=1)
    gap = (loop.true_value(v2, loop.event) - loop.true_value(v1, loop.event) if scenario == "stale_holdout"
           else loop.true_value(serving, loop.event) - loop.true_value(serving, before))
    loop.serve(loop.event, watch_days)
    looks = loop.monitor(loop.event, loop.event + timedelta(days=watch_days - 1))
    if scenario is None and serving == v1:  # no new deployment: v1's watch goes on, one deployment
        out.pop()
        looks = [*first_looks, *(replace(look, day=look.day + WARMUP_DAYS) for look in looks)]
        record = watched(loop, looks, "healthy", v1, float("nan"))
    else:
        record = watched(loop, looks, scenario or "healthy", serving, gap)
    record.drift_day = drift_day(loop, serving, loop.event, watch_days)
    out.append(record)
    loop.deploy_pending()  # what the approval sensor does with a rollback's approval
    loop.instance.dispose()
    return out


def run_improvement(root: Path, seed: int, watch_days: int, per_day: int, verbose: bool = False,
                    holdback: float | None = None) -> list[Watched]:
    """A truly better v2 deployed over v1, with its holdback: two segments swap tastes from day 10,
    after v1's windows, so the second cycle learns what v1 does not know. v2's watch is a healthy
    deployment: any regression it is found to have is a false alarm."""
    loop = Loop(root, seed, per_day=per_day, scenario="preference_shift", verbose=verbose, holdback=holdback)
    loop.event = FIRST + timedelta(days=WARMUP_DAYS)  # the shift, after v1's windows
    loop.serve(FIRST, WARMUP_DAYS)
    v1 = loop.cycle(FIRST, loop.event - timedelta(days=1))
    loop.serve(loop.event, WARMUP_DAYS)
    watch_start = loop.event + timedelta(days=WARMUP_DAYS)
    v2 = loop.cycle(loop.event - timedelta(days=loop.config.max_lateness_days), watch_start - timedelta(days=1))
    out = []
    if v1 and v2 and v2 != v1:
        gap = loop.true_value(v2, watch_start) - loop.true_value(v1, watch_start)
        loop.serve(watch_start, watch_days)
        out.append(watched(loop, loop.monitor(watch_start, watch_start + timedelta(days=watch_days - 1)),
                           "improvement", v2, gap))
        loop.deploy_pending()
    loop.instance.dispose()
    return out


def _days(values: list[int | None]) -> str:
    """``2/5 [1, 3]``: how many declared, of all, and on which days."""
    found = sorted(v for v in values if v is not None)
    return f"{len(found)}/{len(values)} {found}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per scenario")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--healthy-seeds", type=int, default=20, help="seeds of healthy runs (1 or 2 deployments each)")
    parser.add_argument("--improvement-seeds", type=int, default=5,
                        help="seeds of a truly better v2 deployed over v1 with its holdback (healthy)")
    parser.add_argument("--watch-days", type=int, default=7)
    parser.add_argument("--per-day", type=int, default=1500)
    parser.add_argument("--scenarios", nargs="+", default=["stale_holdout", "preference_shift", "new_items"])
    parser.add_argument("--holdback", type=float, help="the monitor's holdback share (default: flywheel.yaml's)")
    parser.add_argument("--verbose", action="store_true", help="each look's figures")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    first = args.first_seed
    plan = [(None, seed) for seed in range(first, first + args.healthy_seeds)]
    plan += [("improvement", seed) for seed in range(first, first + args.improvement_seeds)]
    plan += [(scenario, seed) for scenario in args.scenarios for seed in range(first, first + args.seeds)]
    results: list[Watched] = []
    for scenario, seed in plan:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="flywheel-monitor-") as tmp:
            try:
                if scenario == "improvement":
                    mine = run_improvement(Path(tmp), seed, args.watch_days, args.per_day, args.verbose, args.holdback)
                else:
                    mine = run(Path(tmp), seed, scenario, args.watch_days, args.per_day, args.verbose, args.holdback)
            except RuntimeError as error:  # a failed run is reported, and the others go on
                print(f"  {scenario or 'healthy'} seed {seed}: FAILED: {error}", flush=True)
                mine = []
        results += mine
        for w in mine:
            print(f"  seed {seed} {w.scenario:<16} v{w.version}: true gap {w.true_gap:+.3f}; {w.looks} looks; "
                  f"regression day {w.alert_day}, below forecast day {w.forecast_day}, rollback day {w.rollback_day}, "
                  f"drift day {w.drift_day}", flush=True)
        print(f"  ({scenario or 'healthy'} seed {seed}: {time.monotonic() - started:.0f}s)", flush=True)
    print("\n| deployments | n | true gap (mean) | live_regression declared (days) | live_vs_forecast declared (days) "
          "| rolled back (days) | drift (days) |")
    print("|---|---|---|---|---|---|---|")
    for scenario in ["healthy", "improvement", *args.scenarios]:
        mine = [w for w in results if w.scenario == scenario]
        gaps = [w.true_gap for w in mine if w.true_gap == w.true_gap]
        gap = f"{sum(gaps) / len(gaps):+.3f}" if gaps else "-"

        print(f"| {scenario} | {len(mine)} | {gap} | {_days([w.alert_day for w in mine])} "
              f"| {_days([w.forecast_day for w in mine])} | {_days([w.rollback_day for w in mine])} "
              f"| {_days([w.drift_day for w in mine])} |")
    print("(days from the first day of traffic after the event or deployment, 0 = that day; on healthy deployments "
          "every declaration is a false alarm and every rollback a false rollback)")


if __name__ == "__main__":
    main()
