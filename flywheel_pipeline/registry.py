"""The MLflow model registry: one registered model per domain, aliases for its roles.

    flywheel-<domain>@candidate   passed validation, waiting for approval
    flywheel-<domain>@champion    serving
    flywheel-<domain>@previous    the champion before, kept for rollback

Before its first deployment a domain has no champion: the product serves its baseline, shown as
``baseline`` everywhere (``shown_champion``).

Lineage (data windows, row counts, label model, code version, validation run) rides on each
version as tags, so the registry alone answers "what was this model trained on".
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"
BASELINE = "baseline"  # what a domain serves while it has no champion (scoring.baseline_scorer)


class RegistryError(RuntimeError):
    """A registry operation that would break the promotion rules."""


def model_name(domain: str) -> str:
    return f"flywheel-{domain}"


def code_version() -> str:
    """The git commit this code runs from, or 'unknown' outside a checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def alias_version(client: MlflowClient, domain: str, alias: str) -> str | None:
    """The version an alias points at, or None when the alias is not set."""
    try:
        return str(client.get_model_version_by_alias(model_name(domain), alias).version)
    except MlflowException:
        return None


def shown_champion(version: str | None) -> str:
    """``v4``, or ``baseline`` while no version has been deployed."""
    return f"v{version}" if version else BASELINE


def champion_summary(client: MlflowClient, domain: str) -> str:
    """The champion as it is now, and how it got there: ``v4 (deployed 2026-11-28T10:02:11+00:00,
    approved by recsys-lead)``, ``v3 (restored by a rollback at ...)``, or ``baseline (no model
    deployed yet)``."""
    version = alias_version(client, domain, CHAMPION)
    if version is None:
        return f"{BASELINE} (no model deployed yet)"
    tags = version_tags(client, domain, version)
    deployed, restored = tags.get("deployed_at", ""), tags.get("restored_at", "")
    if restored and restored >= deployed:
        return f"v{version} (restored by a rollback at {restored})"
    approver = f", approved by {tags['approval.approver']}" if tags.get("approval.approver") else ""
    why = f": {tags['approval.reason']}" if tags.get("approval.reason", "").startswith("rollback:") else ""
    return f"v{version} (deployed {deployed or 'at an unrecorded time'}{approver}{why})"


def alias_uri(client: MlflowClient, domain: str, alias: str) -> str | None:
    return f"models:/{model_name(domain)}@{alias}" if alias_version(client, domain, alias) else None


def register_candidate(client: MlflowClient, domain: str, model_uri: str, run_id: str,
                       lineage: dict[str, object]) -> str:
    """Register a validated model as a new version carrying its lineage, aliased ``candidate``."""
    name = model_name(domain)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"flywheel {domain} domain model")
    tags = {key: str(value) for key, value in lineage.items()}
    version = str(client.create_model_version(name, model_uri, run_id=run_id, tags=tags).version)
    client.set_registered_model_alias(name, CANDIDATE, version)
    return version


def promote(client: MlflowClient, domain: str, version: str) -> str | None:
    """Make ``version`` the champion; the old champion becomes ``previous``. Returns the old one."""
    name = model_name(domain)
    client.get_model_version(name, version)  # raises when the version does not exist
    old = alias_version(client, domain, CHAMPION)
    if old == version:
        return old
    if old:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, version)
    if alias_version(client, domain, CANDIDATE) == version:
        client.delete_registered_model_alias(name, CANDIDATE)
    client.set_model_version_tag(name, version, "deployed_at", _now())
    return old


def rollback(client: MlflowClient, domain: str) -> tuple[str, str]:
    """Put the previous champion back. Returns (rolled back version, restored version)."""
    name = model_name(domain)
    current, previous = alias_version(client, domain, CHAMPION), alias_version(client, domain, PREVIOUS)
    if not previous:
        raise RegistryError(f"{name} has no previous champion to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    now = _now()
    client.set_model_version_tag(name, current, "rolled_back_at", now)
    client.set_model_version_tag(name, previous, "restored_at", now)
    return current, previous


def version_tags(client: MlflowClient, domain: str, version: str) -> dict[str, str]:
    return dict(client.get_model_version(model_name(domain), version).tags)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
