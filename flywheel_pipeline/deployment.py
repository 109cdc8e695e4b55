"""The production profile's PostgreSQL (docs/deploying.md): checked before a command uses it, and
MLflow's database made beside the Dagster instance's on first use."""

from __future__ import annotations

from contextlib import closing

from flywheel_pipeline.config import POSTGRES_SCHEME, ConfigError, ProductionSettings, redacted


def _connect(url: str, setting: str):
    """A connection to ``url``; a ConfigError naming ``setting`` when the server does not answer."""
    import psycopg2

    try:
        return psycopg2.connect(url.replace(f"{POSTGRES_SCHEME}://", "postgresql://", 1), connect_timeout=10)
    except psycopg2.OperationalError as error:
        raise ConfigError(f"{setting}: cannot connect to {redacted(url)}: "
                          f"{str(error).strip().splitlines()[0]}") from None


def prepare_postgres(settings: ProductionSettings) -> None:
    """Check that the Dagster instance's database answers, and create MLflow's beside it (with its
    tables, before several processes would race to) when it is missing."""
    import mlflow
    from psycopg2 import errors, sql

    setting = f"production.postgres_url_env ({settings.postgres_url_env})"
    database = settings.mlflow_database_name()
    with closing(_connect(settings.postgres_url(), setting)) as con:
        con.autocommit = True
        with con.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database])
            if cursor.fetchone():
                return
            try:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
            except errors.DuplicateDatabase:
                return  # another process created it
            except errors.InsufficientPrivilege:
                raise ConfigError(f"production.mlflow_database: database {database!r} does not exist and "
                                  f"this role may not create it: create it (createdb {database})") from None
    mlflow_url = settings.mlflow_url()
    client = mlflow.MlflowClient(mlflow_url, mlflow_url)
    client.search_experiments(max_results=1)
    client.search_registered_models(max_results=1)
