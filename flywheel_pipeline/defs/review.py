"""The review_queue asset: after labels, each (day, domain)'s impressions for people to judge."""

import dagster as dg

from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.defs.assets import LABELS
from flywheel_pipeline.defs.partitions import day_domain_partitions, partition_key, run_scope
from flywheel_pipeline.defs.resources import WarehouseResource
from flywheel_pipeline.review import copy_scope, queue_for_review

REVIEW_QUEUE = dg.AssetKey("review_queue")


def build_review_queue(config: FlywheelConfig) -> dg.AssetsDefinition:
    partitions = day_domain_partitions(config)

    @dg.asset(key=REVIEW_QUEUE, deps=[LABELS], partitions_def=partitions,
              backfill_policy=dg.BackfillPolicy.single_run(), group_name="labeling", kinds={"duckdb", "json"},
              description="Impressions for human review within flywheel.yaml's review.daily_budget: a random "
                          "audit slice (gold for validation) and those the label model is least sure of. "
                          "labels.review_queue holds them; <home>/review/<domain>/ the Label Studio tasks and "
                          "Argilla records of each day's pending ones (docs/importing.md).")
    def review_queue(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
        domain, days = run_scope(context, partitions)
        with warehouse.warehouses().for_days(domain, copy_scope(days)) as (con, _):
            settings = config.domain(domain)
            report = queue_for_review(con, warehouse.home().root, domain, days, settings.review, groups=settings.groups)
        for day in days:
            context.add_asset_metadata(report.day_metadata(day), partition_key=partition_key(domain, day))
        context.log.info(f"review queue: {report.metadata()}")
        return dg.MaterializeResult()

    return review_queue
