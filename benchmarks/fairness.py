"""Fairness benchmark: an aggregate gain that a minority pays for, the gate's verdict on it, and the
reweighting lever, against the simulator's per-group truth.

    .venv/bin/python benchmarks/fairness.py              # seeds 1-3
    .venv/bin/python benchmarks/fairness.py --seeds 1

Per seed, in a fresh home, one recommendation domain at automation ``oversight`` (lookback 7,
holdout 7, clicks as the reward, ``--per-day`` interactions a day) whose users fall in two declared groups
(docs/fairness.md): ``minority``, the users of the segment the ``majority_trend`` scenario leaves
alone, and ``majority``, everyone else (a users file written from the simulator's users:
evaluation and reweighting only). ``minority`` is protected (min_samples 100, max_regression 0.02).

1. 14 days served by the baseline; a cycle; v1 deployed.
2. From day 14 the majority's tastes follow a trend, the minority's do not; 14 days served by v1.
3. A second cycle over those days: its candidate's gate outcome and reasons, and the true
   precision@5 of the candidate and of v1 on day 28, for each group's users.
4. The same cycle again with ``groups.reweight`` on: the lever's candidate, judged the same way.

It prints a row per seed and lever: the gate's outcome (and the group reason it gives), the gate's
held-out difference on each group, and the candidate's true gain over v1 for the minority, the
majority and everyone.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import mlflow
import polars as pl

from benchmarks.monitor import DOMAIN, FIRST, Loop
from flywheel_pipeline import registry, simulation
from flywheel_pipeline.simulation.world import SEGMENTS, World

MINORITY, MAJORITY = "minority", "majority"
HOLDOUT_DAYS = 7  # the domain's held-out days (lookback 7): the minority's evidence
WINDOW_DAYS = 7 + HOLDOUT_DAYS


@dataclass
class Outcome:
    seed: int
    reweight: bool
    gate: str
    reasons: str
    gains: dict[str, float]  # group -> the candidate's true precision@5 minus v1's
    held_out: dict[str, str]  # group -> the gate's difference on it, with its interval


def write_groups(loop: Loop, path: Path) -> str:
    """The users file from the simulator's users so far; returns the minority's segment."""
    world = World.load(loop.home.simulator / DOMAIN)
    minority = simulation.scenario_details(loop.home, DOMAIN)["minority_segment"]
    (world.users.select("user_id", group=pl.when(pl.col("segment") == minority).then(pl.lit(MINORITY))
                        .otherwise(pl.lit(MAJORITY)))
     .write_csv(path))
    return minority


def run(root: Path, seed: int, per_day: int) -> list[Outcome]:
    """v1 deployed before the trend; the second cycle's candidate without the lever, then with it."""
    users_file = root / "groups.csv"
    users_file.write_text("user_id,group\n")
    groups = {"field": None, "users_file": str(users_file), "protected": [MINORITY], "min_samples": 100,
              "max_regression": 0.02}
    loop = Loop(root, seed, automation="oversight", per_day=per_day, scenario="majority_trend", groups=groups,
                holdout_days=HOLDOUT_DAYS)
    loop.event = FIRST + timedelta(days=WINDOW_DAYS)  # the trend starts after v1's windows
    loop.serve(FIRST, WINDOW_DAYS)
    write_groups(loop, users_file)
    loop.cycle(FIRST, FIRST + timedelta(days=WINDOW_DAYS - 1))
    v1 = registry.alias_version(loop.client, DOMAIN, registry.CANDIDATE)
    if v1 is None:
        raise RuntimeError(f"seed {seed}: v1 did not pass")
    registry.promote(loop.client, DOMAIN, v1)  # approved by a person: the champion
    loop.serve(loop.event, WINDOW_DAYS)
    minority = write_groups(loop, users_file)
    last = loop.event + timedelta(days=WINDOW_DAYS - 1)
    outcomes = []
    for reweight in (False, True):
        if reweight:  # the same cycle again, with the lever
            groups["reweight"] = True
            loop.reconfigure(groups=groups)
        loop.cycle(loop.event - timedelta(days=loop.config.max_lateness_days), last)
        outcomes.append(judged(loop, seed, reweight, v1, minority, last + timedelta(days=1)))
    loop.instance.dispose()
    return outcomes


def judged(loop: Loop, seed: int, reweight: bool, v1: str, minority: str, day: date) -> Outcome:
    """The latest first validation's outcome, its held-out difference per group, and the truth."""
    [validation] = mlflow.search_runs(
        experiment_names=[f"flywheel-{DOMAIN}"],
        filter_string="tags.`flywheel.stage` = 'validation' and tags.`flywheel.revisit` != 'true'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    tags = validation.data.tags
    report = mlflow.artifacts.load_dict(f"runs:/{validation.info.run_id}/validation/report.json")
    held_out = {}
    for result in report["slices"]:
        if result["name"] in (f"group_{MINORITY}", f"group_{MAJORITY}"):
            dr = result["metrics"]["dr"]
            held_out[result["name"][len("group_"):]] = (f"{dr['difference']:+.3f} [{dr['difference_ci'][0]:+.3f}, "
                                                        f"{dr['difference_ci'][1]:+.3f}] n={result['n_samples']}")
    candidate = mlflow.pyfunc.load_model(tags["flywheel.candidate_model_uri"])
    champion = mlflow.pyfunc.load_model(f"models:/{registry.model_name(DOMAIN)}/{v1}")

    def gain(segment: str | None) -> float:
        return (simulation.true_accuracy_on(loop.home, loop.config, DOMAIN, candidate, day, segment=segment)
                - simulation.true_accuracy_on(loop.home, loop.config, DOMAIN, champion, day, segment=segment))

    majority = [gain(f"s{n}") for n in range(SEGMENTS) if f"s{n}" != minority]
    gains = {MINORITY: gain(minority), MAJORITY: sum(majority) / len(majority), "everyone": gain(None)}
    return Outcome(seed, reweight, tags["flywheel.gate.outcome"], tags["flywheel.gate.reasons"], gains, held_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--per-day", type=int, default=1500, help="interactions a day")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print("| seed | reweight | gate | named | minority gain | majority gain | everyone |")
    print("|---|---|---|---|---|---|---|")
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        with tempfile.TemporaryDirectory(prefix="flywheel-fairness-") as tmp:
            outcomes = run(Path(tmp), seed, args.per_day)
        for o in outcomes:
            named = next((r.split(":")[0] for r in o.reasons.split("; ") if r.startswith("group_")), "-")
            print(f"| {seed} | {'on' if o.reweight else 'off'} | {o.gate} | {named} | {o.gains[MINORITY]:+.3f} "
                  f"| {o.gains[MAJORITY]:+.3f} | {o.gains['everyone']:+.3f} |", flush=True)
            print(f"    held out (dr, candidate - champion): {o.held_out}; reasons: {o.reasons}", flush=True)


if __name__ == "__main__":
    main()
