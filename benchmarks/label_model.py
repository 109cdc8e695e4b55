"""Label model benchmark: Dawid-Skene vs majority vote, scored against hidden truth.

    .venv/bin/python benchmarks/label_model.py                   # a synthetic label matrix
    .venv/bin/python benchmarks/label_model.py --home .flywheel  # also the simulator's labels

The synthetic matrix has flywheel's structure: one user reaction per impression (accept, copy,
reject, reformulate, ...: the reactions exclude each other, so the LFs reading them abstain
together and are not independent), a delayed outcome and a sparse rating, and two noisy content
heuristics that vote on nearly every impression. Dawid-Skene runs as the pipeline runs it (the
reaction LFs as one voter) and, for comparison, with every LF as its own voter. With ``--home``,
the labels the pipeline wrote to ``labels.*`` are scored against the simulator's ``true_labels``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from flywheel_pipeline.config import load_config
from flywheel_pipeline.home import Home
from flywheel_pipeline.labeling.analysis import label_accuracy
from flywheel_pipeline.labeling.functions import ABSTAIN, BAD, GOOD
from flywheel_pipeline.labeling.model import DawidSkene, MajorityVote
from flywheel_pipeline.warehouse import connect

SHARE_GOOD = 0.45
# One reaction per impression: P(reaction | good), P(reaction | bad), the LF votes it sets off.
REACTIONS = {
    "accept": (0.40, 0.06, {"accepted_kept": GOOD}),
    "accept_and_copy": (0.25, 0.03, {"accepted_kept": GOOD, "copied": GOOD}),
    "copy": (0.06, 0.04, {"copied": GOOD}),
    "light_edit": (0.06, 0.01, {"light_edit": GOOD}),
    "nothing": (0.10, 0.08, {}),
    "abandon": (0.05, 0.17, {"quick_abandon": BAD}),
    "reject": (0.04, 0.20, {"rejected": BAD}),
    "reformulate": (0.03, 0.30, {"quick_reformulation": BAD}),
    "heavy_edit": (0.01, 0.07, {"heavy_edit": BAD}),
    "accept_then_revert": (0.00, 0.04, {"accepted_then_reverted": BAD}),
}
REACTION_LFS = list(dict.fromkeys(lf for _, _, votes in REACTIONS.values() for lf in votes))
# LFs independent of everything but the truth: (coverage, accuracy).
INDEPENDENT_LFS = {
    "noisy_heuristic_a": (0.90, 0.62),
    "noisy_heuristic_b": (0.85, 0.58),
    "explicit_rating": (0.08, 0.93),
    "delayed_outcome": (0.40, 0.90),
}
LF_NAMES = REACTION_LFS + list(INDEPENDENT_LFS)
VOTERS = [list(range(len(REACTION_LFS)))] + [[j] for j in range(len(REACTION_LFS), len(LF_NAMES))]


def synthetic_label_matrix(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(votes over LF_NAMES, truth 1 good / 0 bad)."""
    rng = np.random.default_rng(seed)
    truth = (rng.random(rows) < SHARE_GOOD).astype(np.int8)
    votes = np.full((rows, len(LF_NAMES)), ABSTAIN, dtype=np.int8)
    reaction = _draw_reactions(rng, truth)
    for index, (_, _, reaction_votes) in enumerate(REACTIONS.values()):
        for lf, vote in reaction_votes.items():
            votes[reaction == index, LF_NAMES.index(lf)] = vote
    for lf, (coverage, accuracy) in INDEPENDENT_LFS.items():
        fires = rng.random(rows) < coverage
        right = rng.random(rows) < accuracy
        votes[fires, LF_NAMES.index(lf)] = np.where(right, truth, 1 - truth)[fires]
    return votes, truth


def _draw_reactions(rng: np.random.Generator, truth: np.ndarray) -> np.ndarray:
    """Index into REACTIONS of each impression's reaction, drawn given its truth."""
    odds = np.array([(if_bad, if_good) for if_good, if_bad, _ in REACTIONS.values()])
    cumulative = np.cumsum(odds / odds.sum(axis=0), axis=0)  # (reaction, class)
    below = rng.random(len(truth))[:, None] > cumulative[:, truth].T
    return np.minimum(below.sum(axis=1), len(REACTIONS) - 1)


def benchmark_synthetic(rows: int, seed: int) -> None:
    votes, truth = synthetic_label_matrix(rows, seed)
    started = time.perf_counter()
    model = DawidSkene(VOTERS).fit(votes)
    fit_s = time.perf_counter() - started
    print(
        f"synthetic label matrix: {rows:,} impressions, {len(LF_NAMES)} LFs "
        f"({len(REACTION_LFS)} reading one user reaction), seed {seed}"
    )
    print(f"  {'lf':24} {'coverage':>8} {'true acc':>8} {'learned':>8}")
    for j, (lf, learned) in enumerate(zip(LF_NAMES, model.lf_accuracies(), strict=True)):
        voted = votes[:, j] != ABSTAIN
        true_accuracy = (votes[voted, j] == truth[voted]).mean()
        print(f"  {lf:24} {voted.mean():8.3f} {true_accuracy:8.3f} {learned:8.3f}")
    print(f"  fit: {model.n_iter} EM iterations, {fit_s:.3f} s, converged={model.converged}")
    truth = truth.astype(float)
    print_accuracy(f"{DawidSkene.version}", model.predict_proba(votes), truth)
    every_lf_alone = DawidSkene().fit(votes).predict_proba(votes)
    print_accuracy(f"{DawidSkene.version}, every LF a voter", every_lf_alone, truth)
    print_accuracy(MajorityVote.version, MajorityVote().predict_proba(votes), truth)


def print_accuracy(label_model: str, p_good: np.ndarray, truth: np.ndarray) -> None:
    rows, accuracy = label_accuracy(p_good, truth)
    if accuracy is None:
        print(f"  {label_model:34} no labelled impression to score")
    else:
        print(
            f"  {label_model:34} accuracy vs truth {accuracy:.4f} on {rows:,} labelled impressions"
        )


def benchmark_warehouse(home: Home) -> None:
    """Score the pipeline's labels (and majority vote over its label matrix) against the truth."""
    try:
        from flywheel_pipeline.simulation import true_labels
    except ImportError:
        print("simulator labels: flywheel_pipeline.simulation.true_labels not available, skipped")
        return
    with connect(home.warehouse, read_only=True) as con:
        for domain in load_config().domains:
            try:
                labels = _labels_with_majority_vote(con, domain)
            except duckdb.CatalogException:
                print("simulator labels: no labels.* tables in the warehouse yet, skipped")
                return
            scored = labels.join(true_labels(home, domain), on=["interaction_id", "item_id"])
            truth = scored.get_column("good").cast(pl.Float64).to_numpy()
            coverage = scored.get_column("p_good").is_not_null().mean()
            print(
                f"simulator labels, {domain}: {scored.height:,} impressions with truth, "
                f"label coverage {coverage:.3f}"
            )
            for label_model, column in (
                ("labels (p_good)", "p_good"),
                (MajorityVote.version, "p_majority"),
            ):
                print_accuracy(
                    label_model, scored.get_column(column).fill_null(np.nan).to_numpy(), truth
                )


def _labels_with_majority_vote(con: duckdb.DuckDBPyConnection, domain: str) -> pl.DataFrame:
    """impression_labels' p_good beside the share of good votes in the label matrix."""
    return con.sql(
        """SELECT l.interaction_id, l.item_id, l.p_good, m.p_majority
           FROM labels.impression_labels AS l
           LEFT JOIN (
               SELECT domain, event_date, interaction_id, item_id, avg(vote) AS p_majority
               FROM labels.label_matrix GROUP BY ALL
           ) AS m USING (domain, event_date, interaction_id, item_id)
           WHERE l.domain = $domain""",
        params={"domain": domain},
    ).pl()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic impressions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", type=Path, help="a flywheel home with simulated, labelled data")
    args = parser.parse_args()
    benchmark_synthetic(args.rows, args.seed)
    if args.home:
        benchmark_warehouse(Home(args.home.resolve()))


if __name__ == "__main__":
    main()
