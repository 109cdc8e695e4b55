"""The Great Expectations gates as blocking Dagster asset checks: a failure stops downstream assets.

- ``raw_events`` / ``accumulated_traffic``: per day x domain partition, the run's days as a whole.
- ``raw_events`` / ``daily_traffic``: each day of the run, against the domain's median day (a warning).
- ``raw_events`` / ``exploration``: the run logged some exploration traffic (a warning).
- ``fct_impressions`` / ``filtered_impressions``: the run's partitions of the mart labeling reads,
  after every dbt test.
"""

import dagster as dg

from flywheel_pipeline import quality
from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.defs.partitions import day_domain_partitions, run_scope
from flywheel_pipeline.defs.resources import WarehouseResource
from flywheel_pipeline.defs.transform import RAW_EVENTS, fct_impressions_key


def _result(suite: quality.SuiteResult) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=suite.success, severity=dg.AssetCheckSeverity.ERROR, metadata=suite.metadata()
    )


def quality_checks(config: FlywheelConfig) -> list[dg.AssetChecksDefinition]:
    partitions = day_domain_partitions(config)

    @dg.asset_check(asset=RAW_EVENTS, blocking=True, partitions_def=partitions,
                    description="GX: the run's days delivered traffic (as a whole), ids unique, the "
                                "exploration slice the domain's config promises is in the logs.")
    def accumulated_traffic(context: dg.AssetCheckExecutionContext,
                            warehouse: WarehouseResource) -> dg.AssetCheckResult:
        domain, days = run_scope(context, partitions)
        with warehouse.warehouses().reader(domain) as source:
            frame = quality.raw_interactions(source, domain, days[0], days[-1])
        suite = quality.raw_interactions_suite(config.domain(domain), days[0], days[-1])
        return _result(quality.run_suite(f"accumulated_traffic_{domain}", frame, suite))

    @dg.asset_check(asset=RAW_EVENTS, partitions_def=partitions,
                    description="GX: each day of the run delivered at least landing.min_daily_traffic_share "
                                "of the domain's median day; a warning that names the days, it blocks nothing.")
    def daily_traffic(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource) -> dg.AssetCheckResult:
        domain, days = run_scope(context, partitions)
        with warehouse.warehouses().reader(domain) as source:
            frame, median_day = quality.daily_traffic(source, domain, days[0], days[-1])
        suite = quality.daily_traffic_suite(median_day, config.landing.min_daily_traffic_share)
        result = quality.run_suite(f"daily_traffic_{domain}", frame, suite, index_column="day")
        return dg.AssetCheckResult(passed=result.success, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={**result.metadata(), "median_day": median_day})

    @dg.asset_check(asset=RAW_EVENTS, partitions_def=partitions,
                    description="GX: some of the run's traffic was served at random; a warning, as a "
                                "domain may declare exploration_share 0, yet without exploration the "
                                "flywheel only re-ranks what its champion showed.")
    def exploration(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource) -> dg.AssetCheckResult:
        domain, days = run_scope(context, partitions)
        with warehouse.warehouses().reader(domain) as source:
            frame = quality.raw_interactions(source, domain, days[0], days[-1])
        result = quality.run_suite(f"exploration_{domain}", frame, quality.exploration_suite())
        return dg.AssetCheckResult(passed=result.success, severity=dg.AssetCheckSeverity.WARN,
                                   metadata=result.metadata())

    @dg.asset_check(asset=fct_impressions_key(), blocking=True, partitions_def=partitions,
                    description="GX: the run's filtered impressions keep their keys unique, positions "
                                "and propensities in range, inputs within the length bounds.")
    def filtered_impressions(context: dg.AssetCheckExecutionContext,
                             warehouse: WarehouseResource) -> dg.AssetCheckResult:
        domain, days = run_scope(context, partitions)
        with warehouse.warehouses().reader(domain) as source:
            frame = quality.filtered_impressions(source, domain, days[0], days[-1])
        return _result(quality.run_suite(f"filtered_impressions_{domain}", frame,
                                         quality.filtered_impressions_suite(config.domain(domain).input_optional)))

    return [accumulated_traffic, daily_traffic, exploration, filtered_impressions]
