"""Label model benchmark: Dawid-Skene vs majority vote, scored against hidden truth, and the
label model's safety checks (labeling/safety.py).

    .venv/bin/python benchmarks/label_model.py                   # a synthetic label matrix
    .venv/bin/python benchmarks/label_model.py --home .flywheel  # also the simulator's labels

The synthetic matrix has flywheel's structure: one user reaction per impression (accept, copy,
reject, reformulate, ...: the reactions exclude each other, so the LFs reading them abstain
together and are not independent), a delayed outcome and a sparse rating, and two noisy content
heuristics that vote on nearly every impression. Dawid-Skene runs as the pipeline runs it (the
reaction LFs as one voter) and, for comparison, with every LF as its own voter; majority vote
both with ties labelled good (as the pipeline's fallback writes them) and with ties abstaining.

Three scenarios: the LFs as declared, an undeclared copy (the delayed outcome again, under a
source of its own), and an undeclared complement (an LF voting bad wherever ``copied`` abstains,
as a "shown, not copied" LF would, under a source of its own). Each runs the safety checks as the labeling stage does: the dependent-source
warning, the majority-vote fallback on an audit sample of reviews (REVIEW_SHARE of the
impressions, the truth with REVIEWER_ERROR), and calibration on the reviews (held-out Brier score
against the reviews, and against the truth on every labelled impression).

With ``--home``, the labels the pipeline wrote to ``labels.*`` are scored against the simulator's
``true_labels``, and the safety checks run on the simulator's votes (``marts.fct_impressions``):
how often the warning fires on real LFs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from flywheel_pipeline.config import load_config
from flywheel_pipeline.home import Home
from flywheel_pipeline.labeling.analysis import label_accuracy
from flywheel_pipeline.labeling.functions import (
    ABSTAIN,
    BAD,
    GOOD,
    LABELING_FUNCTIONS,
    apply_lfs,
    vote_matrix,
    voters,
)
from flywheel_pipeline.labeling.model import DawidSkene, MajorityVote, majority_vote
from flywheel_pipeline.labeling.safety import calibrate, choose_label_model, dependent_sources
from flywheel_pipeline.labeling.stage import audit_gold, read_impressions, review_gold
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
SOURCES = ["implicit_reaction"] * len(REACTION_LFS) + list(INDEPENDENT_LFS)
COPIED_LF, COPY = "delayed_outcome", "delayed_outcome_copy"  # the undeclared copy scenario
COMPLEMENTED_LF, COMPLEMENT = "copied", "not_copied"  # the undeclared complement scenario
REVIEW_SHARE = 0.02  # impressions reviewed at random (the audit slice)
REVIEWER_ERROR = 0.05  # share of reviews that get the truth wrong


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
    print_majority_votes(votes, truth)

    reviews = synthetic_reviews(truth, np.random.default_rng(seed + 1))
    print(f"\nsafety checks, {int((~np.isnan(reviews)).sum()):,} reviews "
          f"({REVIEW_SHARE:.0%} at random, {REVIEWER_ERROR:.0%} reviewer error)")
    print("LFs as declared:")
    benchmark_safety(votes, LF_NAMES, SOURCES, VOTERS, truth, reviews)
    copied = votes[:, LF_NAMES.index(COPIED_LF)]
    complement = np.where(votes[:, LF_NAMES.index(COMPLEMENTED_LF)] == ABSTAIN, BAD, ABSTAIN)
    for scenario, (name, column) in {
        f"an undeclared copy: {COPIED_LF!r} again": (COPY, copied),
        f"an undeclared complement: bad wherever {COMPLEMENTED_LF!r} abstains": (COMPLEMENT, complement),
    }.items():
        print(f"{scenario}, as {name!r}, a source of its own:")
        extended = np.column_stack([votes, column]).astype(np.int8)
        lf_voters = [*VOTERS, [len(LF_NAMES)]]
        print_accuracy(DawidSkene.version, DawidSkene(lf_voters).fit(extended).predict_proba(extended), truth)
        print_majority_votes(extended, truth)
        benchmark_safety(extended, [*LF_NAMES, name], [*SOURCES, name], lf_voters, truth, reviews)


def synthetic_reviews(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reviewers' verdicts on a random REVIEW_SHARE of the impressions, NaN elsewhere."""
    reviewed = rng.random(len(truth)) < REVIEW_SHARE
    wrong = rng.random(len(truth)) < REVIEWER_ERROR
    return np.where(reviewed, np.where(wrong, 1 - truth, truth), np.nan)


def benchmark_safety(
    votes: np.ndarray,
    names: list[str],
    sources: list[str],
    lf_voters: list[list[int]],
    truth: np.ndarray,
    reviews: np.ndarray,
    audit: np.ndarray | None = None,
) -> None:
    """The labeling stage's safety checks on one label matrix: warning, fallback, calibration;
    ``audit`` (default: every review) holds the reviews chosen at random."""
    model = DawidSkene(lf_voters).fit(votes)
    started = time.perf_counter()
    dependencies = dependent_sources(votes, names, sources, model)
    seconds = time.perf_counter() - started
    print(f"  dependency warnings ({seconds:.1f} s): " + ("none" if not dependencies else ""))
    for dependency in dependencies:
        print(f"    {dependency.message()}")
    p_model, p_majority = model.predict_proba(votes), MajorityVote().predict_proba(votes)
    choice = choose_label_model(p_model, p_majority, reviews if audit is None else audit, model.version)
    print(f"  label model choice: {choice.reason}")
    chosen = p_majority if choice.fell_back else p_model
    for method in ("isotonic", "platt"):
        calibration = calibrate(chosen, reviews, method)
        print(f"  calibration of {choice.version}: {calibration.reason}; applied: {calibration.applied}")
        fitted_anyway = calibrate(chosen, reviews, method, significance=1.0)  # the map, whatever the test says
        if fitted_anyway.applied:
            print(f"    Brier vs truth on every labelled impression: {brier(chosen, truth):.4f} raw, "
                  f"{brier(fitted_anyway(chosen), truth):.4f} calibrated")


def brier(p_good: np.ndarray, truth: np.ndarray) -> float:
    scored = ~np.isnan(p_good) & ~np.isnan(truth)
    return float(np.mean((p_good[scored] - truth[scored]) ** 2))


def print_majority_votes(votes: np.ndarray, truth: np.ndarray) -> None:
    """Majority vote as the fallback writes it (a tie labelled good), and with ties abstaining."""
    p_majority = majority_vote(votes)
    print_accuracy(f"{MajorityVote.version} (tie: good)", p_majority, truth)
    print_accuracy(f"{MajorityVote.version} (tie: abstain)", np.where(p_majority == 0.5, np.nan, p_majority), truth)


def print_accuracy(label_model: str, p_good: np.ndarray, truth: np.ndarray) -> None:
    rows, accuracy = label_accuracy(p_good, truth)
    if accuracy is None:
        print(f"  {label_model:34} no labelled impression to score")
    else:
        print(
            f"  {label_model:34} accuracy vs truth {accuracy:.4f} on {rows:,} labelled impressions "
            f"(coverage {rows / (~np.isnan(truth)).sum():.3f})"
        )


def benchmark_warehouse(home: Home) -> None:
    """Score the pipeline's labels (and majority vote over its label matrix) against the truth."""
    try:
        from flywheel_pipeline.simulation import true_labels
    except ImportError:
        print("simulator labels: flywheel_pipeline.simulation.true_labels not available, skipped")
        return
    for domain in load_config().domains:
        if not home.warehouse(domain).exists():
            print(f"simulator labels: no {domain} warehouse yet, skipped")
            continue
        with connect(home.warehouse(domain), read_only=True) as con:
            try:
                labels = _labels_with_majority_vote(con, domain)
            except duckdb.CatalogException:
                print(f"simulator labels: no labels.* tables in the {domain} warehouse yet, skipped")
                continue
            scored = labels.join(true_labels(home, domain), on=["interaction_id", "item_id"])
            truth = scored.get_column("good").cast(pl.Float64).to_numpy()
            coverage = scored.get_column("p_good").is_not_null().mean()
            print(
                f"simulator labels, {domain}: {scored.height:,} impressions with truth, "
                f"label coverage {coverage:.3f}"
            )
            versions = ", ".join(scored.get_column("label_model_version").unique(maintain_order=True))
            for label_model, column in (
                (f"labels ({versions})", "p_good"),
                (MajorityVote.version, "p_majority"),
            ):
                print_accuracy(
                    label_model, scored.get_column(column).fill_null(np.nan).to_numpy(), truth
                )
            benchmark_simulator_checks(con, home, domain, true_labels)


def benchmark_simulator_checks(
    con: duckdb.DuckDBPyConnection, home: Home, domain: str, true_labels: Callable[[Home, str], pl.DataFrame]
) -> None:
    """The safety checks on the simulator's votes, every day of the warehouse as one fit window."""
    [(first, last)] = con.execute(
        "SELECT min(event_date), max(event_date) FROM marts.fct_impressions WHERE domain = ?", [domain]
    ).fetchall()
    impressions = read_impressions(con, domain, first, last)
    truth = (
        impressions.select("interaction_id", "item_id")
        .join(true_labels(home, domain), on=["interaction_id", "item_id"], how="left")
        .get_column("good").cast(pl.Float64).fill_null(np.nan).to_numpy()
    )
    lfs = list(LABELING_FUNCTIONS.values())
    lf_votes = apply_lfs(impressions, lfs)
    print(f"  safety checks on {first}..{last}, {impressions.height:,} impressions:")
    benchmark_safety(
        vote_matrix(lf_votes), lf_votes.columns, [lf.source for lf in lfs], voters(lfs), truth,
        review_gold(impressions), audit_gold(impressions),
    )


def _labels_with_majority_vote(con: duckdb.DuckDBPyConnection, domain: str) -> pl.DataFrame:
    """impression_labels' p_good beside the share of good votes in the label matrix."""
    return con.sql(
        """SELECT l.interaction_id, l.item_id, l.p_good, l.label_model_version, m.p_majority
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
