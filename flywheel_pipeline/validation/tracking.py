"""The validation run in MLflow: metrics per slice, the gate's outcome as tags, the report as
JSON and Markdown artifacts, in the domain's experiment next to the candidate's training run."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow

from flywheel_pipeline.home import Home
from flywheel_pipeline.training.base import Windows, ensure_experiment
from flywheel_pipeline.validation.intervals import CI_LEVEL, N_BOOTSTRAP
from flywheel_pipeline.validation.report import ValidationReport


def log_validation_run(home: Home, report: ValidationReport) -> str:
    """One run tagged with the candidate's training run; returns its id."""
    candidate_run_id = mlflow.models.get_model_info(report.candidate_model_uri).run_id
    decision = report.decision
    with mlflow.start_run(
        experiment_id=ensure_experiment(home, report.domain),
        run_name=f"validate-{report.windows.holdout_start}",
        tags={
            "flywheel.domain": report.domain,
            "flywheel.stage": "validation",
            "flywheel.candidate_run_id": candidate_run_id or "",
            "flywheel.candidate_model_uri": report.candidate_model_uri,
            "flywheel.champion_model_uri": report.champion_model_uri or "baseline",
            "flywheel.gate.outcome": decision.outcome,
            "flywheel.revisit": str(report.is_revisit).lower(),
            "flywheel.gate.passed": str(decision.passed).lower(),
            "flywheel.gate.decidable": str(decision.decidable).lower(),
            "flywheel.gate.reasons": "; ".join(decision.reasons) or "none",
        },
    ) as run:
        mlflow.log_params({
            "primary_metric": report.primary_metric,
            "reward": report.reward,
            "n_bootstrap": N_BOOTSTRAP,
            "ci_level": CI_LEVEL,
            "examination": ",".join(f"{t:.3f}" for t in report.examination),
            "value_weights": ",".join(f"{v:.3f}" for v in report.value_weights),
            **report.windows.params(),
        })
        metrics = report.metrics()
        metrics["candidates_logged"] = report.candidates_logged
        if decision.samples_needed is not None:
            metrics["samples_needed"] = float(decision.samples_needed)
        mlflow.log_metrics(metrics)
        mlflow.log_dict(report.to_dict(), "validation/report.json")
        mlflow.log_text(report.markdown(), "validation/report.md")
    return run.info.run_id


@dataclass(frozen=True)
class Inconclusive:
    """A candidate left inconclusive: its model and the windows it was validated on."""

    model_uri: str
    windows: Windows


def latest_inconclusive(home: Home, domain: str) -> Inconclusive | None:
    """The candidate of the domain's latest first validation (revisits aside) when that gate was
    inconclusive and more evidence could decide, else None: what the next cycle revisits on fresh
    held-out evidence. A candidate
    gets one revisit: after it, the latest first validation is the next cycle's."""
    experiment = ensure_experiment(home, domain)
    runs = mlflow.search_runs(
        experiment_ids=[experiment],
        filter_string="tags.`flywheel.stage` = 'validation' and tags.`flywheel.revisit` != 'true'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    tags = runs[0].data.tags if runs else {}
    if tags.get("flywheel.gate.outcome") != "inconclusive" or tags.get("flywheel.gate.decidable") == "false":
        return None
    return Inconclusive(
        runs[0].data.tags["flywheel.candidate_model_uri"],
        Windows.from_params(runs[0].data.params),
    )
