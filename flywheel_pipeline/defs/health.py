"""Flywheel health, as a Dagster asset: thin wiring around flywheel_pipeline.health.

    <domain>/candidate_model + <domain>/validation_report -> <domain>/flywheel_health
        -> <domain>/registered_candidate

One asset check per trap (health.TRAPS): a flagged trap warns, or blocks registration when the
domain's ``health.blocking`` lists it. The HTML report is written under the home, logged to the
validation run in MLflow and linked from the asset's metadata. The cycle's input drift (the
held-out days' last ``drift.recent_days`` against the champion's training window, health/drift.py) is
shown beside the traps, in the metadata and the report; it checks nothing (the drift sensor acts on it).
"""

from dataclasses import replace
from typing import Any

import dagster as dg

from flywheel_pipeline import registry
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.health import TRAPS, Finding, HealthReport, fairness
from flywheel_pipeline.health.audit import audit, copy_scope, measure_history, save_measures
from flywheel_pipeline.health.drift import DriftReport, domain_drift
from flywheel_pipeline.monitoring import calibration
from flywheel_pipeline.training import TrainingResult
from flywheel_pipeline.validation import ValidationReport

HEALTH = "flywheel_health"
CHECK_DESCRIPTIONS = {
    "exposure_bias": "the training window holds exploration traffic, so the model does not learn only "
                     "from what the last model chose to show",
    "survivorship": "every cohort (new, returning, churned) and segment is labelled about as often as the rest",
    "label_delay": "no training day is younger than its outcomes' delivery delay",
    "leakage": "no training feature separates the labels too well or arrived after them; no held-out row "
               "is in training",
    "self_consumption": "training labels do not all come from the serving model's own choices",
    "diversity": "the serving model shows enough of the catalogue, not a few items",
    "vocal_minority": "no segment's share of the reactions far exceeds its share of the traffic",
    "popularity": "an item is not clicked more on the days it is among the most shown, whatever its merit",
    "engagement": "the items that draw the most clicks lead to the outcome about as often per click as the rest",
    fairness.CHECK: "the candidate's gain reaches every declared group (none significantly worse while the "
                    "aggregate gains) and the disparity between groups does not grow beyond "
                    "groups.max_disparity_increase",
}
# The measures shown as plot-friendly series in the asset's metadata (Dagster plots numbers over time).
SERIES = {"exposure_bias": "exploration_share", "survivorship": "min_coverage_ratio",
          "label_delay": "immature_share", "leakage": "max_feature_auc",
          "self_consumption": "self_consumption_share", "diversity": "top_share",
          "vocal_minority": "max_representation", "popularity": "head_click_z", "engagement": "outcome_per_click_ratio",
          fairness.CHECK: "disparity"}


def health_key(domain: str) -> dg.AssetKey:
    return dg.AssetKey([domain, HEALTH])


def build_health_asset(config: FlywheelConfig, domain: str, candidate_key: dg.AssetKey,
                       report_key: dg.AssetKey) -> dg.AssetsDefinition:
    key, blocking = health_key(domain), set(config.domain(domain).health.blocking)
    groups = config.domain(domain).groups
    checks = [*TRAPS, fairness.CHECK] if groups is not None else TRAPS  # declared groups: docs/fairness.md
    specs = [dg.AssetCheckSpec(check, asset=key, blocking=check in blocking,
                               description=CHECK_DESCRIPTIONS[check] + (" (blocks registration)" if check in blocking else ""))
             for check in checks]

    @dg.asset(key=key, ins={"candidate": dg.AssetIn(candidate_key), "report": dg.AssetIn(report_key)},
              check_specs=specs, group_name=f"{domain}_model", kinds={"duckdb", "mlflow", "html"},
              description="The cycle's audit of the traps that make a flywheel spin in place (exposure bias, "
                          "survivorship, label delay, leakage, self-consumption, diversity), one check each; "
                          "the HTML report (`flywheel report --domain D`) plots each measure across cycles.")
    def flywheel_health(context: dg.AssetExecutionContext, candidate: TrainingResult, report: ValidationReport,
                        warehouse: WarehouseResource, mlflow: MlflowResource):
        # the report (matplotlib) loads only when a cycle runs, not with every process's Definitions
        from flywheel_pipeline.health.report import simulator_truth, write_report

        client = mlflow.client()
        version = registry.alias_version(client, domain, registry.CHAMPION)
        champion = version or "baseline"
        champion_tags = registry.version_tags(client, domain, version) if version else None
        with warehouse.warehouses().for_days(domain, copy_scope(candidate.windows)) as (con, elsewhere):
            health = audit(con, config, domain, candidate.windows, candidate.mature_until, champion,
                           candidate.model_uri)
            if groups is not None:
                health = replace(health, findings=(*health.findings, fairness.fairness(report, groups)))
            save_measures(con, health, report.evidence())
            history = measure_history(con, domain)
            drift = domain_drift(con if elsewhere is None else elsewhere, config.domain(domain), domain, version,
                                 champion_tags, as_of=candidate.windows.holdout_end)
            live = calibration(con, domain).to_dicts()
        truth = simulator_truth(client, history["candidate_model_uri"].unique().to_list())
        path = write_report(warehouse.home(), health, history, report.to_dict(), truth,
                            drift=drift.to_dict() if drift else None, live=live)
        if report.run_id:
            client.log_artifact(report.run_id, str(path), "health")
        for trap in health.flagged:
            context.log.warning(f"{domain}: {trap}: {health.finding(trap).summary}")
        if drift and drift.drifted:
            context.log.warning(f"input drift: {drift.summary()}")
        yield dg.Output(health, metadata=_metadata(health, path, report.run_id, drift))
        for finding in health.findings:
            yield _check(finding, finding.trap in blocking)

    return flywheel_health


def _drift_metadata(drift: DriftReport | None) -> dict[str, Any]:
    """The cycle's input drift: a Markdown table (feature, PSI, threshold; new-item share) and two
    rounded numbers Dagster plots across materializations."""
    if drift is None:
        return {"drift": "not measured (no impressions)"}
    if drift.note:
        return {"drift": f"not measured: {drift.note}"}
    rows = [f"| {f.feature} | {f.psi:.3f} | {drift.max_psi:g} |" for f in drift.features]
    rows.append(f"| new items (share of recent {drift.new_items_among}) | {drift.new_item_share:.1%} | "
                f"{drift.max_new_item_share:.0%} |")
    verdict = "**drifted**: " + "; ".join(drift.reasons) if drift.drifted else "no drift"
    return {
        "drift": dg.MetadataValue.md(
            f"{verdict}. Days {drift.recent_start} to {drift.recent_end} against {drift.reference} "
            f"({drift.reference_start} to {drift.reference_end}).\n\n| feature | PSI | threshold |\n|---|---|---|\n"
            + "\n".join(rows)),
        "drift_max_psi": round(drift.measures()["max_psi"], 4),
        "new_item_share": round(drift.new_item_share, 4),
    }


def _metadata(health: HealthReport, path, run_id: str | None, drift: DriftReport | None = None) -> dict[str, Any]:
    """What the Dagster UI shows: the verdicts as one Markdown table, a rounded series per trap, the
    input drift, links."""
    rows = [f"| {f.trap} | {'**flagged**' if f.flagged else 'healthy'} | {f.summary} |" for f in health.findings]
    series = {SERIES[f.trap]: round(f.measures[SERIES[f.trap]], 4) for f in health.findings
              if SERIES[f.trap] in f.measures}
    return {
        "flagged": ", ".join(health.flagged) or "none",
        "verdicts": dg.MetadataValue.md("| trap | verdict | measured |\n|---|---|---|\n" + "\n".join(rows)),
        **series,
        **_drift_metadata(drift),
        "report": dg.MetadataValue.path(str(path)),
        "mlflow_artifact": f"runs:/{run_id}/health/{path.name}" if run_id else "not logged (no validation run)",
    }


def _check(finding: Finding, blocking: bool) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=finding.trap, passed=not finding.flagged,
        severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
        metadata={"measured": finding.summary, "why_it_matters": finding.explanation,
                  **{name: round(value, 4) for name, value in finding.measures.items() if "@" not in name}},
    )
