"""Where the recommender's gap to the oracle comes from: each cause measured on its own.

    .venv/bin/python benchmarks/gate.py --domains recommendation --first-seed 3 --seeds 1 \\
        --keep /tmp/gate-homes --records /tmp/gate-3.jsonl
    .venv/bin/python benchmarks/recommender_gap.py --home /tmp/gate-homes/seed-3

Reads a home the gate benchmark kept (``--keep``): for every training run of the recommendation
domain, the training impressions of its windows, their labels and the simulator's hidden truth,
and refits each trainer on variants of them, printing each fit's true precision@5 (scoring code
only; nothing here reaches the pipeline):

- labels: the pipeline's labels, labelled rows only (what the candidate was fitted on);
- truth on labelled rows: the same rows with perfect labels (label noise alone);
- truth (the oracle): every impression of the window with perfect labels (noise + coverage);
- truth / labels on the exploration slice only, or on the champion's own choices only (exposure);
- truth, no IPS: perfect labels weighted 1 (what the position correction does to the oracle);
- labels, IPS clipped at 3 / 30: the clipping of the inverse propensity weights;
- the signals' best label: P(good | the impression's own signals: slot, click, dwell, purchase,
  rating), a logistic regression fitted to the truth of the same rows. No pipeline can have it (it
  is calibrated on the truth); it bounds what any label model could make of each impression alone;
- labels / truth over the window doubled (the days before it too): what more history gives each;
- labels, the model's own prior: EM that swaps the label model's class prior for the trainer's own
  P(good | user, item) in each label (odds(p_good) / odds(prior) x odds(model)), refitting twice:
  a per-impression label judges every impression by one prior, so a silent slot weighs alike for
  an item the user likes and one they do not;
- clicks, position-based click model: no label model at all, the maximum-likelihood fit of
  P(click) = theta(slot) x P(relevant | user, item), by EM (a silent impression's target is
  r (1 - theta) / (1 - r theta) for the trainer's current r), theta from the exploration slice's
  clicks by slot.

It also prints how often the hard label agrees with the truth, per policy. The gate's margin is in
the gate benchmark's records: ``--records`` adds the best candidate the gate left unpromoted.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from flywheel_pipeline.config import load_config
from flywheel_pipeline.home import Home
from flywheel_pipeline.simulation import true_accuracy, true_labels
from flywheel_pipeline.simulation.oracle import with_truth
from flywheel_pipeline.training.base import FittedScorer, Windows, impressions, training_set
from flywheel_pipeline.training.recommendation import (
    HashedRecommendationTrainer,
    RecommendationTrainer,
)
from flywheel_pipeline.warehouse import connect

DOMAIN = "recommendation"
TRAINERS = {"hashed": HashedRecommendationTrainer, "embedding": RecommendationTrainer}


def signals(home: Home) -> pl.DataFrame:
    """Each impression's own signals, as the label model reads them (int_impression_signals)."""
    with connect(home.warehouse(DOMAIN), read_only=True) as con:
        return con.sql(
            """SELECT interaction_id, item_id, coalesce(clicked, false) AS clicked, coalesce(dwell_s, 0) AS dwell_s,
                      coalesce(outcome_value, 0) > 0 AS purchased, rating
               FROM intermediate.int_impression_signals WHERE domain = $domain""", params={"domain": DOMAIN}).pl()


def signals_best_label(rows: pl.DataFrame, truth: pl.DataFrame, reactions: pl.DataFrame) -> pl.DataFrame:
    """``rows`` labelled P(good | their own signals), fitted to their truth (module docstring)."""
    columns = rows.columns
    rows = rows.join(truth, on=["interaction_id", "item_id"], maintain_order="left").join(
        reactions, on=["interaction_id", "item_id"], how="left", maintain_order="left")
    dwell = np.log1p(rows["dwell_s"].fill_null(0).to_numpy())
    clicked = rows["clicked"].fill_null(False).to_numpy()
    x = np.column_stack([
        *(rows["position"].to_numpy() == slot for slot in range(int(rows["position"].max()) + 1)),
        clicked, clicked * dwell, clicked * dwell ** 2, rows["purchased"].fill_null(False).to_numpy(),
        rows["rating"].fill_null(0).to_numpy(), rows["rating"].is_null().to_numpy(), rows["p_good"].to_numpy(),
    ]).astype(float)
    best = LogisticRegression(max_iter=1000).fit(x, rows["good"]).predict_proba(x)[:, 1]
    print(f"   AUC against the truth: label model {roc_auc_score(rows['good'], rows['p_good']):.3f}, "
          f"the signals' best label {roc_auc_score(rows['good'], best):.3f}", flush=True)
    return rows.with_columns(p_good=pl.Series(best), label=pl.Series(best >= 0.5)).select(columns)


def refit(rows: pl.DataFrame, trainer: type[HashedRecommendationTrainer] = RecommendationTrainer,
          **overrides) -> FittedScorer:
    """``trainer`` (the default's, unless named) with ``overrides``, fitted on ``rows``."""
    made = dataclasses.replace(trainer(), **overrides)
    weighted, _ = made.weigh(rows)
    return made.fit(weighted)


def with_p_good(rows: pl.DataFrame, p_good: np.ndarray) -> pl.DataFrame:
    return rows.with_columns(p_good=pl.Series(p_good), label=pl.Series(p_good >= 0.5))


def models_own_prior(labelled: pl.DataFrame, fits: int) -> pl.DataFrame:
    """``labelled`` with each label's class prior swapped for the trainer's P(good | user, item),
    after ``fits`` rounds of fit and swap (module docstring)."""
    p = labelled["p_good"].to_numpy().clip(1e-6, 1 - 1e-6)
    prior = float(p.mean())  # the label model's class prior: its mean posterior, at EM's fixed point
    swapped = labelled
    for _ in range(fits):
        r = refit(swapped).predict(labelled.to_pandas()).clip(1e-6, 1 - 1e-6)
        odds = p / (1 - p) / (prior / (1 - prior)) * r / (1 - r)
        swapped = with_p_good(labelled, odds / (1 + odds))
    return swapped


def click_model_targets(rows: pl.DataFrame, reactions: pl.DataFrame, fits: int) -> pl.DataFrame:
    """``rows`` with EM's targets of a position-based click model after ``fits`` rounds: 1 where
    clicked, r (1 - theta) / (1 - r theta) where not (module docstring); fitted with no IPS weight."""
    clicked = rows.join(reactions, on=["interaction_id", "item_id"], how="left",
                        maintain_order="left")["clicked"].fill_null(False)
    rows = rows.with_columns(clicked=clicked)
    explored = rows.filter(pl.col("policy") == "explore")
    ctr = {position: float(group["clicked"].mean()) for (position,), group in explored.group_by("position")}
    theta = rows["position"].replace_strict({k: min(1.0, v / ctr[0]) for k, v in ctr.items()},
                                            default=1.0, return_dtype=pl.Float64).to_numpy()
    clicks = rows["clicked"].to_numpy()
    targets = np.where(clicks, 1.0, float(clicks.mean()))
    for _ in range(fits):
        r = refit(with_p_good(rows, targets), max_ips_weight=1.0).predict(rows.to_pandas())
        targets = np.where(clicks, 1.0, r * (1 - theta) / (1 - r * theta))
    return with_p_good(rows.drop("clicked"), targets)


def variants(rows: pl.DataFrame, longer: pl.DataFrame, truth: pl.DataFrame,
             reactions: Callable[[], pl.DataFrame]) -> dict[str, tuple[Callable[[], pl.DataFrame], dict]]:
    """name -> (the training rows, made when asked; trainer overrides). ``longer``: the window's
    impressions ``rows`` and those of as many days before it."""
    labelled = training_set(rows)
    perfect = functools.cache(lambda: with_truth(rows, truth))
    explore, own = pl.col("policy") == "explore", pl.col("policy") != "explore"
    return {
        "labels": (lambda: labelled, {}),
        "truth on labelled rows": (lambda: with_truth(labelled, truth), {}),
        "truth (oracle)": (perfect, {}),
        "truth, exploration only": (lambda: perfect().filter(explore), {}),
        "truth, champion's choices only": (lambda: perfect().filter(own), {}),
        "labels, exploration only": (lambda: labelled.filter(explore), {}),
        "truth, no IPS": (perfect, {"max_ips_weight": 1.0}),
        "labels, IPS clipped at 3": (lambda: labelled, {"max_ips_weight": 3.0}),
        "labels, IPS clipped at 30": (lambda: labelled, {"max_ips_weight": 30.0}),
        "the signals' best label (calibrated on the truth)": (
            lambda: signals_best_label(labelled, truth, reactions()), {}),
        "labels, window doubled": (lambda: training_set(longer), {}),
        "truth, window doubled": (lambda: with_truth(longer, truth), {}),
        "labels, the model's own prior (EM, 3 fits)": (lambda: models_own_prior(labelled, fits=2), {}),
        "clicks, position-based click model (EM, 4 fits)": (
            lambda: click_model_targets(rows, reactions(), fits=3), {"max_ips_weight": 1.0}),
    }


def label_agreement(rows: pl.DataFrame, truth: pl.DataFrame) -> dict[str, float]:
    """Share of labelled impressions whose hard label is the truth, per policy; label coverage."""
    labelled = training_set(rows).join(truth, on=["interaction_id", "item_id"])
    agree = {f"agreement {policy}": float(((g["p_good"] >= 0.5) == g["good"]).mean())
             for (policy,), g in labelled.group_by("policy")}
    good = labelled.filter(pl.col("good"))
    return {"coverage": labelled.height / rows.height, **agree,
            "recall of truly good": float((good["p_good"] >= 0.5).mean()),
            "truly good share": float(labelled["good"].mean())}


def training_windows(home: Home) -> list[Windows]:
    """The windows of every recommendation training run in the home's MLflow, oldest first."""
    client = home.mlflow_client()
    experiment = client.get_experiment_by_name(f"flywheel-{DOMAIN}")
    runs = client.search_runs([experiment.experiment_id], "tags.`flywheel.stage` = 'training'",
                              order_by=["attributes.start_time ASC"])
    return [Windows.from_params(run.data.params) for run in runs]


def gap(home: Home, trainers: list[str], only: Callable[[str], bool], cycles: list[int] | None) -> None:
    config = load_config()
    truth = true_labels(home, DOMAIN).unique(["interaction_id", "item_id"])
    reactions = functools.cache(lambda: signals(home))
    for cycle, windows in enumerate(training_windows(home), start=1):
        if cycles and cycle not in cycles:
            continue
        window = windows.train_end - windows.train_start + timedelta(days=1)
        with connect(home.warehouse(DOMAIN), read_only=True) as con:
            longer = impressions(con, DOMAIN, windows.train_start - window, windows.train_end)
        rows = longer.filter(pl.col("event_date") >= windows.train_start)
        stats = label_agreement(rows, truth)
        print(f"\n## cycle {cycle}: train {windows.train_start} .. {windows.train_end}, "
              f"{rows.height} impressions; " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()), flush=True)
        print("| variant | " + " | ".join(trainers) + " |\n|---|" + "---|" * len(trainers))
        for name, (make, overrides) in variants(rows, longer, truth, reactions).items():
            if not only(name):
                continue
            train = make()
            shown = []
            for trainer_name in trainers:
                started = time.monotonic()
                accuracy = true_accuracy(home, config, DOMAIN, refit(train, TRAINERS[trainer_name], **overrides))
                shown.append(f"{accuracy:.3f} ({time.monotonic() - started:.0f}s)")
            print(f"| {name} ({train.height} rows) | " + " | ".join(shown) + " |", flush=True)


def gate_margin(records: Path) -> None:
    """Per seed: the final champion, and the best candidate the gate did not promote."""
    entries = [json.loads(line) for line in records.read_text().splitlines()]
    candidates = [e["candidate"] for e in entries if "candidate" in e and e["candidate"]["domain"] == DOMAIN]
    for seed in sorted({c["seed"] for c in candidates}):
        mine = [c for c in candidates if c["seed"] == seed]
        final = [e["final"][DOMAIN] for e in entries if "final" in e and e["seed"] == seed]
        best = max(mine, key=lambda c: c["candidate"])
        print(f"- seed {seed}: final champion {final[0] if final else float('nan'):.3f}; best candidate "
              f"{best['candidate']:.3f} (cycle {best['cycle']}, gate {best['outcome']}); oracles "
              + ", ".join(f"{c['oracle']:.3f}" for c in mine))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="a home gate.py --keep kept (seed-<n>)")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    parser.add_argument("--variants", nargs="*", help="only the variants whose name contains one of these")
    parser.add_argument("--cycles", type=int, nargs="*", help="only these cycles (1 = the first training run)")
    parser.add_argument("--records", type=Path, help="gate.py --records: also print the gate's margin")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    home = Home(args.home)
    mlflow.set_tracking_uri(home.mlflow_tracking_uri)
    if args.records:
        gate_margin(args.records)
    gap(home, args.trainers, lambda name: not args.variants or any(v in name for v in args.variants),
        args.cycles)


if __name__ == "__main__":
    main()
