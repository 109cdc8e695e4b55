"""The health report: one self-contained HTML page per cycle and domain.

    <home>/reports/<domain>/<as_of>.html   the page people read (inline CSS, plots as inline SVG)
    <home>/reports/<domain>/<as_of>.json   what renders it again: the HealthReport, the gate's evidence
                                           and the input drift

The page opens with a verdict per trap, then a section per trap (its measures, tables and plots
across cycles from ``health.measures``), then the cycle's input drift (health/drift.py: a PSI per
serving feature against its threshold, the new-item share), then the held-out evidence the gate saw and, where the
simulator's scoring code tagged the candidates, their true accuracy beside it. It names the champion
the cycle audited (serving during its days) and, when ``flywheel report`` renders it again, the
champion then: the cycle's page is written before its candidate is registered, let alone deployed.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import jinja2
import matplotlib
import polars as pl
from markupsafe import Markup
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flywheel_pipeline.health import TRAPS, Finding, HealthReport
from flywheel_pipeline.health.audit import MEASURE_COLUMNS, MEASURES_TABLE, measure_history
from flywheel_pipeline.home import Home, write_atomically
from flywheel_pipeline.monitoring import MONITOR_TABLE, calibration
from flywheel_pipeline.registry import BASELINE, champion_summary
from flywheel_pipeline.sources import Scope
from flywheel_pipeline.validation.intervals import CI_LEVEL
from flywheel_pipeline.validation.report import SHOWN_METRICS
from flywheel_pipeline.warehouses import Warehouses

TRUE_ACCURACY_TAG = "simulator.true_accuracy"
VALIDATION = "validation"  # health.measures' trap for the gate's primary metric per cycle
HISTORY_COLUMNS = ("domain", "as_of", "champion", "candidate_model_uri", "trap", "measure", "value")
HISTORY_SCHEMA = {name: MEASURE_COLUMNS[name] for name in HISTORY_COLUMNS}
MINUS = "\u2212"

_FIGSIZE = (6.4, 3.3)
_LEGEND_IN = 1.9
_MAX_TICKS = 8  # cycles labelled on an axis
_MAX_CURVES = 6  # examination curves drawn: the latest audits
_SVG_RC = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
           "axes.spines.right": False, "legend.fontsize": 8, "legend.frameon": False}


class ReportMissing(LookupError):
    """No stored health report for a domain (or day)."""


# --- numbers ---------------------------------------------------------------------------------

def _unit(name: str) -> str:
    """'percent' for shares, coverage and rates; 'hours' for ``*_h``; else 'number'."""
    base = name.split("@")[0].lower()
    if re.search(r"share|coverage|rate", base):
        return "percent"
    return "hours" if base.endswith("_h") else "number"


def _significant(value: float) -> str:
    """Three significant digits, whole numbers of 1,000 and over with separators."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def format_value(value: Any, name: str = "") -> str:
    """A measure or table cell as a person reads it: shares as %, hours with h, 3 significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return "n/a"
    unit = _unit(name)
    if unit == "percent":
        return f"{_significant(100 * value)}%"
    if unit == "hours":
        return f"{_significant(value)} h"
    return _significant(value)


def _signed(value: float, digits: int = 4) -> str:
    return f"{value:+.{digits}f}".replace("-", MINUS)


def format_estimate(point: float | None, interval: Iterable[float] | None = None, signed: bool = False) -> str:
    """``+0.0123 [−0.0010, +0.0250]``; 'n/a' when the point is undefined."""
    if point is None or not math.isfinite(point):
        return "n/a"
    text = _signed(point) if signed else f"{point:.4f}"
    bounds = list(interval or [])
    if len(bounds) == 2 and all(b is not None and math.isfinite(b) for b in bounds):
        text += f" [{_signed(bounds[0])}, {_signed(bounds[1])}]" if signed else f" [{bounds[0]:.4f}, {bounds[1]:.4f}]"
    return text


# --- history ---------------------------------------------------------------------------------

def _cycles(report: HealthReport, history: pl.DataFrame | None) -> pl.DataFrame:
    """One value per cycle, trap and measure up to the report's day (the latest audit of a day
    wins), with the report's own measures for its day."""
    history = pl.DataFrame(schema=MEASURE_COLUMNS) if history is None else history
    past = history.filter(pl.col("domain") == report.domain, pl.col("as_of").cast(pl.Date) <= report.as_of)
    if "audited_at" in past.columns:
        past = past.sort("audited_at")
    past = past.select(HISTORY_COLUMNS).cast(HISTORY_SCHEMA)
    own = pl.DataFrame(
        [(report.domain, report.as_of, report.champion, report.candidate_model_uri, finding.trap, name, float(value))
         for finding in report.findings for name, value in finding.measures.items()],
        schema=HISTORY_SCHEMA, orient="row")
    own_traps = own["trap"].unique().to_list()
    past = past.filter(~((pl.col("as_of") == report.as_of) & pl.col("trap").is_in(own_traps)))
    return (pl.concat([past, own]).unique(["as_of", "trap", "measure"], keep="last", maintain_order=True)
            .sort("as_of"))


def _cycle_labels(cycles: pl.DataFrame) -> dict[date, str]:
    """Tick labels: the audited day and the version serving then."""
    days = cycles.select("as_of", "champion").unique("as_of", keep="last", maintain_order=True).sort("as_of")
    return {day: f"{day:%m-%d}\n{_version(champion)}" for day, champion in days.iter_rows()}


def _version(champion: str | None) -> str:
    champion = champion or BASELINE
    return f"v{champion}" if champion.isdigit() else champion


# --- plots -----------------------------------------------------------------------------------

def _svg(figure: Figure) -> Markup:
    """The figure as an inline, width-fitting <svg> element (no XML header, no metadata)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, count=1, flags=re.DOTALL)
    svg = re.sub(r'<svg([^>]*?) width="[^"]+" height="[^"]+"', r'<svg\1 class="plot"', svg, count=1)
    return Markup(svg)


def _figure(panels: int = 1) -> Figure:
    return Figure(figsize=(_FIGSIZE[0] * panels, _FIGSIZE[1]))


def _layout(figure: Figure, legend: bool = False) -> None:
    """Fixed margins, in inches, room for the legend on the right (a constrained layout draws
    every figure twice: half the report's time)."""
    width, height = figure.get_size_inches()
    right = _LEGEND_IN if legend else 0.2
    figure.subplots_adjust(left=0.75 / width, right=1 - right / width, bottom=0.72 / height,
                           top=1 - 0.3 / height, wspace=0.3)


def _percent_axis(axis: Any) -> None:
    """Percent ticks, with as many decimals as the axis's span needs to tell them apart."""
    low, high = axis.get_ylim()
    decimals = max(0, min(3, 1 - math.floor(math.log10(max(high - low, 1e-6) * 100))))
    axis.yaxis.set_major_formatter(lambda value, _: f"{100 * value:.{decimals}f}%")


def _series(cycles: pl.DataFrame, trap: str, base: str) -> dict[str, pl.DataFrame]:
    """A series measure's values by key (``base@key``): as_of, value per cycle."""
    rows = cycles.filter(pl.col("trap") == trap, pl.col("measure").str.starts_with(f"{base}@"))
    keys = rows["measure"].str.split_exact("@", 1).struct.field("field_1").unique(maintain_order=True)
    return {key: rows.filter(pl.col("measure") == f"{base}@{key}").select("as_of", "value") for key in keys}


def _trend(cycles: pl.DataFrame, lines: Mapping[str, pl.DataFrame], title: str, ylabel: str,
           percent: bool = False, styles: Mapping[str, dict[str, Any]] | None = None,
           extra: Callable[[Any], None] | None = None) -> Markup:
    """Values over cycles, one line per label; x: the cycles (day and serving version)."""
    labels = _cycle_labels(cycles)
    position = {day: i for i, day in enumerate(labels)}
    with matplotlib.rc_context(_SVG_RC):
        figure = _figure()
        axis = figure.add_subplot()
        for label, frame in lines.items():
            axis.plot([position[day] for day in frame["as_of"]], frame["value"].to_list(), marker="o",
                      markersize=4, label=label, **(styles or {}).get(label, {}))
        _cycle_axis(axis, labels)
        axis.set_ylabel(ylabel)
        axis.set_title(title, loc="left")
        if percent:
            _percent_axis(axis)
        if extra:
            extra(axis)
        legend = len(axis.get_legend_handles_labels()[1]) > 1
        if legend:
            axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
        _layout(figure, legend)
        return _svg(figure)


def _cycle_axis(axis: Any, labels: Mapping[date, str]) -> None:
    """x: the cycles, labelled with their held-out day and the version serving then (at most
    _MAX_TICKS labels, the latest cycle's always)."""
    step = math.ceil(len(labels) / _MAX_TICKS)
    ticks = list(range(len(labels) - 1, -1, -step))[::-1]
    names = list(labels.values())
    axis.set_xticks(ticks, [names[tick] for tick in ticks])
    axis.set_xlim(-0.5, len(labels) - 0.5)
    axis.set_xlabel("cycle (held-out day, version serving)")


def _examination_plot(cycles: pl.DataFrame, trap: str) -> Markup | None:
    """Examination probability by position, one line per audit (the latest ones; darkest last)."""
    thetas = cycles.filter(pl.col("trap") == trap, pl.col("measure").str.starts_with("theta@")).with_columns(
        position=pl.col("measure").str.split_exact("@", 1).struct.field("field_1").cast(pl.Int64, strict=False))
    thetas = thetas.drop_nulls("position").filter(pl.col("value").is_not_nan())
    if thetas.is_empty():  # never estimated (no exploration): the section says so, nothing to draw
        return None
    labels = _cycle_labels(cycles)
    days = sorted(thetas["as_of"].unique())[-_MAX_CURVES:]
    with matplotlib.rc_context(_SVG_RC):
        figure = _figure()
        axis = figure.add_subplot()
        for i, day in enumerate(days):
            curve = thetas.filter(pl.col("as_of") == day).sort("position")
            shade = 0.3 + 0.7 * (i + 1) / len(days)
            axis.plot(curve["position"].to_list(), curve["value"].to_list(), marker="o", markersize=4,
                      color=(0.1, 0.3, 0.6, shade), linewidth=2.2 if day == days[-1] else 1.2,
                      label=labels[day].replace("\n", " "))
        axis.set_xlabel("position shown")
        axis.set_ylabel("examination \u03b8 (relative)")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_ylim(bottom=0)
        axis.set_title("Examination curve per cycle", loc="left")
        axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
        _layout(figure, legend=True)
        return _svg(figure)


def _delay_plot(cycles: pl.DataFrame, trap: str, holdout_hours: float, cadence_days: float) -> Markup | None:
    """Label delay quantiles per outcome over cycles, against the held-out window's length and the
    cadence (drawn when it is on the scale of the delays)."""
    quantiles = {base: _series(cycles, trap, base) for base in ("delay_p50_h", "delay_p90_h", "delay_p99_h")}
    if not any(quantiles.values()):
        return None
    dashes = {"delay_p50_h": ":", "delay_p90_h": "--", "delay_p99_h": "-"}
    outcomes = list(dict.fromkeys(key for series in quantiles.values() for key in series))
    colours = {outcome: f"C{i}" for i, outcome in enumerate(outcomes)}
    lines, styles = {}, {}
    for base, series in quantiles.items():
        for outcome, frame in series.items():
            label = f"{base.removeprefix('delay_').removesuffix('_h')} {outcome}"
            lines[label] = frame
            styles[label] = {"linestyle": dashes[base], "color": colours[outcome]}

    def window(axis: Any) -> None:
        top = max(axis.get_ylim()[1], 1.08 * holdout_hours)
        axis.axhline(holdout_hours, color="0.3", linewidth=1, label=f"held out: {holdout_hours:.0f} h")
        if math.isfinite(cadence_days) and cadence_days * 24 <= 2 * top:
            axis.axhline(cadence_days * 24, color="0.5", linewidth=1, linestyle="-.",
                         label=f"cadence: {cadence_days * 24:.0f} h")
            top = max(top, 1.08 * cadence_days * 24)
        axis.set_ylim(0, top)

    cadence = f"{cadence_days:.0f} d" if math.isfinite(cadence_days) else "unknown"
    return _trend(cycles, lines, f"Label delay vs the held-out window and the cadence ({cadence})", "hours",
                  styles=styles, extra=window)


def _scalar_plots(cycles: pl.DataFrame, trap: str, title: str) -> list[Markup]:
    """The trap's plain (non-series) measures over cycles: on one axis when all are in [0, 1],
    else one plot each."""
    rows = cycles.filter(pl.col("trap") == trap, ~pl.col("measure").str.contains("@"))
    names = rows["measure"].unique(maintain_order=True).to_list()
    lines = {name: rows.filter(pl.col("measure") == name).select("as_of", "value") for name in names}
    values = rows["value"].drop_nans().drop_nulls()
    if values.is_empty():
        return []
    if values.min() >= 0 and values.max() <= 1:
        percent = all(_unit(name) == "percent" for name in names)
        labelled = {name.replace("_", " "): frame for name, frame in lines.items()}
        ylabel = next(iter(labelled)) if len(labelled) == 1 else "share" if percent else "0 to 1"
        return [_trend(cycles, labelled, title, ylabel, percent=percent,
                       extra=lambda axis: _min_span(axis, values.min(), values.max()))]
    return [_trend(cycles, {name.replace("_", " "): frame}, f"{title}: {name.replace('_', ' ')}",
                   name.replace("_", " "), percent=_unit(name) == "percent") for name, frame in lines.items()]


def _min_span(axis: Any, low: float, high: float, span: float = 0.1) -> None:
    """Show at least ``span`` of the [0, 1] scale, so that a change of a thousandth looks like one."""
    if high - low < span:
        middle = min(max((low + high) / 2, span / 2), 1 - span / 2)
        axis.set_ylim(middle - span / 2 - 0.01, middle + span / 2 + 0.01)


def _validation_plot(cycles: pl.DataFrame, truth: Mapping[str, float] | None, metric: str | None) -> Markup | None:
    """The gate's held-out difference in its primary ``metric`` (with its interval) per cycle;
    beside it, where known, the simulator's true accuracy of each cycle's candidate."""
    wide = cycles.filter(pl.col("trap") == VALIDATION)
    if "difference" not in wide["measure"].to_list():
        return None
    wide = wide.pivot(on="measure", index=["as_of", "candidate_model_uri"], values="value",
                      aggregate_function="last").sort("as_of")
    wide = wide.filter(pl.all_horizontal(pl.col(c).is_not_null() & pl.col(c).is_finite() for c in
                                         ("difference", "difference_lo", "difference_hi") if c in wide.columns))
    if wide.is_empty():  # no cycle had a difference to show (e.g. propensities unknown)
        return None
    labels = _cycle_labels(cycles)
    x = [list(labels).index(day) for day in wide["as_of"]]
    known = {uri: value for uri, value in (truth or {}).items() if value is not None and math.isfinite(value)}
    true = [(xi, known[uri]) for xi, uri in zip(x, wide["candidate_model_uri"], strict=True) if uri in known]
    with matplotlib.rc_context(_SVG_RC):
        figure = _figure(2 if true else 1)
        held_out, *beside = figure.subplots(1, 2 if true else 1, squeeze=False)[0]
        difference = wide["difference"].to_list()
        if {"difference_lo", "difference_hi"} <= set(wide.columns):
            low = [d - lo for d, lo in zip(difference, wide["difference_lo"], strict=True)]
            high = [hi - d for d, hi in zip(difference, wide["difference_hi"], strict=True)]
            held_out.errorbar(x, difference, yerr=[low, high], fmt="o", capsize=4, color="C0")
        else:
            held_out.plot(x, difference, "o", color="C0")
        held_out.axhline(0, color="0.5", linewidth=0.8)
        _cycle_axis(held_out, labels)
        held_out.set_ylabel("candidate \u2212 champion")
        held_out.set_title(f"Held-out {metric or 'primary metric'}: difference ({CI_LEVEL:.0%} CI)", loc="left")
        if true:
            axis = beside[0]
            axis.plot([p[0] for p in true], [p[1] for p in true], "s-", color="C3")
            _cycle_axis(axis, labels)
            axis.set_ylabel("true accuracy")
            axis.set_title("Candidate's true accuracy (simulator)", loc="left")
        _layout(figure)
        return _svg(figure)


def _groups_plot(cycles: pl.DataFrame) -> Markup | None:
    """Per declared group, each cycle's candidate value on the held-out days, and the disparity
    between groups (docs/fairness.md); None when no cycle declared groups."""
    groups = cycles.filter((pl.col("trap") == VALIDATION) & pl.col("measure").str.starts_with("group@"))
    if groups.is_empty():
        return None
    labels = _cycle_labels(cycles)
    disparity = cycles.filter((pl.col("trap") == VALIDATION) & (pl.col("measure") == "disparity"))
    with matplotlib.rc_context(_SVG_RC):
        figure = _figure(2)
        values, spread = figure.subplots(1, 2, squeeze=False)[0]
        for (measure,), rows in groups.sort("as_of").group_by("measure", maintain_order=True):
            values.plot([list(labels).index(day) for day in rows["as_of"]], rows["value"], "o-",
                        label=measure.removeprefix("group@"))
        values.set_ylabel("candidate's value")
        values.set_title("Each group's value, cycle by cycle", loc="left")
        values.legend(fontsize="small")
        spread.plot([list(labels).index(day) for day in disparity["as_of"]], disparity["value"], "s-", color="C3")
        spread.set_ylabel("largest − smallest")
        spread.set_title("Disparity between groups", loc="left")
        for axis in (values, spread):
            _cycle_axis(axis, labels)
        _layout(figure)
        return _svg(figure)


_TITLES = {"exposure_bias": "Exploration", "survivorship": "Survivorship", "label_delay": "Labels not yet arrived",
           "leakage": "Leakage", "self_consumption": "Exploration and self-consumption",
           "diversity": "Exposure concentration across versions", "fairness": "Fairness across groups",
           "vocal_minority": "Who reacts", "popularity": "Exposure feeding on exposure",
           "engagement": "Clicks and outcomes"}
# (trap, series) -> the plot's title and y label; other series are plotted "<series> by key"
_SERIES_TITLES = {("survivorship", "coverage"): ("Label coverage by cohort", "labelled"),
                  ("fairness", "gain"): ("Each group's gain over the champion", "candidate \u2212 champion"),
                  ("survivorship", "reaction_coverage"): ("Reaction coverage by cohort", "reacted to"),
                  ("vocal_minority", "representation"): ("Share of reactions over share of traffic, by segment",
                                                         "representation"),
                  **{("diversity", base): (f"{base.replace('_', ' ')} by version", base.replace("_", " "))
                     for base in ("items", "coverage", "gini", "entropy", "top_share")}}


def _trap_plots(cycles: pl.DataFrame, finding: Finding, holdout_hours: float) -> list[Markup]:
    """The named plots whose series exist, then one per other series and the plain measures."""
    trap = finding.trap
    plots = [_examination_plot(cycles, trap),
             _delay_plot(cycles, trap, holdout_hours, finding.measures.get("cadence_days", math.nan))]
    bases = cycles.filter(pl.col("trap") == trap, pl.col("measure").str.contains("@"))["measure"]
    for base in bases.str.split_exact("@", 1).struct.field("field_0").unique(maintain_order=True):
        if base == "theta" or base.startswith("delay_p"):
            continue
        title, ylabel = _SERIES_TITLES.get((trap, base), (f"{base.replace('_', ' ')} by key",
                                                          base.replace("_", " ")))
        plots.append(_trend(cycles, _series(cycles, trap, base), title, ylabel, percent=_unit(base) == "percent"))
    plots += _scalar_plots(cycles, trap, _TITLES.get(trap, trap.replace("_", " ")))
    return [plot for plot in plots if plot]


# --- tables ----------------------------------------------------------------------------------

def _measure_rows(measures: Mapping[str, float]) -> list[tuple[str, str]]:
    """(name, shown value); a series' keys on one row: ``0: 1 · 1: 0.62``, each key and its value
    joined by a no-break space, so a long series wraps between them, not inside one."""
    rows: dict[str, list[str]] = {}
    for name, value in measures.items():
        base, _, key = name.partition("@")
        shown = format_value(value, name)
        rows.setdefault(base.replace("_", " "), []).append(f"{key}:\u00a0{shown}" if key else shown)
    return [(name, " \u00b7 ".join(values)) for name, values in rows.items()]


def _table(frame: pl.DataFrame) -> dict[str, Any]:
    """Column names and rows of (shown value, whether it is a number: aligned right)."""
    numeric = [dtype.is_numeric() for dtype in frame.dtypes]
    return {"columns": [column.replace("_", " ") for column in frame.columns],
            "rows": [[(format_value(value, column), number)
                      for column, value, number in zip(frame.columns, row, numeric, strict=True)]
                     for row in frame.iter_rows()]}


def _evidence(validation: Mapping[str, Any]) -> dict[str, Any]:
    """The gate's evidence as rows: slice, n, reviewed, metric, candidate, champion, difference."""
    primary = validation.get("primary_metric")
    decision = validation.get("decision") or {}
    rows = []
    for result in validation.get("slices", []):
        metrics = result.get("metrics", {})
        order = [m for m in SHOWN_METRICS if m in metrics] + [m for m in metrics if m not in SHOWN_METRICS]
        for metric in order:
            m = metrics[metric]
            ess = metric == "ess"
            lower, upper = (m.get("difference_ci") or [math.nan, math.nan])
            rows.append({
                "slice": result.get("name"), "n": format_value(result.get("n_samples")),
                "reviewed": format_value(result.get("n_reviewed", 0)), "metric": metric,
                "primary": metric == primary and result is validation["slices"][0],
                "candidate": f"{m['candidate']:.1f}" if ess else format_estimate(m.get("candidate"), m.get("candidate_ci")),
                "champion": f"{m['champion']:.1f}" if ess else format_estimate(m.get("champion"), m.get("champion_ci")),
                "difference": "" if ess else format_estimate(m.get("difference"), m.get("difference_ci"), signed=True),
                "sign": "" if ess else ("better" if _finite(lower) and lower > 0
                                        else "worse" if _finite(upper) and upper < 0 else ""),
            })
    windows = validation.get("windows") or {}
    return {"candidate": validation.get("candidate_model_uri"),
            "champion": validation.get("champion_model_uri") or BASELINE,
            "held_out": f"{windows.get('holdout_start')} to {windows.get('holdout_end')}",
            "primary": primary, "reward": validation.get("reward", ""),
            "outcome": decision.get("outcome", "undecided"), "reasons": decision.get("reasons", []),
            "revisit": validation.get("is_revisit", False), "rows": rows}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# --- the page --------------------------------------------------------------------------------

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Flywheel health: {{ r.domain }} {{ r.as_of }}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2433;margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:0}h3{font-size:14px;margin:18px 0 6px;color:#475467}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:12px 0 20px;color:#344054}
.meta dt{font-weight:600}.meta dd{margin:0;font-family:ui-monospace,monospace;font-size:13px}
section{background:#fff;border:1px solid #e4e7ec;border-radius:8px;padding:18px 22px;margin:18px 0}
.verdicts{width:100%;border-collapse:collapse}.verdicts td{padding:8px 10px;border-top:1px solid #eaecf0;vertical-align:top}
.badge{display:inline-block;padding:1px 10px;border-radius:10px;font-weight:600;font-size:12px;white-space:nowrap}
.flagged .badge,.badge.flagged,.badge.failed,.badge.rejected{background:#fee4e2;color:#b42318}
.healthy .badge,.badge.healthy,.badge.passed{background:#dcfae6;color:#067647}
.badge.inconclusive,.badge.undecided{background:#fef0c7;color:#93370d}
tr.flagged td:first-child{border-left:4px solid #d92d20}tr.healthy td:first-child{border-left:4px solid #17b26a}
section.trap.flagged,section.drift.flagged{border-left:5px solid #d92d20}
section.trap.healthy,section.drift.healthy{border-left:5px solid #17b26a}
.head{display:flex;align-items:center;gap:12px}.summary{margin:8px 0 2px;font-weight:500}.why{margin:0;color:#475467}
a{color:#1849a9;text-decoration:none}
table.data{border-collapse:collapse;font-size:13px;margin:4px 0}
table.data th{text-align:left;background:#f2f4f7;font-weight:600}
table.data th,table.data td{padding:4px 10px;border-bottom:1px solid #eaecf0}
table.data td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.primary td{font-weight:600;background:#f5f8ff}td.better{color:#067647}td.worse{color:#b42318}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px;margin-top:14px}
.plots figure{margin:0;border:1px solid #eaecf0;border-radius:6px;padding:6px;background:#fff}
svg.plot{width:100%;height:auto;display:block}.plots figure.wide{grid-column:1/-1}
table.measures td.num{text-align:left;white-space:normal}
.none{color:#667085;font-style:italic}
</style></head>
<body><main>
<h1>Flywheel health: {{ r.domain }}</h1>
<dl class="meta">
<dt>cycle</dt><dd>{{ r.as_of }}</dd>
<dt>held out</dt><dd>{{ r.holdout_start }} to {{ r.as_of }} ({{ holdout_days }} days)</dd>
<dt>trained on</dt><dd>{{ r.train_start }} to {{ r.train_end }}</dd>
<dt>labels mature until</dt><dd>{{ r.mature_until or "not measured" }}</dd>
<dt>champion during the cycle</dt><dd>{{ champion }}</dd>
<dt>champion now</dt><dd>{{ champion_now }}</dd>
<dt>candidate</dt><dd>{{ r.candidate_model_uri }}</dd>
{% if evidence %}<dt>gate</dt><dd><span class="badge {{ evidence[0].outcome }}">{{ evidence[0].outcome }}</span></dd>{% endif %}
</dl>
<section id="verdicts"><h2>{{ flagged|length }} of {{ findings|length }} traps flagged</h2>
<table class="verdicts">
{% for f in findings %}<tr class="{{ f.state }}"><td><span class="badge">{{ f.state }}</span></td>
<td><a href="#{{ f.trap }}"><b>{{ f.title }}</b></a></td><td>{{ f.summary }}<br><span class="why">{{ f.explanation }}</span></td></tr>
{% endfor %}</table></section>
{% for f in findings %}
<section class="trap {{ f.state }}" id="{{ f.trap }}">
<div class="head"><h2>{{ f.title }}</h2><span class="badge">{{ f.state }}</span></div>
<p class="summary">{{ f.summary }}</p><p class="why">{{ f.explanation }}</p>
{% if f.measures %}<h3>Measures</h3><table class="data measures"><tr><th>measure</th><th>value</th></tr>
{% for name, value in f.measures %}<tr><td>{{ name }}</td><td class="num">{{ value }}</td></tr>{% endfor %}</table>{% endif %}
{% for name, t in f.tables %}<h3>{{ name }}</h3><table class="data"><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in t.rows %}<tr>{% for v, number in row %}<td{% if number %} class="num"{% endif %}>{{ v }}</td>{% endfor %}</tr>{% endfor %}</table>
{% endfor %}
{% if f.plots %}<div class="plots">{% for p in f.plots %}<figure>{{ p }}</figure>{% endfor %}</div>{% endif %}
</section>
{% endfor %}
{% if drift %}<section class="drift {{ drift.state }}" id="drift">
<div class="head"><h2>Input drift</h2><span class="badge {{ drift.state }}">{{ drift.verdict }}</span></div>
<p class="summary">{{ drift.recent }} against {{ drift.reference }}</p>
{% if drift.note %}<p class="none">Not measured: {{ drift.note }}.</p>{% else %}
{% if drift.reasons %}<ul>{% for reason in drift.reasons %}<li>{{ reason }}</li>{% endfor %}</ul>{% endif %}
<table class="data"><tr><th>feature</th><th>PSI</th><th>threshold</th></tr>
{% for row in drift.rows %}<tr><td>{{ row.feature }}</td><td class="num {{ row.sign }}">{{ row.value }}</td>
<td class="num">{{ row.threshold }}</td></tr>{% endfor %}</table>{% endif %}
<p class="why">The population stability index compares each serving feature's distribution (categories, or the
reference's deciles) between the two windows: below 0.1 little change, above 0.25 a large one. Drift beyond a
threshold makes the drift sensor launch a cycle (docs/monitoring.md).</p>
</section>{% endif %}
{% if live %}<section id="live"><h2>After deployment: the gate's forecast against what came true</h2>
<p class="summary">{{ live.within }} of {{ live.total }} deployments gained within the interval their validation forecast.</p>
<table class="data"><tr><th>version</th><th>replaced</th><th>watched</th><th>forecast gain</th><th>realised gain</th><th>within</th></tr>
{% for row in live.rows %}<tr><td>{{ row.version }}</td><td>{{ row.previous }}</td><td class="num">{{ row.watched }}</td>
<td class="num">{{ row.forecast }}</td><td class="num">{{ row.realised }}</td><td>{{ row.within }}</td></tr>{% endfor %}</table>
<p class="why">The champion_monitor asset measures each deployed champion on the traffic it served against the version it
replaced (docs/monitoring.md); a forecast that keeps missing says the held-out window does not stand for the days after it.</p>
</section>{% endif %}
<section id="evidence"><h2>The gate's evidence</h2>
{% if validation_plot %}<div class="plots"><figure class="wide">{{ validation_plot }}</figure></div>{% endif %}
{% if groups_plot %}<div class="plots"><figure class="wide">{{ groups_plot }}</figure></div>{% endif %}
{% for e in evidence %}
<h3>{{ "Revisit of " if e.revisit else "" }}{{ e.candidate }} vs {{ e.champion }}, held out {{ e.held_out }}:
<span class="badge {{ e.outcome }}">{{ e.outcome }}</span></h3>
<p>primary metric <b>{{ e.primary }}</b>{% if e.reward %} (reward: {{ e.reward }}){% endif %}; intervals are {{ ci_level }} bootstrap intervals.</p>
{% if e.reasons %}<ul>{% for reason in e.reasons %}<li>{{ reason }}</li>{% endfor %}</ul>{% endif %}
<table class="data"><tr><th>slice</th><th>n</th><th>reviewed</th><th>metric</th><th>candidate</th><th>champion</th><th>difference</th></tr>
{% for row in e.rows %}<tr{% if row.primary %} class="primary"{% endif %}><td>{{ row.slice }}</td><td class="num">{{ row.n }}</td>
<td class="num">{{ row.reviewed }}</td><td>{{ row.metric }}</td><td class="num">{{ row.candidate }}</td>
<td class="num">{{ row.champion }}</td><td class="num {{ row.sign }}">{{ row.difference }}</td></tr>{% endfor %}
</table>
{% else %}<p class="none">No validation report for this cycle.</p>{% endfor %}
</section>
</main></body></html>
"""

_CHAMPION_UNKNOWN = ("not known here (the cycle writes this page before its candidate can be deployed): "
                     "flywheel report --domain {domain} writes it again with the champion then")
_ENVIRONMENT = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def _live(live: list[Mapping[str, Any]] | None) -> dict[str, Any] | None:
    """The after-deployment section's rows, from monitoring.calibration (None: no section)."""
    if not live:
        return None
    rows = [{"version": f"v{row['version']}", "previous": f"v{row['previous_version']}" if row["previous_version"] else "baseline",
             "watched": f"{row['days_watched']} days, {row['n_interactions']:,} interactions",
             "forecast": f"{row['forecast_gain']:+.4f} [{row['forecast_gain_lo']:+.4f}, {row['forecast_gain_hi']:+.4f}]",
             "realised": f"{row['realised_gain']:+.4f}", "within": "yes" if row["within_forecast"] else "no"}
            for row in live]
    return {"rows": rows, "total": len(rows), "within": sum(bool(row["within_forecast"]) for row in live)}


def _drift(drift: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The input drift section's rows, from DriftReport.to_dict() (None: no section)."""
    if not drift:
        return None
    rows = [{"feature": f["feature"], "value": f"{f['psi']:.3f}", "threshold": f"{drift['max_psi']:g}",
             "sign": "worse" if f["psi"] > drift["max_psi"] else ""} for f in drift["features"]]
    share = drift["new_item_share"]
    if _finite(share):
        among = drift.get("new_items_among", "impressions")  # reports stored before it counted impressions
        rows.append({"feature": f"new items (share of recent {among})", "value": format_value(share, "share"),
                     "threshold": format_value(drift["max_new_item_share"], "share"),
                     "sign": "worse" if share > drift["max_new_item_share"] else ""})
    return {"state": "flagged" if drift["drifted"] else "healthy",
            "verdict": "drifted" if drift["drifted"] else "no drift", "note": drift.get("note", ""),
            "reasons": drift["reasons"], "rows": rows, "reference": (
                f"{drift['reference']}, {drift['reference_start']} to {drift['reference_end']} "
                f"({drift['reference_interactions']:,} interactions)"),
            "recent": (f"Days {drift['recent_start']} to {drift['recent_end']} "
                       f"({drift['recent_interactions']:,} interactions)")}


def render_html(report: HealthReport, history: pl.DataFrame | None, validation: Mapping[str, Any] | None,
                truth: Mapping[str, float] | None = None, champion_now: str | None = None,
                drift: Mapping[str, Any] | None = None, live: list[Mapping[str, Any]] | None = None) -> str:
    """The cycle's page: verdicts, a section per trap with its measures, tables and plots across
    cycles (``history``: health.measures' rows; None before any), the input drift (``drift``:
    DriftReport.to_dict(); None: no section), the deployed champions' live gain against the gate's
    forecast (``live``: monitoring.calibration's rows; None or empty: no section), and the gate's evidence (with the simulator's true
    accuracy where ``truth`` has it). ``champion_now``: the champion as the registry has it while
    rendering (None: the page says how to get it)."""
    cycles = _cycles(report, history)
    holdout_days = (report.as_of - report.holdout_start).days + 1
    known = [trap for trap in TRAPS if any(f.trap == trap for f in report.findings)]
    ordered = [report.finding(trap) for trap in known] + [f for f in report.findings if f.trap not in TRAPS]
    findings = [{
        "trap": finding.trap, "title": finding.trap.replace("_", " "),
        "state": "flagged" if finding.flagged else "healthy",
        "summary": finding.summary, "explanation": finding.explanation,
        "measures": _measure_rows(finding.measures),
        "tables": [(name.replace("_", " "), _table(frame)) for name, frame in finding.tables.items()],
        "plots": _trap_plots(cycles, finding, holdout_days * 24),
    } for finding in ordered]
    reports = [validation, (validation or {}).get("revisit")]
    return _ENVIRONMENT.from_string(_TEMPLATE).render(
        r=report, champion=_version(report.champion), holdout_days=holdout_days, findings=findings,
        champion_now=champion_now or _CHAMPION_UNKNOWN.format(domain=report.domain),
        flagged=report.flagged, evidence=[_evidence(v) for v in reports if v], drift=_drift(drift), live=_live(live),
        validation_plot=_validation_plot(cycles, truth, (validation or {}).get("primary_metric")),
        groups_plot=_groups_plot(cycles), ci_level=f"{CI_LEVEL:.0%}")


# --- stored reports --------------------------------------------------------------------------

def report_to_dict(report: HealthReport) -> dict[str, Any]:
    """The report as JSON-ready data, each table as its columns and records."""
    days = {name: getattr(report, name) for name in ("as_of", "train_start", "train_end", "holdout_start",
                                                      "mature_until")}
    return {
        "domain": report.domain, **{name: day.isoformat() if day else None for name, day in days.items()},
        "champion": report.champion, "candidate_model_uri": report.candidate_model_uri,
        "findings": [{
            "trap": f.trap, "flagged": f.flagged, "summary": f.summary, "explanation": f.explanation,
            "measures": f.measures,
            "tables": {name: {"columns": frame.columns, "records": frame.to_dicts()} for name, frame in f.tables.items()},
        } for f in report.findings],
    }


def report_from_dict(data: Mapping[str, Any]) -> HealthReport:
    def day(name: str) -> date | None:
        return date.fromisoformat(data[name]) if data.get(name) else None

    findings = tuple(Finding(
        trap=f["trap"], flagged=f["flagged"], summary=f["summary"], explanation=f["explanation"],
        measures={name: float(value) for name, value in f["measures"].items()},
        tables={name: pl.DataFrame(t["records"] or None, schema=t["columns"] if not t["records"] else None)
                .select(t["columns"]) for name, t in f["tables"].items()},
    ) for f in data["findings"])
    return HealthReport(domain=data["domain"], as_of=day("as_of"), train_start=day("train_start"),
                        train_end=day("train_end"), holdout_start=day("holdout_start"),
                        mature_until=day("mature_until"), champion=data["champion"],
                        candidate_model_uri=data["candidate_model_uri"], findings=findings)


def report_paths(home: Home, domain: str, as_of: date) -> tuple[Path, Path]:
    """(page, stored data) of a domain's cycle."""
    folder = home.reports / domain
    return folder / f"{as_of.isoformat()}.html", folder / f"{as_of.isoformat()}.json"


def write_report(home: Home, report: HealthReport, history: pl.DataFrame | None, validation: Mapping[str, Any] | None,
                 truth: Mapping[str, float] | None = None, drift: Mapping[str, Any] | None = None,
                 live: list[Mapping[str, Any]] | None = None) -> Path:
    """Write the cycle's page and, beside it, the data that renders it again (``drift``:
    DriftReport.to_dict(); ``live``: monitoring.calibration's rows); returns the page."""
    page, stored = report_paths(home, report.domain, report.as_of)
    page.parent.mkdir(parents=True, exist_ok=True)
    data = {"report": report_to_dict(report), "validation": validation, "drift": drift, "live": live}
    write_atomically(stored, json.dumps(data, indent=1, default=str).encode())
    return write_atomically(page, render_html(report, history, validation, truth, drift=drift, live=live).encode())


def load_report(path: Path) -> tuple[HealthReport, dict[str, Any] | None]:
    """A stored report (its .json, or the .html beside it) and its validation evidence."""
    data = json.loads(Path(path).with_suffix(".json").read_text())
    return report_from_dict(data["report"]), data["validation"]


def stored_report(home: Home, domain: str, as_of: date | None = None) -> Path:
    """The stored data of the domain's latest (or ``as_of``'s) report."""
    if as_of is not None:
        path = report_paths(home, domain, as_of)[1]
        if not path.exists():
            raise ReportMissing(f"no health report for {domain} on {as_of} in {path.parent}")
        return path
    stored = sorted((home.reports / domain).glob("*.json"))
    if not stored:
        raise ReportMissing(f"no health report for {domain} in {home.reports / domain}: run a cycle first "
                            f"(flywheel run --domain {domain})")
    return stored[-1]


def render_stored(warehouses: Warehouses, stored: Path) -> tuple[HealthReport, str]:
    """A stored report and its page rendered again: the history from the domain's warehouse
    (read-only), the truth its MLflow's candidates carry now and the champion its registry names now."""
    home = warehouses.home
    report, validation = load_report(stored)
    drift = json.loads(Path(stored).with_suffix(".json").read_text()).get("drift")  # none before drift was measured
    history, live = None, None
    if warehouses.exists(report.domain):  # the audits' measures and the monitor's looks, no events
        with warehouses.for_days(report.domain, Scope(whole=(MEASURES_TABLE, MONITOR_TABLE)), read_only=True) as (con, _):
            history = measure_history(con, report.domain)
            live = calibration(con, report.domain).to_dicts()
    truth, champion_now = {}, None
    if home.has_mlflow_store:
        client = home.mlflow_client()
        earlier = [] if history is None else history["candidate_model_uri"].to_list()
        truth = simulator_truth(client, [report.candidate_model_uri, *earlier])
        champion_now = f"{champion_summary(client, report.domain)}, as of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    return report, render_html(report, history, validation, truth, champion_now, drift, live)


def record_true_accuracy(client: MlflowClient, model_uri: str, accuracy: float) -> None:
    """Tag a candidate's logged model with its true accuracy (the simulator's scoring code: the
    demo and benchmarks), so its health reports plot it beside the held-out evidence."""
    client.set_logged_model_tags(model_uri.removeprefix("models:/"), {TRUE_ACCURACY_TAG: f"{accuracy:.6f}"})


def simulator_truth(client: MlflowClient, uris: Iterable[str]) -> dict[str, float]:
    """Each candidate's true accuracy, as the simulator's scoring code tagged its logged model
    (``models:/<model_id>``); models without the tag, or not found, are left out."""
    truth = {}
    for uri in dict.fromkeys(uris):
        if not uri or not uri.startswith("models:/"):
            continue
        try:
            tags = client.get_logged_model(uri.removeprefix("models:/")).tags
        except MlflowException:
            continue
        if TRUE_ACCURACY_TAG in tags:
            truth[uri] = float(tags[TRUE_ACCURACY_TAG])
    return truth
