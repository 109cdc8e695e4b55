"""The promotion gate: passed, failed or inconclusive, decided on the intervals.

- inconclusive, and no evidence of this kind can decide (``samples_needed`` None, a reason of its
  own): the logger's propensities are unknown (``propensity_unknown``), the candidate and
  champion choose the same on every held-out context (``same_choices``), the logger never shows
  what the candidate would (``no_overlap``), or their estimates differ by the same amount on every
  resample (``no_difference``).
- inconclusive: a primary estimate outside the reward's range (``estimate_out_of_range``: the
  weights are too uneven to trust it), too few held-out samples, an effective sample size below ``min_ess`` (the
  importance weights rest on a handful of interactions), an undefined metric, or a primary
  difference whose interval straddles the threshold. Says how many more samples would settle it.
- failed: the primary difference's interval lies wholly below the threshold (no gain, or harm),
  or a slice (or the audit sample's gold labels) shows a regression beyond
  ``max_slice_regression``, with Holm's step-down correction across all those tests
  (Holm 1979, "A simple sequentially rejective multiple test procedure", Scand. J. Statistics).
- passed: the interval's lower bound clears the threshold and nothing regresses.

Declared groups (flywheel.yaml ``groups``, docs/fairness.md): a candidate passes only when every
protected group is shown no worse than ``groups.max_regression`` (its difference's lower bound
clears the margin: a non-inferiority test per group, all of which must hold). Each reason names the
group: fewer than ``groups.min_samples`` held-out interactions leave the gate inconclusive
(``group_evidence``: the aggregate cannot vouch for it), and so does a lower bound below the
margin (``group_uncertain``: a drop beyond it is not ruled out); a drop beyond the margin that is
significant, Holm-corrected across the protected groups, fails it (``group_regression``). The
aggregate's gain never buys a protected group's loss.

The threshold is ``min_improvement`` (superiority), or ``-non_inferiority_margin`` when the
domain sets one (promote what is no worse than the margin).
"""

from __future__ import annotations

import numpy as np

from flywheel_pipeline.config import Gate, Groups
from flywheel_pipeline.groups import slice_name
from flywheel_pipeline.validation.intervals import (
    CI_LEVEL,
    MetricComparison,
    p_below,
    samples_needed,
)
from flywheel_pipeline.validation.report import (
    GOLD_METRIC,
    GateDecision,
    Outcome,
    ValidationReport,
    in_range,
)

MIN_SLICE_SAMPLES = 50  # a smaller slice is reported, not gated


def threshold(gate_config: Gate) -> float:
    """What the primary difference's interval must clear."""
    if gate_config.non_inferiority_margin is not None:
        return -gate_config.non_inferiority_margin
    return gate_config.min_improvement


def gate(
    report: ValidationReport, gate_config: Gate, min_slice_samples: int = MIN_SLICE_SAMPLES,
    groups: Groups | None = None,
) -> GateDecision:
    """Decide on the report's intervals (``groups``: the domain's declared groups); every reason is
    ``code: explanation``."""
    overall, metric = report.overall, report.primary_metric
    primary = overall.metrics[metric]
    undecidable = _undecidable(report)
    if undecidable:
        return GateDecision("inconclusive", undecidable, decidable=False)
    unsure = _evidence_shortfall(report, gate_config) + _out_of_range(report)
    if unsure:
        needed = _ess_samples_needed(report, gate_config)
        return GateDecision("inconclusive", unsure, samples_needed=needed)

    bar = threshold(gate_config)
    low, high = primary.difference_ci
    failed, inconclusive, needed = [], [], None
    interval_text = f"{metric} candidate - champion = {primary.difference:+.4f} [{low:+.4f}, {high:+.4f}]"
    if high < bar:
        failed.append(f"improvement_below_minimum: {interval_text} lies below {bar:+.4f}")
    elif low <= bar:
        needed = samples_needed(overall.n_samples, primary, bar)
        more = (f"about {needed} more held-out samples would decide" if needed is not None
                else "the estimate sits on it: no number of samples can be named")
        inconclusive.append(f"improvement_uncertain: {interval_text} straddles {bar:+.4f} ({more})")
    regressions, ungated = _regressions(report, gate_config, min_slice_samples)
    failed += regressions
    group_failures, group_shortfalls = _protected_groups(report, groups)
    failed += group_failures
    inconclusive += group_shortfalls
    outcome: Outcome = "failed" if failed else "inconclusive" if inconclusive else "passed"
    return GateDecision(outcome, failed + inconclusive, ungated,
                        needed if outcome == "inconclusive" else None)


def _undecidable(report: ValidationReport) -> list[str]:
    """Reasons no amount of evidence of this kind can decide."""
    judged, primary = report.judged, report.overall.metrics[report.primary_metric]
    if not judged.propensities_known:
        return [("propensity_unknown: the log does not say how likely its logger was to show each item, so no "
                "importance-weighted estimate exists (direct and replay are shown, biased); a decision needs an "
                "exploration slice (traffic served at random, exploration_share) or logged propensities")]
    if judged.same_choices:
        return [("same_choices: the candidate and champion choose the same on every held-out context; no "
                "evidence can tell them apart")]
    if judged.no_overlap:
        return [("no_overlap: the logger never shows what the candidate would (its importance weights are 0 on "
                "every held-out impression); a decision needs a logger that explores the candidate's choices")]
    if np.isfinite(primary.difference) and primary.difference_se == 0:
        return [(f"no_difference: {report.primary_metric} candidate - champion is {primary.difference:+.4f} on "
                f"every resample: the held-out contexts where their choices differ carry no reward that tells "
                f"them apart")]
    return []


def _out_of_range(report: ValidationReport) -> list[str]:
    """A primary estimate outside the range of a policy's value: no estimate of it, so no decision on it."""
    metric, primary = report.primary_metric, report.overall.metrics[report.primary_metric]
    ess = report.overall.metrics.get("ess")
    return [f"estimate_out_of_range: {metric} of the {role} is {value:.4f}, outside a policy's 0..{report.highest_value:g}: "
            f"its importance weights are too uneven for this sample"
            + (f" (ess {getattr(ess, role):.0f})" if ess is not None else "")
            for role, value in (("candidate", primary.candidate), ("champion", primary.champion))
            if not in_range(metric, value, report.highest_value)]


def _evidence_shortfall(report: ValidationReport, gate_config: Gate) -> list[str]:
    """Reasons the held-out evidence cannot carry any decision."""
    overall, metric = report.overall, report.primary_metric
    reasons = []
    if overall.n_samples < gate_config.min_samples:
        reasons.append(f"too_few_samples: {overall.n_samples} held-out samples < min_samples "
                       f"{gate_config.min_samples}")
    ess = _candidate_ess(report)
    if ess is not None and ess < gate_config.min_ess:
        reasons.append(f"low_effective_sample_size: the candidate's importance weights are worth "
                       f"{ess:.0f} samples < min_ess {gate_config.min_ess:g}")
    if not np.isfinite(overall.metrics[metric].difference):
        reasons.append(f"undefined_metric: {metric} cannot be computed on the held-out rows")
    return reasons


def _candidate_ess(report: ValidationReport) -> float | None:
    ess = report.overall.metrics.get("ess")
    return None if ess is None or not np.isfinite(ess.candidate) else ess.candidate


def _ess_samples_needed(report: ValidationReport, gate_config: Gate) -> int | None:
    """Samples for both min_samples and min_ess, the ESS growing in proportion to n."""
    n = report.overall.n_samples
    factor = gate_config.min_samples / max(n, 1)
    ess = _candidate_ess(report)
    if ess is not None and ess > 0:
        factor = max(factor, gate_config.min_ess / ess)
    return max(0, int(np.ceil(n * factor)) - n) if factor > 1 else None


def _regressions(
    report: ValidationReport, gate_config: Gate, min_slice_samples: int
) -> tuple[list[str], list[str]]:
    """Slices (and the gold audit) whose difference is significantly below -max_slice_regression,
    Holm-corrected at the interval's one-sided level; and the slices too small to test."""
    bound = -gate_config.max_slice_regression
    tests: list[tuple[str, str, MetricComparison]] = []
    ungated = []
    for result in report.slices[1:]:
        comparison = result.metrics[report.primary_metric]
        if result.n_samples < min_slice_samples or not np.isfinite(comparison.difference_se):
            ungated.append(f"{result.name} ({result.n_samples} samples)")
        else:
            tests.append(("slice_regression", f"slice {result.name} {report.primary_metric}", comparison))
    gold = report.overall.metrics.get(GOLD_METRIC)
    if gold is not None and report.overall.n_reviewed >= min_slice_samples:
        tests.append(("gold_regression", "audited gold accuracy", gold))
    alpha = (1 - CI_LEVEL) / 2
    p_values = [p_below(comparison, bound) for *_, comparison in tests]
    reasons = []
    for rank, i in enumerate(np.argsort(p_values, kind="stable")):
        if p_values[i] > alpha / (len(tests) - rank):
            break  # Holm: stop at the first hypothesis kept
        code, what, comparison = tests[i]
        reasons.append(f"{code}: {what} changed {comparison.difference:+.4f} (p={p_values[i]:.4f}), "
                       f"a drop beyond max_slice_regression {gate_config.max_slice_regression}")
    return reasons, ungated


def _protected_groups(report: ValidationReport, groups: Groups | None) -> tuple[list[str], list[str]]:
    """Protected groups that regressed beyond ``groups.max_regression`` (Holm-corrected across
    them, one-sided at the interval's level), and those not shown within it: too little evidence,
    or a lower bound below the margin."""
    if groups is None or not groups.protected:
        return [], []
    by_name = {result.name: result for result in report.slices}
    tests, short = [], []
    for group in groups.protected:
        result = by_name.get(slice_name(group))
        n = result.n_samples if result else 0
        comparison = result.metrics[report.primary_metric] if result else None
        if n < groups.min_samples or comparison is None or not np.isfinite(comparison.difference_se):
            short.append(f"group_evidence: protected group {group} has {n} held-out interactions < groups.min_samples "
                         f"{groups.min_samples}; the aggregate cannot vouch for it")
        else:
            tests.append((group, comparison))
    alpha = (1 - CI_LEVEL) / 2
    p_values = [p_below(comparison, -groups.max_regression) for _, comparison in tests]
    failed, regressed = [], set()
    for rank, i in enumerate(np.argsort(p_values, kind="stable")):
        if p_values[i] > alpha / (len(tests) - rank):
            break
        group, comparison = tests[i]
        regressed.add(group)
        failed.append(f"group_regression: protected group {group} {report.primary_metric} changed "
                      f"{_interval_text(comparison)} (p={p_values[i]:.4f}), a drop beyond groups.max_regression "
                      f"{groups.max_regression}")
    short += [f"group_uncertain: protected group {group} {report.primary_metric} changed {_interval_text(comparison)}: "
              f"a drop beyond groups.max_regression {groups.max_regression} is not ruled out"
              for group, comparison in tests
              if group not in regressed and comparison.difference_ci[0] < -groups.max_regression]
    return failed, short


def _interval_text(comparison: MetricComparison) -> str:
    low, high = comparison.difference_ci
    return f"{comparison.difference:+.4f} [{low:+.4f}, {high:+.4f}]"
