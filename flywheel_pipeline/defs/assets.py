"""The pipeline's Dagster assets: thin wiring around the plain stage functions.

    raw_events (day x domain)                       accumulation.accumulate
      -> dbt staging/intermediate/marts             dbt_project/ (transform.py)
      -> labels (day x domain)                      labeling.label_partitions
      -> <domain>/candidate_model                   training.train_candidate
      -> <domain>/validation_report (+ gate check)  validation.validate_cycle
      -> <domain>/flywheel_health (+ a check per trap)  health.audit (defs/health.py)
      -> <domain>/registered_candidate              lineage.register (+ approval at automation full)
"""

from collections.abc import Iterator
from datetime import date
from functools import partial

import dagster as dg
import polars as pl
from mlflow import MlflowClient

from flywheel_pipeline import accumulation, approval, registry
from flywheel_pipeline.config import FlywheelConfig, PipesTrainerSettings
from flywheel_pipeline.defs.health import HEALTH, build_health_asset
from flywheel_pipeline.defs.partitions import day_domain_partitions, partition_key, run_scope
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.defs.transform import RAW_EVENTS, fct_impressions_key
from flywheel_pipeline.defs.ui import approval_launchpad_url
from flywheel_pipeline.health import HealthReport
from flywheel_pipeline.labeling import label_partitions, maturity_cutoff
from flywheel_pipeline.labeling import stage as labeling_stage
from flywheel_pipeline.labeling.stage import to_markdown
from flywheel_pipeline.launcher import in_progress
from flywheel_pipeline.lineage import register
from flywheel_pipeline.sources import LABELS as LABELS_TABLE
from flywheel_pipeline.sources import Readable, as_source
from flywheel_pipeline.training import TrainingResult, train_candidate
from flywheel_pipeline.training.base import close_abandoned_runs
from flywheel_pipeline.training.pipes import PipesLaunch
from flywheel_pipeline.validation import ValidationReport, validate_cycle

LABELS = dg.AssetKey("labels")
TRAINER_KINDS = {"hashed": "scikitlearn", "embeddings": "scipy", "transformer": "pytorch",
                 "pipes": "dagsterpipes"}  # the asset's kind tag
DEPLOYMENTS_SINCE = "deployments since: this asset's observations (Events)"


def model_keys(domain: str) -> dict[str, dg.AssetKey]:
    return {step: dg.AssetKey([domain, step])
            for step in ("candidate_model", "validation_report", HEALTH, "registered_candidate")}


def build_data_assets(config: FlywheelConfig) -> list[dg.AssetsDefinition]:
    """The day x domain partitioned stages shared by every domain."""
    partitions = day_domain_partitions(config)

    @dg.asset(key=RAW_EVENTS, partitions_def=partitions, backfill_policy=dg.BackfillPolicy.single_run(),
              group_name="accumulation", kinds={"duckdb"},
              description="Landing batches validated against the event contract into raw.* "
                          "(rows in = accepted + quarantined; reasons in raw.quarantine).")
    def raw_events(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
        domain, days = run_scope(context, partitions)
        with warehouse.warehouses().for_days(domain, accumulation.copy_scope(days)) as (con, elsewhere):
            report = accumulation.accumulate(con, warehouse.home(), config, domain, days, elsewhere=elsewhere)
        for day in days:
            context.add_asset_metadata(report.day_metadata(day), partition_key=partition_key(domain, day))
        context.log.info(f"accumulated {report.metadata()}")
        return dg.MaterializeResult()

    @dg.asset(key=LABELS, deps=[fct_impressions_key()], partitions_def=partitions,
              backfill_policy=dg.BackfillPolicy.single_run(), group_name="labeling", kinds={"duckdb"},
              description="Labeling functions over implicit and explicit signals, combined by a "
                          "Dawid-Skene label model into a probabilistic label per impression.")
    def labels(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
        domain, days = run_scope(context, partitions)
        with warehouse.warehouses().for_days(domain, labeling_stage.copy_scope(days)) as (con, elsewhere):
            report = label_partitions(con, domain, days, config, source=elsewhere)
        for warning in report.warnings:
            context.log.warning(warning)
        tables = {"labeling_functions": dg.MetadataValue.md(to_markdown(report.lf_stats)),
                  "cohort_coverage": dg.MetadataValue.md(to_markdown(report.cohort_coverage))}
        for day in days:
            context.add_asset_metadata({**report.day_metadata(day), **tables},
                                       partition_key=partition_key(domain, day))
        return dg.MaterializeResult()

    return [raw_events, labels]


def latest_labelled_day(source: Readable, domain: str) -> date:
    labelled = as_source(source).read(LABELS_TABLE, domain, columns=["event_date", "p_good"])
    day = labelled.filter(pl.col("p_good").is_not_null())["event_date"].max() if labelled.width else None
    if day is None:
        raise dg.Failure(f"{domain} has no labelled impressions yet: materialize labels first")
    return day


def build_model_assets(config: FlywheelConfig, domain: str) -> list[dg.AssetsDefinition]:
    """One domain's fine-tune -> validation -> registration chain."""
    keys = model_keys(domain)
    group = f"{domain}_model"

    trainer = config.domain(domain).trainer
    reads = trainer.training_set if isinstance(trainer, PipesTrainerSettings) else "impressions"

    @dg.asset(key=keys["candidate_model"], deps=[LABELS, *([dg.AssetKey([domain, reads])] if reads != "impressions"
                                                         else [])],
              group_name=group, kinds={"mlflow", TRAINER_KINDS[trainer.kind]},
              description=f"Fine-tune a {domain} candidate ({trainer.kind} trainer) on the mature, labelled "
                          f"training window.")
    def candidate_model(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                        pipes_trainer: dg.ResourceParam[dg.PipesClient]) -> dg.Output[TrainingResult]:
        if closed := close_abandoned_runs(warehouse.home(), domain, partial(in_progress, context.instance)):
            context.log.warning(f"closed as FAILED the MLflow runs {closed}: their process died")
        with warehouse.warehouses().reader(domain) as source:  # the days and columns it reads, no copy
            as_of = latest_labelled_day(source, domain)
            mature_until = maturity_cutoff(source, config, domain, as_of)
            result = train_candidate(source, warehouse.home(), config, domain, as_of, mature_until=mature_until,
                                     dagster_run_id=context.run_id, launch=PipesLaunch(pipes_trainer, context))
        return dg.Output(result, metadata={**result.metadata(),
                                           "metrics": dg.MetadataValue.md(result.metrics_markdown())})

    @dg.asset(key=keys["validation_report"], ins={"candidate": dg.AssetIn(keys["candidate_model"])},
              group_name=group, kinds={"mlflow"},
              check_specs=[dg.AssetCheckSpec("gate", asset=keys["validation_report"],
                                             description="the domain's promotion gate: when it does not "
                                                         "pass, registered_candidate is not materialized")],
              description="Candidate vs champion on the held-out (most recent) window: overall, per "
                          "slice, bootstrap CIs, off-policy estimates; the gate decides. When it does not "
                          "pass, the previous cycle's inconclusive candidate is revisited on more days.")
    def validation_report(context: dg.AssetExecutionContext, candidate: TrainingResult,
                          warehouse: WarehouseResource, mlflow: MlflowResource):
        client = mlflow.client()
        champion_uri = registry.alias_uri(client, domain, registry.CHAMPION)
        with warehouse.warehouses().reader(domain) as source:
            report = validate_cycle(source, warehouse.home(), config, domain, candidate.model_uri,
                                    champion_uri, candidate.windows)
        yield dg.Output(report, metadata={**report.metadata(), "report": dg.MetadataValue.md(report.markdown())})
        yield _gate_check(report)

    flywheel_health = build_health_asset(config, domain, keys["candidate_model"], keys["validation_report"])

    @dg.asset(key=keys["registered_candidate"],
              ins={"candidate": dg.AssetIn(keys["candidate_model"]),
                   "report": dg.AssetIn(keys["validation_report"]), "health": dg.AssetIn(keys[HEALTH])},
              group_name=group, kinds={"mlflow"}, output_required=False,
              description="A candidate that passed its gate, registered with its lineage (signed) and aliased "
                          "`candidate`; a domain at automation full also gets its approval here. Not materialized "
                          "when the gate did not pass (see the validation_report's gate check), nor when "
                          "a blocking flywheel_health check failed. Its materialization tells the state "
                          "at registration; each deployment (deploy_champion) and rollback "
                          "(rollback_champion) since is an observation of it (Events): the champion, "
                          "candidate and previous versions as they are then.")
    def registered_candidate(context: dg.AssetExecutionContext, candidate: TrainingResult,
                             report: ValidationReport, health: HealthReport, warehouse: WarehouseResource,
                             mlflow: MlflowResource) -> Iterator[dg.MaterializeResult]:
        accepted = report.accepted
        if accepted is None:
            more = (f" ({report.decision.samples_needed} more held-out samples would decide)"
                    if report.decision.samples_needed is not None else "")
            revisit = f"; revisit: {report.revisit.summary()}" if report.revisit else ""
            context.log.warning(f"not registered: the gate {report.outcome}{more}: "
                                + "; ".join(report.decision.reasons) + revisit)
            return
        client = mlflow.client()
        if accepted.is_revisit:
            candidate = TrainingResult.logged(client, accepted.candidate_model_uri)
            context.log.info(f"registering the revisited candidate {candidate.model_uri}: {accepted.summary()}")
        lineage = {**candidate.lineage(), **accepted.lineage(), "code_version": registry.code_version(),
                   "validation.gate": "passed", "health.flagged": ", ".join(health.flagged) or "none"}
        version = register(client, approval.signing_key(warehouse.home()), domain, candidate.model_uri,
                           candidate.run_id, lineage)
        yield dg.MaterializeResult(metadata={
            "model": registry.model_name(domain), "version": version, "model_uri": candidate.model_uri,
            "health": ", ".join(health.flagged) + " flagged (see flywheel_health)" if health.flagged else "no trap flagged",
            **_next_step(config, domain, version, warehouse, client),
        })

    return [candidate_model, validation_report, flywheel_health, registered_candidate]


def _gate_check(report: ValidationReport) -> dg.AssetCheckResult:
    """Passed when a candidate goes through (this cycle's, or the revisited one); else red for
    evidence of no gain or of harm, yellow when the evidence is not enough yet (inconclusive)."""
    metadata = {"gate": report.outcome, "reasons": "; ".join(report.decision.reasons) or "every gate passed"}
    if report.decision.samples_needed is not None:
        metadata["samples_needed"] = report.decision.samples_needed
    if report.revisit is not None:
        metadata["revisit"] = report.revisit.summary()
        metadata["revisit_gate"] = report.revisit.outcome
    return dg.AssetCheckResult(
        check_name="gate", passed=report.accepted is not None, metadata=metadata,
        severity=dg.AssetCheckSeverity.WARN if report.outcome == "inconclusive" else dg.AssetCheckSeverity.ERROR,
    )


def _next_step(config: FlywheelConfig, domain: str, version: str, warehouse: WarehouseResource,
               client) -> dict[str, object]:
    """A domain at automation full approves itself; below it the candidate waits, with a link that opens
    the approve_candidate Launchpad filled in for it. Said as of registration: a deployment since
    is the asset's latest observation (``champion_observation``)."""
    if config.domain(domain).automation != "full":
        approvers = ", ".join(config.domain(domain).approvers)
        return {
            "next": f"waiting for approval by {approvers} when registered; {DEPLOYMENTS_SINCE}",
            "approve": dg.MetadataValue.md(
                f"**[Approve {domain} v{version}]({approval_launchpad_url(config, domain, version)})**: opens "
                f"approve_candidate's Launchpad filled in; check it and click Launch Run."),
        }
    with warehouse.approvals() as con:
        record = approval.record_auto_approval(con, client, config, approval.signing_key(warehouse.home()),
                                               domain, version)
    return {"next": f"auto-approved (approval {record.approval_id}); the approval sensor deploys it; "
                    f"{DEPLOYMENTS_SINCE}"}


def champion_observation(client: MlflowClient, domain: str, change: str) -> dg.AssetObservation:
    """The registered_candidate asset's state after ``change`` (a deployment or a rollback) moved
    the champion alias: an observation, since no version was registered, their roles changed."""
    aliases = {alias: registry.alias_version(client, domain, alias)
               for alias in (registry.CANDIDATE, registry.PREVIOUS)}
    return dg.AssetObservation(
        asset_key=model_keys(domain)["registered_candidate"], description=change,
        metadata={"champion": registry.champion_summary(client, domain), "change": change,
                  **{alias: f"v{version}" if version else "none" for alias, version in aliases.items()}},
    )
