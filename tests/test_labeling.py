"""Labeling: LF votes, the label model, LF statistics, label delay, and the labels.* partitions."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone

import duckdb
import numpy as np
import polars as pl
import pytest

from flywheel_pipeline.labeling import functions as lfs
from flywheel_pipeline.labeling import stage
from flywheel_pipeline.labeling.analysis import COHORT, label_delays, lf_summary, mature_until
from flywheel_pipeline.labeling.functions import ABSTAIN, BAD, GOOD, LABELING_FUNCTIONS
from flywheel_pipeline.labeling.model import DawidSkene, MajorityVote
from flywheel_pipeline.labeling.stage import label_partitions, maturity_cutoff

# --- marts.fct_impressions, hand-built -----------------------------------------------------------

FCT_IMPRESSIONS = {
    "domain": pl.String,
    "event_date": pl.Date,
    "interaction_id": pl.String,
    "item_id": pl.String,
    "position": pl.Int32,
    "propensity": pl.Float64,
    "policy": pl.String,
    "model_version": pl.String,
    "served_at": pl.Datetime("us"),
    "user_id": pl.String,
    "session_id": pl.String,
    "is_new_user": pl.Boolean,
    "segment": pl.String,
    "input_text": pl.String,
    "item_content": pl.String,
    "slate_size": pl.Int32,
    "accepted": pl.Boolean,
    "accepted_at_s": pl.Float64,
    "reverted_after_accept_s": pl.Float64,
    "rejected": pl.Boolean,
    "edit_ratio": pl.Float64,
    "edited_text": pl.String,
    "reformulated_after_s": pl.Float64,
    "copied": pl.Boolean,
    "abandoned_after_s": pl.Float64,
    "rating": pl.Float64,
    "clicked": pl.Boolean,
    "clicked_after_s": pl.Float64,
    "dwell_s": pl.Float64,
    "max_clicked_position": pl.Int32,
    "outcome_name": pl.String,
    "outcome_value": pl.Float64,
    "outcome_at": pl.Datetime("us"),
    "outcome_delay_s": pl.Float64,
    "review_value": pl.Float64,
    "reviewed_at": pl.Datetime("us"),
    "audit_review_value": pl.Float64,
    "reaction_window_closed": pl.Boolean,  # added by the labeling stage, not in the mart
}

DAYS = [date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 3)]

# One assistant reaction pattern per interaction, cycling: clear good, clear bad, and silence.
RESOLVED, UNRESOLVED = (
    {"outcome_name": "resolved", "outcome_value": value} for value in (1.0, 0.0)
)
REACTIONS = [
    {"accepted": True, "copied": True, **RESOLVED},
    {"accepted": True, "reverted_after_accept_s": 60.0, **UNRESOLVED},
    {"edit_ratio": 0.8, **UNRESOLVED},
    {"accepted": True, "rating": 5.0, **RESOLVED},
    {"reformulated_after_s": 20.0, "rating": 1.0},
    {},
]


def impression(**values: object) -> dict[str, object]:
    """A fct_impressions row: the given columns, every other reaction null."""
    return {column: values.get(column) for column in FCT_IMPRESSIONS}


def assistant_day(day: date, per_day: int = 30) -> list[dict[str, object]]:
    rows = []
    for i in range(per_day):
        served_at = datetime.combine(day, datetime.min.time()) + timedelta(minutes=i)
        reaction = dict(REACTIONS[i % len(REACTIONS)])
        if "outcome_value" in reaction:
            reaction["outcome_delay_s"] = 3600.0 * (i + 1)
            reaction["outcome_at"] = served_at + timedelta(seconds=reaction["outcome_delay_s"])
        if i % 5 == 0:
            reaction["review_value"] = reaction["audit_review_value"] = 1.0 if i % len(REACTIONS) in (0, 3) else 0.0
        rows.append(
            impression(
                domain="assistant",
                event_date=day,
                interaction_id=f"a-{day:%d}-{i}",
                item_id="r0",
                position=0,
                served_at=served_at,
                is_new_user=i % 2 == 0,
                segment=f"s{i % 3}",
                **reaction,
            )
        )
    return rows


def recommendation_day(day: date) -> list[dict[str, object]]:
    served_at = datetime.combine(day, datetime.min.time())
    return [
        impression(
            domain="recommendation",
            event_date=day,
            interaction_id=f"r-{day:%d}",
            item_id=f"item{p}",
            position=p,
            served_at=served_at,
            is_new_user=False,
            segment="s0",
            clicked=p == 1,
            dwell_s=60.0 if p == 1 else None,
            max_clicked_position=1,
        )
        for p in range(3)
    ]


@pytest.fixture
def con(tmp_path):
    rows = [row for day in [date(2026, 2, 20), *DAYS] for row in assistant_day(day)]
    rows += [row for day in DAYS for row in recommendation_day(day)]
    frame = pl.DataFrame(rows, schema=FCT_IMPRESSIONS).drop(lfs.STAGE_COLUMNS)
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    connection.execute("CREATE SCHEMA marts")
    connection.register("fct_rows", frame)
    connection.execute("CREATE TABLE marts.fct_impressions AS SELECT * FROM fct_rows")
    connection.unregister("fct_rows")
    yield connection
    connection.close()


def labels_of(
    con: duckdb.DuckDBPyConnection,
    day: date | None = None,
    table: str = "impression_labels",
    columns: str = "*",
) -> list[tuple]:
    where = "" if day is None else f"WHERE event_date = DATE '{day}'"
    return con.sql(f"SELECT {columns} FROM labels.{table} {where} ORDER BY ALL").fetchall()


# --- labeling functions --------------------------------------------------------------------------

LF_CASES = [
    ("accepted_kept", {"accepted": True}, GOOD),
    ("accepted_kept", {"accepted": True, "reverted_after_accept_s": lfs.REVERT_WINDOW_S + 1}, GOOD),
    ("accepted_kept", {"accepted": True, "reverted_after_accept_s": 60.0}, ABSTAIN),
    ("accepted_kept", {"accepted": False}, ABSTAIN),
    ("accepted_then_reverted", {"accepted": True, "reverted_after_accept_s": 60.0}, BAD),
    (
        "accepted_then_reverted",
        {"accepted": True, "reverted_after_accept_s": lfs.REVERT_WINDOW_S + 1},
        ABSTAIN,
    ),
    ("accepted_then_reverted", {"accepted": True}, ABSTAIN),
    ("rejected", {"rejected": True}, BAD),
    ("rejected", {"rejected": False}, ABSTAIN),
    ("heavy_edit", {"edit_ratio": 0.8}, BAD),
    ("heavy_edit", {"edit_ratio": lfs.HEAVY_EDIT_RATIO}, ABSTAIN),
    ("light_edit", {"edit_ratio": 0.05}, GOOD),
    ("light_edit", {"edit_ratio": 0.35}, ABSTAIN),
    ("quick_reformulation", {"reformulated_after_s": 20.0}, BAD),
    ("quick_reformulation", {"reformulated_after_s": lfs.REFORMULATE_WINDOW_S + 1}, ABSTAIN),
    ("copied", {"copied": True}, GOOD),
    ("copied", {"copied": False}, ABSTAIN),
    ("quick_abandon", {"abandoned_after_s": 5.0}, BAD),
    ("quick_abandon", {"abandoned_after_s": lfs.ABANDON_WINDOW_S + 1}, ABSTAIN),
    ("explicit_rating", {"rating": 5.0}, GOOD),
    ("explicit_rating", {"rating": 4.0}, GOOD),
    ("explicit_rating", {"rating": 3.0}, ABSTAIN),
    ("explicit_rating", {"rating": 2.0}, BAD),
    ("explicit_rating", {"rating": 1.0}, BAD),
    ("delayed_outcome", {"outcome_value": 1.0}, GOOD),
    ("delayed_outcome", {"outcome_value": 0.0}, BAD),
    ("delayed_outcome", {"outcome_value": 42.5}, GOOD),
    ("clicked", {"clicked": True}, GOOD),
    ("clicked", {"clicked": False}, ABSTAIN),
    ("long_dwell", {"dwell_s": 45.0}, GOOD),
    ("long_dwell", {"dwell_s": 15.0}, ABSTAIN),
    ("pogo_stick", {"dwell_s": 3.0}, BAD),
    ("pogo_stick", {"dwell_s": 15.0}, ABSTAIN),
    ("examined_but_skipped", {"position": 0, "clicked": False, "max_clicked_position": 2}, BAD),
    ("examined_but_skipped", {"position": 0, "max_clicked_position": 2}, BAD),
    ("examined_but_skipped", {"position": 2, "clicked": True, "max_clicked_position": 2}, ABSTAIN),
    ("examined_but_skipped", {"position": 3, "clicked": False, "max_clicked_position": 2}, ABSTAIN),
    ("examined_but_skipped", {"position": 0, "clicked": False}, ABSTAIN),
]


@pytest.mark.parametrize(("lf", "reaction", "expected"), LF_CASES)
def test_labeling_function_votes(lf, reaction, expected):
    rows = pl.DataFrame([impression(**reaction)], schema=FCT_IMPRESSIONS)
    assert LABELING_FUNCTIONS[lf](rows).to_list() == [expected]


def test_every_labeling_function_abstains_without_signals():
    rows = pl.DataFrame([impression(position=0)], schema=FCT_IMPRESSIONS)
    votes = lfs.apply_lfs(rows)
    assert votes.columns == list(LABELING_FUNCTIONS)
    assert set(votes.row(0)) == {ABSTAIN}


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        lfs.labeling_function(name="copied")(lambda: pl.lit(ABSTAIN))


# --- label model ---------------------------------------------------------------------------------


def synthetic_votes(
    n: int, accuracies: list[float], coverages: list[float], prior: float = 0.4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Independent LFs that each vote with ``coverage`` and are right with ``accuracy``."""
    rng = np.random.default_rng(seed)
    truth = (rng.random(n) < prior).astype(np.int8)
    return independent_votes(rng, truth, accuracies, coverages), truth


def independent_votes(
    rng: np.random.Generator, truth: np.ndarray, accuracies: list[float], coverages: list[float]
) -> np.ndarray:
    votes = np.full((len(truth), len(accuracies)), ABSTAIN, dtype=np.int8)
    for j, (accuracy, coverage) in enumerate(zip(accuracies, coverages, strict=True)):
        fires = rng.random(len(truth)) < coverage
        right = rng.random(len(truth)) < accuracy
        votes[fires, j] = np.where(right, truth, 1 - truth)[fires]
    return votes


def accuracy(p_good: np.ndarray, truth: np.ndarray) -> float:
    labelled = ~np.isnan(p_good)
    return float(((p_good[labelled] >= 0.5) == truth[labelled]).mean())


def test_dawid_skene_recovers_lf_accuracies_deterministically():
    accuracies = [0.9, 0.85, 0.75, 0.7, 0.65]
    votes, _ = synthetic_votes(30_000, accuracies, [0.6] * 5)
    model = DawidSkene().fit(votes)
    assert model.converged
    np.testing.assert_allclose(model.lf_accuracies(), accuracies, atol=0.02)
    assert model.prior_good == pytest.approx(0.4, abs=0.03)
    np.testing.assert_array_equal(
        DawidSkene().fit(votes).predict_proba(votes), model.predict_proba(votes)
    )


def test_dawid_skene_beats_majority_vote_when_accuracies_differ():
    votes, truth = synthetic_votes(20_000, [0.95, 0.9, 0.6, 0.6, 0.55], [0.3, 0.3, 0.95, 0.9, 0.9])
    dawid_skene = accuracy(DawidSkene().fit(votes).predict_proba(votes), truth)
    majority = accuracy(MajorityVote().predict_proba(votes), truth)
    assert dawid_skene > majority + 0.05


def test_one_sided_lfs_still_inform_dawid_skene():
    """Click-like LFs only ever vote one way: their evidence is firing more often on one class."""
    rng = np.random.default_rng(1)
    truth = (rng.random(20_000) < 0.5).astype(np.int8)
    one_sided = [
        (GOOD, 0.6, 0.05),
        (GOOD, 0.4, 0.1),
        (GOOD, 0.3, 0.15),
        (BAD, 0.1, 0.5),
        (BAD, 0.05, 0.3),
    ]
    votes = np.column_stack(
        [
            np.where(rng.random(len(truth)) < np.where(truth == 1, if_good, if_bad), vote, ABSTAIN)
            for vote, if_good, if_bad in one_sided  # P(fires | good), P(fires | bad)
        ]
    ).astype(np.int8)
    model = DawidSkene().fit(votes)
    for j, (vote, _, _) in enumerate(one_sided):
        fired = votes[:, j] == vote
        assert model.lf_accuracies()[j] == pytest.approx((truth[fired] == vote).mean(), abs=0.04)
    p_good = model.predict_proba(votes)
    assert accuracy(p_good, truth) > accuracy(MajorityVote().predict_proba(votes), truth) + 0.03


def test_lfs_reading_one_reaction_vote_as_one():
    """Accept, reject and reformulate exclude each other: their LFs are one voter, not three."""
    rng = np.random.default_rng(2)
    truth = (rng.random(30_000) < 0.45).astype(np.int8)
    reaction = np.where(  # 0 accept, 1 reject, 2 reformulate, 3 nothing
        truth == 1,
        rng.choice(4, len(truth), p=[0.7, 0.05, 0.05, 0.2]),
        rng.choice(4, len(truth), p=[0.1, 0.35, 0.35, 0.2]),
    )
    reactions = np.column_stack(
        [
            np.where(reaction == 0, GOOD, ABSTAIN),
            np.where(reaction == 1, BAD, ABSTAIN),
            np.where(reaction == 2, BAD, ABSTAIN),
        ]
    )
    outcome_rating_noisy = independent_votes(rng, truth, [0.9, 0.93, 0.6], [0.4, 0.1, 0.9])
    votes = np.hstack([reactions, outcome_rating_noisy]).astype(np.int8)
    model = DawidSkene(voters=[[0, 1, 2], [3], [4], [5]]).fit(votes)
    empirical = [
        (votes[voted, j] == truth[voted]).mean() for j, voted in enumerate((votes != ABSTAIN).T)
    ]
    np.testing.assert_allclose(model.lf_accuracies(), empirical, atol=0.03)
    by_reaction = accuracy(model.predict_proba(votes), truth)
    assert by_reaction > accuracy(DawidSkene().fit(votes).predict_proba(votes), truth) + 0.03
    assert by_reaction > accuracy(MajorityVote().predict_proba(votes), truth) + 0.05


def test_lfs_of_one_source_are_one_voter():
    sources = [LABELING_FUNCTIONS[name].source for name in ("accepted_kept", "clicked", "copied")]
    assert sources == [lfs.IMPLICIT] * 3
    assert LABELING_FUNCTIONS["delayed_outcome"].source == lfs.OUTCOME
    grouped = lfs.voters(list(LABELING_FUNCTIONS.values()))
    assert sorted(j for voter in grouped for j in voter) == list(range(len(LABELING_FUNCTIONS)))
    assert len(grouped) == 3


def test_smoothing_keeps_a_rare_lf_below_perfect():
    votes, _ = synthetic_votes(5_000, [0.8, 0.8, 0.8], [0.7, 0.7, 0.7])
    rare = np.full((len(votes), 1), ABSTAIN, dtype=np.int8)
    rare[:3, 0] = (votes[:3, 0] == GOOD).astype(np.int8)  # three votes, all agreeing with LF 0
    model = DawidSkene().fit(np.hstack([votes, rare]))
    assert model.lf_accuracies()[-1] < 1.0


def test_rows_where_every_lf_abstained_get_no_label():
    votes = np.array([[GOOD, ABSTAIN], [ABSTAIN, ABSTAIN], [BAD, BAD], [GOOD, BAD]], dtype=np.int8)
    for model in (DawidSkene().fit(votes), MajorityVote().fit(votes)):
        p_good = model.predict_proba(votes)
        assert np.isnan(p_good[1]) and not np.isnan(p_good[[0, 2, 3]]).any()
    assert MajorityVote().predict_proba(votes).tolist()[2:] == [0.0, 0.5]


# --- analysis ------------------------------------------------------------------------------------


def test_lf_summary_uses_snorkels_definitions():
    votes = np.array([[-1, 0, 0], [-1, -1, -1], [1, 0, -1], [-1, 0, -1], [0, 0, 0]], dtype=np.int8)
    gold = np.array([0, np.nan, 1, 1, np.nan])
    summary = lf_summary(votes, ["a", "b", "c"], gold, learned_accuracy=np.array([0.9, 0.8, 0.7]))
    assert summary.get_column("polarity").to_list() == ["good/bad", "bad", "bad"]
    np.testing.assert_allclose(summary.get_column("coverage"), [0.4, 0.8, 0.4])
    np.testing.assert_allclose(summary.get_column("overlaps"), [0.4, 0.6, 0.4])
    np.testing.assert_allclose(summary.get_column("conflicts"), [0.2, 0.2, 0.0])
    assert summary.get_column("correct").to_list() == [1, 1, 1]
    assert summary.get_column("incorrect").to_list() == [0, 2, 0]
    assert summary.get_column("empirical_accuracy").to_list() == [1.0, pytest.approx(1 / 3), 1.0]


def test_label_delay_percentiles_count_each_outcome_once():
    rows = [
        impression(
            domain="assistant",
            interaction_id=f"i{h}",
            item_id=f"item{k}",
            outcome_name="resolved",
            outcome_delay_s=3600.0 * h,
            outcome_at=datetime(2026, 1, 1) + timedelta(hours=h),
        )
        for h in range(101)
        for k in range(2)  # each outcome seen on two impressions
    ]
    rows.append(
        impression(
            domain="assistant",
            interaction_id="x",
            outcome_name="other",
            outcome_delay_s=1e9,
            outcome_at=datetime(2026, 1, 1),
        )
    )
    delays = label_delays(pl.DataFrame(rows, schema=FCT_IMPRESSIONS), {"assistant": "resolved"})
    assert delays.row(0, named=True) == {
        "domain": "assistant",
        "outcome": "resolved",
        "outcomes": 101,
        "p50_h": 50.0,
        "p90_h": 90.0,
        "p99_h": 99.0,
    }


def test_mature_until_waits_out_the_quantile_delay():
    day = 24 * 3600.0
    assert mature_until([day] * 10, 0.9, datetime(2026, 1, 10)) == date(2026, 1, 8)
    assert mature_until([day] * 10, 0.9, datetime(2026, 1, 10, 23)) == date(2026, 1, 8)
    assert mature_until([day] * 10, 0.9, date(2026, 1, 11)) == date(2026, 1, 9)
    mostly_fast = [3600.0] * 90 + [10 * day] * 10
    assert mature_until(mostly_fast, 0.5, datetime(2026, 1, 10)) == date(2026, 1, 8)
    assert mature_until(mostly_fast, 0.99, datetime(2026, 1, 20)) == date(2026, 1, 9)
    as_of_in_new_york = datetime(2026, 1, 9, 20, tzinfo=timezone(timedelta(hours=-5)))  # 01:00 UTC
    assert mature_until([3600.0], 0.9, as_of_in_new_york) == date(2026, 1, 9)
    with pytest.raises(ValueError, match="no outcome delays"):
        mature_until([], 0.9, date(2026, 1, 10))


# --- the stage: labels.* partitions --------------------------------------------------------------


def test_label_partitions_writes_exactly_the_requested_partitions(con, config):
    report = label_partitions(con, "assistant", [DAYS[2], DAYS[1]], config)
    written = con.sql(
        "SELECT domain, event_date, count(*) FROM labels.impression_labels GROUP BY ALL ORDER BY 2"
    ).fetchall()
    assert written == [("assistant", DAYS[1], 30), ("assistant", DAYS[2], 30)]
    matrix_partitions = con.sql(
        "SELECT DISTINCT domain, event_date FROM labels.label_matrix ORDER BY ALL"
    )
    assert matrix_partitions.fetchall() == [("assistant", DAYS[1]), ("assistant", DAYS[2])]
    assert (report.impressions, report.labelled, report.coverage) == (60, 50, pytest.approx(5 / 6))
    assert report.share_good == pytest.approx(0.4)
    settings = config.domain("assistant")
    window = timedelta(days=settings.lookback_days + settings.holdout_days - 1)
    assert (report.fit_start, report.fit_rows) == (DAYS[2] - window, 120)
    assert report.label_model_version == "dawid-skene-v1"
    json.dumps(report.metadata())


def test_labels_follow_the_votes(con, config):
    label_partitions(con, "assistant", [DAYS[0]], config)
    rows = con.sql(
        """SELECT interaction_id, p_good, label, n_votes FROM labels.impression_labels
           ORDER BY interaction_id"""
    ).pl()
    by_pattern = {
        int(row["interaction_id"].split("-")[-1]) % len(REACTIONS): row
        for row in rows.iter_rows(named=True)
    }
    assert by_pattern[0]["label"] is True and by_pattern[3]["label"] is True
    assert by_pattern[1]["label"] is False and by_pattern[2]["label"] is False
    silent = by_pattern[5]
    assert (silent["p_good"], silent["label"], silent["n_votes"]) == (None, None, 0)
    votes = con.sql(
        "SELECT lf, vote FROM labels.label_matrix WHERE interaction_id = 'a-01-1' ORDER BY lf"
    ).fetchall()
    assert votes == [("accepted_then_reverted", BAD), ("delayed_outcome", BAD)]


def test_relabelling_is_idempotent(con, config):
    label_partitions(con, "assistant", DAYS, config)
    labels = labels_of(con, columns="* EXCLUDE (labelled_at)")
    matrix = labels_of(con, table="label_matrix")
    label_partitions(con, "assistant", DAYS, config)
    assert labels_of(con, columns="* EXCLUDE (labelled_at)") == labels
    assert labels_of(con, table="label_matrix") == matrix


def test_a_late_outcome_relabels_its_day_only(con, config):
    label_partitions(con, "assistant", DAYS, config)
    before = {day: labels_of(con, day) for day in DAYS}
    con.execute(
        """UPDATE marts.fct_impressions SET outcome_name = 'resolved', outcome_value = 1.0,
           outcome_delay_s = 7200 WHERE interaction_id = 'a-02-5'"""
    )
    label_partitions(con, "assistant", [DAYS[1]], config)
    assert labels_of(con, DAYS[1]) != before[DAYS[1]]
    late = con.sql(
        "SELECT p_good, n_votes FROM labels.impression_labels WHERE interaction_id = 'a-02-5'"
    ).fetchall()
    assert late[0][0] > 0.5 and late[0][1] == 1
    assert labels_of(con, DAYS[0]) == before[DAYS[0]]
    assert labels_of(con, DAYS[2]) == before[DAYS[2]]


def test_a_failure_mid_write_leaves_whole_days(con, config, monkeypatch):
    """Each day is written in a transaction of its own: a run that dies on its second day leaves
    the first day relabelled whole and the second as it was, in both tables."""
    label_partitions(con, "assistant", DAYS, config)
    before = {day: (labels_of(con, day), labels_of(con, day, table="label_matrix")) for day in DAYS}
    con.execute("UPDATE marts.fct_impressions SET outcome_value = 0.0 WHERE domain = 'assistant'")
    real_insert = stage._insert
    days_written = []

    def insert_then_crash(connection, table, rows):
        real_insert(connection, table, rows)
        if table == "labels.impression_labels":
            days_written.append(rows["event_date"][0])
            if len(days_written) == 2:
                raise RuntimeError("disk full")

    monkeypatch.setattr(stage, "_insert", insert_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        label_partitions(con, "assistant", DAYS[1:], config)
    assert days_written == DAYS[1:]
    after = {day: (labels_of(con, day), labels_of(con, day, table="label_matrix")) for day in DAYS}
    assert after[DAYS[0]] == before[DAYS[0]] and after[DAYS[2]] == before[DAYS[2]]
    assert after[DAYS[1]][0] != before[DAYS[1]][0] and after[DAYS[1]][1] != before[DAYS[1]][1]
    monkeypatch.undo()  # and without the crash, the same run relabels the second day too
    label_partitions(con, "assistant", DAYS[1:], config)
    assert labels_of(con, DAYS[2], table="label_matrix") != before[DAYS[2]][1]


def test_the_report_measures_gold_cohorts_and_delay(con, config):
    report = label_partitions(con, "assistant", DAYS, config)
    assert report.gold_rows == 20 and report.gold_accuracy == 1.0
    assert report.cohort_coverage.columns == [*COHORT, "impressions", "labelled", "coverage"]
    assert report.cohort_coverage.get_column("impressions").sum() == 90
    delay = report.label_delay.row(0, named=True)
    assert delay["outcome"] == "resolved" and delay["outcomes"] == 80
    # delays of 1 to 28 h a day, p90 about 26 h: by the end of 3 March only 1 March is mature
    assert report.mature_until == maturity_cutoff(con, config, "assistant", DAYS[2]) == DAYS[0]
    assert maturity_cutoff(con, config, "recommendation", DAYS[2]) is None  # no purchase yet
    stats = report.lf_stats.filter(pl.col("lf") == "accepted_then_reverted").row(0, named=True)
    assert stats["polarity"] == "bad" and stats["empirical_accuracy"] == 1.0
    metadata = report.metadata()
    assert metadata["lf_stats"].startswith("| lf") and metadata["label_delay_outcomes"] == 80


# --- late labels: delayed outcomes and the audit sample's reviews ---------------------------------


def test_a_review_label_arriving_after_its_day_was_labelled_makes_that_day_stale(home, config):
    """Reviews come back days later in their own batch; the late-label sensor's query names the
    labelled partition of the reviewed interaction, as it does for a late outcome."""
    from flywheel_pipeline.accumulation import accumulate
    from flywheel_pipeline.labeling.late import late_outcome_partitions
    from flywheel_pipeline.sources import ParquetSource, export_parquet
    from flywheel_pipeline.warehouse import connect
    from tests.test_accumulation import DAY, interaction, label, write_batch

    served, labelled_at, reviewed = (datetime(2026, 11, 2, 12), datetime(2026, 11, 2, 13),
                                     datetime(2026, 11, 4, 12))
    write_batch(home, DAY.isoformat(), [interaction("a")])
    with connect(home.warehouse("assistant")) as con:
        accumulate(con, home, config, "assistant", [DAY], now=served.replace(tzinfo=UTC))
        con.execute(stage.LABELS_DDL)
        con.execute("INSERT INTO labels.impression_labels VALUES "
                    "('assistant', ?, 'i_a', 'r_1', 0.8, true, 2, 'v', ?)", [DAY, labelled_at])
        assert late_outcome_partitions(con, "assistant", None) == ([], None)  # nothing arrived yet

        write_batch(home, "2026-11-03", [label("l1")], folder="labels")
        accumulate(con, home, config, "assistant", [DAY + timedelta(days=1)],
                   now=reviewed.replace(tzinfo=UTC))
        stale, cursor = late_outcome_partitions(con, "assistant", None)
        assert stale == [("assistant", DAY)] and cursor == reviewed
        assert late_outcome_partitions(con, "assistant", cursor) == ([], cursor)  # seen: no second backfill
        export_parquet(con, ["raw.interactions", "raw.outcomes", "raw.labels", "labels.impression_labels"],
                       home.root / "parquet")  # as the distributed profile's store holds them (no outcome: no folder)
    assert late_outcome_partitions(ParquetSource(home.root / "parquet"), "assistant", None) == (stale, cursor)
