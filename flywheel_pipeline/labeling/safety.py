"""Label-model safety: checks that keep a wrong label model from writing confident labels.

Three checks, each reported with its evidence (``stage`` writes them to the run's metadata):

- ``dependent_sources``: Dawid-Skene hears each source as a voter independent of the others given
  the class. Two sources that read the same evidence (a copy under another name) count it twice
  and can pull the whole fit off (benchmarks/label_model.py: 0.87 -> 0.63 accuracy). A pair of
  sources is flagged when hearing them as one voter explains the votes significantly better (a
  likelihood ratio test) *and* two of their LFs vote alike far beyond what independence given the
  class allows (excess agreement); the warning names that pair and the source to declare.
- ``choose_label_model``: the label model's labels against majority vote's on the audit reviews
  (gold labels from a random slice); falls back to majority vote only when that is significantly
  better (an exact one-sided McNemar test on the reviews where exactly one of them is right) on
  enough reviews.
- ``calibrate``: a calibration map of p_good fitted on the reviews (Platt scaling or isotonic),
  applied only where it lowers the held-out Brier score (cross-fitted over folds of the reviews)
  beyond chance (a one-sided paired t-test on the reviews' squared errors).

Reviews chosen for review because p_good was near 0.5 (uncertainty sampling) still estimate
P(good | p_good) without bias, so calibration uses every review; accuracy does not survive that
selection, so the model choice reads the audit slice only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

import numpy as np
from scipy import stats
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from flywheel_pipeline.labeling.model import DawidSkene, MajorityVote, has_votes, vote_patterns

CalibrationMethod = Literal["platt", "isotonic", "off"]
CALIBRATION_FOLDS = 5
LOGIT_CLIP = 1e-6  # Platt scaling reads logit(p_good); Dawid-Skene's p_good can be 1 - 1e-12


# --- dependent sources ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dependency:
    """Two LFs of different sources that vote alike far beyond independence given the class."""

    lfs: tuple[str, str]
    sources: tuple[str, str]
    agreement: float  # share of the rows where either voted on which both cast the same vote
    expected_agreement: float  # the same, were they independent given the class
    labels_changed: float  # share of labels that change when the two sources are one voter
    p_value: float  # likelihood ratio test: one voter explains the votes no better than two
    declare: tuple[str, str]  # (LF, source): the LF whose source to declare, and as which

    @property
    def excess_agreement(self) -> float:
        """Share of the disagreement independence predicts that does not happen (1: a copy)."""
        return _excess(self.agreement, self.expected_agreement)

    def message(self) -> str:
        (a, b), (source_a, source_b), (lf, source) = self.lfs, self.sources, self.declare
        return (
            f"labeling functions {a!r} (source {source_a!r}) and {b!r} (source {source_b!r}) "
            f"cast the same vote on {self.agreement:.1%} of the rows where either voted, "
            f"{self.expected_agreement:.1%} if independent given the class "
            f"({_p_value(self.p_value)}); the label model counts their "
            f"evidence twice, and hearing their sources as one voter changes "
            f"{self.labels_changed:.1%} of the labels. If they read the same evidence, declare "
            f"{lf!r} with source={source!r}."
        )


def dependent_sources(
    votes: np.ndarray,
    names: Sequence[str],
    sources: Sequence[str],
    fitted: DawidSkene,
    *,
    significance: float = 1e-3,
    min_excess_agreement: float = 0.5,
) -> list[Dependency]:
    """Pairs of ``fitted``'s voters (sources) that are not independent given the class.

    Nothing is when ``fitted`` explains the joint votes of every pair of LFs of different
    sources (a G test per LF pair, Bonferroni over them): refits can take many EM rounds. Else
    each pair of voters is refitted as one voter (a joint table: any dependence allowed) and
    flagged when the likelihood ratio test rejects independence at ``significance`` (Bonferroni
    over the voter pairs) and, under the refitted model, one of its LF pairs has at least
    ``min_excess_agreement``: with many rows, a dependence too weak to matter is significant,
    while a copy of an LF has an excess agreement of 1. (The misfit need not show in the copied
    pair itself: the fit may take the copied LF for the truth, and the others then misfit.)
    """
    voters = fitted.lf_voters
    pairs = {
        (a, b): [(j, k) for j in voters[a] for k in voters[b]]
        for a, b in combinations(range(len(voters)), 2)
    }
    patterns, _, rows = vote_patterns(votes)
    screen_level = significance / max(sum(map(len, pairs.values())), 1)
    if all(_misfit(patterns, rows, fitted, j, k) >= screen_level
           for lf_pairs in pairs.values() for j, k in lf_pairs):
        return []
    found = []
    for (a, b), lf_pairs in pairs.items():
        merged, p_value = _as_one_voter(votes, fitted, a, b)
        if p_value >= significance / len(pairs):
            continue
        (agreement, expected), j, k = max(
            ((_agreement(patterns, rows, merged, j, k), j, k) for j, k in lf_pairs),
            key=lambda candidate: _excess(*candidate[0]),
        )
        if _excess(agreement, expected) >= min_excess_agreement:
            found.append(Dependency(
                lfs=(names[j], names[k]),
                sources=(sources[j], sources[k]),
                agreement=agreement,
                expected_agreement=expected,
                labels_changed=_labels_changed(votes, fitted, merged),
                p_value=p_value,
                declare=_declare(names, sources, j, k),
            ))
    return found


def dependent_with(names: Sequence[str], dependencies: list[Dependency]) -> list[str | None]:
    """Per LF, the LFs of other sources it was found dependent on (comma-separated), else None."""
    partners: dict[str, list[str]] = {}
    for dependency in dependencies:
        a, b = dependency.lfs
        partners.setdefault(a, []).append(b)
        partners.setdefault(b, []).append(a)
    return [", ".join(partners[name]) if name in partners else None for name in names]


def _as_one_voter(votes: np.ndarray, fitted: DawidSkene, a: int, b: int) -> tuple[DawidSkene, float]:
    """``fitted`` refitted with its voters ``a`` and ``b`` as one, and the p-value of the
    likelihood ratio test that this explains the votes no better."""
    voters = [v for i, v in enumerate(fitted.lf_voters) if i not in (a, b)]
    voters.append(fitted.lf_voters[a] + fitted.lf_voters[b])
    merged = DawidSkene(voters, smoothing=fitted.smoothing).fit(votes, start=fitted)
    statistic = 2 * (merged.log_likelihood(votes) - fitted.log_likelihood(votes))
    extra_parameters = max(merged.n_parameters - fitted.n_parameters, 1)
    return merged, float(stats.chi2.sf(max(statistic, 0.0), extra_parameters))


def _labels_changed(votes: np.ndarray, fitted: DawidSkene, other: DawidSkene) -> float:
    """Share of the labelled rows whose label differs between two models."""
    labelled = has_votes(votes)
    return float(((fitted.predict_proba(votes) >= 0.5) != (other.predict_proba(votes) >= 0.5))[labelled].mean())


def _joint_votes(
    patterns: np.ndarray, rows: np.ndarray, model: DawidSkene, j: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows per (LF j's vote + 1, LF k's vote + 1), observed and expected under ``model`` were
    the two independent given the class; the cell where both abstained left out (zero)."""
    observed = np.zeros((3, 3))
    np.add.at(observed, (patterns[:, j] + 1, patterns[:, k] + 1), rows)
    rates, class_share = model.vote_rates(), np.array([1 - model.prior_good, model.prior_good])
    expected = np.einsum("uy,vy,y->uv", rates[j], rates[k], class_share)
    observed[0, 0] = expected[0, 0] = 0.0
    return observed, expected * observed.sum() / expected.sum()


def _misfit(patterns: np.ndarray, rows: np.ndarray, model: DawidSkene, j: int, k: int) -> float:
    """p-value of a G test: LF j and LF k's joint votes are as ``model`` expects."""
    observed, expected = _joint_votes(patterns, rows, model, j, k)
    seen = observed > 0
    statistic = 2 * (observed[seen] * np.log(observed[seen] / expected[seen])).sum()
    return float(stats.chi2.sf(statistic, 7)) if seen.any() else 1.0


def _agreement(
    patterns: np.ndarray, rows: np.ndarray, model: DawidSkene, j: int, k: int
) -> tuple[float, float]:
    """On the rows where LF j or LF k voted, the share where both cast the same vote (one voting
    alone counts as disagreeing): observed, and expected under ``model`` were they independent
    given the class."""
    observed, expected = _joint_votes(patterns, rows, model, j, k)
    if not observed.any():
        return 0.0, 0.0
    return float(np.trace(observed) / observed.sum()), float(np.trace(expected) / expected.sum())


def _p_value(p_value: float) -> str:
    return "p<1e-16" if p_value < 1e-16 else f"p={p_value:.1g}"


def _excess(agreement: float, expected: float) -> float:
    return (agreement - expected) / (1 - expected) if expected < 1 else 0.0


def _declare(names: Sequence[str], sources: Sequence[str], j: int, k: int) -> tuple[str, str]:
    """The LF of the smaller source (the second on a tie) joins the other's source."""
    if sources.count(sources[j]) < sources.count(sources[k]):
        return names[j], sources[k]
    return names[k], sources[j]


# --- majority-vote fallback ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelChoice:
    """Which label model writes the labels, and the audit reviews that decided it."""

    version: str
    reason: str
    gold_rows: int  # audit reviews both models labelled
    model_accuracy: float | None  # the label model's labels on them
    majority_vote_accuracy: float | None
    p_value: float | None  # one-sided: majority vote is the better of the two

    @property
    def fell_back(self) -> bool:
        return self.version == MajorityVote.version


def choose_label_model(
    p_model: np.ndarray,
    p_majority: np.ndarray,
    audit_gold: np.ndarray,
    version: str,
    *,
    min_gold_rows: int = 50,
    significance: float = 0.05,
) -> ModelChoice:
    """Keep the label model (``version``) unless majority vote is significantly more accurate on
    the audit reviews (``audit_gold``: 1/0, NaN where not in the audit slice).

    Exact one-sided McNemar test: of the reviews where exactly one of the two is right, majority
    vote must be right on significantly more than half; needs ``min_gold_rows`` reviews labelled.
    """
    scored = ~np.isnan(audit_gold) & ~np.isnan(p_model) & ~np.isnan(p_majority)
    rows = int(scored.sum())
    truth = audit_gold[scored] == 1
    model_right = (p_model[scored] >= 0.5) == truth
    majority_right = (p_majority[scored] >= 0.5) == truth
    accuracies = (float(model_right.mean()), float(majority_right.mean())) if rows else (None, None)
    if rows < min_gold_rows:
        return ModelChoice(version, f"kept {version}: {rows} audit reviews, fewer than the "
                           f"{min_gold_rows} needed to compare it with majority vote", rows, *accuracies, None)
    only_model = int((model_right & ~majority_right).sum())
    only_majority = int((majority_right & ~model_right).sum())
    discordant = only_model + only_majority
    p_value = (
        float(stats.binomtest(only_majority, discordant, 0.5, alternative="greater").pvalue)
        if discordant else 1.0
    )
    evidence = (f"on {rows} audit reviews majority vote is right where {version} is wrong "
                f"{only_majority} times, the reverse {only_model} times (p={p_value:.2g})")
    if p_value < significance:
        return ModelChoice(MajorityVote.version, f"fell back to majority vote: {evidence}", rows,
                           *accuracies, p_value)
    return ModelChoice(version, f"kept {version}: {evidence}", rows, *accuracies, p_value)


# --- calibration on gold -------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """A calibration map of p_good fitted on the reviews, and whether it earned its place."""

    method: CalibrationMethod
    applied: bool
    reason: str
    gold_rows: int  # reviews with a p_good
    brier_raw: float | None  # held-out Brier score of p_good as the model gave it
    brier_calibrated: float | None  # of the cross-fitted calibrated p_good
    mapping: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    def __call__(self, p_good: np.ndarray) -> np.ndarray:
        """p_good calibrated if the map was applied, as it was otherwise; NaN stays NaN."""
        if self.mapping is None:
            return p_good
        labelled = ~np.isnan(p_good)
        calibrated = p_good.copy()
        calibrated[labelled] = self.mapping(p_good[labelled])
        return calibrated


def calibrate(
    p_good: np.ndarray,
    gold: np.ndarray,
    method: CalibrationMethod = "isotonic",
    *,
    row_keys: np.ndarray | None = None,
    min_gold_rows: int = 50,
    significance: float = 0.05,
    folds: int = CALIBRATION_FOLDS,
) -> Calibration:
    """Fit ``method`` on (p_good, gold) over the reviewed rows; apply it only if, cross-fitted
    (each fold scored by a map fitted on the others), it lowers the Brier score, significantly
    at ``significance`` (one-sided paired t-test on the per-review squared errors).

    Folds are dealt in order of p_good, so each spans its range; ties are ordered by
    ``row_keys`` (a number per row that does not depend on the row's order or its review, e.g.
    a hash of the impression key; default: the row order). Never by the reviews: folds that
    depend on the labels make the held-out error optimistic.
    """
    reviewed = ~np.isnan(p_good) & ~np.isnan(gold)
    p, truth = p_good[reviewed], gold[reviewed]
    keys = np.arange(len(p_good)) if row_keys is None else row_keys
    rows = len(p)

    def skipped(reason: str) -> Calibration:
        return Calibration(method, False, reason, rows, None, None)

    if method == "off":
        return skipped("calibration is off")
    if rows < min_gold_rows:
        return skipped(f"{rows} reviews, fewer than the {min_gold_rows} needed to calibrate on")
    fold = np.empty(rows, dtype=int)
    fold[np.lexsort((keys[reviewed], p))] = np.arange(rows) % folds
    if any(np.unique(truth[fold != f]).size < 2 for f in range(folds)):
        return skipped(f"the {rows} reviews hold too few of one class to calibrate on")
    held_out = np.empty(rows)
    for f in range(folds):
        held_out[fold == f] = _fit_map(method, p[fold != f], truth[fold != f])(p[fold == f])
    raw_error, calibrated_error = (p - truth) ** 2, (held_out - truth) ** 2
    brier_raw, brier_calibrated = float(raw_error.mean()), float(calibrated_error.mean())
    gain = raw_error - calibrated_error
    p_value = float(stats.ttest_1samp(gain, 0.0, alternative="greater").pvalue) if gain.any() else 1.0
    applied = p_value < significance
    verdict = "lowers" if applied else "does not significantly lower"
    return Calibration(
        method,
        applied,
        f"{method} calibration {verdict} the held-out Brier score on {rows} reviews "
        f"({brier_raw:.4f} -> {brier_calibrated:.4f}, p={p_value:.2g})",
        rows,
        brier_raw,
        brier_calibrated,
        _fit_map(method, p, truth) if applied else None,
    )


def _fit_map(
    method: CalibrationMethod, p_good: np.ndarray, truth: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """P(good | p_good) fitted on reviews: isotonic, or logistic in logit(p_good) (Platt)."""
    if method == "isotonic":
        isotonic = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p_good, truth)
        return isotonic.predict
    platt = LogisticRegression(C=np.inf).fit(_logit(p_good), truth)
    return lambda p: platt.predict_proba(_logit(p))[:, 1]


def _logit(p_good: np.ndarray) -> np.ndarray:
    p = np.clip(p_good, LOGIT_CLIP, 1 - LOGIT_CLIP)
    return (np.log(p) - np.log1p(-p))[:, None]
