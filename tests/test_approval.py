"""Promotion rules on a real MLflow registry, a real DuckDB file and a real Dagster instance; each
person's decision signed with their own SSH key (ssh-keygen), as flywheel.yaml declares it."""

from __future__ import annotations

import os
from dataclasses import astuple
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd
import pytest
import yaml

from flywheel_pipeline import approval, lineage, registry
from flywheel_pipeline.config import load_config
from flywheel_pipeline.defs.assets import model_keys
from flywheel_pipeline.defs.jobs import approve_candidate, deploy_champion, rollback_champion
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.defs.sensors import build_sensors
from flywheel_pipeline.launcher import failure
from tests.conftest import REPO
from tests.signing import signed, ssh_key, write_config

approval_sensor, _ = build_sensors(load_config(REPO / "flywheel.yaml"))
KEYS: dict[str, Path] = {}  # each person's SSH key (private file): made once for the module by `keys`
DECLARED = ("recsys-lead", "ml-oncall")  # the approvers whose public keys flywheel.yaml declares


class ConstantModel(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame) -> list[float]:
        return [0.5] * len(model_input)


@pytest.fixture(scope="module", autouse=True)
def keys(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    KEYS.update({name: ssh_key(folder, name) for name in (*DECLARED, "mallory")})
    return KEYS


@pytest.fixture
def config_file(tmp_path, keys) -> Path:
    """The repository's flywheel.yaml with the approvers' public keys declared."""
    return write_config(tmp_path / "flywheel.yaml", {name: keys[name] for name in DECLARED})


@pytest.fixture
def config(config_file):
    return load_config(config_file)


@pytest.fixture
def resources(home, config_file):
    return {"warehouse": WarehouseResource(home_path=str(home.root), config_path=str(config_file)),
            "mlflow": MlflowResource(home_path=str(home.root))}


@pytest.fixture
def instance():
    """A real (sqlite-backed, temporary) Dagster instance, as the sensor daemon would use."""
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def client(resources):
    return resources["mlflow"].client()


@pytest.fixture
def key(home) -> bytes:
    return approval.signing_key(home)


def candidate(client, key: bytes, domain: str = "recommendation", outcome: str = "passed",
              gate_tag: str | None = None, validated_uri: str | None = None) -> str:
    """A version registered as a cycle registers one: a training run that logged the model, a
    validation run whose gate had ``outcome`` for that model (or ``validated_uri``), and lineage
    naming both (``validation.gate``: ``gate_tag``, by default the outcome), signed with ``key``."""
    mlflow.set_experiment(f"test-{domain}")
    with mlflow.start_run() as training:
        info = mlflow.pyfunc.log_model(name="model", python_model=ConstantModel(), pip_requirements=[])
    with mlflow.start_run(tags={"flywheel.stage": "validation", "flywheel.domain": domain,
                                "flywheel.gate.outcome": outcome,
                                "flywheel.candidate_model_uri": validated_uri or info.model_uri}) as validation:
        pass
    tags = {"training.run_id": training.info.run_id, "validation.run_id": validation.info.run_id,
            "validation.gate": gate_tag or outcome}
    return lineage.register(client, key, domain, info.model_uri, training.info.run_id, tags)


def sign_as(resources, person: str, version: str, decision: str = "approved", domain: str = "recommendation") -> str:
    """``person``'s signature of the statement a decision on ``version`` signs now ('' without a key)."""
    if person not in KEYS:
        return ""
    return signed(resources["warehouse"].home().approvals, resources["mlflow"].client(), KEYS[person], domain,
                  version, decision)


def approve(resources, version: str, decision: str = "approved", reason: str = "", domain: str = "recommendation",
            approver: str = "recsys-lead", instance: dg.DagsterInstance | None = None, signature: str | None = None):
    """approve_candidate launched as the approver launches it: signed with their own key (or ``signature``)."""
    if signature is None:
        signature = sign_as(resources, approver, version, decision, domain)
    config = {"domain": domain, "version": version, "approver": approver, "decision": decision, "reason": reason,
              "signature": signature}
    return approve_candidate.execute_in_process(
        run_config={"ops": {"record_approval": {"config": config}}}, resources=resources, instance=instance,
        raise_on_error=False)


def tick(resources, instance, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    return approval_sensor(context)


def deploy(resources, instance, approval_id: int):
    return deploy_champion.execute_in_process(
        run_config={"ops": {"deploy_approved": {"config": {"approval_id": approval_id}}}},
        resources=resources, instance=instance, raise_on_error=False)


def approval_id(request: dg.RunRequest) -> int:
    return request.run_config["ops"]["deploy_approved"]["config"]["approval_id"]


def champion(client, domain: str = "recommendation") -> str | None:
    return registry.alias_version(client, domain, registry.CHAMPION)


def shown_on_the_asset(instance, domain: str = "recommendation") -> dict[str, str]:
    """The latest observation of the domain's registered_candidate: what its Events tab shows."""
    (record,) = instance.fetch_observations(model_keys(domain)["registered_candidate"], limit=1).records
    return {name: entry.value for name, entry in record.asset_observation.metadata.items()}


def sql(resources, statement: str, params: list | None = None) -> None:
    with resources["warehouse"].approvals() as con:
        approval.ensure_tables(con)
        con.execute(statement, params or [])


def test_sensor_deploys_only_after_an_approval(resources, client, instance, key):
    version = candidate(client, key)

    assert tick(resources, instance).run_requests == []
    assert champion(client) is None

    assert approve(resources, version).success
    result = tick(resources, instance)
    assert [r.run_key for r in result.run_requests] == [f"deploy:recommendation:v{version}:approval-1"]
    assert deploy(resources, instance, approval_id(result.run_requests[0])).success
    assert champion(client) == version
    assert registry.alias_version(client, "recommendation", registry.CANDIDATE) is None
    deployed_at = registry.version_tags(client, "recommendation", version)["deployed_at"]
    assert shown_on_the_asset(instance) == {  # the asset page says so, not "waiting for approval"
        "champion": f"v{version} (deployed {deployed_at}, approved by recsys-lead)",
        "change": f"deploy_champion deployed v{version}, approved by recsys-lead (approval 1)",
        "candidate": "none", "previous": "none"}

    assert tick(resources, instance, cursor=result.cursor).run_requests == []
    assert tick(resources, instance).run_requests == []  # a deployed approval never deploys again


def test_rejected_candidate_never_becomes_champion(resources, client, instance, key):
    version = candidate(client, key)

    assert not approve(resources, version, decision="rejected").success  # a rejection needs a reason
    assert not approve(resources, version, decision="rejected", reason="   ").success
    assert approve(resources, version, decision="rejected", reason="slate diversity dropped").success

    result = tick(resources, instance)
    assert result.run_requests == [] and result.cursor == "1"
    assert registry.alias_version(client, "recommendation", registry.CANDIDATE) is None
    refused = deploy(resources, instance, 1)
    assert not refused.success and "does not approve" in failure(instance, refused.run_id)
    assert champion(client) is None
    assert registry.version_tags(client, "recommendation", version)["approval.reason"] == "slate diversity dropped"


def test_a_later_rejection_supersedes_an_approval(resources, client, config, key):
    version = candidate(client, key)
    approve(resources, version)
    approve(resources, version, decision="rejected", reason="found a bug")
    with resources["warehouse"].approvals() as con, pytest.raises(approval.ApprovalError, match="superseded"):
        approval.deploy(con, client, config, key, 1)


def test_approval_is_refused_for_a_failed_gate_or_an_unknown_approver(resources, client, config, key):
    failed = candidate(client, key, outcome="failed")
    with resources["warehouse"].approvals() as con:
        with pytest.raises(approval.ApprovalError, match="did not pass its validation gate"):
            approval.record_decision(con, client, config, key, "recommendation", failed, "approved", "recsys-lead")
        with pytest.raises(approval.ApprovalError, match="may not decide"):
            approval.record_decision(con, client, config, key, "recommendation", failed, "approved", "mallory")
        with pytest.raises(approval.ApprovalError, match="pipeline's own identity"):
            approval.record_decision(con, client, config, key, "recommendation", failed, "approved",
                                     approval.AUTO_APPROVER)
        with pytest.raises(approval.ApprovalError, match="has no version '99'"):
            approval.record_decision(con, client, config, key, "recommendation", "99", "rejected", "recsys-lead",
                                     "no such model")
        with pytest.raises(approval.ApprovalError, match="needs a reason"):
            approval.record_decision(con, client, config, key, "recommendation", failed, "rejected", "recsys-lead", " ")


def hand_registered(client) -> str:
    """A version registered by hand: a logged model and a gate tag, no training or validation run."""
    mlflow.set_experiment("by-hand")
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=ConstantModel(), pip_requirements=[])
    return registry.register_candidate(client, "recommendation", info.model_uri, run.info.run_id,
                                       {"validation.gate": "passed"})


def test_a_decision_counts_only_with_the_named_approvers_own_signature(resources, client, instance, key):
    """The approver's name is free text; their signature is not: a decision in their name without
    it, or signed by anyone else, of another version or decision, or already recorded, is refused
    and records nothing. Their own signature is recorded and the approval deploys."""
    version, other = candidate(client, key), candidate(client, key)
    mallorys = signed(resources["warehouse"].home().approvals, client, KEYS["mallory"], "recommendation", version)
    for signature, reason in [
        ("", "needs their signature of this statement"),
        (mallorys, "the signature is not 'recsys-lead''s signature"),
        (sign_as(resources, "recsys-lead", other), "the signature is not"),  # of another version
        (sign_as(resources, "recsys-lead", version, "rejected"), "the signature is not"),  # of another decision
        ("-----BEGIN SSH SIGNATURE-----\nbm90IG9uZQ==\n-----END SSH SIGNATURE-----\n", "the signature is not"),
    ]:
        refused = approve(resources, version, instance=instance, signature=signature)
        message = failure(instance, refused.run_id)
        assert not refused.success and reason in message, (reason, message)
        assert f"version: {version}\nartifact: sha256:" in message  # the statement to sign, shown
    assert tick(resources, instance).run_requests == []  # nothing was recorded

    theirs = sign_as(resources, "recsys-lead", version)
    assert approve(resources, version, instance=instance, signature=theirs).success
    replayed = approve(resources, version, instance=instance, signature=theirs)  # a signature counts once
    assert not replayed.success and "decision number: 2" in failure(instance, replayed.run_id)
    (request,) = tick(resources, instance).run_requests
    assert deploy(resources, instance, approval_id(request)).success
    assert champion(client) == version


def test_an_approver_without_a_declared_key_cannot_decide(resources, client, key):
    version = candidate(client, key)
    undeclared = load_config(REPO / "flywheel.yaml")  # names recsys-lead, declares no key
    with resources["warehouse"].approvals() as con, pytest.raises(
            approval.ApprovalError, match=r"'recsys-lead' has no signing key in flywheel.yaml \(approver_keys.recsys-lead\)"):
        approval.record_decision(con, client, undeclared, key, "recommendation", version, "approved", "recsys-lead",
                                 signature=sign_as(resources, "recsys-lead", version))


def test_a_record_sealed_with_the_machine_key_alone_deploys_nothing(resources, client, instance, key):
    """Someone with the home's files and its key can append a record the chain accepts, and tag the
    version to match; without the approver's signature its deployment is refused."""
    version = candidate(client, key)
    record = approval.ApprovalRecord(1, "recommendation", version, "approved", "recsys-lead", "trust me",
                                     datetime.now())
    sql(resources, "INSERT INTO registry.approvals (approval_id, domain, model_version, decision, approver, reason, "
                   "decided_at, approver_signature, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [*astuple(record), approval._sign(key, record, "")])
    client.set_model_version_tag(registry.model_name("recommendation"), version, "approval.id", "1")

    (request,) = tick(resources, instance).run_requests  # the chain verifies: the key sealed it
    refused = deploy(resources, instance, approval_id(request))
    assert not refused.success and "needs their signature" in failure(instance, refused.run_id)
    assert champion(client) is None


def test_a_hand_inserted_approval_is_refused_by_the_sensor_and_the_deployment(resources, client, instance):
    """A version registered by hand (no lineage, no gate) and an approval row inserted by hand."""
    forged = hand_registered(client)
    sql(resources, "INSERT INTO registry.approvals (domain, model_version, decision, approver, reason, decided_at) "
                   "VALUES ('recommendation', ?, 'approved', 'mallory', 'trust me', ?)", [str(forged), datetime.now()])

    with pytest.raises(approval.ApprovalError, match="approval record 1 breaks the approval chain: it is not signed"):
        tick(resources, instance)
    refused = deploy(resources, instance, 1)
    assert not refused.success
    assert "approval record 1 breaks the approval chain" in failure(instance, refused.run_id)
    assert champion(client) is None


@pytest.mark.parametrize(
    ("tampering", "broken"),
    [
        ("UPDATE registry.approvals SET approver = 'mallory' WHERE approval_id = 1", 1),
        ("UPDATE registry.approvals SET model_version = '1' WHERE approval_id = 2", 2),
        ("DELETE FROM registry.approvals WHERE approval_id = 1", 2),
    ],
)
def test_a_tampered_record_breaks_the_chain_and_nothing_deploys(resources, client, instance, tampering, broken, key):
    first, second = candidate(client, key), candidate(client, key)
    assert approve(resources, first).success and approve(resources, second).success
    sql(resources, tampering)

    message = f"approval record {broken} breaks the approval chain"
    with pytest.raises(approval.ApprovalError, match=message):
        tick(resources, instance)
    refused = deploy(resources, instance, 2)
    assert not refused.success and message in failure(instance, refused.run_id)
    assert champion(client) is None
    third = candidate(client, key)  # nothing is appended to a broken chain either
    recorded = approve(resources, third, instance=instance)
    assert not recorded.success and message in failure(instance, recorded.run_id)


def test_nobody_signs_as_the_pipeline(resources, client, instance, config, key):
    """On a `full` domain only the pipeline approves as flywheel:auto; on an `oversight` one nobody does."""
    version = candidate(client, key, domain="assistant")
    refused = approve(resources, version, domain="assistant", approver=approval.AUTO_APPROVER, instance=instance)
    assert not refused.success and "pipeline's own identity" in failure(instance, refused.run_id)

    manual = candidate(client, key)
    with resources["warehouse"].approvals() as con:
        with pytest.raises(approval.ApprovalError, match="a person approves its candidates"):
            approval.record_auto_approval(con, client, config, key, "recommendation", manual)
        record = approval.record_auto_approval(con, client, config, key, "assistant", version)
    assert record.approver == approval.AUTO_APPROVER
    assert deploy(resources, instance, record.approval_id).success
    assert champion(client, "assistant") == version


def test_deployment_checks_the_approval_again(resources, client, instance, home, tmp_path, key, config_file):
    """What held at approval time is checked again at deploy time: the approver is still allowed,
    their key is still declared, the validation run still says passed."""
    first, second, third = candidate(client, key), candidate(client, key), candidate(client, key)
    assert all(approve(resources, version).success for version in (first, second, third))

    def deployed_under(raw: dict, approval_id: int) -> str:
        (tmp_path / "moved_on.yaml").write_text(yaml.safe_dump(raw))
        moved_on = {**resources, "warehouse": WarehouseResource(home_path=str(home.root),
                                                                config_path=str(tmp_path / "moved_on.yaml"))}
        refused = deploy(moved_on, instance, approval_id)
        assert not refused.success
        return failure(instance, refused.run_id)

    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    raw["domains"]["recommendation"]["approvers"] = ["new-lead"]
    assert "'recsys-lead' may not decide" in deployed_under(raw, 1)
    rotated = {**yaml.safe_load(config_file.read_text()),
               "approver_keys": {"recsys-lead": [Path(f"{KEYS['mallory']}.pub").read_text().strip()]}}
    assert "the signature is not 'recsys-lead''s signature" in deployed_under(rotated, 2)  # their old key revoked

    validation_run = registry.version_tags(client, "recommendation", third)["validation.run_id"]
    client.set_tag(validation_run, "flywheel.gate.outcome", "failed")
    refused = deploy(resources, instance, 3)
    assert not refused.success and "did not pass its validation gate" in failure(instance, refused.run_id)
    assert champion(client) is None


@pytest.mark.parametrize(
    ("version_of", "reason"),
    [
        (lambda client, key: candidate(client, key, outcome="failed", gate_tag="passed"), "did not pass its validation gate"),
        (lambda client, key: candidate(client, key, validated_uri="models:/m-another"), "validated models:/m-another"),
        (lambda client, key: hand_registered(client), "has no signed lineage record"),
    ],
)
def test_a_gate_tag_on_the_version_is_not_proof(resources, client, instance, version_of, reason, key):
    version = version_of(client, key)
    refused = approve(resources, version, instance=instance)
    assert not refused.success and reason in failure(instance, refused.run_id)


def test_approving_twice_deploys_once_and_the_champion_cannot_be_approved_again(resources, client, instance, key):
    version = candidate(client, key)
    assert approve(resources, version).success and approve(resources, version).success  # e.g. two clicks
    requests = tick(resources, instance).run_requests
    assert [deploy(resources, instance, approval_id(r)).success for r in requests] == [True, True]
    assert champion(client) == version

    again = approve(resources, version, instance=instance)
    assert not again.success and "already the champion" in failure(instance, again.run_id)


def test_rejecting_the_champion_is_refused_with_the_way_to_roll_back(resources, client, instance, key):
    first, second = candidate(client, key), candidate(client, key)
    for version in (first, second):
        assert approve(resources, version).success
    for request in tick(resources, instance).run_requests:
        assert deploy(resources, instance, approval_id(request)).success
    assert champion(client) == second

    refused = approve(resources, second, decision="rejected", reason="bad slates", instance=instance)
    assert not refused.success
    assert f"roll back to v{first} first (`flywheel rollback --domain recommendation`" in \
        failure(instance, refused.run_id).lower()
    assert champion(client) == second


def test_rollback_restores_the_previous_champion(resources, client, instance, key):
    first, second = candidate(client, key), None
    approve(resources, first)
    cursor = None
    for _ in range(2):
        result = tick(resources, instance, cursor)
        for request in result.run_requests:
            deploy(resources, instance, approval_id(request))
        cursor = result.cursor
        if second is None:
            second = candidate(client, key)
            approve(resources, second)
    assert champion(client) == second
    assert registry.alias_version(client, "recommendation", registry.PREVIOUS) == first
    assert registry.active_holdback(client, "recommendation") == (first, 0.2)  # flywheel.yaml's default share

    assert shown_on_the_asset(instance)["previous"] == f"v{first}"
    rollback_champion.execute_in_process(
        run_config={"ops": {"restore_previous": {"config": {"domain": "recommendation"}}}}, resources=resources,
        instance=instance)

    assert champion(client) == first
    assert registry.active_holdback(client, "recommendation") is None  # a rollback ends the holdback
    assert "rolled_back_at" in registry.version_tags(client, "recommendation", second)
    restored_at = registry.version_tags(client, "recommendation", first)["restored_at"]
    assert shown_on_the_asset(instance) == {
        "champion": f"v{first} (restored by a rollback at {restored_at})",
        "change": f"rollback_champion rolled back v{second}", "candidate": "none", "previous": "none"}
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback(client, "recommendation")


def test_a_first_deployment_keeps_the_replaced_version_serving_its_share_for_its_days(client, key):
    """The holdback the monitor compares against (docs/monitoring.md): set on a version's first
    deployment over a champion, gone when its days end, never on a restore or a redeployment."""
    domain, holdback = "recommendation", registry.Holdback(0.2, 7)
    first, second = candidate(client, key), candidate(client, key)
    registry.promote(client, domain, first, holdback)
    assert registry.active_holdback(client, domain) is None  # the baseline is no version to hold back

    registry.promote(client, domain, second, holdback)
    assert registry.alias_version(client, domain, registry.HOLDBACK) == first
    tags = registry.version_tags(client, domain, second)
    assert registry.Holdback.of(tags) == holdback
    until = datetime.fromisoformat(tags["holdback.until"])
    assert until - datetime.fromisoformat(tags["deployed_at"]) == timedelta(days=7)
    assert registry.active_holdback(client, domain, now=until - timedelta(seconds=1)) == (first, 0.2)
    assert registry.holdback_summary(client, domain) == f"v{first} serves 20% of requests until {until.isoformat()}"
    assert registry.active_holdback(client, domain, now=until) is None

    registry.promote(client, domain, first, holdback)  # restored: it served before
    assert registry.active_holdback(client, domain) is None
    assert registry.alias_version(client, domain, registry.HOLDBACK) is None
    registry.promote(client, domain, second, holdback)  # deployed again: its old holdback is gone too
    assert registry.active_holdback(client, domain) is None
    assert registry.Holdback.of(registry.version_tags(client, domain, second)) is None


def test_the_signing_key_is_private_and_kept_outside_the_warehouse(home, monkeypatch, tmp_path):
    key = approval.signing_key(home)
    path = approval.key_path(home)
    assert path == home.root / "secrets" / "approval.key" and oct(path.stat().st_mode & 0o777) == "0o600"
    assert approval.signing_key(home) == key  # created once

    path.chmod(0o644)
    with pytest.raises(approval.ApprovalError, match="open to others"):
        approval.signing_key(home)
    monkeypatch.setenv(approval.KEY_ENV, str(tmp_path / "mounted" / "approval.key"))
    with pytest.raises(approval.ApprovalError, match="does not exist"):
        approval.signing_key(home)
    assert not os.path.exists(tmp_path / "mounted")
