"""Label-model safety: checks that keep a wrong label model from writing confident labels.

Three checks, each reported with its evidence (``stage`` writes them to the run's metadata):

- ``dependent_sources``: Dawid-Skene hears each source as a voter independent of the others given
  the class. Two sources that read the same evidence (a copy under another name) count it twice
  and can pull the whole fit off (benchmarks/label_model.py: 0.87 -> 0.63 accuracy). A pair of
  sources is flagged when hearing them as one voter explains the votes significantly better (a
  likelihood ratio test) *and*, given the class, two of their LFs' responses share most of their
  information (a copy, or a complement that votes exactly where the other abstains); the warning
  names that pair and the source to declare.
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

from flywheel_pipeline.labeling.functions import ABSTAIN
from flywheel_pipeline.labeling.model import DawidSkene, MajorityVote, has_votes, vote_patterns

CalibrationMethod = Literal["platt", "isotonic", "off"]
CALIBRATION_FOLDS = 5
MIN_LF_VOTES = 30  # an LF named in a dependency voted at least this often (rarer: no information to share)
LOGIT_CLIP = 1e-6  # Platt scaling reads logit(p_good); Dawid-Skene's p_good can be 1 - 1e-12


# --- dependent sources ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dependency:
    """Two LFs of different sources that are far from independent given the class."""

    lfs: tuple[str, str]
    sources: tuple[str, str]
    # I(a; b | class) / min(H(a | class), H(b | class)) of their responses (abstaining counts),
    # with the two sources heard as one voter: 0 independent given the class, 1 for a copy (or
    # a complement, voting exactly where the other abstains)
    shared_information: float
    labels_changed: float  # share of labels that change when the two sources are one voter
    p_value: float  # likelihood ratio test: one voter explains the votes no better than two
    declare: tuple[str, str]  # (LF, source): the LF whose source to declare, and as which

    def message(self) -> str:
        (a, b), (source_a, source_b), (lf, source) = self.lfs, self.sources, self.declare
        return (
            f"labeling functions {a!r} (source {source_a!r}) and {b!r} (source {source_b!r}) are "
            f"not independent given the class: their votes, abstentions included, share "
            f"{self.shared_information:.0%} of their information beyond the class (0% if "
            f"independent, 100% for a copy) ({_p_value(self.p_value)}). The label model counts "
            f"that evidence twice; hearing their sources as one voter changes "
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
    min_shared_information: float = 0.5,
) -> list[Dependency]:
    """Pairs of ``fitted``'s voters (sources) that are not independent given the class.

    Nothing is flagged when ``fitted`` explains the joint votes of every pair of LFs of different
    sources (a G test per LF pair, Bonferroni over them): refits can take many EM rounds. Else
    each pair of voters is refitted as one voter (a joint table: any dependence allowed) and
    flagged when the likelihood ratio test rejects independence at ``significance`` (Bonferroni
    over the voter pairs) and, under the refitted model, two of its LFs (each with MIN_LF_VOTES
    votes) share at least ``min_shared_information``: with many rows, a dependence too weak to
    matter is significant, while a copy shares all. (The misfit need not show in the copied pair
    itself: the fit may take the copied LF for the truth, and the others then misfit.)
    """
    voters, lf_votes = fitted.lf_voters, (votes != ABSTAIN).sum(axis=0)
    pairs = {
        (a, b): [(j, k) for j in voters[a] for k in voters[b] if min(lf_votes[[j, k]]) >= MIN_LF_VOTES]
        for a, b in combinations(range(len(voters)), 2)
    }
    patterns, _, rows = vote_patterns(votes)
    screen_level = significance / max(sum(map(len, pairs.values())), 1)
    if all(_misfit(patterns, rows, fitted, j, k) >= screen_level
           for lf_pairs in pairs.values() for j, k in lf_pairs):
        return []
    found = []
    for (a, b), lf_pairs in pairs.items():
        if not lf_pairs:
            continue
        merged, p_value = _as_one_voter(votes, fitted, a, b)
        if p_value >= significance / len(pairs):
            continue
        shared, j, k = max((_shared_information(merged, j, k), j, k) for j, k in lf_pairs)
        if shared >= min_shared_information:
            found.append(Dependency(
                lfs=(names[j], names[k]),
                sources=(sources[j], sources[k]),
                shared_information=shared,
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


def _misfit(patterns: np.ndarray, rows: np.ndarray, model: DawidSkene, j: int, k: int) -> float:
    """p-value of a G test that LF j and LF k's joint votes are as ``model`` expects (LFs of
    different voters: independent given the class), over the cells where one of them voted."""
    observed = np.zeros((3, 3))
    np.add.at(observed, (patterns[:, j] + 1, patterns[:, k] + 1), rows)
    rates, class_share = model.vote_rates(), np.array([1 - model.prior_good, model.prior_good])
    expected = np.einsum("uy,vy,y->uv", rates[j], rates[k], class_share)
    observed[0, 0] = expected[0, 0] = 0.0  # both abstained
    seen = observed > 0
    if not seen.any():
        return 1.0
    expected *= observed.sum() / expected.sum()
    statistic = 2 * (observed[seen] * np.log(observed[seen] / expected[seen])).sum()
    return float(stats.chi2.sf(statistic, 7))


def _shared_information(model: DawidSkene, j: int, k: int) -> float:
    """I(j; k | class) / min(H(j | class), H(k | class)) of two LFs' responses (vote or abstain)
    under ``model``, where they are of one voter."""
    joint = _joint_rates(model, j, k)
    class_share = np.array([1 - model.prior_good, model.prior_good])
    rates_j, rates_k = joint.sum(axis=1), joint.sum(axis=0)  # [vote + 1, class]
    independent = rates_j[:, None, :] * rates_k[None, :, :]
    mutual = _weighted_sum(joint, np.log(joint, where=joint > 0, out=np.zeros_like(joint))
                           - np.log(independent, where=joint > 0, out=np.zeros_like(joint)), class_share)
    smaller = min(_entropy(rates_j, class_share), _entropy(rates_k, class_share))
    return float(mutual / smaller) if smaller > 0 else 0.0


def _entropy(rates: np.ndarray, class_share: np.ndarray) -> float:
    """H(vote | class) from rates [vote + 1, class]."""
    return -_weighted_sum(rates, np.log(rates, where=rates > 0, out=np.zeros_like(rates)), class_share)


def _weighted_sum(probability: np.ndarray, value: np.ndarray, class_share: np.ndarray) -> float:
    """Sum of probability * value over the cells, weighting each class (last axis) by its share."""
    return float(((probability * value).reshape(-1, 2) @ class_share).sum())


def _joint_rates(model: DawidSkene, j: int, k: int) -> np.ndarray:
    """P(LF j votes u, LF k votes v | class) as [u + 1, v + 1, class], from the table of the voter
    that holds both."""
    tables = zip(model.lf_voters, model.responses, np.split(model.rates, model.table_starts[1:]), strict=True)
    voter, responses, table = next(entry for entry in tables if j in entry[0] and k in entry[0])
    joint = np.zeros((3, 3, 2))
    np.add.at(joint, (responses // 3 ** voter.index(j) % 3, responses // 3 ** voter.index(k) % 3), table)
    return joint


def _p_value(p_value: float) -> str:
    return "p<1e-16" if p_value < 1e-16 else f"p={p_value:.1g}"


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
