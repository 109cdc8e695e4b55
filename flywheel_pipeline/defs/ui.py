"""Links into the Dagster UI: what the CLI prints and asset metadata shows a person."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.launcher import LOCATION
from flywheel_pipeline.signatures import sign_command

REPOSITORY = f"__repository__@{LOCATION}"
APPROVE_JOB, APPROVE_OP = "approve_candidate", "record_approval"


def job_url(config: FlywheelConfig, job: str) -> str:
    return f"{config.ui_url}/locations/{REPOSITORY}/jobs/{job}"


def run_url(config: FlywheelConfig, run_id: str) -> str:
    return f"{config.ui_url}/runs/{run_id}"


def approval_run_config(config: FlywheelConfig, domain: str, version: str) -> str:
    """The approve_candidate Launchpad config for one candidate, as YAML a person can edit."""
    approvers = config.domain(domain).approvers
    return (
        f"ops:\n  {APPROVE_OP}:\n    config:\n"
        f"      domain: {domain}\n      version: \"{version}\"\n"
        f"      approver: {approvers[0] if approvers else '<you>'}  # you: one of {approvers}\n"
        f"      decision: approved  # or rejected, with a reason\n"
        f"      reason: \"\"\n"
        f"      signature: \"\"  # yours, as `signature: |` and its lines indented; made by: flywheel keys statement "
        f"--domain {domain} --version {version} | {sign_command()}\n"
    )


def approval_launchpad_url(config: FlywheelConfig, domain: str, version: str) -> str:
    """The approve_candidate Launchpad, opened with this candidate's config filled in."""
    query = urlencode({"config": approval_run_config(config, domain, version)}, quote_via=quote)
    return f"{job_url(config, APPROVE_JOB)}/playground/setup?{query}"
