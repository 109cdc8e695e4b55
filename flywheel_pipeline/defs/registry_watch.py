"""The registry watch: each domain's serving aliases against the signed deployment log, every tick.

Anyone who can write to MLflow can move ``champion`` (or ``holdback``, or ``previous``) with one API
call, and serving follows it. The ``registry_watch`` sensor compares each domain's aliases with the
latest entry of the signed deployment log (flywheel_pipeline/deployment_log.py) every
``daemon.registry_watch_seconds``. A mismatch fails the ``registry_matches_log`` check of
``<domain>/serving_aliases`` (red in the UI; an asset flywheel does not materialize, beside
``registered_candidate`` and outside the cycle), is alerted (alerts.webhook_url_env) and, with
``registry_watch: revert`` (the default), is put back as the log says; with ``alert`` it stays until a
person puts it back. ``flywheel status`` compares the same way. A broken log fails the tick, naming
the entry, as a broken approval chain fails the approval sensor's.
"""

from __future__ import annotations

import json

import dagster as dg
import duckdb
from mlflow import MlflowClient

from flywheel_pipeline import approval, deployment_log
from flywheel_pipeline.alerts import Alert, notify
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.defs.assets import model_keys
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.registry import model_name as registry_name
from flywheel_pipeline.warehouse import WarehouseBusy

CHECK = "registry_matches_log"
DESCRIPTION = ("The domain's serving aliases (champion, previous, holdback) are the ones flywheel set, as its "
               "signed deployment log says; an alias moved outside flywheel (MLflow's UI or API) fails it, and "
               "is put back (registry_watch: revert) or left for a person (registry_watch: alert).")


def serving_aliases(domain: str) -> dg.AssetKey:
    return dg.AssetKey([domain, "serving_aliases"])


def build_serving_aliases(config: FlywheelConfig) -> list[dg.AssetSpec]:
    """Each domain's serving aliases in MLflow: what the registry watch checks."""
    return [dg.AssetSpec(serving_aliases(domain), deps=[model_keys(domain)["registered_candidate"]],
                         group_name=f"{domain}_model", kinds={"mlflow"},
                         description=f"{registry_name(domain)}'s champion, previous and holdback aliases, as "
                                     f"serving reads them; set by deploy_champion and rollback_champion only "
                                     f"(the registry_matches_log check)")
            for domain in config.domains]


def look(con: duckdb.DuckDBPyConnection, client: MlflowClient, key: bytes, config: FlywheelConfig,
         domain: str) -> tuple[bool, str]:
    """One look at a domain's aliases: whether they matched the log, and what was found and done."""
    found = deployment_log.mismatch(con, client, key, domain)  # the log verified first
    if deployment_log.deployed_before_the_log(con, domain):
        return True, deployment_log.UNLOGGED
    if found is None:
        entry = deployment_log.latest(con, domain)
        return True, "matches the signed deployment log" + (f" ({entry.summary()})" if entry else " (nothing deployed)")
    if config.registry_watch == "revert":
        entry = deployment_log.revert(con, client, key, found)
        return False, f"{found.summary()}: put back (registry_watch: revert; log entry {entry.entry_id})"
    return False, (f"{found.summary()}: left as found (registry_watch: alert); deploy or roll back through flywheel "
                   f"once it is put back")


def evaluation(domain: str, passed: bool, text: str) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(asset_key=serving_aliases(domain), check_name=CHECK,
                                   passed=passed, metadata={"registry": text},
                                   severity=dg.AssetCheckSeverity.ERROR)


def build_registry_checks(config: FlywheelConfig) -> list[dg.AssetChecksDefinition]:
    """Each domain's registry_matches_log check: reported by the sensor; executed from the UI, one look."""

    def build(domain: str) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=serving_aliases(domain), name=CHECK, description=DESCRIPTION)
        def registry_matches_log(warehouse: WarehouseResource, mlflow: MlflowResource) -> dg.AssetCheckResult:
            with warehouse.approvals() as con:
                passed, text = look(con, mlflow.client(), approval.signing_key(warehouse.home()), config, domain)
            return dg.AssetCheckResult(passed=passed, metadata={"registry": text},
                                       severity=dg.AssetCheckSeverity.ERROR)

        return registry_matches_log

    return [build(domain) for domain in config.domains]


def build_registry_watch(config: FlywheelConfig) -> dg.SensorDefinition:
    """The sensor: every domain looked at each tick; the check reported when what it found changed."""

    @dg.sensor(minimum_interval_seconds=config.daemon.registry_watch_seconds,
               default_status=dg.DefaultSensorStatus.RUNNING, description=DESCRIPTION)
    def registry_watch(context: dg.SensorEvaluationContext, warehouse: WarehouseResource,
                       mlflow: MlflowResource) -> dg.SensorResult:
        home = warehouse.home()
        if not home.has_mlflow_store:  # a reader makes no empty store
            return dg.SensorResult(skip_reason="no MLflow store yet: nothing registered")
        client, key = mlflow.client(), approval.signing_key(home)
        said: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        events, lines = [], []
        try:
            with warehouse.approvals() as con:
                for domain in config.domains:
                    passed, text = look(con, client, key, config, domain)
                    lines.append(f"{domain}: {text}")
                    if text == said.get(domain):
                        continue  # reported and alerted already
                    events.append(evaluation(domain, passed, text))
                    if not passed:
                        context.log.warning(text)
                        context.log.info(notify(config, Alert(domain, "registry", text)))
                    said[domain] = text
        except WarehouseBusy as busy:
            return dg.SensorResult(skip_reason=f"{busy}; looking again next tick")
        return dg.SensorResult(asset_events=events, skip_reason="; ".join(lines), cursor=json.dumps(said, sort_keys=True))

    return registry_watch
