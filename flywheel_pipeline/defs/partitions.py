"""Day x domain partitions: each domain's data is partitioned by the UTC day of its events.

A run covers one domain and a range of days (``dagster/asset_partition_range_*`` tags), so a weekly
cycle is one run and the UI shows every domain's days in one grid. The days start at
``partitions_start`` (flywheel.yaml), or at the earliest day an import wrote into the home when
that is earlier (``home_partitions``): one start for every domain, since the domains share the grid.
"""

from __future__ import annotations

from datetime import date, timedelta

import dagster as dg

from flywheel_pipeline.config import FlywheelConfig
from flywheel_pipeline.home import Home
from flywheel_pipeline.run_range import partitions_start

DATE, DOMAIN = "date", "domain"
# The run tags Dagster reads as "this run covers the partitions start..end" (a single-run backfill).
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"


def home_partitions(config: FlywheelConfig, home: Home) -> FlywheelConfig:
    """``config`` with its ``partitions_start`` moved back to the earliest day imported into
    ``home``, when earlier (run_range.partitions_start): what the definitions partition by."""
    return config.model_copy(update={"partitions_start": partitions_start(config, home)})


def day_domain_partitions(config: FlywheelConfig) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition({
        DATE: dg.DailyPartitionsDefinition(start_date=config.partitions_start.isoformat()),
        DOMAIN: dg.StaticPartitionsDefinition(sorted(config.domains)),
    })


def partition_key(domain: str, day: date) -> str:
    """The multi-partition key of one (day, domain): ``2026-11-02|assistant``."""
    return dg.MultiPartitionKey({DATE: day.isoformat(), DOMAIN: domain})


def days_between(first: date, last: date) -> list[date]:
    return [first + timedelta(days=offset) for offset in range((last - first).days + 1)]


def run_scope(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext,
    partitions_def: dg.MultiPartitionsDefinition,
) -> tuple[str, list[date]]:
    """The one domain and the days a partitioned run (of an asset or a check) covers."""
    keys = [partitions_def.get_partition_key_from_str(key) for key in context.partition_keys]
    domains = {key.keys_by_dimension[DOMAIN] for key in keys}
    if len(domains) != 1:
        raise dg.Failure(f"a run covers exactly one domain, this one covers {sorted(domains)}")
    days = sorted(date.fromisoformat(key.keys_by_dimension[DATE]) for key in keys)
    return domains.pop(), days


def range_tags(domain: str, first: date, last: date) -> dict[str, str]:
    """Run tags that make one run cover ``domain``'s days ``first``..``last``."""
    return {
        PARTITION_RANGE_START_TAG: partition_key(domain, first),
        PARTITION_RANGE_END_TAG: partition_key(domain, last),
    }
