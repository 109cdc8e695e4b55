"""Great Expectations suites on the accumulated and the filtered data.

The event contract (events.py) already rejects bad rows one by one; these suites check what no
single row shows: a day that delivered nothing, an exploration slice that vanished from the logs,
duplicates or out-of-range values that slipped past filtering. Each suite runs on a polars frame
(converted to pandas at the edge, GX reads pandas) in an ephemeral GX context; checks.py wires them
as blocking Dagster asset checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import polars.selectors as cs
import yaml

from flywheel_pipeline.config import DomainConfig
from flywheel_pipeline.events import CONSENT_STATES, POLICIES
from flywheel_pipeline.sources import IMPRESSIONS, INTERACTIONS, Readable, as_source

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

DBT_PROJECT_FILE = Path(__file__).resolve().parent.parent / "dbt_project" / "dbt_project.yml"
EXPLORATION_TOLERANCE = 0.5  # the logged exploration share may be off by this factor either way
TRAFFIC_BASELINE_DAYS = 28  # a day's traffic is compared with the median day of these before the run and the run's


@dataclass(frozen=True)
class SuiteResult:
    """One suite's verdict on one frame: every failed expectation named with what it observed."""

    suite: str
    n_rows: int
    evaluated: int
    failures: list[str]

    @property
    def success(self) -> bool:
        return not self.failures

    def metadata(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "rows": self.n_rows,
            "expectations": self.evaluated,
            "failed": len(self.failures),
            "failures": "; ".join(self.failures) or "none",
        }


def raw_interactions(source: Readable, domain: str, first: date, last: date) -> pl.DataFrame:
    """Accumulated interactions of ``domain`` on days first..last: the columns
    raw_interactions_suite checks, with an exploration flag."""
    rows = _read(source, INTERACTIONS, domain, first, last,
                 {"event_id": pl.String, "event_date": pl.Date, "policy": pl.String, "consent": pl.String})
    return rows.select("event_id", pl.col("event_date").cast(pl.Datetime("us")), "policy", "consent",
                       (pl.col("policy") == "explore").cast(pl.Int32).alias("is_exploration"))


def daily_traffic(source: Readable, domain: str, first: date, last: date) -> tuple[pl.DataFrame, float]:
    """Accepted interactions of ``domain`` on each day first..last (0 for a day that delivered none),
    and the median day that delivered any, over those days and the 28 before them."""
    since = first - timedelta(days=TRAFFIC_BASELINE_DAYS)
    per_day = _read(source, INTERACTIONS, domain, since, last, {"event_date": pl.Date}).group_by("event_date").len()
    counts = (pl.DataFrame({"event_date": pl.date_range(since, last, eager=True)})
              .join(per_day, on="event_date", how="left")
              .select(pl.col("event_date").dt.strftime("%Y-%m-%d").alias("day"),
                      pl.col("len").fill_null(0).cast(pl.Int64).alias("interactions")))
    median = counts.filter(pl.col("interactions") > 0)["interactions"].median() or 0.0
    return counts.filter(pl.col("day") >= first.isoformat()), float(median)


def filtered_impressions(source: Readable, domain: str, first: date, last: date) -> pl.DataFrame:
    """The impressions of ``domain`` on days first..last that passed quality filtering (marts.fct_impressions)."""
    return _read(source, IMPRESSIONS, domain, first, last,
                 {"domain": pl.String, "interaction_id": pl.String, "item_id": pl.String, "position": pl.Int32,
                  "propensity": pl.Float64, "policy": pl.String, "input_text": pl.String})


def _read(source: Readable, table: str, domain: str, first: date, last: date,
          columns: dict[str, pl.DataType]) -> pl.DataFrame:
    """``columns`` of ``domain``'s rows of ``table`` on days first..last; none (with those columns)
    while the table does not exist."""
    rows = as_source(source).read(table, domain, first, last, list(columns))
    return rows if rows.width else pl.DataFrame(schema=columns)


def raw_interactions_suite(domain_config: DomainConfig, first: date, last: date) -> list[Expectation]:
    """What accumulated traffic of a range of days must look like as a whole."""
    import great_expectations.expectations as gxe

    share = domain_config.exploration_share
    expectations = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="event_id"),
        gxe.ExpectColumnValuesToBeBetween(
            column="event_date",
            min_value=datetime.combine(first, time()),
            max_value=datetime.combine(last, time()),
        ),
        gxe.ExpectColumnValuesToBeInSet(column="policy", value_set=list(POLICIES)),
        gxe.ExpectColumnValuesToBeInSet(column="consent", value_set=list(CONSENT_STATES)),
    ]
    if share > 0:  # the exploration slice the domain's config promises is in the logs (0: nothing promised)
        expectations.append(
            gxe.ExpectColumnMeanToBeBetween(
                column="is_exploration",
                min_value=share * EXPLORATION_TOLERANCE,
                max_value=min(1.0, share / EXPLORATION_TOLERANCE),
            )
        )
    return expectations


def exploration_suite() -> list[Expectation]:
    """Some of the run's traffic was served at random (whatever the domain declares): without an
    exploration slice the examination curve and the off-policy estimates have nothing unbiased to
    learn from, and each model only re-ranks what its predecessor showed. A warning."""
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnMaxToBeBetween(column="is_exploration", min_value=1)]


def daily_traffic_suite(median_day: float, min_share: float) -> list[Expectation]:
    """Every day delivered traffic: at least ``min_share`` of the median day, and at least one interaction."""
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToBeBetween(column="interactions", min_value=max(1.0, min_share * median_day))]


def filtered_impressions_suite(input_optional: bool = False) -> list[Expectation]:
    """What quality filtering promises downstream: keys, positions, propensities in (0, 1] where
    known (null: the logger's probability was not logged), text bounds (an empty input allowed
    where the domain declares its input optional)."""
    import great_expectations.expectations as gxe

    bounds = dbt_vars()
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *(
            gxe.ExpectColumnValuesToNotBeNull(column=column)
            for column in ("domain", "interaction_id", "item_id", "position", "policy")
        ),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["domain", "interaction_id", "item_id"]),
        gxe.ExpectColumnValuesToBeBetween(column="position", min_value=0),
        # positions are 0-based: without a top slot (a 1-based log) no examination curve exists
        gxe.ExpectColumnMinToBeBetween(column="position", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToBeBetween(
            column="propensity", min_value=0, max_value=1, strict_min=True
        ),
        gxe.ExpectColumnValuesToBeInSet(column="policy", value_set=list(POLICIES)),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="input_text",
            min_value=0 if input_optional else bounds["min_input_chars"],
            max_value=bounds["max_input_chars"],
        ),
    ]


@cache
def dbt_vars() -> dict[str, Any]:
    """The filtering thresholds, read from dbt_project.yml so dbt and GX share one value."""
    return yaml.safe_load(DBT_PROJECT_FILE.read_text())["vars"]


def run_suite(
    name: str, frame: pl.DataFrame, expectations: list[Expectation], index_column: str | None = None
) -> SuiteResult:
    """Validate ``frame`` against ``expectations`` in an ephemeral GX context; a failure names its
    rows by ``index_column`` when given."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(name)
        .get_batch(batch_parameters={"dataframe": _for_pandas(frame, expectations, index_column)})
    )
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    result_format = ({"result_format": "COMPLETE", "unexpected_index_column_names": [index_column]}
                     if index_column else "SUMMARY")
    result = batch.validate(suite, result_format=result_format)
    failures = [_describe(outcome) for outcome in result.results if not outcome.success]
    return SuiteResult(name, frame.height, len(result.results), failures)


def _for_pandas(
    frame: pl.DataFrame, expectations: list[Expectation], index_column: str | None
) -> pd.DataFrame:
    """``frame`` in the pandas dtypes GX checks vectorised: int64 and nanosecond timestamps (it
    checks the range of an int32 or microsecond column one Python call per row).

    A text column that the expectations only test for nulls and duplicates goes as its
    dictionary codes: the same nulls and duplicates, found by hashing integers (pandas hashing
    millions of strings was most of the filtered_impressions suite's time).
    """
    identity_only = set(frame.select(cs.string()).columns) - {index_column}
    for expectation in expectations:
        if not isinstance(expectation, _identity_checks()):
            identity_only -= set(_columns(expectation))
    return frame.with_columns(
        cs.integer().cast(pl.Int64),
        cs.datetime().cast(pl.Datetime("ns")),
        *(pl.col(column).cast(pl.Categorical).to_physical().cast(pl.Int64) for column in identity_only),
    ).to_pandas()


def _identity_checks() -> tuple[type[Expectation], ...]:
    """Expectations that only compare values for equality or null."""
    import great_expectations.expectations as gxe

    return (gxe.ExpectColumnValuesToNotBeNull, gxe.ExpectColumnValuesToBeUnique,
            gxe.ExpectCompoundColumnsToBeUnique)


def _columns(expectation: Expectation) -> list[str]:
    column = getattr(expectation, "column", None)
    return [column] if column else list(getattr(expectation, "column_list", None) or [])


def _describe(outcome: Any) -> str:
    """``expect_column_mean_to_be_between(is_exploration): observed 0.0, expected 0.05..0.2``."""
    config = outcome.expectation_config
    target = config.kwargs.get("column") or config.kwargs.get("column_list") or "table"
    observed = outcome.result.get("observed_value")
    if observed is None and outcome.result.get("unexpected_index_list"):
        index = outcome.result["unexpected_index_column_names"][0]
        observed = ", ".join(f"{row[index]}: {row[target]}" for row in outcome.result["unexpected_index_list"])
    elif observed is None and "unexpected_count" in outcome.result:
        observed = f"{outcome.result['unexpected_count']} unexpected rows"
    if outcome.exception_info and outcome.exception_info.get("raised_exception"):
        observed = outcome.exception_info.get("exception_message")
    return f"{config.type}({target}): observed {observed}{_expected(config.kwargs)}"


def _expected(kwargs: dict[str, Any]) -> str:
    """``, expected 0.05..0.2`` (or ``>= 1``, ``<= 0``) from an expectation's bounds or value set ('' without
    either)."""
    if kwargs.get("value_set") is not None:
        return f", expected one of {list(kwargs['value_set'])}"
    low, high = (_number(kwargs.get(bound)) for bound in ("min_value", "max_value"))
    if low is None and high is None:
        return ""
    return f", expected {low}..{high}" if low and high else f", expected {'>= ' + low if low else '<= ' + high}"


def _number(value: object) -> str | None:
    return f"{value:g}" if isinstance(value, float) else None if value is None else str(value)
