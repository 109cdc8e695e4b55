"""The stages' one input interface: the same reads from a domain's DuckDB warehouse and from Parquet
partitions as Spark writes them give the same frames, so labeling, training and validation see the
same input whichever engine holds it; and ParquetSink replaces exactly one partition at a time."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from flywheel_pipeline import sources
from flywheel_pipeline.labeling.stage import maturity_cutoff, read_impressions, with_reaction_window
from flywheel_pipeline.sources import DuckDBSource, ParquetSink, ParquetSource, export_parquet
from flywheel_pipeline.training.base import Windows, impressions, label_model_versions
from flywheel_pipeline.validation.evidence import holdout_rows, logged_candidates
from flywheel_pipeline.warehouse import connect
from tests.test_pipeline import DOMAIN, FIRST, LAST

pytestmark = pytest.mark.slow  # reads the assistant cycle (conftest)

TABLES = [sources.IMPRESSIONS, sources.LABELS, sources.INTERACTIONS]


@pytest.fixture(scope="module")
def both(assistant_cycle, tmp_path_factory):
    """The assistant cycle's warehouse, read directly and as exported Parquet partitions."""
    root = tmp_path_factory.mktemp("parquet")
    with connect(assistant_cycle.home.warehouse(DOMAIN), read_only=True) as con:
        export_parquet(con, TABLES, root)
        yield assistant_cycle.config, DuckDBSource(con), ParquetSource(root)


def test_the_parquet_layout_is_spark_s(both):
    _, _, parquet = both
    folder = Path(sources.table_folder(parquet.root, sources.IMPRESSIONS)) / f"domain={DOMAIN}"
    assert folder.parent.parent.name == "marts.db"
    days = sorted(path.name for path in folder.iterdir())
    assert days[0] == f"event_date={FIRST}" and days[-1] == f"event_date={LAST}"


def test_training_reads_the_same_labelled_impressions(both):
    _, duck, parquet = both
    rows = impressions(duck, DOMAIN, FIRST, LAST)
    assert rows.height > 1000 and rows["p_good"].is_not_null().any() and rows["p_good"].is_null().any()
    assert_frame_equal(impressions(parquet, DOMAIN, FIRST, LAST), rows)
    assert label_model_versions(parquet, DOMAIN, FIRST, LAST) == label_model_versions(duck, DOMAIN, FIRST, LAST) != ""


def test_labeling_reads_the_same_impressions_and_maturity(both):
    config, duck, parquet = both
    settings = config.domain(DOMAIN)
    read = {name: with_reaction_window(source, DOMAIN, settings, read_impressions(source, DOMAIN, FIRST, LAST))
            for name, source in (("duckdb", duck), ("parquet", parquet))}
    assert_frame_equal(read["parquet"], read["duckdb"])
    assert maturity_cutoff(parquet, config, DOMAIN, LAST) == maturity_cutoff(duck, config, DOMAIN, LAST) is not None


def test_validation_reads_the_same_held_out_evidence(both):
    config, duck, parquet = both
    windows = Windows(FIRST, LAST - timedelta(days=2), LAST - timedelta(days=1), LAST)
    outcome = config.domain(DOMAIN).label_maturity.outcome
    held_out = holdout_rows(duck, DOMAIN, windows, outcome)
    assert held_out["outcome"].sum() > 0
    assert_frame_equal(holdout_rows(parquet, DOMAIN, windows, outcome), held_out)
    logged = logged_candidates(duck, DOMAIN, windows).sort("interaction_id", "item_id")
    assert logged.height > held_out["interaction_id"].n_unique()  # more candidates than shown
    assert_frame_equal(logged_candidates(parquet, DOMAIN, windows).sort("interaction_id", "item_id"), logged)


def test_a_table_or_domain_not_there_reads_empty(both, tmp_path):
    _, duck, parquet = both
    assert duck.read("labels.no_such_table", DOMAIN).is_empty()
    assert parquet.read(sources.IMPRESSIONS, "recommendation").is_empty()
    assert ParquetSource(tmp_path).read(sources.LABELS, DOMAIN, date(2026, 1, 1)).is_empty()


def test_the_sink_replaces_one_partition_whole_and_removes_an_emptied_one(both, tmp_path):
    _, duck, _ = both
    labels = duck.read(sources.LABELS, DOMAIN)
    sink, copy = ParquetSink(tmp_path), ParquetSource(tmp_path)
    for day in (FIRST, LAST):
        sink.replace_partition(sources.LABELS, DOMAIN, day, labels.filter(pl.col("event_date") == day).to_arrow())
    assert_frame_equal(copy.read(sources.LABELS, DOMAIN), labels.filter(pl.col("event_date").is_in([FIRST, LAST])))
    sink.replace_partition(sources.LABELS, DOMAIN, FIRST, labels.filter(pl.col("event_date") == LAST).head(0).to_arrow())
    assert_frame_equal(copy.read(sources.LABELS, DOMAIN), labels.filter(pl.col("event_date") == LAST))
    folder = Path(sources.table_folder(str(tmp_path), sources.LABELS)) / f"domain={DOMAIN}"
    assert [path.name for path in folder.iterdir()] == [f"event_date={LAST}"]
    assert [path.name for path in (folder / f"event_date={LAST}").iterdir()] == [sources.PARTITION_FILE]
