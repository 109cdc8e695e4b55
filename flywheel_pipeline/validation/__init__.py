"""Validation: the candidate against the champion on held-out evidence, and the gate.

``evidence`` reads what the held-out window logged (candidates, per-position propensities,
rewards, audit verdicts), ``estimators`` holds the off-policy estimators, ``intervals`` the paired
bootstrap, ``comparison`` measures every metric on every slice, ``gate`` decides (passed, failed,
inconclusive), ``report`` renders it and ``tracking`` logs it to MLflow. docs/validation.md says
what each estimator assumes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlflow
import numpy as np

from flywheel_pipeline import groups
from flywheel_pipeline.catalogue import candidate_catalogue, judges_slots
from flywheel_pipeline.config import FlywheelConfig, Serving
from flywheel_pipeline.home import Home
from flywheel_pipeline.scoring import Scorer, baseline_scorer
from flywheel_pipeline.sources import Readable
from flywheel_pipeline.training.base import Windows
from flywheel_pipeline.validation.comparison import (
    PRIMARY_METRIC,
    Routing,
    Scored,
    compare_on_holdout,
    score_holdout,
)
from flywheel_pipeline.validation.estimators import Positions, examination_curve, weighted_auc
from flywheel_pipeline.validation.evidence import (
    REWARD,
    REWARD_MODEL_KEYS,
    Evidence,
    assemble,
    holdout_rows,
    logged_candidates,
    reward_model,
)
from flywheel_pipeline.validation.gate import GateDecision, gate, threshold
from flywheel_pipeline.validation.intervals import MetricComparison
from flywheel_pipeline.validation.report import Judged, SliceResult, ValidationReport
from flywheel_pipeline.validation.tracking import (
    Inconclusive,
    latest_inconclusive,
    log_validation_run,
)

__all__ = [
    "PRIMARY_METRIC",
    "Compared",
    "Evidence",
    "GateDecision",
    "Inconclusive",
    "MetricComparison",
    "Routing",
    "SliceResult",
    "ValidationReport",
    "compare_models",
    "gate",
    "held_out_evidence",
    "holdout_rows",
    "latest_inconclusive",
    "log_validation_run",
    "score_models",
    "threshold",
    "validate_candidate",
    "validate_cycle",
    "weighted_auc",
]


def held_out_evidence(source: Readable, home: Home, config: FlywheelConfig, domain: str,
                      windows: Windows) -> Evidence:
    """The domain's held-out evidence with its reward (``evidence.REWARD``), its candidates as
    logged or from its catalogue, and each unit's declared group (``groups.assign``)."""
    settings = config.domain(domain)
    rows = holdout_rows(source, domain, windows, outcome=settings.label_maturity.outcome)
    evidence = assemble(rows, logged_candidates(source, domain, windows), REWARD[settings.shape],
                        catalogue=candidate_catalogue(home, source, config, domain),
                        slot_decisions=judges_slots(config, domain))
    return replace(evidence, units=groups.assign(evidence.units, settings.groups))


def reward_name(config: FlywheelConfig, domain: str) -> str:
    settings = config.domain(domain)
    return "click" if settings.shape == "recommendation" else f"{settings.label_maturity.outcome} outcome"


def value_positions(theta: np.ndarray, candidates_logged: float) -> Positions:
    """What the primary value counts: precision@L (every position of the top L alike) when most
    interactions logged their candidates; else expected clicks (positions by examination), since a
    policy judged on the shown slate alone can only reorder it, and the precision of a reordered
    slate is the slate's own."""
    return Positions.precision(theta) if candidates_logged >= 0.5 else Positions(theta, theta)


@dataclass(frozen=True)
class Compared:
    """Every metric on every slice, the positions' examination and value used, and what the
    evidence can tell apart (``comparison.Scored``)."""

    slices: list[SliceResult]
    positions: Positions
    same_choices: bool
    no_overlap: bool


def score_models(evidence: Evidence, shape: str, candidate: Scorer, champion: Scorer,
                 serving: Serving | None = None, routing: Routing | None = None) -> tuple[Scored, Positions]:
    """Both models' per-interaction sums on the evidence, each as it would serve (``serving``: the
    default, top-k), and the positions' examination and value used (``routing``: the two served
    the evidence side by side)."""
    serving = serving or Serving()
    explored = evidence.explored()
    theta = examination_curve(explored["position"].to_numpy(), explored["reward"].to_numpy(),
                              evidence.slate_size)
    positions = (Positions.precision(np.ones(evidence.slate_size)) if evidence.slot_decisions
                 else value_positions(theta, evidence.candidates_logged))
    rho = reward_model(evidence, positions.examination, REWARD_MODEL_KEYS[shape])
    scored = score_holdout(evidence, {"candidate": candidate, "champion": champion}, positions, rho,
                           serving.ranking, serving.epsilon, routing)
    return scored, positions


def compare_models(evidence: Evidence, shape: str, candidate: Scorer, champion: Scorer,
                   serving: Serving | None = None) -> Compared:
    """Candidate and champion, each as it would serve, on the held-out evidence: every metric on
    every slice."""
    scored, positions = score_models(evidence, shape, candidate, champion, serving)
    return Compared(compare_on_holdout(evidence, scored, positions), positions, scored.same_choices,
                    scored.no_overlap)


def validate_candidate(
    source: Readable,
    home: Home,
    config: FlywheelConfig,
    domain: str,
    candidate_model_uri: str,
    champion_model_uri: str | None,
    windows: Windows,
    is_revisit: bool = False,
) -> ValidationReport:
    """Score candidate and champion (or the baseline) on the held-out window, gate, and log the
    report as an MLflow run in the domain's experiment."""
    settings = config.domain(domain)
    mlflow.set_tracking_uri(home.mlflow_tracking_uri)
    candidate = mlflow.pyfunc.load_model(candidate_model_uri)
    champion = (mlflow.pyfunc.load_model(champion_model_uri) if champion_model_uri
                else baseline_scorer(settings.shape))
    evidence = held_out_evidence(source, home, config, domain, windows)
    compared = compare_models(evidence, settings.shape, candidate, champion, settings.serving)
    report = ValidationReport(
        domain=domain,
        primary_metric=PRIMARY_METRIC,
        windows=windows,
        candidate_model_uri=candidate_model_uri,
        champion_model_uri=champion_model_uri,
        slices=compared.slices,
        reward=reward_name(config, domain),
        examination=tuple(float(t) for t in compared.positions.examination),
        value_weights=tuple(float(v) for v in compared.positions.value),
        candidates_logged=evidence.candidates_logged,
        is_revisit=is_revisit,
        judged=Judged(slots=evidence.slot_decisions, propensities_known=evidence.propensities_known,
                      same_choices=compared.same_choices, no_overlap=compared.no_overlap),
    )
    report = replace(report, decision=gate(report, settings.gate, groups=settings.groups))
    return replace(report, run_id=log_validation_run(home, report))


def validate_cycle(
    source: Readable,
    home: Home,
    config: FlywheelConfig,
    domain: str,
    candidate_model_uri: str,
    champion_model_uri: str | None,
    windows: Windows,
) -> ValidationReport:
    """Validate the cycle's candidate; when it does not pass and the previous cycle's candidate
    was left inconclusive, revisit that one too, on its own held-out window extended to this
    cycle's (days it never trained on), with the report's ``revisit`` holding the second look.
    ``accepted`` says which candidate, if any, the gate lets through."""
    pending = latest_inconclusive(home, domain)
    report = validate_candidate(source, home, config, domain, candidate_model_uri, champion_model_uri, windows)
    if report.decision.passed or not _has_fresh_evidence(pending, candidate_model_uri, windows):
        return report
    extended = replace(pending.windows, holdout_end=windows.holdout_end)
    revisit = validate_candidate(source, home, config, domain, pending.model_uri, champion_model_uri,
                                 extended, is_revisit=True)
    return replace(report, revisit=revisit)


def _has_fresh_evidence(pending: Inconclusive | None, candidate_model_uri: str, windows: Windows) -> bool:
    return (pending is not None and pending.model_uri != candidate_model_uri
            and pending.windows.holdout_end < windows.holdout_end)
