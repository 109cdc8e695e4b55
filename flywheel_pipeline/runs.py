"""A domain's cycle as people run it: submitted to the instance, followed step by step, and read
back as the gate's outcome and the next step for a person."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

import dagster as dg

from flywheel_pipeline import registry
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.defs.assets import model_keys
from flywheel_pipeline.defs.jobs import accumulation_assets, cycle_job_name
from flywheel_pipeline.defs.partitions import range_tags
from flywheel_pipeline.defs.ui import approval_launchpad_url, run_url
from flywheel_pipeline.launcher import Dagster, LaunchError, Step, failure
from flywheel_pipeline.run_range import ACCUMULATE

OUTCOME_EVENTS = {dg.DagsterEventType.ASSET_MATERIALIZATION, dg.DagsterEventType.ASSET_CHECK_EVALUATION}


@dataclass
class CycleOutcome:
    """What one cycle run decided: the gate's outcome, its evidence, and what was registered."""

    domain: str
    run_id: str
    status: dg.DagsterRunStatus
    gate: str | None = None  # passed | failed | inconclusive; None when validation never ran
    reasons: str = ""
    revisit: str = ""  # the previous inconclusive candidate's second look, when there was one
    revisit_gate: str = ""
    evidence: dict[str, object] = field(default_factory=dict)  # validation_report's headline metadata
    candidate: dict[str, object] = field(default_factory=dict)  # candidate_model's metadata (model_uri, windows)
    version: str | None = None  # registered candidate version
    next_step: str = ""
    failed_checks: list[str] = field(default_factory=list)  # ``check_failure`` of each, the gate aside
    failure: str = ""  # why the run did not succeed (launcher.failure)
    only: str | None = None  # ACCUMULATE: the run covered accumulation and labels only

    @property
    def succeeded(self) -> bool:
        return self.status == dg.DagsterRunStatus.SUCCESS

    def held_out(self, detail: bool = True) -> str:
        """``dr 0.812 vs 0.655 (+0.1570 [+0.1203, +0.1911])``: the candidate against the champion,
        held out (without ``detail``: ``0.812 vs 0.655``). Values to 3 decimals, as the true
        accuracies beside them; the difference and its interval signed to 4, as the gate's reasons
        and the revisit's summary say them."""
        e = self.evidence
        if "primary_metric" not in e:
            return ""
        values = f"{_estimate(e['candidate'])} vs {_estimate(e['champion'])}"
        if not detail or not (isinstance(e["difference"], int | float) and math.isfinite(e["difference"])):
            return values if not detail else f"{e['primary_metric']} {values}"
        return f"{e['primary_metric']} {values} ({e['difference']:+.4f} {e['difference_ci']})"


def _estimate(value: float | str, spec: str = ".3f") -> str:
    """A value of the gate's metadata: a number formatted, or the text saying why there is none
    ("undefined", "outside 0..1 (...): no estimate")."""
    return format(value, spec) if isinstance(value, int | float) and math.isfinite(value) else str(value)


def run_cycle(dagster: Dagster, domain: str, first: date, last: date,
              on_step: Callable[[Step], None] = lambda step: None,
              on_submit: Callable[[str], None] = lambda run_id: None,
              only: str | None = None) -> CycleOutcome:
    """Submit ``domain``'s cycle over first..last (``only`` ACCUMULATE: its accumulation and
    labels), follow it, and read back what it decided; refused while another run of the domain's
    cycle is queued or in progress."""
    run_id = submit_cycle(dagster, domain, first, last, only)
    on_submit(run_id)
    return follow_cycle(dagster, domain, run_id, on_step)


def submit_cycle(dagster: Dagster, domain: str, first: date, last: date,
                 only: str | None = None) -> str:
    """Queue ``domain``'s cycle over first..last (``only`` ACCUMULATE: its accumulation_assets);
    the queue runs other domains' cycles beside it. Refused while another run of the domain's
    cycle is queued or in progress."""
    job = cycle_job_name(domain)
    if running := dagster.active_runs(job):
        raise LaunchError(f"domain {domain} is already running (run {running[-1].run_id}, "
                          f"{running[-1].status.value.lower()}): run it again once that run has ended")
    assets = accumulation_assets() if only == ACCUMULATE else None
    return dagster.submit(job, range_tags(domain, first, last), assets=assets)


def follow_cycle(dagster: Dagster, domain: str, run_id: str,
                 on_step: Callable[[Step], None] = lambda step: None) -> CycleOutcome:
    """Follow a submitted cycle run to its end and read back what it decided."""
    return read_outcome(dagster.instance, domain, dagster.wait(run_id, on_step))


def read_outcome(instance: dg.DagsterInstance, domain: str, run: dg.DagsterRun) -> CycleOutcome:
    keys = model_keys(domain)
    outcome = CycleOutcome(domain, run.run_id, run.status)
    if run.status != dg.DagsterRunStatus.SUCCESS:
        outcome.failure = failure(instance, run.run_id)
    if run.asset_selection is not None and keys["candidate_model"] not in run.asset_selection:
        outcome.only = ACCUMULATE
    for record in instance.get_records_for_run(run.run_id, of_type=OUTCOME_EVENTS).records:
        event = record.event_log_entry.dagster_event
        if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            evaluation = event.event_specific_data
            if not evaluation.passed and evaluation.check_name != "gate":
                outcome.failed_checks.append(check_failure(evaluation))
            if evaluation.asset_key == keys["validation_report"] and evaluation.check_name == "gate":
                outcome.gate = _value(evaluation.metadata, "gate")
                outcome.reasons = _value(evaluation.metadata, "reasons")
                outcome.revisit = _value(evaluation.metadata, "revisit")
                outcome.revisit_gate = _value(evaluation.metadata, "revisit_gate")
        elif event.asset_key == keys["candidate_model"]:
            outcome.candidate = {k: v.value for k, v in event.materialization.metadata.items()}
        elif event.asset_key == keys["validation_report"]:
            outcome.evidence = {k: v.value for k, v in event.materialization.metadata.items() if k != "report"}
        elif event.asset_key == keys["registered_candidate"]:
            metadata = event.materialization.metadata
            outcome.version = str(_value(metadata, "version"))
            outcome.next_step = _value(metadata, "next")
    return outcome


def check_failure(evaluation: dg.AssetCheckEvaluation) -> str:
    """``accumulated_traffic (error): expect_column_mean_to_be_between(is_exploration): observed
    0.0, expected 0.05..0.2``: a failed check, its severity and what it observed against what it
    expected (a GX suite's ``failures``; a dbt test's failing rows)."""
    metadata = evaluation.metadata
    detail = _value(metadata, "failures") or _value(metadata, "measured") or (
        f"{_value(metadata, 'dagster_dbt/failed_row_count')} failing rows"
        if "dagster_dbt/failed_row_count" in metadata else "")
    severity = evaluation.severity.value.lower() if evaluation.severity else "error"
    return f"{evaluation.check_name} ({severity})" + (f": {detail}" if detail else "")


def _value(metadata, key: str):
    return metadata[key].value if key in metadata else ""


def wait_for_deployment(dagster: Dagster, config: FlywheelConfig, domain: str, version: str,
                        client) -> dg.DagsterRun:
    """Wait for the approval sensor to launch (and the daemon to finish) the deployment of ``version``."""
    deadline = time.monotonic() + config.daemon.approval_sensor_seconds + 600
    tags = {"flywheel/domain": domain, "flywheel/version": version}
    while time.monotonic() < deadline:
        runs = dagster.instance.get_runs(filters=dg.RunsFilter(job_name="deploy_champion", tags=tags), limit=1)
        if runs:
            return dagster.wait(runs[0].run_id)
        time.sleep(2)
    raise LaunchError(f"no deployment of {domain} v{version} after {config.daemon.approval_sensor_seconds + 600}s; "
                      f"is the approval sensor running? (current champion: "
                      f"{registry.shown_champion(registry.alias_version(client, domain, registry.CHAMPION))})")


def next_step_for_person(config: FlywheelConfig, outcome: CycleOutcome) -> str:
    """One line a person can act on after a cycle."""
    if not outcome.succeeded:
        return (f"the run {outcome.status.value.lower()}: {outcome.failure}; its steps and logs: "
                f"{run_url(config, outcome.run_id)}")
    if outcome.only == ACCUMULATE:
        return (f"accumulated and labelled; the next cycle trains on them: flywheel run --domain "
                f"{outcome.domain}")
    if outcome.version is None:
        return f"nothing to approve: the gate {outcome.gate or 'did not run'}"
    if config.domain(outcome.domain).automation == "full":
        return "auto-approved; the approval sensor deploys it"
    approvers = config.domain(outcome.domain).approvers
    return (f"approve in the UI: {approval_launchpad_url(config, outcome.domain, outcome.version)}\n"
            f"  or: flywheel approve --domain {outcome.domain} --version {outcome.version} "
            f"--approver {approvers[0] if approvers else '<you>'} --sign-with ~/.ssh/id_ed25519")
