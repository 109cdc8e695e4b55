"""The one Dagster Definitions object, built from flywheel.yaml and the home folder."""

from datetime import date

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from flywheel_pipeline.assets import LABELS, build_data_assets, build_model_assets, model_keys
from flywheel_pipeline.checks import quality_checks
from flywheel_pipeline.config import FlywheelConfig, active_config, config_path
from flywheel_pipeline.home import Home
from flywheel_pipeline.jobs import (
    WAREHOUSE_TAG,
    approve_candidate,
    deploy_champion,
    rollback_champion,
)
from flywheel_pipeline.partitions import day_domain_partitions, range_tags
from flywheel_pipeline.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.schedules import build_schedule, cycle_job_name
from flywheel_pipeline.sensors import approval_sensor, late_label_sensor
from flywheel_pipeline.transform import RAW_EVENTS, dbt_resource, flywheel_dbt_assets


def cycle_job(config: FlywheelConfig, domain: str) -> UnresolvedAssetJobDefinition:
    """A domain's whole cycle as one run over a range of its days."""
    selection = (
        dg.AssetSelection.assets(RAW_EVENTS, LABELS, *model_keys(domain).values())
        | dg.AssetSelection.assets(flywheel_dbt_assets)
    )
    return dg.define_asset_job(
        cycle_job_name(domain), selection=selection, partitions_def=day_domain_partitions(config),
        tags={**WAREHOUSE_TAG, "flywheel/domain": domain},
        description=f"{domain}: accumulate -> filter (dbt + GX) -> label -> fine-tune -> validate -> register",
    )


def execute_cycle(defs: dg.Definitions, instance: dg.DagsterInstance, domain: str, first: date, last: date,
                  **options) -> dg.ExecuteInProcessResult:
    """Run ``domain``'s cycle job in this process over its days first..last (the CLI and the demo)."""
    job = defs.resolve_job_def(cycle_job_name(domain))
    return job.execute_in_process(instance=instance, tags=range_tags(domain, first, last),
                                  raise_on_error=False, **options)


def build_definitions(config: FlywheelConfig, home: Home) -> dg.Definitions:
    home.ensure()
    model_assets = [a for domain in config.domains for a in build_model_assets(config, domain)]
    return dg.Definitions(
        assets=[*build_data_assets(config), flywheel_dbt_assets, *model_assets],
        asset_checks=quality_checks(config),
        jobs=[*(cycle_job(config, d) for d in config.domains), approve_candidate, deploy_champion, rollback_champion],
        schedules=[build_schedule(config, domain) for domain in config.domains],
        sensors=[approval_sensor, late_label_sensor],
        resources={
            "warehouse": WarehouseResource(home_path=str(home.root), config_path=str(config_path()),
                                           memory_limit=config.warehouse.memory_limit),
            "mlflow": MlflowResource(home_path=str(home.root)),
            "dbt": dbt_resource(home),
            "io_manager": dg.FilesystemIOManager(base_dir=str(home.dagster / "storage")),
        },
        executor=dg.in_process_executor,
    )


defs = build_definitions(active_config(), Home.from_env())
