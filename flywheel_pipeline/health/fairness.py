"""The fairness check of a cycle's audit: does the candidate's gain reach every declared group
(docs/fairness.md)?

Read from the cycle's validation report, each declared group's difference (candidate - champion
in the primary value, with its interval) and the disparity (largest - smallest group value) of
both policies. Flagged when

- **differential improvement**: the aggregate gains (its point estimate is above 0) while some
  group is significantly worse (the upper bound of its difference lies below 0), whether or not
  the group is protected (the gate acts on protected groups only);
- **disparity growth**: the candidate's disparity exceeds the champion's by more than
  ``groups.max_disparity_increase``.

Its measures (kept per cycle in ``health.measures``): ``disparity``, ``disparity_change``,
``min_group_gain`` and each group's ``gain@<group>``; the report plots each group's value and the
disparity cycle by cycle.
"""

from __future__ import annotations

import math

from flywheel_pipeline.config import Groups
from flywheel_pipeline.groups import GROUP_SLICE
from flywheel_pipeline.health import Finding
from flywheel_pipeline.validation.report import ValidationReport

CHECK = "fairness"
EXPLANATION = ("a flywheel can improve on average while a group of users gets worse, and each cycle trains on "
               "what the last one served them: differential improvement compounds into a group left behind")


def fairness(report: ValidationReport, groups: Groups) -> Finding:
    """The fairness Finding of a validation with declared ``groups``."""
    metric = report.primary_metric
    aggregate = report.overall.metrics[metric].difference
    gains = {result.name[len(GROUP_SLICE):]: result.metrics[metric] for result in report.group_slices()}
    disparity = report.disparity()
    change = disparity["candidate"] - disparity["champion"]
    problems = []
    if aggregate > 0:
        problems += [f"group {group} {metric} {gain.difference:+.4f} (upper bound {gain.difference_ci[1]:+.4f}) "
                     f"while the aggregate gained {aggregate:+.4f}"
                     for group, gain in gains.items() if gain.difference_ci[1] < 0]
    if math.isfinite(change) and change > groups.max_disparity_increase:
        problems.append(f"disparity {disparity['champion']:.4f} -> {disparity['candidate']:.4f} "
                        f"(+{change:.4f} > groups.max_disparity_increase {groups.max_disparity_increase})")
    measures = {"disparity": disparity["candidate"], "disparity_change": change,
                "min_group_gain": min((g.difference for g in gains.values()), default=math.nan),
                **{f"gain@{group}": gain.difference for group, gain in gains.items()}}
    judged = (f"{len(gains)} groups, none significantly worse; disparity {disparity['champion']:.4f} -> "
              f"{disparity['candidate']:.4f}") if gains else "no declared group in the held-out days"
    return Finding(CHECK, bool(problems), "; ".join(problems) or judged, EXPLANATION, measures)
