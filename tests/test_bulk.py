"""Bulk landing batches (simulation.bulk): accumulation, dbt and labeling take them as they take
simulated ones, so the generator cannot drift away from the event contract unnoticed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import dagster as dg
import pytest

from flywheel_pipeline.accumulation import accumulate
from flywheel_pipeline.config import FlywheelConfig, load_config
from flywheel_pipeline.definitions import build_definitions
from flywheel_pipeline.defs.assets import LABELS
from flywheel_pipeline.defs.partitions import days_between, range_tags
from flywheel_pipeline.defs.transform import GROUP, RAW_EVENTS
from flywheel_pipeline.home import Home
from flywheel_pipeline.simulation import SimulationSummary
from flywheel_pipeline.simulation.bulk import write_bulk_landing
from flywheel_pipeline.warehouse import connect
from tests.conftest import REPO

DAYS = 4
LAST = datetime.now(UTC).date() - timedelta(days=1)
FIRST = LAST - timedelta(days=DAYS - 1)
EVENTS = 8000
BAD_SHARE = 0.03
BAD_LINE_REASONS = {"malformed_json", "not_an_object", "missing_field:user_id", "wrong_type:timestamp",
                    "future_timestamp", "user_id_not_pseudonymous", "duplicate_event_id", "conflicting_duplicate"}


class Bulk(NamedTuple):
    home: Home
    config: FlywheelConfig
    summary: SimulationSummary


@pytest.fixture(scope="module")
def bulk(tmp_path_factory) -> Bulk:
    home = Home(tmp_path_factory.mktemp("bulk")).ensure()
    config = load_config(REPO / "flywheel.yaml")
    return Bulk(home, config, write_bulk_landing(home, config, FIRST, DAYS, EVENTS, seed=5, bad_share=BAD_SHARE))


def test_about_the_events_asked_for_in_both_domains_and_their_review_batches(bulk):
    summary = bulk.summary
    assert abs(summary.total_events + summary.total_bad_rows - EVENTS) < 0.05 * EVENTS
    assert {b.domain for b in summary.batches} == set(bulk.config.domains)
    for domain in bulk.config.domains:
        product = [b for b in summary.batches if b.domain == domain and b.path.parent.name == domain]
        reviews = [b for b in summary.batches if b.domain == domain and b.path.parent.name == "labels"]
        assert [b.day for b in product] == days_between(FIRST, LAST)
        assert reviews and all(b.interactions == 0 for b in reviews)


def test_every_valid_line_is_accepted_and_every_bad_line_quarantined(bulk):
    home, config, summary = bulk
    for domain in config.domains:
        written = [b for b in summary.batches if b.domain == domain]
        with connect(home.warehouse(domain)) as con:
            report = accumulate(con, home, config, domain, days_between(FIRST, LAST))
            assert report.reconciles
            assert report.lines_in == sum(b.events + b.bad_rows for b in written)
            assert sum(report.accepted.values()) == sum(b.events for b in written)
            assert report.quarantined == sum(b.bad_rows for b in written)
            assert set(report.reasons) == BAD_LINE_REASONS, report.reasons
            assert all(report.accepted.values()) and report.impressions > report.accepted["interactions"] / 2


@pytest.mark.slow
def test_the_marts_and_labels_build_from_them_through_dagster(bulk):
    """Each domain's accumulate -> dbt (+ its tests and the GX checks) -> labels, as a cycle runs it."""
    home, config, _ = bulk
    defs = build_definitions(config, home)
    selection = dg.AssetSelection.assets(RAW_EVENTS, LABELS) | dg.AssetSelection.groups(GROUP)
    with dg.DagsterInstance.ephemeral() as instance:
        for domain in config.domains:
            result = dg.materialize([*defs.assets, *defs.asset_checks], selection=selection, instance=instance,
                                    resources=defs.resources, tags=range_tags(domain, FIRST, LAST))
            assert result.success
            evaluations = result.get_asset_check_evaluations()
            assert {"accumulated_traffic", "daily_traffic", "filtered_impressions"} <= {e.check_name for e in evaluations}
            assert all(e.passed for e in evaluations), [e.check_name for e in evaluations if not e.passed]
    for domain in config.domains:
        with connect(home.warehouse(domain)) as con:
            [(coverage, labelled)] = con.execute("""
                SELECT count(*) FILTER (p_good IS NOT NULL) / count(*), count(*) FROM labels.impression_labels
                WHERE domain = $domain""", {"domain": domain}).fetchall()
            [(marts,)] = con.execute("SELECT count(*) FROM marts.fct_impressions").fetchall()
        assert coverage > 0.5 and marts == labelled > 0, domain
