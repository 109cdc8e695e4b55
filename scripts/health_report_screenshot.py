"""Full-page screenshots of a health report, as headless Chromium (Debian's binary) shows it.

Renders the report stored at --report (a <home>/reports/<domain>/<as_of>.json; history from that
home's warehouse, truth from its MLflow), or, without it, a constructed example of four cycles in
which the candidate's held-out gains outrun its true accuracy; saves the page and its screenshots:

    health-report.html       the page rendered
    health-report.png        the whole page
    health-report-<id>.png   each section: verdicts, one per trap, evidence (the gate's)

Usage: python scripts/health_report_screenshot.py --out <folder> [--report <json>] [--width 1280]
"""

from __future__ import annotations

import argparse
import math
from datetime import date, timedelta
from pathlib import Path

import polars as pl
from playwright.sync_api import sync_playwright

from flywheel_pipeline.health import TRAPS, Finding, HealthReport
from flywheel_pipeline.health.report import render_html, render_stored
from flywheel_pipeline.home import Home
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.validation.gate import GateDecision
from flywheel_pipeline.validation.intervals import MetricComparison
from flywheel_pipeline.validation.report import SliceResult, ValidationReport

CHROMIUM = "/usr/bin/chromium"
DOMAIN = "recommendation"
FIRST = date(2026, 11, 1)


def _day(i: int) -> date:
    return FIRST + timedelta(days=7 * i)


def _champion(i: int) -> str:
    return "baseline" if i == 0 else str(max(1, i - i // 3))


def _uri(i: int) -> str:
    return f"models:/m-{i:04d}"


def _truth(i: int) -> float:
    return round(0.612 + 0.006 * math.sin(i) - 0.004 * max(0, i - 1), 4)


def _share(value: float) -> float:
    return round(min(max(value, 0.01), 0.99), 4)


def _cycle_measures(i: int) -> dict[str, dict[str, float]]:
    """Each trap's measures in cycle i: exploration and coverage of churned users shrink, the
    catalogue narrows, self-consumption grows (shares kept within 1% to 99%)."""
    return {
        "exposure_bias": {**{f"theta@{p}": round(0.94 ** (p * (1 + 0.15 * i)), 4) for p in range(6)},
                          "exploration_share": _share(0.12 - 0.03 * i)},
        "survivorship": {"coverage@new": _share(0.41 - 0.02 * i), "coverage@returning": _share(0.78 + 0.01 * i),
                         "coverage@churned": _share(0.22 - 0.06 * i)},
        "label_delay": {"delay_p50_h@resolved": 6.5 + i, "delay_p90_h@resolved": 40.0 + 9 * i,
                        "delay_p99_h@resolved": 120.0 + 30 * i, "delay_p50_h@escalated": 20.0,
                        "delay_p90_h@escalated": 95.0, "delay_p99_h@escalated": 190.0,
                        "immature_share": _share(0.03 + 0.025 * i)},
        "leakage": {"max_feature_auc": 0.58 + 0.005 * i},
        "self_consumption": {"self_consumption_share": _share(0.55 + 0.1 * i), "exploration_share": _share(0.12 - 0.03 * i)},
        "diversity": {"top10_share": _share(0.31 + 0.07 * i), "catalogue_coverage": _share(0.64 - 0.08 * i), "gini": _share(0.52 + 0.06 * i)},
    }


def example_history(cycles: int) -> pl.DataFrame:
    rows = [(DOMAIN, _day(i), _champion(i), _uri(i), trap, name, value)
            for i in range(cycles) for trap, measures in _cycle_measures(i).items()
            for name, value in measures.items()]
    for i in range(cycles):
        difference = 0.004 + 0.006 * i
        validation = {"candidate": 0.31 + difference, "champion": 0.31, "difference": difference,
                      "difference_lo": difference - 0.009, "difference_hi": difference + 0.008}
        rows += [(DOMAIN, _day(i), _champion(i), _uri(i), "validation", name, value)
                 for name, value in validation.items()]
    return pl.DataFrame(rows, orient="row", schema=["domain", "as_of", "champion", "candidate_model_uri", "trap",
                                                   "measure", "value"])


def example_report(cycles: int) -> HealthReport:
    i, as_of = cycles - 1, _day(cycles - 1)
    measures = _cycle_measures(i)
    flagged = {"exposure_bias": True, "survivorship": True, "label_delay": True, "leakage": False,
               "self_consumption": True, "diversity": True}
    summaries = {
        "exposure_bias": "exploration 3.0% of impressions < 5% required; theta at position 5 is 0.55",
        "survivorship": "churned users' label coverage 4.0% < 10% of returning users' 81%",
        "label_delay": "p90 delay of resolved labels 67 h > the 7-day held-out window's maturity margin",
        "leakage": "no feature predicts the label better than AUC 0.6 alone; held-out rows not in training",
        "self_consumption": "85% of labels are on the model's own choices (> 70%)",
        "diversity": "top-10 items take 52% of impressions (> 40%); catalogue coverage 40%",
    }
    explanations = {
        "exposure_bias": "A model trained on what it chose to show learns its own positions, not <relevance>.",
        "survivorship": "Users who left stop sending labels, so the model is tuned for those who stayed.",
        "label_delay": "Recent days look worse than they are while their outcomes are still arriving.",
        "leakage": "A feature known only after the label makes held-out accuracy a lie.",
        "self_consumption": "Labels on its own choices confirm the model's beliefs without new evidence.",
        "diversity": "What is shown narrows each cycle, and so does what can be learned.",
    }
    tables = {
        "exposure_bias": {"examination": pl.DataFrame({
            "position": list(range(6)), "theta": [measures["exposure_bias"][f"theta@{p}"] for p in range(6)],
            "raw_rate": [0.21, 0.15, 0.11, 0.083, 0.061, 0.047], "weighted_rate": [0.21, 0.2, 0.19, 0.18, 0.16, 0.15]})},
        "survivorship": {"by_cohort": pl.DataFrame({
            "cohort": ["new", "returning", "churned"], "impressions": [12_345, 40_211, 1_902],
            "traffic_share": [0.2265, 0.7386, 0.0349], "coverage": [0.35, 0.81, 0.04]})},
        "label_delay": {"by_outcome": pl.DataFrame({
            "outcome": ["resolved", "escalated"], "p50_h": [9.5, 20.0], "p90_h": [67.0, 95.0], "p99_h": [210.0, 190.0]})},
        "diversity": {"by_version": pl.DataFrame({
            "model_version": ["baseline", "v1", "v2"], "items": [812, 640, 505],
            "catalogue_coverage": [0.64, 0.48, 0.40], "gini": [0.52, 0.64, 0.70], "entropy": [6.1234567, 5.2, 4.81],
            "top10_share": [0.31, 0.45, 0.52]})},
    }
    findings = tuple(Finding(trap, flagged[trap], summaries[trap], explanations[trap], measures[trap],
                             tables.get(trap, {})) for trap in TRAPS)
    return HealthReport(domain=DOMAIN, as_of=as_of, train_start=as_of - timedelta(days=27),
                        train_end=as_of - timedelta(days=7), holdout_start=as_of - timedelta(days=6),
                        mature_until=as_of - timedelta(days=2), champion=_champion(i),
                        candidate_model_uri=_uri(i), findings=findings)


def example_validation(report: HealthReport) -> dict:
    def comparison(candidate: float, champion: float, width: float) -> MetricComparison:
        difference = candidate - champion
        return MetricComparison(candidate, champion, difference, (candidate - width, candidate + width),
                                (champion - width, champion + width),
                                (difference - 1.3 * width, difference + 1.1 * width))

    slices = [SliceResult("all", 10_512, {"dr": comparison(0.3283456789, 0.3103, 0.0071),
                                          "snips": comparison(0.331, 0.309, 0.008),
                                          "ess": MetricComparison(812.34, 1001.5, float("nan"), (0, 0), (0, 0), (0, 0))},
                          n_reviewed=240),
              SliceResult("cohort=churned", 388, {"dr": comparison(0.21, 0.24, 0.03)}),
              SliceResult("exploration", 1_204, {"dr": comparison(0.29, 0.285, 0.02)})]
    windows = Windows(report.train_start, report.train_end, report.holdout_start, report.as_of)
    return ValidationReport(
        domain=report.domain, primary_metric="dr", windows=windows, candidate_model_uri=report.candidate_model_uri,
        champion_model_uri="models:/flywheel-recommendation/2", slices=slices, reward="click",
        decision=GateDecision("passed", ["dr difference's lower bound +0.0092 > 0"]),
    ).to_dict()


def screenshots(page_file: Path, out: Path, width: int) -> list[Path]:
    """The whole page, then each section on its own."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(page_file.resolve().as_uri())
            shots = [out / "health-report.png"]
            page.screenshot(path=shots[0], full_page=True)
            for section in page.locator("section").all():
                shots.append(out / f"health-report-{section.get_attribute('id')}.png")
                section.screenshot(path=shots[-1])
            return shots
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the page and screenshots")
    parser.add_argument("--report", type=Path, help="a stored report's .json (default: the constructed example)")
    parser.add_argument("--width", type=int, default=1280, help="browser window width in pixels")
    parser.add_argument("--cycles", type=int, default=4, help="cycles in the constructed example")
    args = parser.parse_args()
    if args.report:
        html = render_stored(Home(args.report.resolve().parents[2]), args.report)[1]
    else:
        report = example_report(args.cycles)
        truth = {_uri(i): _truth(i) for i in range(args.cycles)}
        html = render_html(report, example_history(args.cycles), example_validation(report), truth)
    args.out.mkdir(parents=True, exist_ok=True)
    page_file = args.out / "health-report.html"
    page_file.write_text(html)
    for path in screenshots(page_file, args.out, args.width):
        print(path)


if __name__ == "__main__":
    main()
