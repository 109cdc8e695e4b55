"""The deployment profile (flywheel.yaml's ``profile``): embedded by default, production by the file or
$FLYWHEEL_PROFILE; what each puts in the Dagster instance config and the MLflow URIs, and the errors
that name the setting. The production profile's full cycle runs in test_daemon."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config

from flywheel_pipeline.config import ConfigError, load_config, load_deployment
from flywheel_pipeline.home import Home
from flywheel_pipeline.launcher import free_port
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # a PostgreSQL server and the production profile's cycle

URL = "postgresql+psycopg2://flywheel:s3cret@db.internal:5432/flywheel"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A flywheel.yaml to edit, no profile or URL in the environment; returns a writer of its
    ``profile`` and ``production`` keys."""
    for name in ("FLYWHEEL_PROFILE", "FLYWHEEL_POSTGRES_URL", "PG_URL"):
        monkeypatch.delenv(name, raising=False)
    raw = yaml.safe_load((REPO / "flywheel.yaml").read_text())
    path = tmp_path / "flywheel.yaml"
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(path))

    def write(**settings) -> Home:
        path.write_text(yaml.safe_dump({**raw, **settings}))
        return Home(tmp_path / "home")

    write()
    return write


def test_the_default_profile_is_embedded_with_sqlite_stores(project):
    home = project().ensure()
    assert load_config().profile == "embedded" and home.deployment.profile == "embedded"
    assert home.mlflow_tracking_uri == f"sqlite:///{home.mlflow / 'mlflow.db'}"
    assert home.mlflow_artifact_uri == home.mlflow_artifacts.as_uri()
    assert not home.has_mlflow_store  # no sqlite store until something writes one
    with dg.DagsterInstance.from_config(str(home.dagster)) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert type(instance.run_launcher).__name__ == "LocalRunLauncher"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"


def test_flywheel_profile_overrides_the_file(project, monkeypatch):
    project(profile="production")
    assert load_config().profile == "production"
    monkeypatch.setenv("FLYWHEEL_PROFILE", "embedded")
    assert load_config().profile == "embedded" and load_deployment().profile == "embedded"
    monkeypatch.setenv("FLYWHEEL_PROFILE", "cluster")
    with pytest.raises(ConfigError, match=r"FLYWHEEL_PROFILE: must be one of \['embedded', 'production'\]"):
        load_deployment()


def test_an_unknown_profile_or_production_key_is_named(project):
    project(profile="prod")
    with pytest.raises(ConfigError, match="profile: Input should be 'embedded' or 'production'"):
        load_deployment()
    project(production={"postgres_url": URL})  # the secret itself never goes in the file
    with pytest.raises(ConfigError, match="production.postgres_url: Extra inputs are not permitted"):
        load_config()


def test_production_writes_postgres_storage_read_from_the_named_variable(project, monkeypatch):
    home = project(profile="production", production={"postgres_url_env": "PG_URL"}).ensure()
    config, _ = dagster_instance_config(str(home.dagster))
    assert config["storage"] == {"postgres": {"postgres_url": {"env": "PG_URL"}}}
    assert config["run_launcher"]["class"] == "LocalRunLauncher"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["run_monitoring"]["enabled"]
    monkeypatch.setenv("PG_URL", URL)
    assert home.mlflow_tracking_uri == "postgresql+psycopg2://flywheel:s3cret@db.internal:5432/flywheel_mlflow"
    assert home.has_mlflow_store  # in PostgreSQL: a report reads the candidates' truth from it

    back = project().ensure()  # back to embedded: flywheel's own dagster.yaml is rewritten
    assert "storage" not in dagster_instance_config(str(back.dagster))[0]


def test_a_missing_or_driverless_url_names_the_setting(project, monkeypatch):
    home = project(profile="production", production={"postgres_url_env": "PG_URL"})
    with pytest.raises(ConfigError, match="production.postgres_url_env: the environment variable PG_URL is not set"):
        _ = home.mlflow_tracking_uri
    with pytest.raises(ConfigError, match="production.postgres_url_env"):
        home.activate()
    monkeypatch.setenv("PG_URL", URL.replace("+psycopg2", ""))
    with pytest.raises(ConfigError, match=r"must name the driver flywheel installs, postgresql\+psycopg2://") as error:
        _ = home.mlflow_tracking_uri
    assert "s3cret" not in str(error.value) and "flywheel:***@db.internal" in str(error.value)


def test_an_unreachable_server_names_the_setting_not_the_password(project, monkeypatch):
    home = project(profile="production")
    monkeypatch.setenv("FLYWHEEL_POSTGRES_URL", f"postgresql+psycopg2://flywheel:s3cret@127.0.0.1:{free_port()}/flywheel")
    with pytest.raises(ConfigError, match=r"production.postgres_url_env \(FLYWHEEL_POSTGRES_URL\): cannot connect "
                                          r"to postgresql\+psycopg2://flywheel:\*\*\*@127.0.0.1") as error:
        home.activate()
    assert "s3cret" not in str(error.value)


def test_mlflow_database_and_artifacts_where_production_says(project, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_POSTGRES_URL", URL + "?sslmode=require")
    home = project(profile="production", production={"mlflow_database": "models", "mlflow_artifacts": "s3://b/fw"})
    assert home.mlflow_tracking_uri == "postgresql+psycopg2://flywheel:s3cret@db.internal:5432/models?sslmode=require"
    assert home.mlflow_artifact_uri == "s3://b/fw"
    home = project(profile="production", production={"mlflow_artifacts": "shared/artifacts"})
    assert home.mlflow_artifact_uri == (home.root / "shared" / "artifacts").as_uri()
    home = project(production={"mlflow_artifacts": "s3://b/fw"})  # embedded: the home's folder
    assert home.mlflow_artifact_uri == home.mlflow_artifacts.as_uri()
