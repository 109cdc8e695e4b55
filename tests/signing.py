"""Approvers' SSH keys for tests: made with ssh-keygen, declared in a flywheel.yaml, used to sign."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from flywheel_pipeline import approval, signatures
from flywheel_pipeline.warehouse import connect
from tests.conftest import REPO


def ssh_key(folder: Path, name: str) -> Path:
    """A new ed25519 key without a passphrase: its private file (the public one beside it, .pub)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
    return path


def declare(raw: dict, keys: dict[str, Path]) -> dict:
    """flywheel.yaml's document with each approver's public key (their key's .pub) declared."""
    return {**raw, "approver_keys": {name: [Path(f"{key}.pub").read_text().strip()] for name, key in keys.items()}}


def write_config(path: Path, keys: dict[str, Path], raw: dict | None = None) -> Path:
    """The repository's flywheel.yaml (or ``raw``) with the approvers' keys, written to ``path``."""
    raw = raw if raw is not None else yaml.safe_load((REPO / "flywheel.yaml").read_text())
    path.write_text(yaml.safe_dump(declare(raw, keys)))
    return path


def signed(home_approvals: Path, client, key: Path, domain: str, version: str, decision: str = "approved") -> str:
    """``key``'s signature of the statement a decision on ``version`` signs now."""
    with connect(home_approvals) as con:
        statement = approval.statement(con, client, domain, version, decision)
    return signatures.sign(key, statement.text)
