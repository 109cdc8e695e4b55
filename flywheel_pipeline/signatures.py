"""Who signed what: the machine's seal on flywheel's own records, and each approver's SSH signature.

Two kinds of proof, for two questions (docs/security.md):

- ``seal``: an HMAC-SHA256 with the machine key (``approval.signing_key``). It proves a record was
  written by flywheel's code on a machine that holds the key (the approval chain, the deployment
  log, a version's lineage), not who decided.
- an approver's signature: ``ssh-keygen -Y sign`` with the approver's own SSH key over the
  approval ``statement``, verified with ``ssh-keygen -Y verify`` against the public keys
  flywheel.yaml declares for them (``approver_keys``), as git verifies SSH-signed commits. Only the
  holder of the private key can make one; nothing on the flywheel machine can.

OpenSSH does the signature work: approvers keep their keys where they already are (a file,
ssh-agent, a hardware key), and no signature format is parsed here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

NAMESPACE = "flywheel-approval"  # ssh-keygen's -n: a signature made for anything else never counts here
# Key types OpenSSH signs with (ssh-keygen -Y); sk-*: hardware keys (FIDO).
KEY_TYPES = ("ssh-ed25519", "sk-ssh-ed25519@openssh.com", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
             "ecdsa-sha2-nistp521", "sk-ecdsa-sha2-nistp256@openssh.com", "ssh-rsa")
_PRINCIPAL = "approver"  # the only principal of the allowed-signers file written per check


class SignatureError(ValueError):
    """A public key that cannot be read, or a signature ssh-keygen could not make."""


def seal(key: bytes, fields: list) -> str:
    """The machine key's HMAC-SHA256 over ``fields`` (JSON): what flywheel's own records carry."""
    return hmac.new(key, json.dumps(fields).encode(), hashlib.sha256).hexdigest()


def sealed_by(key: bytes, fields: list, signature: str | None) -> bool:
    return signature is not None and hmac.compare_digest(signature, seal(key, fields))


@dataclass(frozen=True)
class Statement:
    """What an approver signs: a decision on one model's files (``artifact``: their digest), and its
    place among the decisions on that version (``number``: 1 for the first), so that no signature
    can be recorded twice."""

    domain: str
    version: str
    artifact: str
    decision: str
    number: int

    @property
    def text(self) -> str:
        return (f"flywheel decision\ndomain: {self.domain}\nversion: {self.version}\nartifact: {self.artifact}\n"
                f"decision: {self.decision}\ndecision number: {self.number}\n")


def sign_command(key_file: str = "~/.ssh/id_ed25519") -> str:
    """The command that signs a statement given on its standard input."""
    return f"ssh-keygen -Y sign -n {NAMESPACE} -f {key_file}"


def public_key(line: str) -> str:
    """``type base64 [comment]`` as an OpenSSH .pub file holds it, checked; returns ``type base64``."""
    parts = line.split()
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise SignatureError(f"not an SSH public key (`<type> <base64> [comment]`, type one of "
                             f"{', '.join(KEY_TYPES)}): {line[:40]!r}")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise SignatureError(f"not an SSH public key: its key is not base64: {parts[1][:20]!r}...") from None
    if blob[4:4 + int.from_bytes(blob[:4], "big")] != parts[0].encode():
        raise SignatureError(f"not an SSH public key: its key is not a {parts[0]} key")
    return f"{parts[0]} {parts[1]}"


def fingerprint(line: str) -> str:
    """``SHA256:...``, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_key(line).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def signed_by(public_keys: list[str], text: str, signature: str) -> bool:
    """Whether ``signature`` (an armored SSH signature) signs ``text`` in flywheel's namespace with
    one of ``public_keys``: ``ssh-keygen -Y verify`` against an allowed-signers file of those keys."""
    if not public_keys or "BEGIN SSH SIGNATURE" not in signature:
        return False
    with tempfile.TemporaryDirectory(prefix="flywheel-verify-") as folder:
        allowed, armored = Path(folder, "allowed_signers"), Path(folder, "signature")
        allowed.write_text("".join(f'{_PRINCIPAL} namespaces="{NAMESPACE}" {public_key(key)}\n'
                                   for key in public_keys))
        armored.write_text(signature.strip() + "\n")
        verified = subprocess.run(
            ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", _PRINCIPAL, "-n", NAMESPACE, "-s", str(armored)],
            input=text.encode(), capture_output=True, check=False)
    return verified.returncode == 0


def sign(key_file: Path, text: str) -> str:
    """Sign ``text`` with the SSH key ``key_file`` (a private key, or a public one whose private half
    ssh-agent holds); ssh-keygen asks for its passphrase on the terminal."""
    if not key_file.exists():
        raise SignatureError(f"no SSH key at {key_file}")
    signed = subprocess.run(["ssh-keygen", "-Y", "sign", "-n", NAMESPACE, "-f", str(key_file)],
                            input=text.encode(), capture_output=True, check=False)
    if signed.returncode != 0:
        said = signed.stderr.decode().strip().splitlines()
        raise SignatureError(f"ssh-keygen could not sign with {key_file}: {said[-1] if said else 'no reason given'}")
    return signed.stdout.decode()
