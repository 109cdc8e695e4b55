"""Human approval: the record that stands between a candidate and the champion alias.

A decision (approve or reject, who, why) is appended to ``registry.approvals`` and mirrored as tags
on the model version. A person's decision counts only with their own SSH signature of the decision's
``statement`` (the domain, the version, its model's digest), made with a key flywheel.yaml declares
for them (``approver_keys``; flywheel_pipeline/signatures.py). A domain at automation level ``full``
gets its approval from the pipeline itself (``flywheel:auto``) when every gate passed.

The records are append-only and tamper-evident: each is signed with an HMAC over its fields (the
approver's signature among them) and the previous record's signature, with a key kept outside the
warehouse (``signing_key``). A row inserted, edited or deleted by hand breaks the chain from that
row on, and nothing deploys until the chain is whole again (docs/operations.md). Deployment trusts
no earlier check: it re-verifies the chain, the approver and their signature against flywheel.yaml
as it is now, the version's signed lineage and its model's files (flywheel_pipeline/lineage.py), and
that the registry's aliases are the ones flywheel set (flywheel_pipeline/deployment_log.py); docs/security.md.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import duckdb
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flywheel_pipeline import deployment_log, lineage, registry, signatures
from flywheel_pipeline.config import AUTO_APPROVER, DomainConfig, FlywheelConfig
from flywheel_pipeline.home import Home
from flywheel_pipeline.warehouse import transaction

KEY_ENV = "FLYWHEEL_APPROVAL_KEY_FILE"
AUTO_REASON = "automation=full and every gate passed"
LINEAGE_TAGS = ("training.run_id", "validation.run_id", "validation.gate")
Decision = Literal["approved", "rejected"]

_FIELDS = "approval_id, domain, model_version, decision, approver, reason, decided_at, approver_signature"
_DDL = """
CREATE SCHEMA IF NOT EXISTS registry;
CREATE SEQUENCE IF NOT EXISTS registry.approval_ids;
CREATE TABLE IF NOT EXISTS registry.approvals (
    approval_id BIGINT PRIMARY KEY DEFAULT nextval('registry.approval_ids'),
    domain VARCHAR NOT NULL, model_version VARCHAR NOT NULL, decision VARCHAR NOT NULL,
    approver VARCHAR NOT NULL, reason VARCHAR, decided_at TIMESTAMP NOT NULL, signature VARCHAR
);
ALTER TABLE registry.approvals ADD COLUMN IF NOT EXISTS signature VARCHAR;  -- records from before signing
ALTER TABLE registry.approvals ADD COLUMN IF NOT EXISTS approver_signature VARCHAR;  -- a person's, over the statement
CREATE TABLE IF NOT EXISTS registry.deployments (
    approval_id BIGINT PRIMARY KEY, domain VARCHAR NOT NULL, model_version VARCHAR NOT NULL,
    previous_version VARCHAR, deployed_at TIMESTAMP NOT NULL
);
"""


class ApprovalError(ValueError):
    """A decision that cannot be recorded or deployed (unknown approver, failed gate, broken chain...)."""


@dataclass(frozen=True)
class ApprovalRecord:
    approval_id: int
    domain: str
    model_version: str
    decision: Decision
    approver: str
    reason: str | None
    decided_at: datetime
    approver_signature: str | None = None  # the person's SSH signature; None for flywheel:auto


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(_DDL)


# --- the signing key and the chain ---------------------------------------------------------------

def key_path(home: Home) -> Path:
    """$FLYWHEEL_APPROVAL_KEY_FILE, else ``<home>/secrets/approval.key``."""
    return Path(os.environ.get(KEY_ENV) or home.root / "secrets" / "approval.key")


def signing_key(home: Home) -> bytes:
    """The key approval records are signed with. The default file is created (mode 0600) on first
    use; a file named by $FLYWHEEL_APPROVAL_KEY_FILE must exist; either must be private to its owner."""
    path = key_path(home)
    if not path.exists():
        if os.environ.get(KEY_ENV):
            raise ApprovalError(f"{KEY_ENV} names {path}, which does not exist")
        _create_key(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ApprovalError(f"the approval key {path} is open to others (mode {mode:o}): chmod 600 {path}")
    key = path.read_bytes().strip()
    if len(key) < 32:
        raise ApprovalError(f"the approval key {path} is too short ({len(key)} bytes, 32 needed)")
    return key


def _create_key(path: Path) -> None:
    """Write a random key, atomically: a process that loses the race keeps the winner's key."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    with os.fdopen(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        file.write(secrets.token_hex(32))
    try:
        os.link(draft, path)
    except FileExistsError:
        pass
    finally:
        draft.unlink()


def _sign(key: bytes, record: ApprovalRecord, previous_signature: str) -> str:
    """The record's HMAC; a person's signature is sealed with it (records without one, the pipeline's
    and those from before people signed, keep the fields they were signed with)."""
    fields = [record.approval_id, record.domain, record.model_version, record.decision, record.approver,
              record.reason, record.decided_at.isoformat(), previous_signature]
    return signatures.seal(key, fields + ([record.approver_signature] if record.approver_signature else []))


def verify_chain(con: duckdb.DuckDBPyConnection, key: bytes) -> str:
    """Check every record's signature in order; returns the last one ('' for no records).
    Raises ApprovalError naming the first record that breaks the chain."""
    ensure_tables(con)
    previous = ""
    for *fields, signature in con.execute(
            f"SELECT {_FIELDS}, signature FROM registry.approvals ORDER BY approval_id").fetchall():
        record = ApprovalRecord(*fields)
        if signature is None:
            raise ApprovalError(f"approval record {record.approval_id} breaks the approval chain: it is not "
                                f"signed (written by hand, not by flywheel)")
        if not hmac.compare_digest(signature, _sign(key, record, previous)):
            raise ApprovalError(
                f"approval record {record.approval_id} breaks the approval chain: its signature does not match "
                f"(the record was changed, a record before it was removed, or the approval key was replaced)")
        previous = signature
    return previous


# --- who may decide, and what a version must show ------------------------------------------------

def check_person(domain: str, domain_config: DomainConfig, approver: str) -> None:
    """A person deciding for ``domain``: listed under its approvers, and never the pipeline's identity."""
    if approver == AUTO_APPROVER:
        raise ApprovalError(f"{AUTO_APPROVER!r} is the pipeline's own identity; a person decides under their "
                            f"own name (approvers of {domain!r}: {domain_config.approvers})")
    if approver not in domain_config.approvers:
        raise ApprovalError(f"{approver!r} may not decide for domain {domain!r}; approvers: {domain_config.approvers}")


def check_passed_gate(client: MlflowClient, key: bytes, domain: str, version: str) -> lineage.Lineage:
    """The version was registered by a flywheel cycle after its validation run passed the gate: its
    lineage record carries flywheel's signature and still matches the version and its model's files
    (``lineage.verify``), and the validation run it names, in MLflow, finished with the gate passed
    for this very model. Tags alone prove nothing: anyone who can write to MLflow can set them."""
    name = registry.model_name(domain)
    _model_version(client, domain, version)
    try:
        record = lineage.verify(client, key, domain, version)
    except lineage.LineageError as error:
        raise ApprovalError(str(error)) from None
    run_id = record.validation_run_id
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ApprovalError(f"{name} v{version}: its validation run {run_id} is not in MLflow") from None
    run_tags = run.data.tags
    if (run_tags.get("flywheel.stage"), run_tags.get("flywheel.domain")) != ("validation", domain):
        raise ApprovalError(f"{name} v{version}: run {run_id} is not a validation run of {domain}")
    if run.info.status != "FINISHED" or run_tags.get("flywheel.gate.outcome") != "passed":
        raise ApprovalError(f"version {version} of {domain} did not pass its validation gate: validation run "
                            f"{run_id} is {run.info.status} with gate {run_tags.get('flywheel.gate.outcome')!r}")
    if run_tags.get("flywheel.candidate_model_uri") != record.source:
        raise ApprovalError(f"{name} v{version}: validation run {run_id} validated "
                            f"{run_tags.get('flywheel.candidate_model_uri')}, not this version's model {record.source}")
    return record


def _model_version(client: MlflowClient, domain: str, version: str):
    try:
        return client.get_model_version(registry.model_name(domain), version)
    except MlflowException:
        raise ApprovalError(f"{registry.model_name(domain)} has no version {version!r}") from None


def check_decision(client: MlflowClient, config: FlywheelConfig, key: bytes, domain: str, version: str,
                   decision: str, approver: str, reason: str | None) -> None:
    """What a person may record (their signature aside: ``check_signature``): raises ApprovalError
    saying why not."""
    if decision not in ("approved", "rejected"):
        raise ApprovalError(f"decision must be 'approved' or 'rejected', got {decision!r}")
    if decision == "rejected" and not (reason or "").strip():
        raise ApprovalError("a rejection needs a reason")
    check_person(domain, config.domain(domain), approver)
    _model_version(client, domain, version)
    champion = registry.alias_version(client, domain, registry.CHAMPION)
    if decision == "approved":
        check_passed_gate(client, key, domain, version)
        if champion == version:
            raise ApprovalError(f"{domain} v{version} is already the champion: nothing to deploy")
    elif champion == version:
        previous = registry.alias_version(client, domain, registry.PREVIOUS)
        raise ApprovalError(
            f"{domain} v{version} is the serving champion; a rejection would not take it down. "
            + (f"Roll back to v{previous} first (`flywheel rollback --domain {domain}` or the rollback_champion "
               f"job), then reject it." if previous else "There is no previous champion to roll back to."))


# --- a person's signature ------------------------------------------------------------------------

def statement(con: duckdb.DuckDBPyConnection, client: MlflowClient, domain: str, version: str, decision: str,
              before: int | None = None, artifact: str | None = None) -> signatures.Statement:
    """What an approver signs for a decision on ``version``: its model's digest (``artifact``, by
    default hashed from the artifact store now) and the decision's number among the version's
    decisions (counting those recorded before approval ``before``; by default all of them)."""
    ensure_tables(con)
    [(earlier,)] = con.execute(
        "SELECT count(*) FROM registry.approvals WHERE domain = ? AND model_version = ? "
        "AND approval_id < coalesce(?, approval_id + 1)", [domain, version, before]).fetchall()
    if artifact is None:
        try:
            artifact = lineage.artifact_digest(client, domain, version)
        except lineage.LineageError as error:
            raise ApprovalError(str(error)) from None
    return signatures.Statement(domain, version, artifact, decision, earlier + 1)


def how_to_sign(statement: signatures.Statement) -> str:
    reject = " --reject" if statement.decision == "rejected" else ""
    which = f"--domain {statement.domain} --version {statement.version}{reject}"
    return (f"Sign it with your SSH key: `flywheel keys statement {which} | {signatures.sign_command()}` prints "
            f"the signature to give (the Launchpad's `signature`), or `flywheel approve {which} --approver <you> "
            f"--sign-with ~/.ssh/id_ed25519` signs and records it (docs/security.md)")


def check_signature(config: FlywheelConfig, approver: str, statement: signatures.Statement,
                    signature: str | None) -> None:
    """``signature`` is the approver's SSH signature of ``statement``, by one of the keys flywheel.yaml
    declares for them now (``approver_keys``); raises ApprovalError saying why not."""
    keys = config.approver_keys.get(approver, [])
    if not keys:
        raise ApprovalError(f"{approver!r} has no signing key in flywheel.yaml (approver_keys.{approver}): nobody "
                            f"can decide as them until their SSH public key is declared there (docs/security.md)")
    if not (signature or "").strip():
        raise ApprovalError(f"a decision as {approver!r} needs their signature of this statement:\n"
                            f"{statement.text}{how_to_sign(statement)}")
    if not signatures.signed_by(keys, statement.text, signature):
        raise ApprovalError(f"the signature is not {approver!r}'s signature of this decision: it does not verify "
                            f"with their keys in flywheel.yaml (approver_keys.{approver}) over the statement:\n"
                            f"{statement.text}{how_to_sign(statement)}")


# --- recording decisions ---------------------------------------------------------------------------

def record_decision(con: duckdb.DuckDBPyConnection, client: MlflowClient, config: FlywheelConfig, key: bytes,
                    domain: str, version: str, decision: Decision, approver: str, reason: str | None = None,
                    signature: str | None = None) -> ApprovalRecord:
    """A person's approval or rejection, with their signature of its statement, appended to the chain
    and tagged on the model version."""
    check_decision(client, config, key, domain, version, decision, approver, reason)
    return _append(con, client, config, key, domain, version, decision, approver, reason, signature)


def record_auto_approval(con: duckdb.DuckDBPyConnection, client: MlflowClient, config: FlywheelConfig,
                         key: bytes, domain: str, version: str) -> ApprovalRecord:
    """The pipeline's own approval of an ``automation: full`` domain's candidate that passed its gate."""
    if config.domain(domain).automation != "full":
        raise ApprovalError(f"domain {domain!r} is not automation=full: a person approves its candidates")
    check_passed_gate(client, key, domain, version)
    return _append(con, client, config, key, domain, version, "approved", AUTO_APPROVER, AUTO_REASON)


def record_rollback(con: duckdb.DuckDBPyConnection, client: MlflowClient, config: FlywheelConfig, key: bytes,
                    domain: str, reason: str) -> ApprovalRecord:
    """The pipeline's own approval to put the previous champion back (automation ``full``, a
    regression on the champion's traffic: flywheel_pipeline/monitoring.py), appended to the chain
    like any decision; the approval sensor deploys it through deploy_champion."""
    if config.domain(domain).automation != "full":
        raise ApprovalError(f"domain {domain!r} is automation={config.domain(domain).automation}: a person decides "
                            f"a rollback (`flywheel rollback --domain {domain}` or the rollback_champion job)")
    previous = registry.alias_version(client, domain, registry.PREVIOUS)
    if previous is None:
        raise ApprovalError(f"{domain} has no previous champion to roll back to")
    check_passed_gate(client, key, domain, previous)
    return _append(con, client, config, key, domain, previous, "approved", AUTO_APPROVER, f"rollback: {reason}")


def _append(con: duckdb.DuckDBPyConnection, client: MlflowClient, config: FlywheelConfig, key: bytes, domain: str,
            version: str, decision: Decision, approver: str, reason: str | None,
            signature: str | None = None) -> ApprovalRecord:
    """Sign and append one record (refused on a broken chain; a person's, without their signature of
    its statement), then mirror it as version tags."""
    with transaction(con):
        previous = verify_chain(con, key)
        if approver != AUTO_APPROVER:  # numbered in the transaction: a signature is recorded once
            check_signature(config, approver, statement(con, client, domain, version, decision), signature)
        approval_id = con.execute("SELECT nextval('registry.approval_ids')").fetchone()[0]
        record = ApprovalRecord(approval_id, domain, version, decision, approver, reason,
                                datetime.now(UTC).replace(tzinfo=None), signature)
        con.execute(f"INSERT INTO registry.approvals ({_FIELDS}, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [*astuple(record), _sign(key, record, previous)])
    name = registry.model_name(domain)
    for tag, value in {"approval.decision": decision, "approval.approver": approver,
                       "approval.reason": reason or "", "approval.id": str(approval_id)}.items():
        client.set_model_version_tag(name, version, tag, value)
    if decision == "rejected" and registry.alias_version(client, domain, registry.CANDIDATE) == version:
        client.delete_registered_model_alias(name, registry.CANDIDATE)
    return record


# --- reading and deploying -----------------------------------------------------------------------

def _records(con: duckdb.DuckDBPyConnection, condition: str, params: list) -> list[ApprovalRecord]:
    """Approval records matching ``condition`` (a WHERE clause and its ordering)."""
    ensure_tables(con)
    rows = con.execute(f"SELECT {_FIELDS} FROM registry.approvals WHERE {condition}", params).fetchall()
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


def check_registry(con: duckdb.DuckDBPyConnection, client: MlflowClient, key: bytes, domain: str) -> None:
    """The domain's serving aliases are the ones flywheel set (``deployment_log.check_matches``)."""
    try:
        deployment_log.check_matches(con, client, key, domain)
    except deployment_log.LogError as error:
        raise ApprovalError(str(error)) from None


def check_deployable(con: duckdb.DuckDBPyConnection, client: MlflowClient, config: FlywheelConfig,
                     key: bytes, approval_id: int) -> ApprovalRecord:
    """Everything an approval must show at deploy time, checked again: an unbroken chain, an approval
    not overruled by a later rejection, an approver allowed by flywheel.yaml as it is now and their
    signature by a key it declares now, a version whose signed lineage and model's files still hold,
    and a registry whose aliases flywheel set. Returns the record; raises ApprovalError with the reason."""
    verify_chain(con, key)
    record = approval_for(con, approval_id)
    if record is None:
        raise ApprovalError(f"there is no approval record {approval_id}")
    if record.decision != "approved":
        raise ApprovalError(f"approval {approval_id} does not approve a deployment ({record.decision})")
    latest = latest_decision(con, record.domain, record.model_version)
    if latest.decision == "rejected":
        raise ApprovalError(f"approval {approval_id} was superseded by decision {latest.approval_id} ({latest.decision})")
    tagged = registry.version_tags(client, record.domain, record.model_version).get("approval.id")
    if tagged != str(latest.approval_id):
        raise ApprovalError(f"{registry.model_name(record.domain)} v{record.model_version} names decision {tagged} "
                            f"as its latest, the warehouse {latest.approval_id}: a record is missing")
    domain_config = config.domain(record.domain)
    if record.approver == AUTO_APPROVER and domain_config.automation != "full":
        raise ApprovalError(f"approval {approval_id} is by {AUTO_APPROVER} but domain {record.domain!r} is "
                            f"automation={domain_config.automation}: a person must approve it")
    if record.approver != AUTO_APPROVER:
        check_person(record.domain, domain_config, record.approver)
    lineage_record = check_passed_gate(client, key, record.domain, record.model_version)
    if record.approver != AUTO_APPROVER:
        check_signature(config, record.approver, statement(con, client, record.domain, record.model_version,
                                                           record.decision, before=approval_id,
                                                           artifact=lineage_record.artifact),
                        record.approver_signature)
    check_registry(con, client, key, record.domain)
    return record


def deploy(con: duckdb.DuckDBPyConnection, client: MlflowClient, config: FlywheelConfig, key: bytes,
           approval_id: int) -> tuple[ApprovalRecord, str | None]:
    """Move ``champion`` to the version a verified approval names, and log the aliases it left.
    Returns the approval deployed and the champion before it (None: the baseline)."""
    record = check_deployable(con, client, config, key, approval_id)
    monitor = config.domain(record.domain).monitor
    previous = registry.promote(client, record.domain, record.model_version,
                                registry.Holdback(monitor.holdback, monitor.holdback_days))
    con.execute(
        "INSERT OR IGNORE INTO registry.deployments VALUES (?, ?, ?, ?, ?)",
        [approval_id, record.domain, record.model_version, previous,
         datetime.now(UTC).replace(tzinfo=None)],
    )
    deployment_log.append(con, client, key, record.domain, "deployed", approval_id=approval_id)
    return record, previous


def rollback(con: duckdb.DuckDBPyConnection, client: MlflowClient, key: bytes, domain: str) -> tuple[str, str]:
    """Put the previous champion back (a person's rollback: rollback_champion, `flywheel rollback`),
    once the registry's aliases are the ones flywheel set and the previous champion's signed lineage
    and model's files still hold; log the aliases it left. Returns (rolled back, restored)."""
    check_registry(con, client, key, domain)
    previous = registry.alias_version(client, domain, registry.PREVIOUS)
    if previous is None:
        raise ApprovalError(f"{registry.model_name(domain)} has no previous champion to roll back to")
    check_passed_gate(client, key, domain, previous)
    rolled_back, restored = registry.rollback(client, domain)
    deployment_log.append(con, client, key, domain, "rolled back")
    return rolled_back, restored
