"""Nothing made or changed through MLflow alone deploys (issue 25): the hostile tester's forgery,
refused at approval (the command line and the Launchpad) and at deployment, and a model's files
changed after registration, refused at deployment and at rollback. A real MLflow registry
(sqlite), a real DuckDB approvals file, a real Dagster instance, real SSH keys."""

from __future__ import annotations

import subprocess
from dataclasses import astuple
from datetime import datetime
from pathlib import Path

import dagster as dg
import mlflow
import pytest
from mlflow.exceptions import MlflowException

from flywheel_pipeline import approval, lineage, registry
from flywheel_pipeline.cli import main
from flywheel_pipeline.config import load_config
from flywheel_pipeline.defs.jobs import approve_candidate, deploy_champion, rollback_champion
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.launcher import failure
from tests.signing import signed, ssh_key, write_config
from tests.test_approval import candidate

DOMAIN, APPROVER = "recommendation", "recsys-lead"
NAME = registry.model_name(DOMAIN)


@pytest.fixture
def key_file(tmp_path) -> Path:
    return ssh_key(tmp_path / "keys", APPROVER)


@pytest.fixture
def project(home, tmp_path, monkeypatch, key_file):
    """The home and a flywheel.yaml declaring the approver's key, as the commands find them."""
    config_file = write_config(tmp_path / "flywheel.yaml", {APPROVER: key_file})
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")  # recorded first: what the home sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("FLYWHEEL_HOME", str(home.root))
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(config_file))
    resources = {"warehouse": WarehouseResource(home_path=str(home.root), config_path=str(config_file)),
                 "mlflow": MlflowResource(home_path=str(home.root))}
    with dg.instance_for_test() as instance:
        yield resources, resources["mlflow"].client(), approval.signing_key(home), instance


def forged(client) -> str:
    """The hostile tester's recipe, through MLflow's API alone: a text file logged as a model,
    registered as a version whose lineage tags name a made-up training run and a made-up validation
    run tagged passed for that very file."""
    mlflow.set_experiment("made-up")
    with mlflow.start_run() as training:
        mlflow.log_text("not a model", "model/model.txt")
    source = f"runs:/{training.info.run_id}/model"
    with mlflow.start_run(tags={"flywheel.stage": "validation", "flywheel.domain": DOMAIN,
                                "flywheel.gate.outcome": "passed", "flywheel.candidate_model_uri": source}) as validation:
        pass
    try:
        client.create_registered_model(NAME)
    except MlflowException:
        pass  # a cycle registered it already
    version = str(client.create_model_version(NAME, source, run_id=training.info.run_id, tags={
        "training.run_id": training.info.run_id, "validation.run_id": validation.info.run_id,
        "validation.gate": "passed"}).version)
    client.set_registered_model_alias(NAME, registry.CANDIDATE, version)
    return version


def launchpad(resources, version: str, signature: str, instance: dg.DagsterInstance):
    config = {"domain": DOMAIN, "version": version, "approver": APPROVER, "signature": signature}
    return approve_candidate.execute_in_process(run_config={"ops": {"record_approval": {"config": config}}},
                                                resources=resources, instance=instance, raise_on_error=False)


def deploy(resources, instance: dg.DagsterInstance, approval_id: int):
    return deploy_champion.execute_in_process(
        run_config={"ops": {"deploy_approved": {"config": {"approval_id": approval_id}}}},
        resources=resources, instance=instance, raise_on_error=False)


def record(resources, client, key, key_file, version: str) -> int:
    """A person's approval of ``version``, signed by them, recorded through the Launchpad."""
    signature = signed(resources["warehouse"].home().approvals, client, key_file, DOMAIN, version)
    with resources["warehouse"].approvals() as con:
        return approval.record_decision(con, client, load_config(resources["warehouse"].config_path), key, DOMAIN,
                                        version, "approved", APPROVER, signature=signature).approval_id


def test_the_mlflow_only_forgery_is_refused_at_approval(project, key_file):
    resources, client, key, instance = project
    candidate(client, key)  # v1, a cycle's
    version = forged(client)
    assert version == "2"
    reason = f"{NAME} v2 has no signed lineage record: it was not registered by a flywheel cycle"

    with pytest.raises(SystemExit, match=reason):  # typed by anyone, refused before anything starts
        main(["approve", "--domain", DOMAIN, "--approver", APPROVER, "--version", version])
    with pytest.raises(SystemExit, match=reason):  # even by the approver, signing
        main(["approve", "--domain", DOMAIN, "--approver", APPROVER, "--version", version, "--sign-with", str(key_file)])
    theirs = signed(resources["warehouse"].home().approvals, client, key_file, DOMAIN, version)
    refused = launchpad(resources, version, theirs, instance)
    assert not refused.success and reason in failure(instance, refused.run_id)
    assert registry.alias_version(client, DOMAIN, registry.CHAMPION) is None


def copied_lineage(client, version: str) -> None:
    """Version 1's signed lineage tags, copied onto ``version``."""
    for tag in (lineage.RECORD_TAG, lineage.SIGNATURE_TAG):
        client.set_model_version_tag(NAME, version, tag, registry.version_tags(client, DOMAIN, "1")[tag])


def made_up_lineage(client, version: str) -> None:
    """A lineage record written for ``version`` by someone without the machine key."""
    model = client.get_model_version(NAME, version)
    text = (f'{{"artifact": "{lineage.artifact_digest(client, DOMAIN, version)}", "domain": "{DOMAIN}", '
            f'"gate": "passed", "registered_at": "2026-11-28T10:00:00+00:00", "source": "{model.source}", '
            f'"training_run_id": "{model.run_id}", "validation_run_id": "x", "version": "{version}"}}')
    client.set_model_version_tag(NAME, version, lineage.RECORD_TAG, text)
    client.set_model_version_tag(NAME, version, lineage.SIGNATURE_TAG, "0" * 64)


@pytest.mark.parametrize(("dressing", "reason"), [
    (lambda client, version: None, "v2 has no signed lineage record"),
    (copied_lineage, "v2: its lineage record is recommendation v1's, copied onto this version"),
    (made_up_lineage, "v2: its lineage record does not carry flywheel's signature"),
])
def test_a_forged_version_is_refused_at_deployment_whatever_its_approval(project, key_file, dressing, reason):
    """Even an approval record the chain accepts (sealed by someone holding the machine key) and
    carrying the approver's own signature (say, of a statement they were tricked into signing)
    deploys no forged version, however its lineage tags are dressed up."""
    resources, client, key, instance = project
    candidate(client, key)
    version = forged(client)
    dressing(client, version)
    with resources["warehouse"].approvals() as con:
        approval.ensure_tables(con)
        sealed = approval.ApprovalRecord(1, DOMAIN, version, "approved", APPROVER, None, datetime.now(),
                                         signed(resources["warehouse"].home().approvals, client, key_file,
                                                DOMAIN, version))
        con.execute("INSERT INTO registry.approvals (approval_id, domain, model_version, decision, approver, reason, "
                    "decided_at, approver_signature, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [*astuple(sealed), approval._sign(key, sealed, "")])
    client.set_model_version_tag(NAME, version, "approval.id", "1")

    refused = deploy(resources, instance, 1)
    assert not refused.success and reason in failure(instance, refused.run_id)
    assert registry.alias_version(client, DOMAIN, registry.CHAMPION) is None


def tamper(client, version: str) -> None:
    """Change the model's files in the artifact store (what write access to it allows)."""
    folder = Path(client.get_model_version_download_uri(NAME, version))
    with (folder / "python_model.pkl").open("ab") as model:
        model.write(b"\0")


def test_model_files_changed_after_registration_are_refused_at_deployment_and_rollback(project, key_file):
    resources, client, key, instance = project
    first, second = candidate(client, key), candidate(client, key)
    for version in (first, second):
        assert deploy(resources, instance, record(resources, client, key, key_file, version)).success
    assert registry.alias_version(client, DOMAIN, registry.PREVIOUS) == first

    tamper(client, first)
    refused = rollback_champion.execute_in_process(
        run_config={"ops": {"restore_previous": {"config": {"domain": DOMAIN}}}}, resources=resources,
        instance=instance, raise_on_error=False)
    assert not refused.success
    assert f"{NAME} v{first}: its model's files changed since registration" in failure(instance, refused.run_id)

    third = candidate(client, key)
    approval_id = record(resources, client, key, key_file, third)
    tamper(client, third)
    refused = deploy(resources, instance, approval_id)
    assert not refused.success
    assert f"{NAME} v{third}: its model's files changed since registration" in failure(instance, refused.run_id)
    assert registry.alias_version(client, DOMAIN, registry.CHAMPION) == second


def test_a_cycles_registration_records_its_lineage_signed(project):
    _, client, key, _ = project
    version = candidate(client, key)
    record = lineage.verify(client, key, DOMAIN, version)
    tags = registry.version_tags(client, DOMAIN, version)
    assert (record.version, record.training_run_id, record.validation_run_id, record.gate) == (
        version, tags["training.run_id"], tags["validation.run_id"], "passed")
    assert record.artifact.startswith("sha256:") and record.source == client.get_model_version(NAME, version).source
    with pytest.raises(lineage.LineageError, match="does not carry flywheel's signature"):
        lineage.verify(client, b"another machine's key" * 2, DOMAIN, version)


def test_the_statement_flywheel_keys_prints_signed_with_ssh_keygen_is_accepted_in_the_launchpad(project, key_file,
                                                                                                 capsys):
    """The UI path as docs/security.md gives it: `flywheel keys statement ... | ssh-keygen -Y sign
    -n flywheel-approval -f KEY`, the output pasted as the Launchpad's signature."""
    resources, client, key, instance = project
    version = candidate(client, key)
    main(["keys", "statement", "--domain", DOMAIN])  # the candidate waiting
    statement = capsys.readouterr().out
    assert statement.startswith(f"flywheel decision\ndomain: {DOMAIN}\nversion: {version}\nartifact: sha256:")
    signature = subprocess.run(["ssh-keygen", "-Y", "sign", "-n", "flywheel-approval", "-f", str(key_file)],
                               input=statement.encode(), capture_output=True, check=True).stdout.decode()
    assert launchpad(resources, version, signature, instance).success
    assert deploy(resources, instance, 1).success
    assert registry.alias_version(client, DOMAIN, registry.CHAMPION) == version
