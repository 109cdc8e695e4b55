"""The lineage a cycle signs when it registers a version, checked again before any deployment.

MLflow's tags are anyone's to write: a version registered through MLflow alone can carry made-up
``training.run_id`` and ``validation.run_id`` tags and point at a made-up validation run. So the
cycle that registers a version also records, sealed with the machine key (``signatures.seal``),
what it registered: the version, its model's source, the digest of the model's files, the training
and validation runs and the gate's outcome (tags ``lineage.record`` and ``lineage.signature``).
``verify`` checks that record against the registry as it is now and hashes the model's files
again: a version made, or a model's files changed, outside a cycle, does not verify.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flywheel_pipeline import registry
from flywheel_pipeline.signatures import seal, sealed_by

RECORD_TAG, SIGNATURE_TAG = "lineage.record", "lineage.signature"
# MLflow writes this file into a logged model's folder each time the model is registered as a version:
# it names the registered model, and changes with every registration of the same files.
REGISTRATION_FILE = "registered_model_meta"


class LineageError(ValueError):
    """A version whose signed lineage is missing, forged, or no longer matches its model."""


@dataclass(frozen=True)
class Lineage:
    domain: str
    version: str
    source: str  # the version's model URI
    artifact: str  # sha256:... of the model's files (``artifact_digest``)
    training_run_id: str
    validation_run_id: str
    gate: str
    registered_at: str


def artifact_digest(client: MlflowClient, domain: str, version: str) -> str:
    """``sha256:...`` over the model's files (their paths and contents), fetched from the artifact store
    as a serving system fetches them; MLflow's own registration file aside."""
    uri = client.get_model_version_download_uri(registry.model_name(domain), version)
    with tempfile.TemporaryDirectory(prefix="flywheel-digest-") as folder:
        try:
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder))
        except (MlflowException, OSError) as error:
            raise LineageError(f"{registry.model_name(domain)} v{version}: cannot read its model's files at "
                               f"{uri}: {error}") from None
        digest = hashlib.sha256()
        files = sorted(path for path in root.rglob("*") if path.is_file())
        for path in files:
            name = path.relative_to(root).as_posix()
            if name != REGISTRATION_FILE:
                digest.update(json.dumps([name, hashlib.sha256(path.read_bytes()).hexdigest()]).encode())
    return f"sha256:{digest.hexdigest()}"


def register(client: MlflowClient, key: bytes, domain: str, model_uri: str, run_id: str,
             lineage: dict[str, object]) -> str:
    """Register a validated model as a cycle does (``registry.register_candidate``), and record its
    lineage, sealed: ``lineage`` names its ``training.run_id``, ``validation.run_id`` and
    ``validation.gate``. Returns the version."""
    version = registry.register_candidate(client, domain, model_uri, run_id, lineage)
    record = Lineage(domain, version, client.get_model_version(registry.model_name(domain), version).source,
                     artifact_digest(client, domain, version), str(lineage["training.run_id"]),
                     str(lineage["validation.run_id"]), str(lineage["validation.gate"]),
                     datetime.now(UTC).isoformat(timespec="seconds"))
    text = json.dumps(asdict(record), sort_keys=True)
    client.set_model_version_tag(registry.model_name(domain), version, RECORD_TAG, text)
    client.set_model_version_tag(registry.model_name(domain), version, SIGNATURE_TAG, seal(key, ["lineage", text]))
    return version


def verify(client: MlflowClient, key: bytes, domain: str, version: str) -> Lineage:
    """The version's signed lineage, checked: sealed by this flywheel, recorded for this very version
    and model, a passed gate, and the model's files unchanged since. Raises LineageError saying why not."""
    name = registry.model_name(domain)
    model = client.get_model_version(name, version)
    text, signature = model.tags.get(RECORD_TAG), model.tags.get(SIGNATURE_TAG)
    if not text:
        raise LineageError(f"{name} v{version} has no signed lineage record: it was not registered by a flywheel "
                           f"cycle (a version made through MLflow alone is never deployed)")
    if not sealed_by(key, ["lineage", text], signature):
        raise LineageError(f"{name} v{version}: its lineage record does not carry flywheel's signature: it was "
                           f"written or changed outside the pipeline")
    record = Lineage(**json.loads(text))
    if (record.domain, record.version) != (domain, version):
        raise LineageError(f"{name} v{version}: its lineage record is {record.domain} v{record.version}'s, "
                           f"copied onto this version")
    if record.source != model.source or record.training_run_id != model.run_id:
        raise LineageError(f"{name} v{version} now names model {model.source} (run {model.run_id}); its lineage "
                           f"was recorded for {record.source} (run {record.training_run_id})")
    if record.gate != "passed":
        raise LineageError(f"version {version} of {domain} did not pass its validation gate ({record.gate})")
    if (digest := artifact_digest(client, domain, version)) != record.artifact:
        raise LineageError(f"{name} v{version}: its model's files changed since registration ({digest}, "
                           f"registered as {record.artifact})")
    return record
