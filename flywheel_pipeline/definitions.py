"""The one Dagster Definitions object, built from flywheel.yaml and the home folder.

``dagster dev -w workspace.yaml`` (``make ui``) and the daemon load ``defs`` from here; the pieces
live in ``flywheel_pipeline.defs``. Its day partitions start where the home says (a log imported
from before ``partitions_start`` moves them back: ``defs.partitions.home_partitions``).
"""

from datetime import date

import dagster as dg

from flywheel_pipeline.config import FlywheelConfig, active_config
from flywheel_pipeline.defs.assets import build_data_assets, build_model_assets
from flywheel_pipeline.defs.checks import quality_checks
from flywheel_pipeline.defs.jobs import (
    approve_candidate,
    cycle_job,
    cycle_job_name,
    deploy_champion,
    enforce_retention,
    relabel_job,
    rollback_champion,
)
from flywheel_pipeline.defs.monitor import build_monitor_asset, build_monitor_schedule, monitor_job
from flywheel_pipeline.defs.partitions import home_partitions, range_tags
from flywheel_pipeline.defs.registry_watch import (
    build_registry_checks,
    build_registry_watch,
    build_serving_aliases,
)
from flywheel_pipeline.defs.resources import MlflowResource, WarehouseResource
from flywheel_pipeline.defs.review import build_review_queue
from flywheel_pipeline.defs.schedules import build_retention_schedule, build_schedule
from flywheel_pipeline.defs.sensors import build_drift_sensor, build_sensors
from flywheel_pipeline.defs.training_sets import build_training_set_assets
from flywheel_pipeline.defs.transform import build_dbt_assets, dbt_resource
from flywheel_pipeline.home import Home


def build_definitions(config: FlywheelConfig, home: Home) -> dg.Definitions:
    home.ensure()
    config = home_partitions(config, home)
    model_assets = [a for domain in config.domains for a in build_model_assets(config, domain)]
    training_set_assets = [a for domain in config.domains for a in build_training_set_assets(config, domain)]
    cycle_jobs = [cycle_job(d) for d in config.domains]  # one definition each: the jobs and the drift sensor's
    monitor_assets = [build_monitor_asset(config, domain) for domain in config.domains]
    return dg.Definitions(
        assets=[*build_data_assets(config), build_dbt_assets(config), build_review_queue(config), *model_assets,
                *training_set_assets, *monitor_assets, *build_serving_aliases(config)],
        asset_checks=[*quality_checks(config), *build_registry_checks(config)],
        jobs=[*cycle_jobs, *(relabel_job(d) for d in config.domains),
              *(monitor_job(d) for d in config.domains),
              approve_candidate, deploy_champion, rollback_champion, enforce_retention],
        schedules=[*(build_schedule(config, domain) for domain in config.domains),
                   *(build_monitor_schedule(config, domain) for domain in config.domains),
                   build_retention_schedule(config)],
        sensors=[*build_sensors(config), build_drift_sensor(config, cycle_jobs), build_registry_watch(config)],
        resources={
            "warehouse": WarehouseResource.for_config(home, config),
            "mlflow": MlflowResource(home_path=str(home.root)),
            "dbt": dbt_resource(home, config),
            "io_manager": dg.FilesystemIOManager(base_dir=str(home.dagster / "storage")),
            # what launches a `trainer: pipes` fine-tune; a PipesK8sClient or PipesDatabricksClient
            # here sends it to other compute (docs/training.md)
            "pipes_trainer": dg.PipesSubprocessClient(),
        },
        executor=dg.in_process_executor,
    )


def execute_cycle(defs: dg.Definitions, instance: dg.DagsterInstance, domain: str, first: date, last: date,
                  **options) -> dg.ExecuteInProcessResult:
    """Run ``domain``'s cycle job in this process over its days first..last (tests and benchmarks;
    people's runs go through the instance: ``flywheel_pipeline.runs``)."""
    job = defs.resolve_job_def(cycle_job_name(domain))
    return job.execute_in_process(instance=instance, tags=range_tags(domain, first, last),
                                  raise_on_error=False, **options)


defs = build_definitions(active_config(), Home.from_env())
