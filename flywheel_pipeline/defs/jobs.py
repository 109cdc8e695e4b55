"""The jobs: each domain's cycle, what a person launches from the Launchpad, what the sensor launches.

    <domain>_cycle      accumulate -> filter -> label (-> review queue) -> fine-tune -> validate -> register
                        (schedules; at automation semi accumulate -> filter -> label only, the
                        accumulation_assets); an assistant domain's training sets too, from its labels
    <domain>_relabel    rebuild the dbt models and labels of the days late outcomes reached
                        (launched by the late-label sensor)
    approve_candidate   record a person's approval or rejection of a candidate version
    deploy_champion     move `champion` to an approved version (launched by the approval sensor)
    rollback_champion   put the previous champion back
    enforce_retention   delete events older than each domain's retention_days (daily schedule)
"""

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from functools import cache
from typing import Literal

import dagster as dg
from pydantic import Field

from flywheel_pipeline import approval, privacy, registry
from flywheel_pipeline.defs.assets import LABELS, champion_observation, model_keys
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.defs.review import REVIEW_QUEUE
from flywheel_pipeline.defs.training_sets import training_sets_group
from flywheel_pipeline.defs.transform import DBT_MODELS, RAW_EVENTS, dbt_model_keys

WAREHOUSE = "flywheel/warehouse"
LATE_LABELS_TAG = {"flywheel/reason": "late-labels"}
# What a late outcome changes: the dbt models' partitions of the interactions it reacts to (rebuilt
# together, so the marts stay consistent with each other and their tests pass) and their labels.
# Never accumulation: the outcome is already in raw.
RELABEL_SELECTION = DBT_MODELS | dg.AssetSelection.assets(LABELS)
# A person's decision and a deployment take seconds: one that hangs is terminated after 10 minutes
# (the instance's run monitoring). They write only the approvals' file, in short transactions.
QUICK_JOB_TAGS = {"dagster/max_runtime": "600"}


def warehouse_tags(domain: str) -> dict[str, str]:
    """The tags of a run that writes ``domain``'s warehouse: the run queue starts one such run per
    domain at a time (its DuckDB file has one writer), and runs of different domains side by side."""
    return {WAREHOUSE: domain, "flywheel/domain": domain}


def cycle_job_name(domain: str) -> str:
    return f"{domain}_cycle"


def accumulation_assets() -> list[dg.AssetKey]:
    """What a cycle run limited to accumulation materializes (with their checks): the landing
    batches into raw tables, the dbt models, and labels; no training. `flywheel run --only
    accumulate` submits it, and so does the cadence schedule of a domain at automation semi."""
    return [RAW_EVENTS, *dbt_model_keys(), LABELS]


def cycle_job(domain: str):  # an unresolved asset job (its type is not public)
    """A domain's whole cycle as one run over a range of its days (the partitions come from the assets)."""
    selection = (dg.AssetSelection.assets(RAW_EVENTS, LABELS, REVIEW_QUEUE, *model_keys(domain).values())
                 | DBT_MODELS | dg.AssetSelection.groups(training_sets_group(domain)))
    return dg.define_asset_job(
        cycle_job_name(domain), selection=selection,
        tags=warehouse_tags(domain),
        description=f"{domain}: accumulate -> filter (dbt + GX) -> label -> fine-tune -> validate -> register",
    )


def relabel_job_name(domain: str) -> str:
    return f"{domain}_relabel"


@cache  # one definition per domain: the sensor that launches it and the Definitions share it
def relabel_job(domain: str):  # an unresolved asset job, as cycle_job
    """A domain's re-labelling of a range of its days: the dbt models, then labels (the partitions
    come from the run's range tags, as the cycle's)."""
    return dg.define_asset_job(
        relabel_job_name(domain), selection=RELABEL_SELECTION,
        tags={**LATE_LABELS_TAG, **warehouse_tags(domain)},
        description=f"{domain}: rebuild the dbt models and labels of the days late outcomes or reviews "
                    f"reached (launched by the late_label_sensor)",
    )


@contextmanager
def refusal_as_failure() -> Iterator[None]:
    """A refused decision or deployment fails the run, with the reason as its message."""
    try:
        yield
    except approval.ApprovalError as refused:
        raise dg.Failure(str(refused), metadata={"refused": str(refused)}) from None


class ApprovalConfig(dg.Config):
    domain: str = Field(description="the domain whose candidate is decided, e.g. recommendation")
    version: str = Field(description="the registered model version (see the registered_candidate asset)")
    approver: str = Field(description="your name, as listed under the domain's approvers in flywheel.yaml")
    decision: Literal["approved", "rejected"] = "approved"
    reason: str = Field("", description="why; required when rejecting")
    signature: str = Field("", description="your SSH signature of the decision's statement: `flywheel keys "
                                           "statement --domain D --version V | ssh-keygen -Y sign -n "
                                           "flywheel-approval -f ~/.ssh/id_ed25519` prints it (docs/security.md)")


@dg.op(description="Record an approval or rejection of a candidate; the approval sensor deploys approvals.")
def record_approval(context: dg.OpExecutionContext, config: ApprovalConfig,
                    warehouse: WarehouseResource, mlflow: MlflowResource) -> None:
    with warehouse.approvals() as con, refusal_as_failure():
        record = approval.record_decision(con, mlflow.client(), warehouse.config(),
                                          approval.signing_key(warehouse.home()), config.domain,
                                          config.version, config.decision, config.approver,
                                          config.reason or None, config.signature)
    context.log.info(f"approval {record.approval_id}: {record.decision} {config.domain} v{config.version}")
    context.add_output_metadata({"approval_id": record.approval_id, "decision": record.decision})


class DeployConfig(dg.Config):
    approval_id: int = Field(description="the approval record to deploy")


@dg.op(description="Verify an approval again (signature chain, approver and their signature, signed lineage and "
                   "the model's files, validation run, the registry's aliases) and move the champion alias to "
                   "the version it names; the old one becomes previous.")
def deploy_approved(context: dg.OpExecutionContext, config: DeployConfig,
                    warehouse: WarehouseResource, mlflow: MlflowResource) -> None:
    client = mlflow.client()
    with warehouse.approvals() as con, refusal_as_failure():
        record, old = approval.deploy(con, client, warehouse.config(), approval.signing_key(warehouse.home()),
                                      config.approval_id)
    new = record.model_version
    context.log.info(f"v{new} was already the champion" if new == old
                     else f"champion is now v{new} (previous: {registry.shown_champion(old)})")
    context.log_event(champion_observation(
        client, record.domain, f"deploy_champion deployed v{new}, approved by {record.approver} "
                               f"(approval {record.approval_id})"))


class RollbackConfig(dg.Config):
    domain: str = Field(description="the domain whose previous champion is restored")


@dg.op(description="Put the previous champion back, once the registry's aliases are the ones flywheel set and "
                   "its signed lineage and model's files still hold.")
def restore_previous(context: dg.OpExecutionContext, config: RollbackConfig, warehouse: WarehouseResource,
                     mlflow: MlflowResource) -> None:
    client = mlflow.client()
    with warehouse.approvals() as con, refusal_as_failure():
        rolled_back, restored = approval.rollback(con, client, approval.signing_key(warehouse.home()), config.domain)
    context.log.info(f"{config.domain}: rolled back v{rolled_back}, champion is v{restored} again")
    context.log_event(champion_observation(client, config.domain,
                                           f"rollback_champion rolled back v{rolled_back}"))


@dg.job(tags=QUICK_JOB_TAGS, description="A person approves or rejects a candidate (launch from the Launchpad).")
def approve_candidate() -> None:
    record_approval()


@dg.job(tags=QUICK_JOB_TAGS, description="Deploy an approved candidate as champion (launched by the approval sensor).")
def deploy_champion() -> None:
    deploy_approved()


@dg.job(description="Restore the previous champion of a domain.")
def rollback_champion() -> None:
    restore_previous()


class RetentionConfig(dg.Config):
    domain: str = Field(description="the domain whose expired events are deleted")
    today: str = Field("", description="the day retention counts back from (YYYY-MM-DD); default: today (UTC)")


@dg.op(description="Delete the events of a domain's days older than its retention_days: their rows in "
                   "every table and their landing batches.")
def delete_expired(context: dg.OpExecutionContext, config: RetentionConfig, warehouse: WarehouseResource) -> None:
    today = date.fromisoformat(config.today) if config.today else datetime.now(UTC).date()
    settings = warehouse.config().domain(config.domain)
    report = privacy.enforce_retention(warehouse.home(), config.domain, settings.retention_days, today,
                                       warehouse.warehouses().for_deletion)
    context.log.info(f"{report.domain}: deleted {sum(report.rows_deleted.values())} rows and "
                     f"{len(report.batches_deleted)} landing batches before {report.cutoff}")
    context.add_output_metadata(report.metadata())


@dg.job(description="Delete a domain's events older than its retention_days (docs/privacy.md); the daily "
                    "schedule launches one run per domain, tagged with its warehouse.")
def enforce_retention() -> None:
    delete_expired()
