"""What the demo and `flywheel run` print after a cycle: one wording for "no champion yet", each
kind of figure rounded one way (values to 3 decimals; differences and intervals signed to 4, as the
gate's reasons and the validation report say them)."""

from __future__ import annotations

import io
import re
from datetime import date, timedelta

import dagster as dg
from rich.console import Console

from flywheel_pipeline.demo import CycleRow, print_summary
from flywheel_pipeline.runs import CycleOutcome
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.validation.gate import GateDecision
from flywheel_pipeline.validation.intervals import MetricComparison
from flywheel_pipeline.validation.report import SliceResult, ValidationReport

TRAINED, HELD_OUT = date(2026, 11, 15), date(2026, 11, 22)


def report(candidate: float = 0.61234, champion: float = 0.5) -> ValidationReport:
    """A passed gate whose primary metric (dr) gained ``candidate - champion``."""
    difference = candidate - champion
    dr = MetricComparison(candidate, champion, difference, (candidate - 0.01, candidate + 0.01),
                          (champion - 0.01, champion + 0.01), (difference - 0.021, difference + 0.0137))
    return ValidationReport(domain="recommendation", primary_metric="dr", windows=Windows(TRAINED - timedelta(days=6), TRAINED, HELD_OUT, HELD_OUT),
                            candidate_model_uri="models:/m-1", champion_model_uri=None, reward="clicked",
                            slices=[SliceResult("all", 4321, {"dr": dr})],
                            decision=GateDecision("passed", []))


def outcome(validation: ValidationReport) -> CycleOutcome:
    """A cycle's outcome as read_outcome reads it from the validation_report's metadata."""
    return CycleOutcome("recommendation", "run-1", dg.DagsterRunStatus.SUCCESS, gate="passed",
                        evidence=validation.metadata(), version="1")


def test_the_held_out_line_rounds_values_to_3_and_differences_as_the_gate_says_them():
    validation = report()
    assert outcome(validation).held_out() == "dr (clicked) 0.612 vs 0.500 (+0.1123 [+0.0913, +0.1260])"
    assert outcome(validation).held_out(detail=False) == "0.612 vs 0.500"
    assert "dr +0.1123 [+0.0913, +0.1260]" in validation.summary()  # a revisit's line says it alike
    worse = outcome(report(candidate=0.48)).held_out()
    assert re.fullmatch(r"dr \(clicked\) 0\.480 vs 0\.500 \(-0\.0200 \[-0\.0410, -0\.0063\]\)", worse)


def test_the_summary_says_baseline_for_no_champion_and_rates_to_3_decimals():
    rows = [CycleRow(0, "recommendation", "baseline", "", "", "", "baseline", 0.25),
            CycleRow(1, "recommendation", "baseline", outcome(report()).held_out(detail=False), "passed",
                     "v1", "v1", 0.61234, 0.6049)]
    out = io.StringIO()
    print_summary(rows, {"recommendation": 0.70001}, Console(file=out, width=250))
    text = " ".join(out.getvalue().split())  # the caption wraps at the table's width
    assert "baseline: no model deployed yet, the product serves its baseline" in text
    assert "none" not in text
    assert "0.250" in text and "0.612" in text and "0.605" in text and "oracle recommendation: 0.700" in text
    assert not re.search(r"\d\.\d{4}", text)  # no figure with more decimals in the table
