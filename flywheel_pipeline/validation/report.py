"""The evidence report: every slice's metrics, the gate's decision, and how they are shown
(Dagster metadata, Markdown, registry lineage tags, JSON)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.validation.gate import GOLD_METRIC, GateDecision
from flywheel_pipeline.validation.intervals import CI_LEVEL, MetricComparison

SHOWN_METRICS = ("dr", "pbm_ips", "snips", "audit", "weak_label_value", "weak_label_auc")
# Values of a 0/1 reward: an estimate outside this range is the estimator's variance, said so in the report.
VALUE_METRICS = ("dr", "pbm_ips", "snips")
OUT_OF_RANGE = ("† outside the 0..1 range of the reward: an importance-weighted estimate is that far "
                "off when a few impressions carry large weights (see ess); read its interval, or snips")


@dataclass(frozen=True)
class SliceResult:
    name: str
    n_samples: int  # held-out interactions
    metrics: dict[str, MetricComparison]
    n_reviewed: int = 0  # of which the audit sample reviewed


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

    def metrics(self) -> dict[str, float]:
        """Flat ``<slice>/<metric>/<candidate|champion|difference>`` values (MLflow)."""
        flat: dict[str, float] = {}
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
            "candidate": _round(primary.candidate),
            "champion": _round(primary.champion),
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
        """The primary metric's candidate, champion and difference with its interval (the health
        report's history of held-out evidence)."""
        primary = self.overall.metrics[self.primary_metric]
        low, high = primary.difference_ci
        return {"candidate": primary.candidate, "champion": primary.champion,
                "difference": primary.difference, "difference_lo": low, "difference_hi": high}

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
             f"{self.reward}; candidates logged for {self.candidates_logged:.0%} of interactions"),
            f"- by position: examination {theta}; weight in the value {value}",
            f"- gate: **{self.outcome}** (primary metric {self.primary_metric})",
            *(f"  - {reason}" for reason in reasons),
            *self._ungated(),
            "",
            f"| slice | n | reviewed | metric | candidate ({level}) | champion ({level}) | difference ({level}) |",
            "|---|---|---|---|---|---|---|",
        ]
        out_of_range = False
        for result in self.slices:
            for metric in SHOWN_METRICS:
                if metric in result.metrics:
                    m = result.metrics[metric]
                    marks = ["†" if metric in VALUE_METRICS and not 0 <= value <= 1 else ""
                             for value in (m.candidate, m.champion)]
                    out_of_range |= any(marks)
                    lines.append(
                        f"| {result.name} | {result.n_samples} | {result.n_reviewed} | {metric} "
                        f"| {_value(m.candidate, m.candidate_ci)}{marks[0]} "
                        f"| {_value(m.champion, m.champion_ci)}{marks[1]} "
                        f"| {_value(m.difference, m.difference_ci, signed=True)} |"
                    )
            ess = result.metrics.get("ess")
            if ess is not None:
                lines.append(f"| {result.name} | {result.n_samples} | {result.n_reviewed} | ess "
                             f"| {ess.candidate:.1f} | {ess.champion:.1f} | |")
        if out_of_range:
            lines += ["", OUT_OF_RANGE]
        if self.revisit is not None:
            lines += ["", self.revisit.markdown()]
        return "\n".join(lines) + "\n"

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
