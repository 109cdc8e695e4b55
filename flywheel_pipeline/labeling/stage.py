"""The labeling stage: LF votes -> label model -> ``labels.*`` for (domain, day) partitions.

The label model is fitted on the domain's whole fit window (by default its lookback + holdout days,
ending at the last requested day), so re-labelling one day learns from as much evidence as a
weekly run does; only the requested days are rewritten, each in a transaction of its own. The
window is read a day at a time and kept as int8 votes, so memory is a day's impressions. The
window's votes are recomputed from ``marts.fct_impressions`` rather than read back from
``labels.label_matrix``: stored votes of the other days would miss the outcomes and reviews that
arrived since those days were labelled.

Before writing, the label model passes the checks of ``safety``: majority vote replaces it where it
is significantly worse on the audit reviews, p_good is calibrated on the reviews where that lowers
a held-out error, and sources that vote together beyond independence are reported and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import duckdb
import numpy as np
import polars as pl

from flywheel_pipeline.config import DomainConfig, FlywheelConfig, LabelModelSettings
from flywheel_pipeline.events import CLICK_MATURITY
from flywheel_pipeline.labeling.analysis import (
    COHORT,
    OUTCOME_COLUMNS,
    cohort_coverage,
    delay_summary,
    label_accuracy,
    lf_summary,
    mature_until,
    maturity_delays,
    reaction_window_closed,
)
from flywheel_pipeline.labeling.functions import (
    ABSTAIN,
    LABELING_FUNCTIONS,
    REACTION_WINDOW_CLOSED,
    STAGE_COLUMNS,
    LabelingFunction,
    apply_lfs,
    vote_matrix,
    voters,
)
from flywheel_pipeline.labeling.model import DawidSkene, MajorityVote
from flywheel_pipeline.labeling.safety import (
    Calibration,
    Dependency,
    ModelChoice,
    calibrate,
    choose_label_model,
    dependent_sources,
    dependent_with,
)
from flywheel_pipeline.sources import (
    IMPRESSION_KEY,
    IMPRESSIONS,
    DuckDBSource,
    Readable,
    Scope,
    Source,
    as_source,
)
from flywheel_pipeline.warehouse import transaction

logger = logging.getLogger(__name__)

LABELS_DDL = """
CREATE SCHEMA IF NOT EXISTS labels;
CREATE TABLE IF NOT EXISTS labels.label_matrix (
    domain VARCHAR NOT NULL, event_date DATE NOT NULL, interaction_id VARCHAR NOT NULL,
    item_id VARCHAR NOT NULL, lf VARCHAR NOT NULL, vote TINYINT NOT NULL
);
CREATE TABLE IF NOT EXISTS labels.impression_labels (
    domain VARCHAR NOT NULL, event_date DATE NOT NULL, interaction_id VARCHAR NOT NULL,
    item_id VARCHAR NOT NULL, p_good DOUBLE, label BOOLEAN, n_votes INTEGER NOT NULL,
    label_model_version VARCHAR NOT NULL, labelled_at TIMESTAMP NOT NULL
);
"""

# Read besides what the LFs read: cohorts, label delay and reaction windows, gold labels.
_REPORT_COLUMNS = [
    "served_at",
    "clicked_after_s",
    "is_new_user",
    "segment",
    "outcome_name",
    "outcome_at",
    "outcome_delay_s",
    "review_value",  # every review's verdict: calibration learns from them all
    "audit_review_value",  # the randomly chosen reviews' only: they alone measure accuracy
]


@dataclass(frozen=True)
class LabelingReport:
    """What one labeling run wrote and how trustworthy it looks."""

    domain: str
    dates: list[date]
    label_model_version: str
    fit_start: date
    fit_end: date
    fit_rows: int
    model_converged: bool
    model_iterations: int
    impressions: int  # rows written to labels.impression_labels
    labelled: int  # of which got a label (some LF voted)
    share_good: float | None  # of the labelled, the share labelled good
    gold_rows: int  # audit reviews in the fit window that got a label
    gold_accuracy: float | None  # the labels written against the audit reviews
    gold_accuracy_majority_vote: float | None
    label_model_choice: ModelChoice  # the label model or, where worse on gold, majority vote
    calibration: Calibration  # of p_good on the reviews, applied where it helps held-out
    dependencies: list[Dependency]  # LFs of different sources that are not independent
    lf_stats: pl.DataFrame  # per LF over the fit window
    cohort_coverage: pl.DataFrame  # over the requested days
    label_delay: pl.DataFrame  # over the fit window: outcomes and p50/p90/p99 hours
    mature_until: (
        date | None
    )  # last day whose outcomes have mostly arrived by the end of the last day
    per_day: pl.DataFrame  # event_date, impressions, labelled, share_good over the requested days

    @property
    def coverage(self) -> float | None:
        return self.labelled / self.impressions if self.impressions else None

    @property
    def warnings(self) -> list[str]:
        return [dependency.message() for dependency in self.dependencies]

    def safety_metadata(self) -> dict[str, object]:
        """The label model's safety checks: fallback, calibration, dependent sources."""
        choice, calibration = self.label_model_choice, self.calibration
        return {
            "label_model_choice": choice.reason,
            "gold_accuracy_label_model": choice.model_accuracy,
            "calibration": calibration.reason,
            "calibration_applied": calibration.applied,
            "calibration_reviews": calibration.gold_rows,
            "calibration_brier_raw": calibration.brier_raw,
            "calibration_brier_calibrated": calibration.brier_calibrated,
            "lf_dependencies": len(self.dependencies),
            "lf_dependency_warnings": "\n".join(self.warnings) or "none",
        }

    def day_metadata(self, day: date) -> dict[str, object]:
        """One (day, domain) partition's labels, and the label model that wrote them."""
        rows = self.per_day.filter(pl.col("event_date") == day)
        impressions, labelled, share_good = rows.row(0)[1:] if rows.height else (0, 0, None)
        return {
            "impressions": impressions,
            "labelled": labelled,
            "coverage": round(labelled / impressions, 3) if impressions else None,
            "share_good": round(share_good, 3) if share_good is not None else None,
            "label_model_version": self.label_model_version,
            "label_model": f"Dawid-Skene fit on {self.fit_start}..{self.fit_end} ({self.fit_rows} impressions), "
                           f"gold accuracy {_fmt(self.gold_accuracy)} vs majority vote "
                           f"{_fmt(self.gold_accuracy_majority_vote)} on {self.gold_rows} reviews",
            "mature_until": self.mature_until.isoformat() if self.mature_until else None,
            **self.safety_metadata(),
        }

    def metadata(self) -> dict[str, object]:
        """Flat JSON-able values for Dagster asset metadata; tables as markdown strings."""
        delay = self.label_delay.row(0, named=True)
        return {
            "domain": self.domain,
            "dates": ", ".join(day.isoformat() for day in self.dates),
            "label_model_version": self.label_model_version,
            "impressions": self.impressions,
            "labelled": self.labelled,
            "coverage": self.coverage,
            "share_good": self.share_good,
            "fit_window": f"{self.fit_start.isoformat()}..{self.fit_end.isoformat()}",
            "fit_rows": self.fit_rows,
            "model_converged": self.model_converged,
            "model_iterations": self.model_iterations,
            "gold_rows": self.gold_rows,
            "gold_accuracy": self.gold_accuracy,
            "gold_accuracy_majority_vote": self.gold_accuracy_majority_vote,
            **self.safety_metadata(),
            "label_delay_outcome": delay["outcome"],
            "label_delay_outcomes": delay["outcomes"],
            "label_delay_p50_h": delay["p50_h"],
            "label_delay_p90_h": delay["p90_h"],
            "label_delay_p99_h": delay["p99_h"],
            "mature_until": self.mature_until.isoformat() if self.mature_until else None,
            "lf_stats": to_markdown(self.lf_stats),
            "cohort_coverage": to_markdown(self.cohort_coverage),
        }


@dataclass
class _Day:
    """What one day read leaves in memory until its labels are written: its LF votes as int8
    codes and, for a day the label model learns from, its reviews and a hash of each key."""

    day: date
    votes: np.ndarray  # (impressions, LFs) int8, the day's rows in key order
    audit: np.ndarray | None = None  # audit_gold of the day's rows (days in the fit window)
    review: np.ndarray | None = None  # review_gold
    row_keys: np.ndarray | None = None  # a hash of each row's impression key


def copy_scope(dates: list[date]) -> Scope:
    """What a run of ``dates`` holds in a working copy: those days of the labels tables it rewrites
    (its impressions it reads through ``label_partitions``' ``source``)."""
    return Scope.of(dates, ("labels.label_matrix", "labels.impression_labels"))


def label_partitions(
    con: duckdb.DuckDBPyConnection,
    domain: str,
    dates: list[date],
    config: FlywheelConfig,
    fit_window_days: int | None = None,
    source: Source | None = None,
) -> LabelingReport:
    """Label ``domain``'s impressions on ``dates``: rewrite exactly those partitions of labels.* in
    the warehouse of ``con``, reading the impressions from ``source`` (default: that warehouse).

    In bounded memory, a day at a time: the outcome delays of every day read, then each day's LF
    votes (int8 codes, what the label model learns from), then, with the model fitted, each
    requested day read again for its keys and written in a transaction of its own (a run that dies
    leaves whole days, each labelled by one model)."""
    source = source or DuckDBSource(con)
    settings = config.domain(domain)
    if not dates:
        raise ValueError("label_partitions needs at least one day")
    dates = sorted(set(dates))
    fit_start, fit_end = fit_window(dates[-1], settings, fit_window_days)
    read_days, in_window = _days(min(fit_start, dates[0]), fit_end), set(_days(fit_start, fit_end))
    maturity = settings.label_maturity

    delays, days_with_rows = {}, []
    for day in read_days:
        outcomes = source_outcomes(source, domain, day)
        delays[day] = maturity_delays(outcomes, maturity.outcome)
        days_with_rows += [day] if outcomes.height else []
    window = reaction_window(source, domain, settings, pl.concat(delays.values()), days_with_rows)
    lfs = list(LABELING_FUNCTIONS.values())
    names = [lf.name for lf in lfs]
    evidence = [_day_evidence(window(read_impressions(source, domain, day, day)), lfs, day in in_window, day)
                for day in read_days]

    fitted = [day for day in evidence if day.day in in_window]
    votes, in_fit = np.concatenate([day.votes for day in evidence]), np.repeat(
        [day.day in in_window for day in evidence], [len(day.votes) for day in evidence])
    fitted_votes = votes[in_fit]
    audit = _concat([day.audit for day in fitted])
    fit_delays = pl.concat([delays[day.day] for day in fitted])
    model = DawidSkene(voters(lfs)).fit(fitted_votes)
    p_good, choice, calibration = checked_p_good(
        model, votes, in_fit, audit, _concat([day.review for day in fitted]), _concat([day.row_keys for day in fitted]),
        settings.label_model,
    )
    version = label_model_version(choice, calibration)
    dependencies = dependent_sources(
        fitted_votes, names, [lf.source for lf in lfs], model,
        min_shared_information=settings.label_model.dependency_min_shared_information,
    )
    for dependency in dependencies:
        logger.warning("%s: %s", domain, dependency.message())

    starts = dict(zip(read_days, np.cumsum([0] + [len(day.votes) for day in evidence[:-1]]), strict=True))
    per_day, cohorts = [], []
    for day in dates:
        rows = slice(starts[day], starts[day] + len(evidence[read_days.index(day)].votes))
        labels, cohort = _write_day(con, source, domain, day, names, votes[rows], p_good[rows], version)
        per_day.append(labels)
        cohorts.append(cohort)
    per_day = pl.concat(per_day)

    gold_rows, gold_accuracy = label_accuracy(p_good[in_fit], audit)
    impressions, labelled = int(per_day["impressions"].sum()), int(per_day["labelled"].sum())
    return LabelingReport(
        domain=domain,
        dates=dates,
        label_model_version=version,
        fit_start=fit_start,
        fit_end=fit_end,
        fit_rows=len(fitted_votes),
        model_converged=model.converged,
        model_iterations=model.n_iter,
        impressions=impressions,
        labelled=labelled,
        share_good=int(per_day["good"].sum()) / labelled if labelled else None,
        gold_rows=gold_rows,
        gold_accuracy=gold_accuracy,
        gold_accuracy_majority_vote=choice.majority_vote_accuracy,
        label_model_choice=choice,
        calibration=calibration,
        dependencies=dependencies,
        lf_stats=lf_summary(fitted_votes, names, audit, model.lf_accuracies()).with_columns(
            pl.Series("dependent_with", dependent_with(names, dependencies), pl.String)
        ),
        cohort_coverage=combined_cohort_coverage(cohorts),
        label_delay=delay_summary(domain, maturity.outcome, fit_delays),
        mature_until=_cutoff(fit_delays, maturity.quantile, fit_end),
        per_day=per_day.select("event_date", "impressions", "labelled", "share_good"),
    )


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=offset) for offset in range((last - first).days + 1)]


def _concat(arrays: list[np.ndarray | None]) -> np.ndarray:
    return np.concatenate([array for array in arrays if array is not None] or [np.zeros(0)])


def source_outcomes(source: Readable, domain: str, day: date) -> pl.DataFrame:
    """One day's OUTCOME_COLUMNS: what maturity_delays reads."""
    return as_source(source).read(IMPRESSIONS, domain, day, day, OUTCOME_COLUMNS)


def _day_evidence(impressions: pl.DataFrame, lfs: list[LabelingFunction], fitted: bool, day: date) -> _Day:
    votes = vote_matrix(apply_lfs(impressions, lfs))
    if not fitted:
        return _Day(day, votes)
    return _Day(day, votes, audit_gold(impressions), review_gold(impressions),
                impressions.select(pl.struct(IMPRESSION_KEY).hash(seed=0)).to_series().to_numpy())


def _write_day(
    con: duckdb.DuckDBPyConnection, source: Source, domain: str, day: date, names: list[str],
    votes: np.ndarray, p_good: np.ndarray, version: str,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Write one requested day's labels and votes in one transaction; its per_day row (with the
    count of good labels) and its cohort coverage."""
    impressions = as_source(source).read(IMPRESSIONS, domain, day, day, sorted({*IMPRESSION_KEY, *COHORT}))
    impressions = impressions.sort(IMPRESSION_KEY)
    if impressions.height != len(votes):
        raise RuntimeError(f"{domain} {day}: {impressions.height} impressions now, {len(votes)} when voted on")
    labels = impression_labels(impressions, votes, p_good, version)
    lf_votes = pl.DataFrame(votes, schema=dict.fromkeys(names, pl.Int8), orient="row")
    write_labels(con, domain, [day], long_label_matrix(impressions, lf_votes), labels)
    label = labels.get_column("label")
    summary = pl.DataFrame({"event_date": [day], "impressions": [labels.height], "labelled": [label.count()],
                            "good": [int(label.sum())], "share_good": [label.mean()]},
                           schema_overrides={"impressions": pl.UInt32, "labelled": pl.UInt32, "share_good": pl.Float64})
    cohort = cohort_coverage(impressions.select(COHORT).with_columns(labels.get_column("p_good")))
    return summary, cohort


def combined_cohort_coverage(tables: list[pl.DataFrame]) -> pl.DataFrame:
    """``cohort_coverage`` over several days' rows, from each day's table."""
    return (
        pl.concat(tables).group_by(COHORT).agg(pl.col("impressions").sum(), pl.col("labelled").sum())
        .with_columns((pl.col("labelled") / pl.col("impressions")).alias("coverage"))
        .sort(COHORT, nulls_last=True)
    )


def checked_p_good(
    model: DawidSkene,
    votes: np.ndarray,
    in_fit: np.ndarray,
    audit: np.ndarray,
    reviews: np.ndarray,
    row_keys: np.ndarray,
    settings: LabelModelSettings,
) -> tuple[np.ndarray, ModelChoice, Calibration]:
    """p_good of every row of ``votes``: ``model``'s, or majority vote's where that is
    significantly more accurate on the ``audit`` reviews of the fit window (the ``in_fit`` rows);
    calibrated on all its ``reviews`` where that lowers the held-out Brier score (folds dealt by
    ``row_keys``, a hash of each fit row's impression key)."""
    p_model, p_majority = model.predict_proba(votes), MajorityVote().predict_proba(votes)
    choice = choose_label_model(
        p_model[in_fit], p_majority[in_fit], audit, model.version,
        min_gold_rows=settings.min_gold_rows, significance=settings.significance,
    )
    chosen = p_majority if choice.fell_back else p_model
    calibration = calibrate(
        chosen[in_fit], reviews, settings.calibration, row_keys=row_keys,
        min_gold_rows=settings.min_gold_rows, significance=settings.significance,
    )
    return calibration(chosen), choice, calibration


def label_model_version(choice: ModelChoice, calibration: Calibration) -> str:
    """The label model that wrote the labels, and its calibration if applied: e.g.
    ``dawid-skene-v1+isotonic``, ``majority-vote-v1``."""
    return f"{choice.version}+{calibration.method}" if calibration.applied else choice.version


def fit_window(
    last_day: date, settings: DomainConfig, days: int | None = None
) -> tuple[date, date]:
    """First and last day the label model learns from: ``days`` days (default lookback + holdout)
    ending at ``last_day``."""
    days = settings.lookback_days + settings.holdout_days if days is None else days
    if days < 1:
        raise ValueError(f"fit_window_days must be at least 1, got {days}")
    return last_day - timedelta(days=days - 1), last_day


def read_impressions(source: Readable, domain: str, start: date, end: date) -> pl.DataFrame:
    """The domain's impressions from ``start`` to ``end`` (inclusive) with what the LFs read, in
    key order (the same rows in the same order from any source)."""
    lf_inputs = {
        name for lf in LABELING_FUNCTIONS.values() for name in lf.expression.meta.root_names()
    }
    columns = IMPRESSION_KEY + sorted(
        (lf_inputs | set(_REPORT_COLUMNS)) - set(IMPRESSION_KEY) - STAGE_COLUMNS
    )
    return as_source(source).read(IMPRESSIONS, domain, start, end, columns).sort(IMPRESSION_KEY)


def with_reaction_window(
    source: Readable, domain: str, settings: DomainConfig, impressions: pl.DataFrame
) -> pl.DataFrame:
    """``impressions`` with ``reaction_window_closed``, measured from their own outcome delays
    (``reaction_window``)."""
    delays = maturity_delays(impressions, settings.label_maturity.outcome)
    days = impressions.get_column("event_date").unique().sort().to_list()
    return reaction_window(source, domain, settings, delays, days)(impressions)


def reaction_window(
    source: Readable, domain: str, settings: DomainConfig, delays_s: pl.Series, days: list[date]
) -> Callable[[pl.DataFrame], pl.DataFrame]:
    """What adds ``reaction_window_closed`` to impressions of ``days`` (those read that have rows):
    served at least the domain's maturity delay quantile (of ``delays_s``, those days' outcome
    delays) before the end of its latest day in the warehouse (the moment maturity_cutoff measures
    from). Null, so the "not
    clicked" LFs abstain, where items are not clicked (an assistant's responses) or no delay is
    measured yet."""
    latest = None
    if settings.shape == "recommendation" and days:  # days from the last one read on: the domain's latest
        latest = as_source(source).read(IMPRESSIONS, domain, first=days[-1], columns=["event_date"])["event_date"].max()
    if latest is None:
        return lambda impressions: impressions.with_columns(pl.lit(None, pl.Boolean).alias(REACTION_WINDOW_CLOSED))
    quantile, as_of = settings.label_maturity.quantile, latest + timedelta(days=1)
    return lambda impressions: impressions.with_columns(
        reaction_window_closed(impressions.get_column("served_at"), delays_s, quantile, as_of))


def review_gold(impressions: pl.DataFrame) -> np.ndarray:
    """Every reviewer's verdict, 1 good / 0 bad, NaN where no one reviewed the impression."""
    return _verdicts(impressions, "review_value")


def audit_gold(impressions: pl.DataFrame) -> np.ndarray:
    """The verdicts of reviews chosen at random (the audit slice; an uncertainty-sampled review is
    not a random sample), NaN elsewhere."""
    return _verdicts(impressions, "audit_review_value")


def _verdicts(impressions: pl.DataFrame, column: str) -> np.ndarray:
    return impressions.get_column(column).cast(pl.Float64).fill_null(np.nan).to_numpy()


def impression_labels(
    impressions: pl.DataFrame, votes: np.ndarray, p_good: np.ndarray, version: str
) -> pl.DataFrame:
    """Rows of labels.impression_labels: p_good, its 0.5 label, and how many LFs voted."""
    return (
        impressions.select(IMPRESSION_KEY)
        .with_columns(
            pl.Series("p_good", p_good, dtype=pl.Float64).fill_nan(None),
            pl.Series("n_votes", (votes != ABSTAIN).sum(axis=1), dtype=pl.Int32),
            pl.lit(version).alias("label_model_version"),
            pl.lit(datetime.now(UTC).replace(tzinfo=None)).alias("labelled_at"),
        )
        .with_columns((pl.col("p_good") >= 0.5).alias("label"))
        .select(*IMPRESSION_KEY, "p_good", "label", "n_votes", "label_model_version", "labelled_at")
    )


def long_label_matrix(impressions: pl.DataFrame, lf_votes: pl.DataFrame) -> pl.DataFrame:
    """Rows of labels.label_matrix: one per (impression, LF) vote cast; abstentions not stored.

    One filter per LF, never the (impressions x LFs) long frame: most LFs abstain on most rows."""
    keyed = pl.concat([impressions.select(IMPRESSION_KEY), lf_votes], how="horizontal").lazy()
    return pl.concat(
        keyed.filter(pl.col(lf) != ABSTAIN).select(
            *IMPRESSION_KEY, pl.lit(lf).alias("lf"), pl.col(lf).alias("vote")
        )
        for lf in lf_votes.columns
    ).collect()


def write_labels(
    con: duckdb.DuckDBPyConnection,
    domain: str,
    dates: list[date],
    matrix: pl.DataFrame,
    labels: pl.DataFrame,
) -> None:
    """Replace the (domain, dates) partitions of both labels tables, all or nothing."""
    with transaction(con):
        con.execute(LABELS_DDL)
        for table in ("label_matrix", "impression_labels"):
            con.execute(
                f"DELETE FROM labels.{table} WHERE domain = $domain AND event_date IN $dates",
                {"domain": domain, "dates": dates},
            )
        _insert(con, "labels.label_matrix", matrix)
        _insert(con, "labels.impression_labels", labels)


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: pl.DataFrame) -> None:
    # Arrow with polars' own string views: DuckDB reads them without a copy to plain strings.
    con.register("labeling_rows", rows.to_arrow(compat_level=pl.CompatLevel.newest()))
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM labeling_rows")
    finally:
        con.unregister("labeling_rows")


def maturity_cutoff(
    source: Readable, config: FlywheelConfig, domain: str, as_of: date
) -> date | None:
    """The last day of ``domain`` mature by the end of ``as_of``; later days may still get outcomes.

    Delays are those of the domain's maturity outcome over its fit window ending at ``as_of``;
    None while no such outcome has arrived (nothing to measure the delay from).
    """
    settings = config.domain(domain)
    start, end = fit_window(as_of, settings)
    outcome = settings.label_maturity.outcome
    rows = as_source(source).read(IMPRESSIONS, domain, start, end, OUTCOME_COLUMNS)
    arrived = pl.col("outcome_name") == outcome
    if outcome == CLICK_MATURITY:
        arrived = arrived | pl.col("clicked_after_s").is_not_null()
    outcomes = rows.filter(arrived)
    return _cutoff(maturity_delays(outcomes, outcome), settings.label_maturity.quantile, as_of)


def _cutoff(delays_s: pl.Series, quantile: float, last_day: date) -> date | None:
    """mature_until as of the end of ``last_day``, None without delays."""
    return (
        None
        if delays_s.is_empty()
        else mature_until(delays_s, quantile, last_day + timedelta(days=1))
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def to_markdown(table: pl.DataFrame) -> str:
    """A polars table as a markdown table (floats to 3 decimals), for asset metadata."""
    with pl.Config(
        tbl_formatting="MARKDOWN",
        tbl_hide_column_data_types=True,
        tbl_hide_dataframe_shape=True,
        tbl_rows=-1,
        tbl_width_chars=10_000,
        tbl_cols=-1,
        float_precision=3,
        fmt_str_lengths=200,
    ):
        return str(table)
