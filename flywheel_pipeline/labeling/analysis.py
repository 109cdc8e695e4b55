"""How good are the labels: LF statistics, who gets labelled, and how long labels take to arrive.

LF coverage, overlaps and conflicts follow Snorkel's ``LFAnalysis`` definitions (each a share of all
rows); empirical accuracy is measured against the gold slice (``review_value``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta

import numpy as np
import polars as pl

from flywheel_pipeline.events import CLICK_MATURITY
from flywheel_pipeline.groups import anonymised
from flywheel_pipeline.labeling.functions import ABSTAIN, BAD, GOOD, REACTION_WINDOW_CLOSED
from flywheel_pipeline.labeling.model import vote_patterns

COHORT = ["domain", "is_new_user", "segment"]
DELAY_QUANTILES = {"p50_h": 0.5, "p90_h": 0.9, "p99_h": 0.99}
DELAY_SCHEMA = {"domain": pl.String, "outcome": pl.String, "outcomes": pl.Int64} | dict.fromkeys(DELAY_QUANTILES, pl.Float64)
OUTCOME_COLUMNS = [
    "domain", "interaction_id", "outcome_name", "outcome_at", "outcome_delay_s", "clicked_after_s"
]


def lf_summary(
    votes: np.ndarray,
    names: Sequence[str],
    gold: np.ndarray | None = None,
    learned_accuracy: np.ndarray | None = None,
) -> pl.DataFrame:
    """One row per LF: polarity, coverage, overlaps, conflicts, accuracy on gold, learned accuracy.

    ``gold`` holds 1/0 per row and NaN where no human reviewed it. Accuracies are null for an LF
    that never voted.
    """
    patterns, _, rows = vote_patterns(votes)  # the shares, counted once per distinct row
    voted = patterns != ABSTAIN
    overlapped = voted.sum(axis=1) > 1
    conflicted = (patterns == GOOD).any(axis=1) & (patterns == BAD).any(axis=1)
    summary = pl.DataFrame(
        {
            "lf": list(names),
            "polarity": [_polarity(column) for column in patterns.T],
            "coverage": _share(voted, rows),
            "overlaps": _share(voted & overlapped[:, None], rows),
            "conflicts": _share(voted & conflicted[:, None], rows),
        }
    )
    if gold is not None:
        summary = summary.with_columns(_gold_accuracy(votes, gold))
    if learned_accuracy is not None:
        learned = pl.Series("learned_accuracy", learned_accuracy)
        summary = summary.with_columns(pl.when(pl.col("coverage") > 0).then(learned))
    return summary


def _share(mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per column, the share of all rows that are set, ``mask`` holding one row per pattern of
    ``rows`` rows (0 when there are no rows)."""
    return rows @ mask / max(rows.sum(), 1)


def _polarity(column: np.ndarray) -> str:
    return "/".join(name for name, vote in (("good", GOOD), ("bad", BAD)) if (column == vote).any())


def _gold_accuracy(votes: np.ndarray, gold: np.ndarray) -> list[pl.Series]:
    reviewed = ~np.isnan(gold)
    votes, gold = votes[reviewed], gold[reviewed]
    judged = votes != ABSTAIN
    correct = (judged & (votes == gold[:, None])).sum(axis=0)
    incorrect = judged.sum(axis=0) - correct
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = correct / (correct + incorrect)
    return [
        pl.Series("correct", correct),
        pl.Series("incorrect", incorrect),
        pl.Series("empirical_accuracy", accuracy).fill_nan(None),
    ]


def label_accuracy(p_good: np.ndarray, truth: np.ndarray) -> tuple[int, float | None]:
    """(rows with both a label and a truth, share where label == truth); NaN means missing."""
    both = ~np.isnan(p_good) & ~np.isnan(truth)
    if not both.any():
        return 0, None
    return int(both.sum()), float(((p_good[both] >= 0.5) == (truth[both] == 1)).mean())


def cohort_coverage(labels: pl.DataFrame) -> pl.DataFrame:
    """Share of impressions with a label per cohort: where labels are missing, learning is blind.
    A segment is named by its hash (``groups.anonymous``): the table is Dagster metadata."""
    return (
        labels.with_columns(segment=anonymised(pl.col("segment"), declared=[])).group_by(COHORT)
        .agg(
            pl.len().alias("impressions"),
            pl.col("p_good").is_not_null().sum().alias("labelled"),
        )
        .with_columns((pl.col("labelled") / pl.col("impressions")).alias("coverage"))
        .sort(COHORT, nulls_last=True)
    )


def outcome_delays(impressions: pl.DataFrame, outcome: str) -> pl.Series:
    """Seconds from serving to ``outcome``, once per outcome event (not per impression); reads
    OUTCOME_COLUMNS."""
    return (
        impressions.filter(
            (pl.col("outcome_name") == outcome) & pl.col("outcome_delay_s").is_not_null()
        )
        .unique(["domain", "interaction_id", "outcome_at"], keep="first", maintain_order=True)
        .get_column("outcome_delay_s")
    )


def maturity_delays(impressions: pl.DataFrame, outcome: str) -> pl.Series:
    """Seconds from serving to what the domain waits for: its delayed ``outcome`` (``outcome_delays``)
    or, for a click-only domain (``CLICK_MATURITY``), each impression's first click."""
    if outcome == CLICK_MATURITY:
        return impressions.get_column("clicked_after_s").drop_nulls()
    return outcome_delays(impressions, outcome)


def reaction_window_closed(
    served_at: pl.Series, delays_s: pl.Series, quantile: float, as_of: datetime | date
) -> pl.Series:
    """Per impression, whether the ``quantile`` delay has passed since it was served, by ``as_of``:
    whatever reaction it was going to get has most likely come. Null (unknown) without delays."""
    if delays_s.is_empty():
        return pl.repeat(None, len(served_at), dtype=pl.Boolean, eager=True).alias(REACTION_WINDOW_CLOSED)
    wait = timedelta(seconds=float(np.quantile(delays_s.to_numpy(), quantile)))
    return (served_at + wait <= _utc(as_of)).alias(REACTION_WINDOW_CLOSED)


def label_delays(impressions: pl.DataFrame, maturity_outcome: Mapping[str, str]) -> pl.DataFrame:
    """Per domain: its maturity outcome, how many arrived, and the p50/p90/p99 delay in hours."""
    return pl.concat([
        pl.DataFrame(schema=DELAY_SCHEMA),
        *(delay_summary(domain, outcome, maturity_delays(impressions.filter(pl.col("domain") == domain), outcome))
          for domain, outcome in maturity_outcome.items()),
    ])


def delay_summary(domain: str, outcome: str, delays_s: pl.Series) -> pl.DataFrame:
    """One row of ``label_delays``: ``domain``'s maturity ``outcome`` from its delays in seconds."""
    delays_h = delays_s.cast(pl.Float64) / 3600
    quantiles = {name: delays_h.quantile(q, interpolation="linear") for name, q in DELAY_QUANTILES.items()}
    return pl.DataFrame([{"domain": domain, "outcome": outcome, "outcomes": delays_h.len(), **quantiles}],
                        schema=DELAY_SCHEMA)


def mature_until(
    delays_s: Sequence[float] | np.ndarray | pl.Series, quantile: float, as_of: datetime | date
) -> date:
    """The last day whose interactions have all had the ``quantile`` label delay by ``as_of``.

    A day is mature once its last moment (midnight after it, UTC) is at least that delay before
    ``as_of``; later days are still waiting for outcomes. A ``date`` ``as_of`` means its midnight.
    """
    delays = np.asarray(delays_s, dtype=float)
    delays = delays[~np.isnan(delays)]
    if not len(delays):
        raise ValueError("no outcome delays to measure label maturity from")
    wait = timedelta(seconds=float(np.quantile(delays, quantile)))
    return (_utc(as_of) - wait).date() - timedelta(days=1)


def _utc(moment: datetime | date) -> datetime:
    if not isinstance(moment, datetime):
        return datetime.combine(moment, time.min)
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment
