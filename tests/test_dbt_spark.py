"""The dbt project on Spark (dbt-spark, a local session) builds, passes its tests and leaves every
intermediate model and mart with the rows the DuckDB build leaves (scripts/dbt_on_spark.py).

Needs the optional extra `spark` and Java 17+; skipped without them. Takes minutes (Spark's JVM
starts twice): `pytest -m spark`."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from flywheel_pipeline.home import Home
from tests.conftest import REPO

MISSING = [name for name, present in (
    ("pyspark", importlib.util.find_spec("pyspark") is not None),
    ("dbt-spark", importlib.util.find_spec("dbt.adapters.spark") is not None),
    ("java", shutil.which("java") is not None),
) if not present]

pytestmark = [
    pytest.mark.spark,
    pytest.mark.skipif(bool(MISSING), reason=f"dbt on Spark: {', '.join(MISSING)} missing; it needs "
                       "the optional extra spark (`pip install -e '.[spark]'`) and Java 17+"),
    pytest.mark.timeout(1200),
]


@pytest.fixture(scope="module")
def dbt_on_spark():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import dbt_on_spark
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return dbt_on_spark


def test_both_engines_build_the_same_rows(dbt_on_spark, tmp_path: Path):
    home = Home(tmp_path / "home").ensure()
    comparisons, seconds = dbt_on_spark.compare_engines(home, days=1, interactions_per_day=15,
                                                       domains=["assistant", "recommendation"])
    print(dbt_on_spark.report(comparisons, seconds))
    assert [row.table for row in comparisons] == [
        "intermediate.int_impression_signals", "intermediate.int_interactions_flagged",
        "intermediate.int_reactions", "intermediate.int_sessions",
        "marts.fct_impressions", "marts.fct_interactions", "marts.rpt_quality_filter"]
    assert all(row.duckdb_rows > 0 for row in comparisons)
    assert [row.table for row in comparisons if not row.matches] == []
    rules = dbt_on_spark.spark_table(home, "marts.rpt_quality_filter")["rule"].unique().sort().to_list()
    assert rules == ["bot_session", "consent_denied", "duplicate_interaction", "input_too_long", "kept",
                     "response_too_long"]  # every rule the planted cases break, judged alike
