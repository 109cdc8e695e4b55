"""Human approval: the record that stands between a candidate and the champion alias.

A decision (approve or reject, who, why) is appended to ``registry.approvals`` and mirrored as tags
on the model version. Only an approved record lets deployment move ``champion``; a domain whose
automation level is ``auto`` gets its record from flywheel itself when every gate passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import duckdb
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flywheel_pipeline import registry
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.warehouse import transaction

AUTO_APPROVER = "flywheel:auto"
Decision = Literal["approved", "rejected"]

_DDL = """
CREATE SCHEMA IF NOT EXISTS registry;
CREATE SEQUENCE IF NOT EXISTS registry.approval_ids;
CREATE TABLE IF NOT EXISTS registry.approvals (
    approval_id BIGINT PRIMARY KEY DEFAULT nextval('registry.approval_ids'),
    domain VARCHAR NOT NULL, model_version VARCHAR NOT NULL, decision VARCHAR NOT NULL,
    approver VARCHAR NOT NULL, reason VARCHAR, decided_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS registry.deployments (
    approval_id BIGINT PRIMARY KEY, domain VARCHAR NOT NULL, model_version VARCHAR NOT NULL,
    previous_version VARCHAR, deployed_at TIMESTAMP NOT NULL
);
"""


class ApprovalError(ValueError):
    """A decision that cannot be recorded (unknown version, failed gate, unknown approver...)."""


@dataclass(frozen=True)
class ApprovalRecord:
    approval_id: int
    domain: str
    model_version: str
    decision: Decision
    approver: str
    reason: str | None


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(_DDL)


def check_decision(client: MlflowClient, config: FlywheelConfig, domain: str, version: str,
                   decision: str, approver: str) -> None:
    domain_config = config.domain(domain)
    if decision not in ("approved", "rejected"):
        raise ApprovalError(f"decision must be 'approved' or 'rejected', got {decision!r}")
    allowed = [*domain_config.approvers, *([AUTO_APPROVER] if domain_config.automation == "auto" else [])]
    if approver not in allowed:
        raise ApprovalError(f"{approver!r} may not decide for domain {domain!r}; approvers: {allowed}")
    try:
        tags = registry.version_tags(client, domain, version)
    except MlflowException:
        raise ApprovalError(f"{registry.model_name(domain)} has no version {version!r}") from None
    if decision == "approved" and tags.get("validation.gate") != "passed":
        raise ApprovalError(f"version {version} of {domain} did not pass its validation gate")


def record_decision(con: duckdb.DuckDBPyConnection, client: MlflowClient, config: FlywheelConfig,
                    domain: str, version: str, decision: Decision, approver: str,
                    reason: str | None = None) -> ApprovalRecord:
    """Append an approval or rejection and tag the model version with it."""
    check_decision(client, config, domain, version, decision, approver)
    ensure_tables(con)
    with transaction(con):
        approval_id = con.execute(
            """INSERT INTO registry.approvals (domain, model_version, decision, approver, reason, decided_at)
               VALUES (?, ?, ?, ?, ?, ?) RETURNING approval_id""",
            [domain, version, decision, approver, reason, datetime.now(UTC).replace(tzinfo=None)],
        ).fetchone()[0]
    name = registry.model_name(domain)
    for key, value in {"approval.decision": decision, "approval.approver": approver,
                       "approval.reason": reason or "", "approval.id": str(approval_id)}.items():
        client.set_model_version_tag(name, version, key, value)
    if decision == "rejected" and registry.alias_version(client, domain, registry.CANDIDATE) == version:
        client.delete_registered_model_alias(name, registry.CANDIDATE)
    return ApprovalRecord(approval_id, domain, version, decision, approver, reason)


def _records(con: duckdb.DuckDBPyConnection, condition: str, params: list) -> list[ApprovalRecord]:
    """Approval records matching ``condition`` (a WHERE clause and its ordering)."""
    ensure_tables(con)
    rows = con.execute(
        "SELECT approval_id, domain, model_version, decision, approver, reason "
        f"FROM registry.approvals WHERE {condition}",
        params,
    ).fetchall()
    return [ApprovalRecord(*row) for row in rows]


def decisions_after(con: duckdb.DuckDBPyConnection, approval_id: int) -> list[ApprovalRecord]:
    """Decisions recorded after ``approval_id`` and not deployed yet, oldest first."""
    return _records(
        con,
        "approval_id > ? AND approval_id NOT IN (SELECT approval_id FROM registry.deployments) "
        "ORDER BY approval_id",
        [approval_id],
    )


def approval_for(con: duckdb.DuckDBPyConnection, approval_id: int) -> ApprovalRecord | None:
    return next(iter(_records(con, "approval_id = ?", [approval_id])), None)


def latest_decision(con: duckdb.DuckDBPyConnection, domain: str, version: str) -> ApprovalRecord | None:
    records = _records(con, "domain = ? AND model_version = ? ORDER BY approval_id DESC LIMIT 1",
                       [domain, version])
    return next(iter(records), None)


def deploy(con: duckdb.DuckDBPyConnection, client: MlflowClient, approval_id: int) -> tuple[str, str | None]:
    """Move ``champion`` to the version an approved record names. Returns (new, old) champion."""
    record = approval_for(con, approval_id)
    if record is None or record.decision != "approved":
        raise ApprovalError(f"approval {approval_id} does not approve a deployment")
    latest = latest_decision(con, record.domain, record.model_version)
    if latest.approval_id != record.approval_id:
        raise ApprovalError(f"approval {approval_id} was superseded by decision {latest.approval_id} ({latest.decision})")
    previous = registry.promote(client, record.domain, record.model_version)
    con.execute(
        "INSERT OR IGNORE INTO registry.deployments VALUES (?, ?, ?, ?, ?)",
        [approval_id, record.domain, record.model_version, previous,
         datetime.now(UTC).replace(tzinfo=None)],
    )
    return record.model_version, previous
