"""Flywheel health: an audit of the traps that make a data flywheel spin in place.

Each cycle, after validation, the ``flywheel_health`` asset measures and judges one Finding per
trap (TRAPS, also the names of its asset checks and of the simulator's ``--trap`` switches):

    exposure_bias     the model learns from what it chose to show: exploration, IPS, examination
    survivorship      only users who stayed are heard: label coverage by cohort and segment
    label_delay       training on days whose outcomes have not arrived: delay vs windows, cadence
    leakage           features known only after the label; held-out rows in training
    self_consumption  labels on the model's own choices, with no independent evidence
    diversity         what is shown narrows: catalogue coverage, concentration, per version
    vocal_minority    a few who react speak for everyone: each segment's share of reactions vs traffic
    popularity        exposure feeds on exposure: explored items' clicks on the days they are most shown
    engagement        clicks that do not lead to outcomes: the clickiest items' outcomes per click vs the rest's

``measures.py`` holds one plain function per trap over polars frames; ``audit.py`` reads their
frames from the warehouse and keeps each cycle's measures (``health.measures``) for the report's
history; ``report.py`` renders the HTML page people read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import polars as pl

from flywheel_pipeline.config import TRAPS

__all__ = ["FAULTS", "TRAPS", "Finding", "HealthReport"]

# Faults the simulator can commit besides the traps themselves, each with the check that must catch it.
FAULTS = {"mislogged_propensity": "exposure_bias"}


@dataclass(frozen=True)
class Finding:
    """One trap's measures and the judgement on them.

    ``measures``: the headline numbers, kept per cycle in ``health.measures`` (the report's plots
    across versions); a series is named ``<measure>@<key>``, e.g. ``coverage@returning``,
    ``theta@2``, ``delay_p90_h@resolved``. ``tables``: the cycle's detail (by cohort, by version...).
    """

    trap: str
    flagged: bool
    summary: str      # one line: what was measured against which threshold
    explanation: str  # one line: what this trap does to a flywheel, for a person reading the check
    measures: dict[str, float] = field(default_factory=dict)
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthReport:
    """One cycle's audit of a domain: a Finding per trap, over the candidate's windows."""

    domain: str
    as_of: date                # the last held-out day
    train_start: date
    train_end: date
    holdout_start: date
    mature_until: date | None  # what the pipeline believed mature (None: no delay measured)
    champion: str              # the version serving when audited ("baseline" before the first)
    candidate_model_uri: str
    findings: tuple[Finding, ...]

    @property
    def flagged(self) -> list[str]:
        return [finding.trap for finding in self.findings if finding.flagged]

    def finding(self, trap: str) -> Finding:
        return next(finding for finding in self.findings if finding.trap == trap)
