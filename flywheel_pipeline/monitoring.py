"""Watching the deployed champion on the traffic it serves: is it as good as the gate said, and no
worse than what it replaced?

Each day after a deployment, over every interaction the champion's version served since, the
monitor measures with validation's own evidence and estimators (validation/evidence.py: the same
reward and the same primary value, ``dr``, as the gate):

- the champion's **live value** (its doubly robust terms per interaction; on its own traffic close
  to on-policy), against the **gate's forecast**: the interval its validation gave it;
- the champion **minus the previous champion** (or the baseline), both estimated on the same
  interactions: the champion's and, for the ``monitor.holdback_days`` after a first deployment,
  those the previous version still served as its holdback (``registry.Holdback``), each logger
  then the routing's mixture (``validation.Routing``); without a holdback the previous one rests
  on the exploration slice alone.

A regression is declared by a confidence sequence, not by one day's estimate: the asymptotic
confidence sequence of Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas (2024, "Time-uniform central
limit theory and asymptotic confidence sequences", Annals of Statistics), a bound on the running
mean that holds at every day at once, so looking every day does not raise the false-alarm rate the
way a daily test would. With ``monitor.false_alarm_rate`` alpha, a champion truly no worse than its
reference is ever declared regressed with probability about alpha (asymptotically; the bound
assumes interactions independent given the days). Its boundary, for n interactions of variance
s^2 and a tuning rho (tightest after ``monitor.planned_days`` of traffic):

    mean +- sqrt( 2 (n s^2 rho^2 + 1) / (n^2 rho^2) * log( sqrt(n s^2 rho^2 + 1) / (2 alpha) ) )

one-sided at alpha (each side of the two-sided sequence at 2 alpha).

- ``regressed``: the upper bound of champion - previous lies below -``regression_margin``: the
  champion is worse than what it replaced. At automation ``full`` it is rolled back (a signed
  approval of the previous version by ``flywheel:auto``, deployed by the approval sensor); below
  it, an alert waits for a person.
- ``below_forecast``: the upper bound of the live value lies below the forecast's lower bound
  less the margin: the gate's promise did not come true (the world moved, or the proxy reward and
  the outcome parted). An alert; a rollback only follows from ``regressed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import mlflow
import numpy as np
import polars as pl
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flywheel_pipeline import registry
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import Scorer, baseline_scorer
from flywheel_pipeline.sources import Readable, Scope, as_source
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.validation import PRIMARY_METRIC, Routing, held_out_evidence, score_models
from flywheel_pipeline.warehouse import transaction

MONITOR_TABLE = "health.champion_monitor"
# What a look holds in a working copy: its own table; what it watches it reads through a Source.
COPY_SCOPE = Scope(whole=(MONITOR_TABLE,))
_DDL = f"""
CREATE SCHEMA IF NOT EXISTS health;
CREATE TABLE IF NOT EXISTS {MONITOR_TABLE} (
    domain VARCHAR NOT NULL, event_date DATE NOT NULL, version VARCHAR NOT NULL, previous_version VARCHAR,
    deployed_at TIMESTAMP, days_watched INTEGER, n_interactions INTEGER,
    live DOUBLE, live_lo DOUBLE, live_hi DOUBLE, forecast DOUBLE, forecast_lo DOUBLE, forecast_hi DOUBLE,
    forecast_gain DOUBLE, forecast_gain_lo DOUBLE, forecast_gain_hi DOUBLE,
    difference DOUBLE, difference_lo DOUBLE, difference_hi DOUBLE,
    regressed BOOLEAN, below_forecast BOOLEAN, action VARCHAR, watched_at TIMESTAMP,
    PRIMARY KEY (domain, event_date)
)"""


@dataclass(frozen=True)
class Bound:
    """A running mean and its confidence sequence's bounds at this point."""

    mean: float
    low: float
    high: float

    @classmethod
    def undefined(cls) -> Bound:
        return cls(math.nan, math.nan, math.nan)


def confidence_sequence(values: np.ndarray, alpha: float, planned_n: float) -> Bound:
    """The asymptotic confidence sequence for the mean of ``values`` (see the module), each side at
    ``alpha``, tuned to be tightest at ``planned_n`` values."""
    values = values[np.isfinite(values)]
    n = len(values)
    if n < 2:
        return Bound.undefined()
    mean, variance = float(values.mean()), float(values.var(ddof=1))
    if variance == 0:
        return Bound(mean, mean, mean)
    level = 2 * alpha
    rho2 = (-2 * math.log(level) + math.log(-2 * math.log(level) + 1)) / (max(planned_n, 2) * variance)
    spread = n * variance * rho2 + 1
    half = math.sqrt(2 * spread / (n**2 * rho2) * math.log(math.sqrt(spread) / level))
    return Bound(mean, mean - half, mean + half)


@dataclass(frozen=True)
class Forecast:
    """What the gate said of the deployed version: its value, and its gain over the champion it
    replaced, each with the validation's interval."""

    value: Bound
    gain: Bound


@dataclass(frozen=True)
class Deployed:
    """The champion being watched: its version, what it replaced, when, and the gate's forecast."""

    domain: str
    version: str
    previous_version: str | None  # None: the baseline
    deployed_at: datetime
    forecast: Forecast
    holdback: registry.Holdback | None = None  # the previous version's share of requests, and for how long

    @property
    def first_day(self) -> date:
        return self.deployed_at.date()


def deployed_champion(client: MlflowClient, deployments: list[tuple], domain: str) -> Deployed | None:
    """The latest deployment of ``domain`` (``registry.deployments`` rows: model_version,
    previous_version, deployed_at, newest first) when its version still serves; None otherwise
    (nothing deployed yet, or the champion was restored by hand since)."""
    champion = registry.alias_version(client, domain, registry.CHAMPION)
    if not deployments or champion is None or deployments[0][0] != champion:
        return None
    version, previous, deployed_at = deployments[0]
    tags = registry.version_tags(client, domain, version)
    return Deployed(domain, version, previous, deployed_at, gate_forecast(tags), registry.Holdback.of(tags))


def gate_forecast(tags: dict[str, str]) -> Forecast:
    """The primary metric's candidate value and difference, with their intervals, from the
    validation run that let a version through (its report.json; ``tags``: the version's)."""
    run_id = tags.get("validation.run_id", "")
    try:
        report = mlflow.artifacts.load_dict(f"runs:/{run_id}/validation/report.json")
    except (MlflowException, OSError):
        return Forecast(Bound.undefined(), Bound.undefined())
    accepted = report if report.get("decision", {}).get("outcome") == "passed" else report.get("revisit") or report
    metric = accepted["slices"][0]["metrics"][accepted.get("primary_metric", PRIMARY_METRIC)]
    return Forecast(Bound(metric["candidate"], *metric["candidate_ci"]),
                    Bound(metric["difference"], *metric["difference_ci"]))


@dataclass(frozen=True)
class Watch:
    """One day's look at the deployed champion."""

    deployed: Deployed
    day: date
    days_watched: int
    n_interactions: int
    live: Bound  # the champion's value on its traffic
    difference: Bound  # champion - previous champion (or the baseline), on the same interactions
    margin: float

    @property
    def regressed(self) -> bool:
        return bool(self.difference.high < -self.margin)

    @property
    def below_forecast(self) -> bool:
        return bool(self.live.high < self.deployed.forecast.value.low - self.margin)

    def summary(self) -> str:
        previous = registry.shown_champion(self.deployed.previous_version)
        return (f"v{self.deployed.version} live {self.live.mean:.4f} [{self.live.low:.4f}, {self.live.high:.4f}] "
                f"(forecast [{self.deployed.forecast.value.low:.4f}, {self.deployed.forecast.value.high:.4f}]); "
                f"vs {previous} {self.difference.mean:+.4f} [{self.difference.low:+.4f}, {self.difference.high:+.4f}] "
                f"over {self.n_interactions} interactions in {self.days_watched} days")


def watch(source: Readable, home: Home, config: FlywheelConfig, domain: str, deployed: Deployed, day: date,
          champion: Scorer, previous: Scorer) -> Watch:
    """The champion's live value and its difference from the previous champion, over the
    interactions its version served from its deployment's day (at most ``monitor.max_days``
    before) to ``day``, and never before the last day the version it replaced served (a version
    restored by a rollback is judged on its traffic since, not on its earlier turn)."""
    settings = config.domain(domain)
    first = day - timedelta(days=settings.monitor.max_days - 1)
    if deployed.first_day <= day:  # else recorded after the days watched (a replayed past): the version's traffic
        first = max(first, deployed.first_day)
    evidence = held_out_evidence(source, home, config, domain,
                                 Windows(first - timedelta(days=1), first - timedelta(days=1), first, day))
    served, held_back, routed = _watched_units(evidence.units, deployed)
    watched = (served | held_back).to_numpy()
    if not served.any():
        return Watch(deployed, day, 0, 0, Bound.undefined(), Bound.undefined(), settings.monitor.regression_margin)
    days = (day - evidence.units.filter(served)["event_date"].min()).days + 1
    routing = None
    if held_back.any():
        routing = Routing(_daily_share(evidence.units, held_back, routed), held_back.to_numpy(),
                          settings.exploration_share)
    scored, _ = score_models(evidence, settings.shape, champion, previous, settings.serving, routing)
    live, before = (_values(scored, role)[watched] for role in ("candidate", "champion"))
    planned = watched.sum() / days * settings.monitor.planned_days
    alpha = settings.monitor.false_alarm_rate
    return Watch(deployed, day, days, int(watched.sum()), confidence_sequence(live, alpha, planned),
                 confidence_sequence(live - before, alpha, planned), settings.monitor.regression_margin)


def _watched_units(units: pl.DataFrame, deployed: Deployed) -> tuple[pl.Series, pl.Series, pl.Series]:
    """Which units the champion served since it replaced the previous version (a version restored
    by a rollback: since then, not on its earlier turn); which the previous version served as the
    deployment's holdback; and which fell in the holdback's days (requests routed at its share)."""
    version, event_date = units["model_version"], units["event_date"]
    previous = deployed.previous_version or registry.BASELINE
    served = version == deployed.version
    if deployed.holdback is not None and served.any():
        since = event_date.filter(served).min()
        routed = (event_date >= since) & (event_date < since + timedelta(days=deployed.holdback.days))
        return served, (version == previous) & routed, routed
    replaced = event_date.filter(version == previous)
    if not replaced.is_empty():
        served = served & (event_date >= replaced.max())
    none = pl.Series([False] * units.height)
    return served, none, none


def _daily_share(units: pl.DataFrame, held_back: pl.Series, routed: pl.Series) -> np.ndarray:
    """Per unit, the share of its day's watched requests the holdback served (0 outside the
    holdback's days): the routing as it happened, whatever share the serving system was set to."""
    return (units.select("event_date").with_columns(held=held_back, routed=routed)
            .select(pl.when(pl.col("routed")).then(pl.col("held").mean().over("event_date", "routed"))
                    .otherwise(0.0))
            .to_series().to_numpy())


def _values(scored, role: str) -> np.ndarray:
    """Per interaction, the doubly robust value of a role's policy (its mean is ``dr``)."""
    terms = scored.roles[role].terms
    return terms.direct + terms.residual


def earlier_flags(con, domain: str, deployed: Deployed, day: date) -> tuple[bool, bool]:
    """Whether this deployment was already found regressed, and below its forecast, before ``day``
    (an alert goes out once per deployment and kind)."""
    con.execute(_DDL)
    [(regressed, below)] = con.execute(
        f"SELECT coalesce(bool_or(regressed), false), coalesce(bool_or(below_forecast), false) FROM {MONITOR_TABLE} "
        "WHERE domain = ? AND version = ? AND deployed_at = ? AND event_date < ?",
        [domain, deployed.version, deployed.deployed_at, day]).fetchall()
    return bool(regressed), bool(below)


def version_scorer(config: FlywheelConfig, domain: str, version: str | None) -> Scorer:
    """A registered version's model, or the domain's baseline for None."""
    if version is None:
        return baseline_scorer(config.domain(domain).shape)
    return mlflow.pyfunc.load_model(f"models:/{registry.model_name(domain)}/{version}")


def save_watch(con, watch: Watch, action: str, watched_at: datetime, earlier: tuple[bool, bool] = (False, False)) -> None:
    """Replace the domain's row of the day in ``health.champion_monitor``; ``regressed`` and
    ``below_forecast`` say whether it was declared by this day (``earlier``: before it), since a
    declaration stands for the deployment."""
    con.execute(_DDL)
    d, f = watch.deployed, watch.deployed.forecast
    row = {"domain": d.domain, "event_date": watch.day, "version": d.version, "previous_version": d.previous_version,
           "deployed_at": d.deployed_at, "days_watched": watch.days_watched, "n_interactions": watch.n_interactions,
           "live": watch.live.mean, "live_lo": watch.live.low, "live_hi": watch.live.high,
           "forecast": f.value.mean, "forecast_lo": f.value.low, "forecast_hi": f.value.high,
           "forecast_gain": f.gain.mean, "forecast_gain_lo": f.gain.low, "forecast_gain_hi": f.gain.high,
           "difference": watch.difference.mean, "difference_lo": watch.difference.low,
           "difference_hi": watch.difference.high, "regressed": watch.regressed or earlier[0],
           "below_forecast": watch.below_forecast or earlier[1], "action": action, "watched_at": watched_at}
    frame = pl.DataFrame([row])  # noqa: F841 (read by the SQL below)
    with transaction(con):
        con.execute(f"DELETE FROM {MONITOR_TABLE} WHERE domain = ? AND event_date = ?", [d.domain, watch.day])
        con.execute(f"INSERT INTO {MONITOR_TABLE} BY NAME SELECT * FROM frame")


def log_to_validation_run(client: MlflowClient, watch: Watch) -> None:
    """The day's live figures on the MLflow validation run that let the version through, one step
    per day watched: what the gate forecast and what came true sit side by side
    (``live/value``, ``live/gain``, ``live/gain_within_forecast``)."""
    d = watch.deployed
    run_id = registry.version_tags(client, d.domain, d.version).get("validation.run_id")
    if not run_id or not math.isfinite(watch.difference.mean):
        return
    gain = d.forecast.gain
    within = float(gain.low <= watch.difference.mean <= gain.high)
    for key, value in (("live/value", watch.live.mean), ("live/gain", watch.difference.mean),
                       ("live/gain_within_forecast", within)):
        client.log_metric(run_id, key, value, step=watch.days_watched)


def calibration(con, domain: str) -> pl.DataFrame:
    """Per deployment (its latest watched day): the gate's forecast gain interval, the realised
    gain (champion - previous on its traffic), and whether the realised gain lies in the interval;
    empty before the monitor's first look (read-only connections welcome)."""
    if not _has_table(con):
        return pl.DataFrame()
    return con.sql(f"""
        SELECT version, previous_version, deployed_at, event_date AS last_watched, days_watched, n_interactions,
               forecast_gain, forecast_gain_lo, forecast_gain_hi, difference AS realised_gain,
               difference BETWEEN forecast_gain_lo AND forecast_gain_hi AS within_forecast
        FROM {MONITOR_TABLE} WHERE domain = ? AND difference IS NOT NULL AND NOT isnan(difference)
        QUALIFY row_number() OVER (PARTITION BY version, deployed_at ORDER BY event_date DESC) = 1
        ORDER BY deployed_at""", params=[domain]).pl()


def _has_table(con) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'health' "
                            "AND table_name = 'champion_monitor'").fetchall()[0][0])


def latest_watch(source: Readable, domain: str) -> str:
    """The monitor's latest look at the domain's champion, in a line (``flywheel status``); a
    regression says the day it was declared (its first regressed look) and what was done then."""
    watches = as_source(source).read(MONITOR_TABLE, domain, columns=[
        "event_date", "version", "deployed_at", "regressed", "below_forecast", "action"])
    if not watches.height:
        return "not run yet"
    watches = watches.sort("event_date")
    latest = watches.row(-1, named=True)
    day, version = latest["event_date"], latest["version"]
    if latest["regressed"]:
        declared = watches.filter(pl.col("regressed") & (pl.col("version") == version)
                                  & pl.col("deployed_at").eq_missing(latest["deployed_at"])).row(0, named=True)
        return f"{day}: v{version} regressed (declared {declared['event_date']}: {declared['action']})"
    return f"{day}: v{version} {'below its forecast' if latest['below_forecast'] else 'healthy'}; {latest['action']}"
