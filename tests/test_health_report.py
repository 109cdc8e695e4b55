"""The health report: the page people read per cycle and domain, its stored data, `flywheel report`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from playwright.sync_api import Page

from flywheel_pipeline import registry
from flywheel_pipeline.cli import main
from flywheel_pipeline.health import TRAPS, Finding, HealthReport
from flywheel_pipeline.health.report import (
    format_estimate,
    format_value,
    load_report,
    render_html,
    report_to_dict,
    simulator_truth,
    write_report,
)
from flywheel_pipeline.home import Home
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.validation.gate import GateDecision
from flywheel_pipeline.validation.intervals import MetricComparison
from flywheel_pipeline.validation.report import SliceResult, ValidationReport

DOMAIN = "support"
DAYS = [date(2026, 11, 8), date(2026, 11, 15), date(2026, 11, 22)]
URIS = ["models:/m-first", "models:/m-second", "models:/m-third"]
CHAMPIONS = ["baseline", "1", "2"]
PLOTS = 11  # examination, exploration, coverage, delay, leakage, self-consumption, diversity, representation,
# head clicks, outcomes per click, evidence


def measures(i: int) -> dict[str, dict[str, float]]:
    """Cycle i's measures per trap (0.1 + 0.2 = 0.30000000000000004: never shown so)."""
    return {
        "exposure_bias": {"theta@0": 1.0, "theta@1": 0.7 - 0.05 * i, "theta@2": 0.5 - 0.05 * i,
                          "exploration_share": 0.1 + 0.2 - 0.1 * i},
        "survivorship": {"coverage@new": 0.4, "coverage@returning": 0.8},
        "label_delay": {"delay_p90_h@resolved": 30.0 + 40 * i},
        "leakage": {"max_feature_auc": 0.55},
        "self_consumption": {"self_consumption_share": 0.5 + 0.1 * i},
        "diversity": {"top10_share": 0.2 + 0.1 * i, "catalogue_coverage": 0.7, "gini": 0.5},
        "vocal_minority": {"representation@s0": 1.0 + 0.4 * i, "representation@s1": 1.0 - 0.1 * i},
        "popularity": {"head_click_z": 0.5 + i},
        "engagement": {"outcome_per_click_ratio": 1.2 - 0.2 * i},
    }


def health_report(i: int = 2) -> HealthReport:
    """Cycle i's audit: label delay flagged (with a table), the rest healthy."""
    as_of = DAYS[i]
    findings = tuple(
        Finding(trap, trap == "label_delay", f"{trap} measured <against> its threshold",
                "what the trap does & why it <matters>", measures(i)[trap],
                {"by_outcome": pl.DataFrame({"outcome": ["resolved"], "p90_h": [110.0], "share": [1 / 3]})}
                if trap == "label_delay" else {})
        for trap in TRAPS)
    return HealthReport(DOMAIN, as_of, as_of - timedelta(days=20), as_of - timedelta(days=7),
                        as_of - timedelta(days=6), as_of - timedelta(days=3), CHAMPIONS[i], URIS[i], findings)


def history(cycles: int = 3) -> pl.DataFrame:
    """health.measures' rows of the first ``cycles`` cycles, with the gate's evidence of each."""
    rows = []
    for i in range(cycles):
        gate = {"candidate": 0.5 + 0.01 * i, "champion": 0.5, "difference": 0.01 * i,
                "difference_lo": 0.01 * i - 0.02, "difference_hi": 0.01 * i + 0.015}
        for trap, values in [*measures(i).items(), ("validation", gate)]:
            rows += [(DOMAIN, DAYS[i], CHAMPIONS[i], URIS[i], trap, name, value, f"{DAYS[i]}T06:00:00")
                     for name, value in values.items()]
    return pl.DataFrame(rows, orient="row", schema=["domain", "as_of", "champion", "candidate_model_uri", "trap",
                                                   "measure", "value", "audited_at"])


def validation(report: HealthReport) -> dict:
    """The gate's evidence in ValidationReport.to_dict() form."""
    def comparison(candidate: float, champion: float) -> MetricComparison:
        difference = candidate - champion
        return MetricComparison(candidate, champion, difference, (candidate - 0.01, candidate + 0.01),
                                (champion - 0.01, champion + 0.01), (difference - 0.021, difference + 0.0137))

    windows = Windows(report.train_start, report.train_end, report.holdout_start, report.as_of)
    return ValidationReport(
        domain=DOMAIN, primary_metric="dr", windows=windows, candidate_model_uri=report.candidate_model_uri,
        champion_model_uri=None, reward="resolved",
        slices=[SliceResult("all", 4321, {"dr": comparison(0.5123, 0.5), "snips": comparison(0.49, 0.5)}),
                SliceResult("cohort=<new>", 210, {"dr": comparison(0.45, 0.5)})],
        decision=GateDecision("inconclusive", ["dr difference's interval straddles 0"], samples_needed=900),
    ).to_dict()


def sections(html: str) -> dict[str, str]:
    """Each trap section's HTML by its id."""
    return dict(re.findall(r'<section class="trap \w+" id="(\w+)">(.*?)</section>', html, flags=re.DOTALL))


@pytest.fixture(scope="module")
def page() -> str:
    report = health_report()
    return render_html(report, history(), validation(report), truth={URIS[0]: 0.61, URIS[2]: 0.64})


def test_numbers_shown_as_people_read_them() -> None:
    assert format_value(0.1 + 0.2, "exploration_share") == "30%"
    assert format_value(0.034912, "coverage@churned") == "3.49%"
    assert format_value(67.04, "delay_p90_h@resolved") == "67 h"
    assert format_value(0.63812345, "theta@5") == "0.638"
    assert format_value(12345.678, "entropy") == "12,346"
    assert format_value(40211, "impressions") == "40,211"
    assert format_value(float("nan"), "gini") == format_value(None) == "n/a"
    assert format_value("v2", "model_version") == "v2"
    assert format_estimate(0.0123, (-0.001, 0.025), signed=True) == "+0.0123 [\u22120.0010, +0.0250]"
    assert format_estimate(0.5123, [0.5023, 0.5223]) == "0.5123 [0.5023, 0.5223]"
    assert format_estimate(float("nan"), (0.0, 1.0)) == "n/a"


def test_page_shows_each_traps_verdict_measures_and_plots(page: str) -> None:
    traps = sections(page)
    assert list(traps) == list(TRAPS)
    assert '<section class="trap flagged" id="label_delay">' in page
    assert page.count('class="trap healthy"') == len(TRAPS) - 1
    assert "1 of 9 traps flagged" in page
    assert "110 h" in traps["label_delay"] and "33.3%" in traps["label_delay"]  # its table
    assert "held out: 168 h" in traps["label_delay"]  # the delay plot's line
    assert '<td>exploration share</td><td class="num">10%</td>' in traps["exposure_bias"]  # this cycle's
    assert "1:\u00a00.6 \u00b7 2:\u00a00.4" in traps["exposure_bias"]  # theta's series on one row
    assert page.count("<svg") == PLOTS
    assert all("<svg" in traps[trap] for trap in TRAPS)
    shown = re.sub(r"<svg.*?</svg>", "", page, flags=re.DOTALL) + " ".join(re.findall(r"<text[^>]*>([^<]*)<", page))
    assert re.search(r"\d\.\d{7,}|\d{9,}", shown) is None  # no float's full repr: text and plots' labels


def test_page_escapes_text_from_findings_and_evidence(page: str) -> None:
    assert "<against>" not in page and "&lt;against&gt;" in page
    assert "&amp; why it &lt;matters&gt;" in page
    assert "cohort=&lt;new&gt;" in page


def test_page_shows_the_gates_evidence_with_intervals_and_the_truth(page: str) -> None:
    evidence = page[page.index('id="evidence"'):]
    assert "inconclusive" in evidence and "interval straddles 0" in evidence
    assert "+0.0123 [\u22120.0087, +0.0260]" in evidence  # difference [lower, upper]
    assert "0.5123 [0.5023, 0.5223]" in evidence  # the candidate's own interval
    assert "\u22120.0500 [\u22120.0710, \u22120.0363]" in evidence and 'class="num worse"' in evidence
    assert "baseline" in evidence
    assert "true accuracy (simulator)" in evidence and "<svg" in evidence


def test_truth_plot_only_with_truth_and_history_up_to_the_cycle() -> None:
    report = health_report(1)
    html = render_html(report, history(), validation(report))  # the third cycle is after this one
    assert "11-15" in html and "11-22" not in html
    assert "true accuracy" not in html
    assert html.count("<svg") == PLOTS


def test_page_without_history_or_validation() -> None:
    html = render_html(health_report(), None, None)
    assert "No validation report for this cycle" in html
    assert html.count("<svg") == PLOTS - 1  # this cycle's measures only; no evidence over cycles


def test_write_and_load_round_trip(home: Home) -> None:
    report = health_report()
    evidence = validation(report)
    page = write_report(home, report, history(), evidence)
    assert page == home.reports / DOMAIN / "2026-11-22.html"
    assert page.read_text().count("<svg") == PLOTS
    loaded, loaded_evidence = load_report(page.with_suffix(".json"))
    assert report_to_dict(loaded) == report_to_dict(report)
    assert loaded.finding("label_delay").tables["by_outcome"].equals(
        report.finding("label_delay").tables["by_outcome"])
    assert loaded_evidence == evidence
    assert not list(page.parent.glob(".*"))  # no partial files left


@dataclass
class LoggedModel:
    tags: dict[str, str]


class Client:
    """MlflowClient's get_logged_model over a dict of model ids to tags."""

    def __init__(self, models: dict[str, dict[str, str]]) -> None:
        self.models = models

    def get_logged_model(self, model_id: str) -> LoggedModel:
        if model_id not in self.models:
            raise MlflowException(f"Logged model with ID '{model_id}' not found")
        return LoggedModel(self.models[model_id])


def test_simulator_truth_reads_the_candidates_tags() -> None:
    client = Client({"m-first": {"simulator.true_accuracy": "0.612"}, "m-second": {"other": "x"}})
    assert simulator_truth(client, [*URIS, URIS[0], "models:/m-gone", ""]) == {URIS[0]: 0.612}


def store(home: Home, cycles: int = 3) -> None:
    """A stored report of the last cycle and health.measures' history in the warehouse."""
    write_report(home, health_report(cycles - 1), None, validation(health_report(cycles - 1)))
    rows = history(cycles)  # noqa: F841 (read by DuckDB below)
    home.warehouses.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(home.warehouse(DOMAIN))) as con:
        con.execute("CREATE SCHEMA health")
        con.execute("CREATE TABLE health.measures AS SELECT * FROM rows")


def test_cli_report_writes_the_latest_cycle_again(home: Home, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(home.root))
    store(home)
    stored_page = home.reports / DOMAIN / "2026-11-22.html"
    assert "<svg" in stored_page.read_text() and "11-08" not in stored_page.read_text()  # written without history
    main(["report", "--domain", DOMAIN])
    assert capsys.readouterr().out.strip() == str(stored_page)
    assert "11-08" in stored_page.read_text()  # now with the earlier cycles from health.measures

    opened = []
    monkeypatch.setattr("webbrowser.open", opened.append)
    output = tmp_path / "out" / "health.html"
    main(["report", "--domain", DOMAIN, "--as-of", "2026-11-22", "--output", str(output), "--open"])
    assert opened == [output.as_uri()]
    assert sections(output.read_text()).keys() == set(TRAPS)


def meta(html: str) -> dict[str, str]:
    """The page's header: each <dt> and its <dd>."""
    return dict(re.findall(r"<dt>([^<]*)</dt><dd>(.*?)</dd>", html))


def test_the_cycles_page_names_its_champion_and_says_how_to_see_the_one_now(page: str) -> None:
    shown = meta(page)
    assert shown["champion during the cycle"] == "v2"
    assert "flywheel report --domain support writes it again with the champion then" in shown["champion now"]
    assert meta(render_html(health_report(0), None, None))["champion during the cycle"] == "baseline"


def test_cli_report_names_the_champion_as_the_registry_has_it_now(home: Home, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(home.root))
    store(home)
    client = MlflowClient(tracking_uri=home.mlflow_tracking_uri, registry_uri=home.mlflow_tracking_uri)
    main(["report", "--domain", DOMAIN])
    page = Path(capsys.readouterr().out.strip())
    assert meta(page.read_text())["champion now"].startswith("baseline (no model deployed yet), as of ")

    version = registry.register_candidate(client, DOMAIN, (home.root / "model").as_uri(), None,
                                         {"approval.approver": "lead"})
    registry.promote(client, DOMAIN, version)
    main(["report", "--domain", DOMAIN])
    deployed_at = registry.version_tags(client, DOMAIN, version)["deployed_at"]
    shown = meta(page.read_text())
    assert shown["champion during the cycle"] == "v2"  # what the cycle audited and compared against
    assert shown["champion now"].startswith(f"v{version} (deployed {deployed_at}, approved by lead), as of ")


def test_cli_report_says_when_there_is_none(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(home.root))
    with pytest.raises(SystemExit, match="no health report for other .*run a cycle first"):
        main(["report", "--domain", "other"])
    with pytest.raises(SystemExit, match="no health report for support on 2026-11-21"):
        main(["report", "--domain", DOMAIN, "--as-of", "2026-11-21"])


@contextmanager
def in_chromium(html: str, folder: Path) -> Iterator[Page]:
    """``html`` opened in headless Chromium (Debian's), 1280 pixels wide."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("no Chromium at /usr/bin/chromium to render the page")
    from playwright.sync_api import sync_playwright

    path = folder / "health.html"
    path.write_text(html)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium))
        try:
            view = browser.new_page(viewport={"width": 1280, "height": 900})
            view.goto(path.as_uri())
            yield view
        finally:
            browser.close()


def test_page_in_a_browser_shows_a_section_per_trap_and_plots(page: str, tmp_path: Path) -> None:
    with in_chromium(page, tmp_path) as view:
        shown = view.locator("section.trap")
        assert [shown.nth(i).get_attribute("id") for i in range(shown.count())] == list(TRAPS)
        assert all(shown.nth(i).is_visible() for i in range(shown.count()))
        boxes = [svg.bounding_box() for svg in view.locator("svg.plot").all()]
        assert len(boxes) == PLOTS
        assert all(box and box["width"] > 300 and box["height"] > 100 for box in boxes)
        assert view.get_by_text("1 of 9 traps flagged").is_visible()


def test_a_long_series_of_measures_wraps_inside_its_section(tmp_path: Path) -> None:
    """Coverage by a dozen segments (hashed names, as a real page shows them) stays on the page."""
    report = health_report()
    coverage = {f"coverage@segment=hash-{i:010x}": 0.99 for i in range(12)}
    wide = replace(report, findings=tuple(replace(f, measures={**f.measures, **coverage})
                                          if f.trap == "survivorship" else f for f in report.findings))
    with in_chromium(render_html(wide, history(), validation(wide)), tmp_path) as view:
        section = view.locator("section#survivorship").bounding_box()
        table = view.locator("section#survivorship table.measures").bounding_box()
        assert table["x"] + table["width"] <= section["x"] + section["width"]


def test_declared_groups_are_plotted_cycle_by_cycle_with_their_disparity() -> None:
    """The validation measures of each cycle carry each group's value and the disparity
    (ValidationReport.evidence); the evidence section plots them across cycles, text as SVG paths."""
    frame = history()
    rows = [(DOMAIN, DAYS[i], CHAMPIONS[i], URIS[i], "validation", name, value, f"{DAYS[i]}T06:00:00")
            for i in range(3) for name, value in
            {"group@s0": 0.50 + 0.02 * i, "group@s5": 0.48 - 0.03 * i, "disparity": 0.02 + 0.05 * i}.items()]
    grouped = pl.concat([frame, pl.DataFrame(rows, orient="row", schema=frame.columns)])
    report = health_report()
    page = render_html(report, grouped, validation(report))
    assert page.count("<svg") == PLOTS + 1
    evidence = page[page.index('id="evidence"'):]
    assert evidence.count("<svg") == 2  # the gate's difference, and the groups
    assert render_html(report, history(), validation(report)).count("<svg") == PLOTS  # no groups: no plot


def test_the_fairness_finding_is_a_section_of_its_own_with_its_plots() -> None:
    report = health_report()
    finding = Finding("fairness", True, "group b dr -0.0400 (upper bound -0.0236) while the aggregate gained +0.0300",
                      "a group left behind", {"disparity": 0.12, "disparity_change": 0.1, "min_group_gain": -0.04,
                                              "gain@a": 0.06, "gain@b": -0.04})
    grouped = replace(report, findings=(*report.findings, finding))
    page = render_html(grouped, history(), validation(grouped))
    shown = sections(page)
    assert list(shown) == [*TRAPS, "fairness"]
    assert "group b dr -0.0400" in shown["fairness"] and "<svg" in shown["fairness"]
