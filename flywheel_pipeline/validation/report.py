"""The evidence report: every slice's metrics, the gate's decision, and how they are shown
(Dagster metadata, Markdown, registry lineage tags, JSON)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from flywheel_pipeline.groups import GROUP_SLICE
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.validation.intervals import CI_LEVEL, MetricComparison

Outcome = Literal["passed", "failed", "inconclusive"]
GOLD_METRIC = "audit"
SHOWN_METRICS = ("dr", "pbm_ips", "snips", "audit", "weak_label_value", "weak_label_auc")
# Shown instead, labelled biased, where the logger's propensities are unknown.
BIASED_METRICS = ("direct", "replay")
# Values of a 0/1 reward: an estimate outside this range is not reported as the estimate.
VALUE_METRICS = ("dr", "pbm_ips", "snips", "direct", "replay")
OUT_OF_RANGE = ("† outside the range of a policy's value (0..1 of the reward; expected clicks: 0..the sum of "
                "the examination), so not an estimate of it: an importance-weighted "
                "estimate lands there when a few impressions carry large weights (see ess)")
BIASED = ("‡ biased: the logger's propensities are unknown, so no importance-weighted estimate exists; "
          "direct is the reward model's guess, replay assumes a uniformly random logger")


@dataclass(frozen=True)
class GateDecision:
    outcome: Outcome
    reasons: list[str]
    ungated_slices: list[str] = field(default_factory=list)
    samples_needed: int | None = None  # inconclusive: more held-out samples that would decide
    decidable: bool = True  # False: no evidence of this kind can decide (gate.py), so nothing to revisit

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


@dataclass(frozen=True)
class SliceResult:
    name: str
    n_samples: int  # held-out interactions
    metrics: dict[str, MetricComparison]
    n_reviewed: int = 0  # of which the audit sample reviewed


@dataclass(frozen=True)
class Judged:
    """What the held-out evidence can tell apart (validation/evidence.py)."""

    slots: bool = False  # each shown slot judged as its own decision (a per-row log, a catalogue)
    propensities_known: bool = True  # else no importance-weighted estimate exists
    same_choices: bool = False  # candidate and champion choose the same on every held-out context
    no_overlap: bool = False  # the logger never showed what the candidate would


def in_range(metric: str, value: float, highest: float = 1.0) -> bool:
    """Whether ``value`` can be ``metric``'s estimate: a policy's value of a 0/1 reward lies in
    0..``highest``, the sum of its positions' weights (1 but for expected clicks per slate)."""
    return metric not in VALUE_METRICS or not math.isfinite(value) or 0 <= value <= highest + 1e-12


@dataclass(frozen=True)
class ValidationReport:
    domain: str
    primary_metric: str
    windows: Windows
    candidate_model_uri: str
    champion_model_uri: str | None  # None: compared with the domain's baseline scorer
    slices: list[SliceResult]  # the first one is the whole domain ("all")
    reward: str = ""
    examination: tuple[float, ...] = ()  # theta per position, from the exploration slice
    value_weights: tuple[float, ...] = ()  # how much each of the policy's positions counts in its value
    candidates_logged: float = 1.0  # share of interactions whose candidates were logged
    decision: GateDecision | None = None
    run_id: str | None = None
    is_revisit: bool = False  # a second look at an earlier inconclusive candidate
    revisit: ValidationReport | None = None  # this cycle's revisit of the previous candidate
    judged: Judged = field(default_factory=Judged)

    @property
    def highest_value(self) -> float:
        """The largest value a policy can have: the sum of its positions' weights."""
        return float(sum(self.value_weights)) if self.value_weights else 1.0

    @property
    def overall(self) -> SliceResult:
        return self.slices[0]

    @property
    def accepted(self) -> ValidationReport | None:
        """The report whose candidate the gate lets through: this one's, else its revisit's."""
        for report in (self, self.revisit):
            if report is not None and report.decision is not None and report.decision.passed:
                return report
        return None

    @property
    def outcome(self) -> str:
        return self.decision.outcome if self.decision else "undecided"

    def group_slices(self) -> list[SliceResult]:
        """The declared groups' slices (``groups.slice_name``), in name order."""
        return [result for result in self.slices if result.name.startswith(GROUP_SLICE)]

    def disparity(self) -> dict[str, float]:
        """Per role, the largest minus the smallest primary value among the declared groups (NaN
        with fewer than two groups valued): how unequal the policy's value is across groups."""
        out = {}
        for role in ("candidate", "champion"):
            values = [getattr(r.metrics[self.primary_metric], role) for r in self.group_slices()]
            values = [v for v in values if math.isfinite(v)]
            out[role] = max(values) - min(values) if len(values) > 1 else math.nan
        return out

    def metrics(self) -> dict[str, float]:
        """Flat ``<slice>/<metric>/<candidate|champion|difference>`` values (MLflow), and the
        groups' ``disparity/<candidate|champion>``."""
        flat: dict[str, float] = {f"disparity/{role}": value for role, value in self.disparity().items()
                                  if math.isfinite(value)}
        for result in self.slices:
            flat[f"{result.name}/n_samples"] = float(result.n_samples)
            flat[f"{result.name}/n_reviewed"] = float(result.n_reviewed)
            for metric, comparison in result.metrics.items():
                for role in ("candidate", "champion", "difference"):
                    value = getattr(comparison, role)
                    if math.isfinite(value):
                        flat[f"{result.name}/{metric}/{role}"] = value
        return flat

    def metadata(self) -> dict[str, Any]:
        """The headline figures, rounded (Dagster asset metadata; ``markdown()`` has every slice)."""
        primary = self.overall.metrics[self.primary_metric]
        gold = self.overall.metrics.get(GOLD_METRIC)
        headline: dict[str, Any] = {
            "gate": self.outcome,
            "gate_reasons": "; ".join(self.decision.reasons) if self.decision else "",
            "primary_metric": f"{self.primary_metric} ({self.reward})",
            "candidate": self._headline(primary.candidate),
            "champion": self._headline(primary.champion),
            "difference": _round(primary.difference),
            "difference_ci": _interval(primary.difference_ci),
            "n_samples": self.overall.n_samples,
        }
        if "ess" in self.overall.metrics:
            headline["ess_candidate"] = _round(self.overall.metrics["ess"].candidate, 1)
        if gold is not None:
            headline["gold_difference_ci"] = (f"{_round(gold.difference):+} {_interval(gold.difference_ci)} "
                                              f"on {self.overall.n_reviewed} reviewed")
        if self.decision and self.decision.outcome == "inconclusive":
            headline["samples_needed"] = self.decision.samples_needed if self.decision.samples_needed is not None else "unknown"
        if self.revisit is not None:
            headline["revisit"] = self.revisit.summary()
        return {
            **headline,
            "champion_model": self.champion_model_uri or "baseline",
            "held_out": f"{self.windows.holdout_start}..{self.windows.holdout_end}",
            "validation_run_id": self.run_id or "",
        }

    def evidence(self) -> dict[str, float]:
        """The primary metric's candidate, champion and difference with its interval, and per
        declared group the candidate's value (``group@<name>``) and gain (``group_gain@<name>``)
        with the candidate's ``disparity`` (the health report's history of held-out evidence)."""
        primary = self.overall.metrics[self.primary_metric]
        low, high = primary.difference_ci
        groups = {}
        for result in self.group_slices():
            name, metric = result.name[len(GROUP_SLICE):], result.metrics[self.primary_metric]
            groups[f"group@{name}"], groups[f"group_gain@{name}"] = metric.candidate, metric.difference
        if groups:
            groups["disparity"] = self.disparity()["candidate"]
        return {"candidate": primary.candidate, "champion": primary.champion,
                "difference": primary.difference, "difference_lo": low, "difference_hi": high, **groups}

    def summary(self) -> str:
        """``<model> on <held-out days>: <outcome>, dr +0.0123 [-0.0010, +0.0250]``."""
        primary = self.overall.metrics[self.primary_metric]
        return (f"{self.candidate_model_uri} on {self.windows.holdout_start}..{self.windows.holdout_end}: "
                f"{self.outcome}, {self.primary_metric} {primary.difference:+.4f} {_interval(primary.difference_ci)}")

    def lineage(self) -> dict[str, Any]:
        """Registry tags: the validation run and the held-out evidence the gate saw."""
        primary = self.overall.metrics[self.primary_metric]
        low, high = primary.difference_ci
        return {
            "validation.run_id": self.run_id or "",
            "validation.champion_model_uri": self.champion_model_uri or "baseline",
            "validation.primary_metric": self.primary_metric,
            "validation.gate": self.outcome,
            "validation.difference": _round(primary.difference),
            "validation.difference_ci": f"[{low:.4f}, {high:.4f}]",
            "validation.n_samples": self.overall.n_samples,
            "validation.revisit": str(self.is_revisit).lower(),
        }

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def markdown(self) -> str:
        reasons = self.decision.reasons if self.decision else []
        theta = ", ".join(f"{t:.2f}" for t in self.examination)
        value = ", ".join(f"{v:.2f}" for v in self.value_weights)
        level = f"{CI_LEVEL:.0%} CI"
        title = "Revisit of the inconclusive" if self.is_revisit else "Validation of"
        lines = [
            f"{'##' if self.is_revisit else '#'} {title} {self.candidate_model_uri} ({self.domain})",
            f"- champion: {self.champion_model_uri or 'baseline'}",
            (f"- held-out: {self.windows.holdout_start} to {self.windows.holdout_end}; reward: "
             f"{self.reward}; {self._candidates()}"),
            f"- by position: examination {theta}; weight in the value {value}",
            f"- gate: **{self.outcome}** (primary metric {self.primary_metric})",
            *(f"  - {reason}" for reason in reasons),
            *self._ungated(),
            "",
            f"| slice | n | reviewed | metric | candidate ({level}) | champion ({level}) | difference ({level}) |",
            "|---|---|---|---|---|---|---|",
        ]
        out_of_range = False
        metrics = SHOWN_METRICS if self.judged.propensities_known else (*BIASED_METRICS, *SHOWN_METRICS)
        for result in self.slices:
            for metric in (name for name in metrics if name in result.metrics):
                m = result.metrics[metric]
                cells = [_value(m.candidate, m.candidate_ci), _value(m.champion, m.champion_ci)]
                for i, value in enumerate((m.candidate, m.champion)):
                    if not in_range(metric, value, self.highest_value):
                        cells[i], out_of_range = f"† ({value:.4f})", True
                label = f"{metric} ‡" if metric in BIASED_METRICS else metric
                lines.append(
                    f"| {result.name} | {result.n_samples} | {result.n_reviewed} | {label} "
                    f"| {cells[0]} | {cells[1]} | {_value(m.difference, m.difference_ci, signed=True)} |"
                )
            ess = result.metrics.get("ess")
            if ess is not None and self.judged.propensities_known:
                lines.append(f"| {result.name} | {result.n_samples} | {result.n_reviewed} | ess "
                             f"| {ess.candidate:.1f} | {ess.champion:.1f} | |")
        lines += self._groups_table()
        if out_of_range:
            lines += ["", OUT_OF_RANGE]
        if not self.judged.propensities_known:
            lines += ["", BIASED]
        if self.revisit is not None:
            lines += ["", self.revisit.markdown()]
        return "\n".join(lines) + "\n"

    def _groups_table(self) -> list[str]:
        """Per declared group: its share of the held-out traffic and of the reviews, and the
        primary value of both policies; then the disparity between groups."""
        mine = self.group_slices()
        if not mine:
            return []
        total, reviewed = max(self.overall.n_samples, 1), max(self.overall.n_reviewed, 1)
        lines = ["", f"Groups ({self.primary_metric}; docs/fairness.md):", "",
                 "| group | traffic | reviews | candidate | champion | difference |", "|---|---|---|---|---|---|"]
        for result in mine:
            m = result.metrics[self.primary_metric]
            lines.append(f"| {result.name[len(GROUP_SLICE):]} | {result.n_samples / total:.1%} "
                         f"| {result.n_reviewed / reviewed:.1%} | {_value(m.candidate, m.candidate_ci)} "
                         f"| {_value(m.champion, m.champion_ci)} | {_value(m.difference, m.difference_ci, signed=True)} |")
        spread = self.disparity()
        lines += ["", (f"Disparity (largest - smallest group value): candidate {spread['candidate']:.4f}, "
                       f"champion {spread['champion']:.4f}")]
        return lines

    def _headline(self, value: float) -> float | str:
        """A primary estimate as the headline shows it: rounded, or why it is no estimate."""
        if not math.isfinite(value):
            return "undefined"
        if in_range(self.primary_metric, value, self.highest_value):
            return _round(value)
        return f"outside 0..{self.highest_value:g} ({value:.4f}): no estimate"

    def _candidates(self) -> str:
        judged = "each shown slot judged as its own decision" if self.judged.slots else "whole slates judged"
        return f"ranked over more than what was shown for {self.candidates_logged:.0%} of interactions; {judged}"

    def _ungated(self) -> list[str]:
        if not (self.decision and self.decision.ungated_slices):
            return []
        return [f"  - not gated (too few samples): {', '.join(self.decision.ungated_slices)}"]


def _round(value: float, digits: int = 4) -> float:
    return round(float(value), digits)


def _interval(bounds: tuple[float, float]) -> str:
    return f"[{bounds[0]:+.4f}, {bounds[1]:+.4f}]"


def _value(point: float, bounds: tuple[float, float], signed: bool = False) -> str:
    if not math.isfinite(point):
        return "n/a"
    number = f"{point:+.4f}" if signed else f"{point:.4f}"
    return f"{number} ({bounds[0]:.4f}, {bounds[1]:.4f})"
