"""Labeling functions (LFs): weak, programmatic votes on whether an impression was good.

In Snorkel's spirit, each LF is a small named rule registered with ``@labeling_function``; here it
returns a polars expression over the reaction columns of ``marts.fct_impressions`` so every LF runs
vectorised over a whole frame. A vote is GOOD (1), BAD (0) or ABSTAIN (-1); an LF abstains when the
signal it reads never came (a null column is never evidence).

Each LF names the ``source`` of evidence it reads. LFs of one source are not independent (a user
who rejected a response did not accept it too), so the label model hears each source as one voter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

GOOD, BAD, ABSTAIN = 1, 0, -1

IMPLICIT = "implicit_reaction"  # what the user did: accept, edit, copy, click, dwell, leave, ...
EXPLICIT = "explicit_feedback"  # what the user said: a rating
OUTCOME = "delayed_outcome"  # what happened later: resolved, a purchase

REVERT_WINDOW_S = 10 * 60  # an accept undone within this many seconds was a mistake
HEAVY_EDIT_RATIO = 0.5  # rewritten by more than half: the response was not usable
LIGHT_EDIT_RATIO = 0.2  # touched up at most this much: the response was usable
REFORMULATE_WINDOW_S = 60  # asking again this soon means the answer missed
ABANDON_WINDOW_S = 30  # leaving this soon after the response means it did not help
GOOD_RATING = 4  # explicit rating at or above: good
BAD_RATING = 2  # explicit rating at or below: bad
LONG_DWELL_S = 30.0  # reading a clicked item this long means it was worth it
POGO_STICK_DWELL_S = 10.0  # bouncing back this fast means the click disappointed
TOP_SLOTS = 1  # slots 0..TOP_SLOTS-1 are (nearly) always examined; lower ones often are not

# Columns the labeling stage adds to what it reads from marts.fct_impressions (stage.read_impressions).
REACTION_WINDOW_CLOSED = "reaction_window_closed"  # the impression's reaction window has passed
STAGE_COLUMNS = frozenset({REACTION_WINDOW_CLOSED})


@dataclass(frozen=True)
class LabelingFunction:
    """A named rule: ``expression`` evaluates to one Int8 vote per row."""

    name: str
    source: str
    expression: pl.Expr

    def __call__(self, impressions: pl.DataFrame) -> pl.Series:
        return impressions.select(self.expression.alias(self.name)).to_series()


LABELING_FUNCTIONS: dict[str, LabelingFunction] = {}


def labeling_function(
    name: str | None = None, source: str | None = None
) -> Callable[[Callable[[], pl.Expr]], LabelingFunction]:
    """Register a function returning a vote expression as an LF.

    ``name`` defaults to the function's; ``source`` to the LF's name (independent of every other).
    """

    def register(build: Callable[[], pl.Expr]) -> LabelingFunction:
        lf_name = name or build.__name__
        lf = LabelingFunction(lf_name, source or lf_name, build().cast(pl.Int8))
        if lf.name in LABELING_FUNCTIONS:
            raise ValueError(f"labeling function {lf.name!r} is already registered")
        LABELING_FUNCTIONS[lf.name] = lf
        return lf

    return register


def vote(*, good: pl.Expr | None = None, bad: pl.Expr | None = None) -> pl.Expr:
    """GOOD where ``good`` holds, BAD where ``bad`` holds, ABSTAIN elsewhere (null counts as no)."""
    never = pl.lit(False)
    bad = never if bad is None else bad.fill_null(False)
    good = never if good is None else good.fill_null(False)
    return pl.when(bad).then(pl.lit(BAD)).when(good).then(pl.lit(GOOD)).otherwise(pl.lit(ABSTAIN))


def flag(column: str) -> pl.Expr:
    """A yes/no signal, no when it never came."""
    return pl.col(column).fill_null(False)


def within(column: str, seconds: float) -> pl.Expr:
    """The ``*_s`` signal came, and no later than ``seconds``."""
    return pl.col(column).le(seconds).fill_null(False)


def unclicked_after_window() -> pl.Expr:
    """Shown, not clicked, and its reaction window has passed (unknown while it is open).

    Silence is the only negative evidence a click-only log has, and it is position-dependent: an
    item in the top slot was almost surely looked at, one lower down maybe never (examination
    falls with the slot). Rather than a fixed examination-weighted rule, the "not clicked" vote is
    split by slot band into separate LFs of the implicit source (``not_clicked_top``,
    ``not_clicked_lower``): the label model then learns from the data how much each band's
    silence says (a lower slot's less), as it does for every other reaction, with no examination
    curve to estimate first (which needs an exploration slice the log may not have).
    """
    return ~flag("clicked") & pl.col(REACTION_WINDOW_CLOSED)


@labeling_function(name="accepted_kept", source=IMPLICIT)
def _accepted_kept() -> pl.Expr:
    """Accepted and not reverted within REVERT_WINDOW_S: good."""
    return vote(good=flag("accepted") & ~within("reverted_after_accept_s", REVERT_WINDOW_S))


@labeling_function(name="accepted_then_reverted", source=IMPLICIT)
def _accepted_then_reverted() -> pl.Expr:
    """Accepted, then reverted within REVERT_WINDOW_S: bad."""
    return vote(bad=flag("accepted") & within("reverted_after_accept_s", REVERT_WINDOW_S))


@labeling_function(name="rejected", source=IMPLICIT)
def _rejected() -> pl.Expr:
    """Explicitly rejected: bad."""
    return vote(bad=flag("rejected"))


@labeling_function(name="heavy_edit", source=IMPLICIT)
def _heavy_edit() -> pl.Expr:
    """Rewritten by more than HEAVY_EDIT_RATIO: bad."""
    return vote(bad=pl.col("edit_ratio") > HEAVY_EDIT_RATIO)


@labeling_function(name="light_edit", source=IMPLICIT)
def _light_edit() -> pl.Expr:
    """Edited by at most LIGHT_EDIT_RATIO: good."""
    return vote(good=pl.col("edit_ratio") <= LIGHT_EDIT_RATIO)


@labeling_function(name="quick_reformulation", source=IMPLICIT)
def _quick_reformulation() -> pl.Expr:
    """The query was reformulated within REFORMULATE_WINDOW_S: bad."""
    return vote(bad=within("reformulated_after_s", REFORMULATE_WINDOW_S))


@labeling_function(name="copied", source=IMPLICIT)
def _copied() -> pl.Expr:
    """The response was copied: good."""
    return vote(good=flag("copied"))


@labeling_function(name="quick_abandon", source=IMPLICIT)
def _quick_abandon() -> pl.Expr:
    """Abandoned within ABANDON_WINDOW_S of the response: bad."""
    return vote(bad=within("abandoned_after_s", ABANDON_WINDOW_S))


@labeling_function(name="explicit_rating", source=EXPLICIT)
def _explicit_rating() -> pl.Expr:
    """Rated GOOD_RATING or more: good; BAD_RATING or less: bad."""
    return vote(good=pl.col("rating") >= GOOD_RATING, bad=pl.col("rating") <= BAD_RATING)


@labeling_function(name="delayed_outcome", source=OUTCOME)
def _delayed_outcome() -> pl.Expr:
    """The delayed outcome, once arrived: a positive value (resolved, a purchase) good, else bad."""
    return vote(good=pl.col("outcome_value") > 0, bad=pl.col("outcome_value") <= 0)


@labeling_function(name="clicked", source=IMPLICIT)
def _clicked() -> pl.Expr:
    """The item was clicked: good."""
    return vote(good=flag("clicked"))


@labeling_function(name="long_dwell", source=IMPLICIT)
def _long_dwell() -> pl.Expr:
    """Dwelt on for LONG_DWELL_S or more: good."""
    return vote(good=pl.col("dwell_s") >= LONG_DWELL_S)


@labeling_function(name="pogo_stick", source=IMPLICIT)
def _pogo_stick() -> pl.Expr:
    """Dwelt on for less than POGO_STICK_DWELL_S (clicked, then straight back): bad."""
    return vote(bad=pl.col("dwell_s") < POGO_STICK_DWELL_S)


@labeling_function(name="examined_but_skipped", source=IMPLICIT)
def _examined_but_skipped() -> pl.Expr:
    """Shown above the lowest clicked item (so seen) yet not clicked: bad."""
    return vote(bad=~flag("clicked") & (pl.col("position") < pl.col("max_clicked_position")))


@labeling_function(name="not_clicked_top", source=IMPLICIT)
def _not_clicked_top() -> pl.Expr:
    """Shown in a top slot (below TOP_SLOTS), not clicked once its reaction window passed: bad."""
    return vote(bad=unclicked_after_window() & (pl.col("position") < TOP_SLOTS))


@labeling_function(name="not_clicked_lower", source=IMPLICIT)
def _not_clicked_lower() -> pl.Expr:
    """Shown lower down (perhaps never examined), not clicked once its window passed: bad, weaker."""
    return vote(bad=unclicked_after_window() & (pl.col("position") >= TOP_SLOTS))


def apply_lfs(
    impressions: pl.DataFrame, lfs: Iterable[LabelingFunction] | None = None
) -> pl.DataFrame:
    """The label matrix, wide: one Int8 vote column per LF, one row per impression."""
    lfs = list(LABELING_FUNCTIONS.values()) if lfs is None else list(lfs)
    return impressions.select([lf.expression.alias(lf.name) for lf in lfs])


def voters(lfs: Sequence[LabelingFunction]) -> list[list[int]]:
    """Positions of ``lfs`` grouped by source (first seen, first): the label model's voters."""
    by_source: dict[str, list[int]] = {}
    for position, lf in enumerate(lfs):
        by_source.setdefault(lf.source, []).append(position)
    return list(by_source.values())


def vote_matrix(votes: pl.DataFrame) -> np.ndarray:
    """The wide label matrix as an (impressions x LFs) int8 array, -1 for abstain."""
    return votes.to_numpy().astype(np.int8, copy=False)
