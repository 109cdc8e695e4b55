"""A fine-tune on other compute: the pipes trainer launches flywheel's worker in a subprocess through
Dagster Pipes (PipesSubprocessClient); its model goes through validation and registration with the
lineage of where and on what it was trained. Also: an external trainer that reports no model
fails the asset and leaves its MLflow run FAILED, nothing registered."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import dagster as dg
import mlflow
import pytest
import yaml

from flywheel_pipeline import approval, lineage, registry, simulation
from flywheel_pipeline.config import CONFIG_ENV, FlywheelConfig, load_config
from flywheel_pipeline.definitions import build_definitions, execute_cycle
from flywheel_pipeline.defs.assets import build_model_assets, model_keys
from flywheel_pipeline.home import Home
from flywheel_pipeline.training.pipes import digest
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # one lean assistant cycle

DOMAIN = "assistant"
DAYS, PER_DAY = 12, 150
LAST = datetime.now(UTC).date() - timedelta(days=1)
FIRST = LAST - timedelta(days=DAYS - 1)
# lenient enough that a lean cycle's candidate is registered: what is tested is the way there
LENIENT_GATE = {"non_inferiority_margin": 1.0, "max_slice_regression": 1.0, "min_samples": 50, "min_ess": 5}


class Cycle(NamedTuple):
    home: Home
    config: FlywheelConfig
    defs: dg.Definitions
    instance: dg.DagsterInstance
    result: dg.ExecuteInProcessResult


def metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict:
    [values] = [{name: value.value for name, value in event.materialization.metadata.items()}
                for event in result.get_asset_materialization_events() if event.asset_key == key]
    return values


@contextmanager
def lean_cycle(root: Path, trainer: Any) -> Iterator[Cycle]:
    """One assistant cycle (12 days x 150 interactions, 3 held out) in a new home at ``root``,
    with flywheel.yaml's assistant domain alone, its ``trainer`` as given and a lenient gate."""
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    raw["domains"] = {DOMAIN: {**raw["domains"][DOMAIN], "trainer": trainer, "holdout_days": 3,
                               "gate": LENIENT_GATE}}
    config_file = root / "flywheel.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    with pytest.MonkeyPatch.context() as patch:
        for name in ("FLYWHEEL_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"):
            patch.delenv(name, raising=False)
        patch.setenv(CONFIG_ENV, str(config_file))
        config = load_config(config_file)
        home = Home(root / "home").activate()
        simulation.simulate(home, config, FIRST, DAYS, seed=5, interactions_per_day=PER_DAY)
        defs = build_definitions(config, home)
        instance = dg.DagsterInstance.local_temp(str(home.dagster))
        try:
            yield Cycle(home, config, defs, instance, execute_cycle(defs, instance, DOMAIN, FIRST, LAST))
        finally:
            instance.dispose()


@pytest.fixture(scope="module")
def cycle(tmp_path_factory) -> Iterator[Cycle]:
    with lean_cycle(tmp_path_factory.mktemp("pipes"), {"kind": "pipes", "fits": "hashed"}) as cycle:
        yield cycle


def test_a_pipes_trainer_runs_in_a_subprocess_and_its_model_is_registered_with_its_lineage(cycle):
    home, _, _, instance, result = cycle
    assert result.success
    keys = model_keys(DOMAIN)
    trained, registered = metadata(result, keys["candidate_model"]), metadata(result, keys["registered_candidate"])

    # the fit ran in the worker's process: its Pipes log reached the Dagster run
    messages = [record.user_message for record in instance.all_logs(result.run_id)]
    assert any(m.startswith("fitting assistant-hashed-logistic on ") for m in messages), messages[-20:]

    client = mlflow.MlflowClient(home.mlflow_tracking_uri, home.mlflow_tracking_uri)
    tags = client.get_model_version(registry.model_name(DOMAIN), str(registered["version"])).tags
    run = client.get_run(trained["training_run_id"])
    model = client.get_logged_model(trained["model_uri"].removeprefix("models:/"))
    assert model.source_run_id == run.info.run_id == tags["training.run_id"]
    assert registered["model_uri"] == trained["model_uri"]
    assert tags["training.compute"] == "PipesSubprocessClient" == run.data.tags["flywheel.compute"]
    assert tags["training.trainer"] == f"pipes: {sys.executable} -m flywheel_pipeline.training.worker"
    kind, path = tags["training.training_set"].split(": ")
    assert kind == "impressions" and tags["training.training_set_sha256"] == digest(Path(path))
    assert run.data.params["trainer.kind"] == "pipes" and run.data.params["trainer.name"] == "assistant-hashed-logistic"
    assert run.data.metrics["training_auc"] > 0.5 and "internal_check_auc" in run.data.metrics
    assert tags["validation.gate"] == "passed" and tags["training.train_end"] < tags["training.holdout_start"]
    record = lineage.verify(client, approval.signing_key(home), DOMAIN, str(registered["version"]))
    assert record.training_run_id == run.info.run_id
    assert mlflow.pyfunc.load_model(trained["model_uri"]) is not None


def test_an_external_trainer_that_reports_no_model_fails_and_registers_nothing(cycle):
    home, config, defs, instance, _ = cycle
    silent = config.model_copy(update={"domains": {DOMAIN: config.domain(DOMAIN).model_copy(update={
        "trainer": config.domain(DOMAIN).trainer.model_copy(update={"command": [
            sys.executable, "-c", "from dagster_pipes import open_dagster_pipes\nwith open_dagster_pipes(): pass"]})})}})
    client = mlflow.MlflowClient(home.mlflow_tracking_uri, home.mlflow_tracking_uri)
    versions = len(client.search_model_versions(f"name = '{registry.model_name(DOMAIN)}'"))
    candidate_model = build_model_assets(silent, DOMAIN)[0]
    again = dg.materialize([candidate_model], instance=instance, resources=defs.resources, raise_on_error=False)

    assert not again.success
    [failure] = [e for e in again.all_events if e.is_step_failure]
    assert "reported no model" in failure.event_specific_data.error.cause.message
    [run] = client.search_runs([client.get_experiment_by_name(f"flywheel-{DOMAIN}").experiment_id],
                               f"tags.`flywheel.dagster_run_id` = '{again.run_id}'")
    assert run.info.status == "FAILED"
    assert len(client.search_model_versions(f"name = '{registry.model_name(DOMAIN)}'")) == versions
