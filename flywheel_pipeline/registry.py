"""The MLflow model registry: one registered model per domain, aliases for its roles.

    flywheel-<domain>@candidate   passed validation, waiting for approval
    flywheel-<domain>@champion    serving
    flywheel-<domain>@previous    the champion before, kept for rollback
    flywheel-<domain>@holdback    the champion before, still serving a random share of requests
                                  after a new champion's first deployment (docs/monitoring.md)

Before its first deployment a domain has no champion: the product serves its baseline, shown as
``baseline`` everywhere (``shown_champion``).

Lineage (data windows, row counts, label model, code version, validation run) rides on each
version as tags, so the registry alone answers "what was this model trained on".
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

CANDIDATE, CHAMPION, PREVIOUS, HOLDBACK = "candidate", "champion", "previous", "holdback"
HOLDBACK_TAGS = ("holdback.share", "holdback.days", "holdback.until")  # on the champion, while one lasts
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


def promote(client: MlflowClient, domain: str, version: str, holdback: Holdback | None = None) -> str | None:
    """Make ``version`` the champion; the old champion becomes ``previous``. Returns the old one.

    On ``version``'s first deployment over an old champion, ``holdback`` (when given) keeps the
    old one serving its share of requests for its days: the alias ``holdback`` and the new
    champion's ``HOLDBACK_TAGS`` say so to the serving system (``active_holdback``). A version
    deployed again (a rollback's restore) ends any holdback instead."""
    name = model_name(domain)
    tags = dict(client.get_model_version(name, version).tags)  # raises when the version does not exist
    old = alias_version(client, domain, CHAMPION)
    if old == version:
        return old
    if old:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, version)
    if alias_version(client, domain, CANDIDATE) == version:
        client.delete_registered_model_alias(name, CANDIDATE)
    now = datetime.now(UTC)
    client.set_model_version_tag(name, version, "deployed_at", now.isoformat(timespec="seconds"))
    _end_holdback(client, domain)
    for key in HOLDBACK_TAGS:  # they describe this deployment only
        if key in tags:
            client.delete_model_version_tag(name, version, key)
    if holdback and holdback.share > 0 and old and "deployed_at" not in tags:
        client.set_registered_model_alias(name, HOLDBACK, old)
        until = now + timedelta(days=holdback.days)
        for key, value in zip(HOLDBACK_TAGS, (holdback.share, holdback.days, until.isoformat(timespec="seconds"))):
            client.set_model_version_tag(name, version, key, str(value))
    return old


@dataclass(frozen=True)
class Holdback:
    """A share of requests the replaced version keeps serving, for some days after a deployment."""

    share: float
    days: int

    @classmethod
    def of(cls, tags: dict[str, str]) -> Holdback | None:
        """The holdback a champion's deployment started (its version's tags), if any."""
        if "holdback.share" not in tags:
            return None
        return cls(float(tags["holdback.share"]), int(tags["holdback.days"]))


def active_holdback(client: MlflowClient, domain: str, now: datetime | None = None) -> tuple[str, float] | None:
    """The version held back and the share of requests it serves, while its holdback lasts (what a
    serving system routes); None when there is none."""
    held = _holdback(client, domain, now)
    return None if held is None else (held[0], float(held[1]["holdback.share"]))


def holdback_summary(client: MlflowClient, domain: str) -> str:
    """``v3 serves 20% of requests until 2026-12-13T10:02:11+00:00``, or ``none``."""
    held = _holdback(client, domain)
    if held is None:
        return "none"
    version, tags = held
    return f"v{version} serves {float(tags['holdback.share']):.0%} of requests until {tags['holdback.until']}"


def _holdback(client: MlflowClient, domain: str, now: datetime | None = None) -> tuple[str, dict[str, str]] | None:
    """The version held back and the champion's tags, while the holdback lasts."""
    held, champion = alias_version(client, domain, HOLDBACK), alias_version(client, domain, CHAMPION)
    if held is None or champion is None:
        return None
    tags = version_tags(client, domain, champion)
    until = tags.get("holdback.until")
    if not until or (now or datetime.now(UTC)) >= datetime.fromisoformat(until):
        return None
    return held, tags


def _end_holdback(client: MlflowClient, domain: str) -> None:
    if alias_version(client, domain, HOLDBACK):
        client.delete_registered_model_alias(model_name(domain), HOLDBACK)


def rollback(client: MlflowClient, domain: str) -> tuple[str, str]:
    """Put the previous champion back. Returns (rolled back version, restored version)."""
    name = model_name(domain)
    current, previous = alias_version(client, domain, CHAMPION), alias_version(client, domain, PREVIOUS)
    if not previous:
        raise RegistryError(f"{name} has no previous champion to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    _end_holdback(client, domain)
    now = _now()
    client.set_model_version_tag(name, current, "rolled_back_at", now)
    client.set_model_version_tag(name, previous, "restored_at", now)
    return current, previous


def version_tags(client: MlflowClient, domain: str, version: str) -> dict[str, str]:
    return dict(client.get_model_version(model_name(domain), version).tags)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
