"""Promotion rules on a real MLflow registry, a real DuckDB file and a real Dagster instance."""

from __future__ import annotations

import dagster as dg
import mlflow
import pandas as pd
import pytest

from flywheel_pipeline import approval, registry
from flywheel_pipeline.config import load_config
from flywheel_pipeline.defs.jobs import approve_candidate, deploy_champion, rollback_champion
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.defs.sensors import build_sensors
from tests.conftest import REPO

approval_sensor, _ = build_sensors(load_config(REPO / "flywheel.yaml"))


class ConstantModel(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame) -> list[float]:
        return [0.5] * len(model_input)


@pytest.fixture
def resources(home):
    return {"warehouse": WarehouseResource(home_path=str(home.root)), "mlflow": MlflowResource(home_path=str(home.root))}


@pytest.fixture
def instance():
    """A real (sqlite-backed, temporary) Dagster instance, as the sensor daemon would use."""
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def client(resources):
    return resources["mlflow"].client()


def candidate(client, domain: str = "recommendation", gate: str = "passed") -> str:
    mlflow.set_experiment(f"test-{domain}")
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=ConstantModel(), pip_requirements=[])
    return registry.register_candidate(client, domain, info.model_uri, run.info.run_id, {"validation.gate": gate})


def approve(resources, version: str, decision: str = "approved", reason: str = "", domain: str = "recommendation"):
    config = {"domain": domain, "version": version, "approver": "recsys-lead", "decision": decision, "reason": reason}
    return approve_candidate.execute_in_process(
        run_config={"ops": {"record_approval": {"config": config}}}, resources=resources, raise_on_error=False)


def tick(resources, instance, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    return approval_sensor(context)


def deploy(resources, instance, request: dg.RunRequest):
    return deploy_champion.execute_in_process(run_config=request.run_config, resources=resources, instance=instance)


def test_sensor_deploys_only_after_an_approval(resources, client, instance):
    version = candidate(client)

    assert tick(resources, instance).run_requests == []
    assert registry.alias_version(client, "recommendation", registry.CHAMPION) is None

    assert approve(resources, version).success
    result = tick(resources, instance)
    assert [r.run_key for r in result.run_requests] == [f"deploy:recommendation:v{version}:approval-1"]
    assert deploy(resources, instance, result.run_requests[0]).success
    assert registry.alias_version(client, "recommendation", registry.CHAMPION) == version
    assert registry.alias_version(client, "recommendation", registry.CANDIDATE) is None

    assert tick(resources, instance, cursor=result.cursor).run_requests == []
    assert tick(resources, instance).run_requests == []  # a deployed approval never deploys again


def test_rejected_candidate_never_becomes_champion(resources, client, instance):
    version = candidate(client)

    assert not approve(resources, version, decision="rejected").success  # a rejection needs a reason
    assert approve(resources, version, decision="rejected", reason="slate diversity dropped").success

    result = tick(resources, instance)
    assert result.run_requests == [] and result.cursor == "1"
    assert registry.alias_version(client, "recommendation", registry.CANDIDATE) is None
    with resources["warehouse"].connect() as con, pytest.raises(approval.ApprovalError, match="does not approve"):
        approval.deploy(con, client, 1)
    assert registry.alias_version(client, "recommendation", registry.CHAMPION) is None
    assert registry.version_tags(client, "recommendation", version)["approval.reason"] == "slate diversity dropped"


def test_a_later_rejection_supersedes_an_approval(resources, client):
    version = candidate(client)
    approve(resources, version)
    approve(resources, version, decision="rejected", reason="found a bug")
    with resources["warehouse"].connect() as con, pytest.raises(approval.ApprovalError, match="superseded"):
        approval.deploy(con, client, 1)


def test_approval_is_refused_for_a_failed_gate_or_an_unknown_approver(resources, client, config):
    failed = candidate(client, gate="failed")
    with resources["warehouse"].connect() as con:
        with pytest.raises(approval.ApprovalError, match="did not pass its validation gate"):
            approval.record_decision(con, client, config, "recommendation", failed, "approved", "recsys-lead")
        with pytest.raises(approval.ApprovalError, match="may not decide"):
            approval.record_decision(con, client, config, "recommendation", failed, "approved", "mallory")
        with pytest.raises(approval.ApprovalError, match="may not decide"):
            approval.record_decision(con, client, config, "recommendation", failed, "approved", approval.AUTO_APPROVER)
        with pytest.raises(approval.ApprovalError, match="has no version '99'"):
            approval.record_decision(con, client, config, "recommendation", "99", "rejected", "recsys-lead")


def test_rollback_restores_the_previous_champion(resources, client, instance):
    first, second = candidate(client), None
    approve(resources, first)
    cursor = None
    for _ in range(2):
        result = tick(resources, instance, cursor)
        for request in result.run_requests:
            deploy(resources, instance, request)
        cursor = result.cursor
        if second is None:
            second = candidate(client)
            approve(resources, second)
    assert registry.alias_version(client, "recommendation", registry.CHAMPION) == second
    assert registry.alias_version(client, "recommendation", registry.PREVIOUS) == first

    rollback_champion.execute_in_process(
        run_config={"ops": {"restore_previous": {"config": {"domain": "recommendation"}}}}, resources=resources)

    assert registry.alias_version(client, "recommendation", registry.CHAMPION) == first
    assert "rolled_back_at" in registry.version_tags(client, "recommendation", second)
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback(client, "recommendation")
