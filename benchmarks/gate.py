"""Gate benchmark: the promotion gate's decisions scored against the simulator's hidden truth.

    .venv/bin/python benchmarks/gate.py                          # 5 seeds x 6 cycles, both domains
    .venv/bin/python benchmarks/gate.py --seeds 1 --cycles 3      # a quick look
    .venv/bin/python benchmarks/gate.py --domains recommendation --first-seed 101 --seeds 2
    .venv/bin/python benchmarks/gate.py --per-day 6000 --users 750   # 4x traffic, as 4x per user

``--domains`` runs only those domains (the simulator's draws are per domain, so a domain's loop is
the same with or without the others); ``--keep DIR`` keeps each seed's home as DIR/seed-<n> for
benchmarks/recommender_gap.py.

Each seed runs the closed loop in a fresh temporary home: a warm-up served by the baseline, then
per cycle a week of traffic served by each domain's champion, the domain's cycle job in process
(``definitions.execute_cycle``: accumulate, dbt, label, fine-tune, validate, register), and a
passed candidate promoted to champion. For every candidate it records its true accuracy
(``simulation.true_accuracy``) against the champion's at the time and the gate's outcome (after
its revisit, when an inconclusive candidate was looked at again the next cycle), and prints per
domain:

- the confusion table: promoted / rejected / inconclusive x truly better (> +0.01) / truly worse
  (< -0.01) / within +-0.01;
- the share of candidates truly better by >= 0.02 that were promoted (at once or on revisit), or
  inconclusive and superseded by a promotion the next cycle;
- the final champion's true accuracy against the baseline's and the oracle's: the same trainer
  fitted on the hidden truth of the same training impressions (what perfect labels would give).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from io import StringIO
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np

from flywheel_pipeline import registry, simulation
from flywheel_pipeline.config import FlywheelConfig, load_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.assets import model_keys
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import Scorer, baseline_scorer
from flywheel_pipeline.simulation.oracle import model_true_accuracy, oracle_accuracy
from flywheel_pipeline.training.base import Windows

DAYS_PER_CYCLE = 7
WARMUP_DAYS = 14
WITHIN = 0.01
CLEARLY_BETTER = 0.02
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
OUTCOMES = ("passed", "failed", "inconclusive")
TRUTHS = ("truly better", "truly worse", "within +-0.01")


@dataclass
class Candidate:
    seed: int
    cycle: int
    domain: str
    outcome: str
    candidate: float  # true accuracy
    champion: float   # the champion's true accuracy when the candidate was decided (on revisit, then)
    oracle: float     # the same trainer on the hidden truth of the same training impressions
    reasons: str
    model_uri: str = ""
    revisit: str = ""  # the outcome of its second look the next cycle, when it had one

    @property
    def final(self) -> str:
        return self.revisit or self.outcome

    @property
    def truth(self) -> str:
        gain = self.candidate - self.champion
        return TRUTHS[0] if gain > WITHIN else TRUTHS[1] if gain < -WITHIN else TRUTHS[2]


def _metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict:
    for event in result.get_asset_materialization_events():
        if event.asset_key == key:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    return {}


def _gate_check(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict:
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.asset_key == key and evaluation.check_name == "gate":
            return {k: v.value for k, v in evaluation.metadata.items()}
    return {}


class Loop:
    """One seed's closed loop in its own home."""

    def __init__(self, root: Path, config: FlywheelConfig, seed: int, per_day: int, end: date,
                 cycles: int, records: Path | None = None, domains: list[str] | None = None,
                 users: int | None = None) -> None:
        self.records, self.users = records, users
        self.domains = domains or list(config.domains)
        self.home, self.config, self.seed, self.per_day = Home(root).activate(), config, seed, per_day
        self.instance = dg.DagsterInstance.local_temp(str(self.home.dagster))
        self.defs = build_definitions(config, self.home)
        self.start = end - timedelta(days=WARMUP_DAYS + cycles * DAYS_PER_CYCLE - 1)
        # this process's MLflow points at this seed's home (the previous seed's set it too)
        mlflow.set_tracking_uri(self.home.mlflow_tracking_uri)
        mlflow.set_registry_uri(self.home.mlflow_tracking_uri)
        self.client = self.home.mlflow_client()

    def champion(self, domain: str) -> Scorer:
        uri = registry.alias_uri(self.client, domain, registry.CHAMPION)
        return mlflow.pyfunc.load_model(uri) if uri else baseline_scorer(self.config.domain(domain).shape)

    def serve(self, first: date, days: int) -> None:
        scorers = {d: self.champion(d) for d in self.domains}
        versions = {d: registry.alias_version(self.client, d, registry.CHAMPION) or "baseline"
                    for d in self.domains}
        simulation.simulate(self.home, self.config, first, days, seed=self.seed,
                            interactions_per_day=self.per_day, bad_row_share=0.01,
                            scorers=scorers, model_versions=versions, domains=self.domains, users=self.users)

    def cycle(self, cycle: int, domain: str, first: date, last: date) -> tuple[Candidate, str]:
        """The cycle's candidate, and the outcome of the previous candidate's revisit ("" if none)."""
        champion = simulation.true_accuracy(self.home, self.config, domain, self.champion(domain))
        with redirect_stdout(StringIO()):
            result = execute_cycle(self.defs, self.instance, domain, first, last, run_config=QUIET)
        if not result.success:
            raise RuntimeError(f"seed {self.seed} cycle {cycle} {domain} failed: run {result.run_id}")
        keys = model_keys(domain)
        trained, check = _metadata(result, keys["candidate_model"]), _gate_check(result, keys["validation_report"])
        registered = _metadata(result, keys["registered_candidate"])
        candidate = model_true_accuracy(self.home, self.config, domain, trained["model_uri"])
        if registered:
            registry.promote(self.client, domain, str(registered["version"]))
        oracle = oracle_accuracy(self.home, self.config, domain, Windows.from_params(trained))
        judged = Candidate(self.seed, cycle, domain, check["gate"], candidate, champion, oracle,
                           check.get("reasons", ""), trained["model_uri"])
        return judged, check.get("revisit_gate", "")

    def run(self, cycles: int) -> tuple[list[Candidate], dict[str, float], dict[str, float]]:
        self.serve(self.start, WARMUP_DAYS)
        baseline = {d: simulation.true_accuracy(self.home, self.config, d, self.champion(d))
                    for d in self.domains}
        candidates = []
        for cycle in range(1, cycles + 1):
            first = self.start + timedelta(days=WARMUP_DAYS + (cycle - 1) * DAYS_PER_CYCLE)
            self.serve(first, DAYS_PER_CYCLE)
            run_from = self.start if cycle == 1 else first - timedelta(days=self.config.max_lateness_days)
            for domain in self.domains:
                started = time.monotonic()
                judged, revisit = self.cycle(cycle, domain, run_from, first + timedelta(days=DAYS_PER_CYCLE - 1))
                if revisit:
                    [earlier] = [c for c in candidates if c.domain == domain and c.cycle == cycle - 1]
                    # decided now, against the champion of now
                    earlier.revisit, earlier.champion = revisit, judged.champion
                    self.record({"revisit": {"seed": self.seed, "domain": domain, "cycle": cycle - 1,
                                             "outcome": revisit, "champion": judged.champion}})
                    print(f"  seed {self.seed} cycle {cycle} {domain:<14} revisited cycle {cycle - 1}'s "
                          f"candidate: {revisit}", flush=True)
                candidates.append(judged)
                self.record({"candidate": asdict(judged)})
                print(f"  seed {self.seed} cycle {cycle} {domain:<14} {judged.outcome:<12} candidate "
                      f"{judged.candidate:.3f} champion {judged.champion:.3f} oracle {judged.oracle:.3f} "
                      f"({time.monotonic() - started:.0f}s) {judged.reasons[:150]}", flush=True)
        final = {d: simulation.true_accuracy(self.home, self.config, d, self.champion(d))
                 for d in self.domains}
        self.record({"seed": self.seed, "baseline": baseline, "final": final})
        self.instance.dispose()
        return candidates, baseline, final


    def record(self, entry: dict) -> None:
        if self.records:
            with self.records.open("a") as out:
                out.write(json.dumps(entry) + "\n")


def from_records(path: Path) -> tuple[list[Candidate], dict[int, dict], dict[int, dict]]:
    """What ``--records`` wrote: every candidate, and each finished seed's baseline and final."""
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    finished = [e for e in entries if "final" in e]
    done = {e["seed"] for e in finished}
    candidates = [Candidate(**e["candidate"]) for e in entries
                  if "candidate" in e and e["candidate"]["seed"] in done]
    by_key = {(c.seed, c.domain, c.cycle): c for c in candidates}
    for e in entries:
        if "revisit" in e and e["revisit"]["seed"] in done:
            revisit = e["revisit"]
            earlier = by_key[revisit["seed"], revisit["domain"], revisit["cycle"]]
            earlier.revisit, earlier.champion = revisit["outcome"], revisit["champion"]
    return (candidates, {e["seed"]: e["baseline"] for e in finished},
            {e["seed"]: e["final"] for e in finished})


def caught(candidates: list[Candidate]) -> tuple[int, int, int]:
    """Of the candidates truly better by CLEARLY_BETTER: how many were promoted (at once or on
    revisit), how many more were inconclusive and superseded by a promotion the next cycle, all."""
    by_key = {(c.seed, c.domain, c.cycle): c for c in candidates}
    clearly = [c for c in candidates if c.candidate - c.champion >= CLEARLY_BETTER]
    promoted = sum(c.final == "passed" for c in clearly)
    superseded = 0
    for c in clearly:
        later = by_key.get((c.seed, c.domain, c.cycle + 1))
        superseded += (c.final == "inconclusive" and later is not None and later.outcome == "passed")
    return promoted, superseded, len(clearly)


def report(candidates: list[Candidate], baselines: dict[int, dict], finals: dict[int, dict]) -> None:
    """Per domain: the confusion table, the clearly-better catch rate, final accuracy vs oracle.
    ``baselines`` and ``finals``: per seed, each domain's true accuracy."""
    for domain in sorted({c.domain for c in candidates}):
        mine = [c for c in candidates if c.domain == domain]
        table = defaultdict(int)
        for c in mine:
            table[c.final, c.truth] += 1
        print(f"\n## {domain}: {len(mine)} candidates")
        print(f"| gate | {' | '.join(TRUTHS)} |\n|---|---|---|---|")
        for outcome in OUTCOMES:
            name = {"passed": "promoted", "failed": "rejected"}.get(outcome, outcome)
            print(f"| {name} | " + " | ".join(str(table[outcome, t]) for t in TRUTHS) + " |")
        worse = [c for c in mine if c.final == "passed" and c.candidate - c.champion < -WITHIN]
        revisited = [c for c in mine if c.revisit]
        promoted, superseded, clearly = caught(mine)
        print(f"- promoted while truly worse by more than {WITHIN}: {len(worse)}")
        print(f"- revisited after inconclusive: {len(revisited)}; on revisit promoted "
              f"{sum(c.revisit == 'passed' for c in revisited)}, rejected {sum(c.revisit == 'failed' for c in revisited)}")
        print(f"- truly better by >= {CLEARLY_BETTER}: {clearly}; promoted (at once or on revisit) {promoted}, "
              f"inconclusive and superseded by a promotion the next cycle {superseded}"
              + (f": {(promoted + superseded) / clearly:.0%}" if clearly else ""))
        seeds = sorted({c.seed for c in mine})
        base = np.array([baselines[s][domain] for s in seeds])
        final = np.array([finals[s][domain] for s in seeds])
        last = np.array([[c.oracle for c in mine if c.seed == s][-1] for s in seeds])
        best = np.array([max(c.oracle for c in mine if c.seed == s) for s in seeds])
        share, share_best = ((final - base) / (o - base) for o in (last, best))
        for s, b, f, o, ob, g, gb in zip(seeds, base, final, last, best, share, share_best):
            print(f"- seed {s}: baseline {b:.3f} -> champion {f:.3f}; oracle {o:.3f} (last cycle; best "
                  f"{ob:.3f}); share of the oracle's gain {g:.0%} (of the best's {gb:.0%})")
        print(f"- mean: champion {final.mean():.3f}, oracle {last.mean():.3f} (best {best.mean():.3f}), "
              f"share of the oracle's gain {share.mean():.0%} (of the best's {share_best.mean():.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--per-day", type=int, default=1500)
    parser.add_argument("--users", type=int, help="active users per domain (default: half of --per-day)")
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "flywheel.yaml")
    parser.add_argument("--domains", nargs="+", help="only these domains (default: every one in the config)")
    parser.add_argument("--keep", type=Path, help="keep each seed's home under this folder (seed-<n>)")
    parser.add_argument("--records", type=Path, help="append every candidate here as JSON lines")
    parser.add_argument("--report", type=Path, help="only print the tables of a --records file")
    args = parser.parse_args()
    if args.report:
        report(*from_records(args.report))
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    config = load_config(args.config)
    end = date.today() - timedelta(days=1)
    candidates, baselines, finals = [], {}, {}
    started = time.monotonic()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        with tempfile.TemporaryDirectory(prefix=f"gate-bench-{seed}-") as root:
            home = args.keep / f"seed-{seed}" if args.keep else Path(root)
            loop = Loop(home, config, seed, args.per_day, end, args.cycles, args.records, args.domains, args.users)
            found, baseline, final = loop.run(args.cycles)
        candidates += found
        baselines[seed], finals[seed] = baseline, final
    users = f", {args.users} users" if args.users else ""
    print(f"\n# Gate benchmark: {args.seeds} seeds x {args.cycles} cycles, {args.per_day} interactions "
          f"a day per domain{users} ({time.monotonic() - started:.0f}s)")
    report(candidates, baselines, finals)


if __name__ == "__main__":
    main()
