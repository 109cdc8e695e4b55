"""Label models: turn the (impressions x LFs) vote matrix into p_good, a probabilistic label.

``DawidSkene`` learns how far to trust each LF without gold labels (EM on Dawid & Skene's model);
``MajorityVote`` is the baseline it has to beat. Both give NaN p_good where every LF abstained.

Dawid-Skene assumes its voters are independent given the true class. LFs that read the same user
behaviour are not (a user who rejected a response did not also accept it), so LFs are grouped
into voters (``voters``; by default each LF alone) and a voter's response is the joint vote of its
LFs, abstentions included: each voter has a table P(response | true class). Counting abstention as
a response is also what lets one-sided LFs count: a click only ever says "good", and what it
carries is how much more often it fires on good impressions than on bad ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import numpy as np

from flywheel_pipeline.labeling.functions import ABSTAIN, BAD, GOOD

SILENT = 0  # the response code of a voter whose LFs all abstained
MAX_LFS = 39  # vote patterns are base-3 numbers in an int64


def has_votes(votes: np.ndarray) -> np.ndarray:
    """Rows where at least one LF voted."""
    return (votes != ABSTAIN).any(axis=1)


def majority_vote(votes: np.ndarray) -> np.ndarray:
    """Share of good votes per row (0.5 on a tie), NaN where every LF abstained."""
    good = (votes == GOOD).sum(axis=1)
    cast = (votes != ABSTAIN).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cast > 0, good / cast, np.nan)


@dataclass
class MajorityVote:
    """The baseline: every LF counts the same."""

    version: ClassVar[str] = "majority-vote-v1"

    def fit(self, votes: np.ndarray) -> MajorityVote:
        return self

    def predict_proba(self, votes: np.ndarray) -> np.ndarray:
        return majority_vote(votes)


@dataclass
class DawidSkene:
    """Binary Dawid-Skene fitted by EM on the rows with at least one vote.

    Silent rows (every LF abstained) get no label, yet leaving them out would bias every voter's
    table towards voting; so EM treats them as truncated data and counts, in expectation, the
    silent rows each class would have produced. EM runs on the distinct vote patterns weighted by
    how many rows show each, so a fit costs the same for a day or a quarter of impressions.

    ``smoothing`` is a pseudo-count added to every cell of every voter's table (and to each class
    of the prior), so an LF seen a handful of times cannot look perfect. Initialised from majority
    vote, which also fixes which class is "good"; stops when no vote pattern's p_good moves more
    than ``tol`` or after ``max_iter`` rounds. Deterministic: no random restarts. A response never
    seen in the fit counts as no evidence.

    With fewer than two voters that ever vote (a click-only log: one implicit source), the votes
    alone cannot tell how far to trust them: every labelling is a fixed point of EM, which then
    only drifts with the smoothing. The model then keeps the majority vote it starts from (one
    M-step, no EM rounds).
    """

    voters: Sequence[Sequence[int]] | None = None  # LF columns voting as one; None: each LF alone
    smoothing: float = 1.0
    tol: float = 1e-6
    max_iter: int = 20_000
    version: ClassVar[str] = "dawid-skene-v1"

    prior_good: float = field(init=False, default=0.5)
    lf_voters: list[list[int]] = field(init=False, repr=False, default_factory=list)
    responses: list[np.ndarray] = field(init=False, repr=False, default_factory=list)
    # Every voter's table stacked: P(response | bad), P(response | good) per row; a voter's rows
    # start at its ``table_starts`` entry, its SILENT response first.
    rates: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.ones((0, 2)))
    table_starts: np.ndarray = field(init=False, repr=False, default_factory=lambda: np.zeros(0, int))
    n_iter: int = field(init=False, default=0)
    converged: bool = field(init=False, default=False)

    def fit(self, votes: np.ndarray, start: DawidSkene | None = None) -> DawidSkene:
        """EM from majority vote, or from ``start``'s p_good (a model of the same LFs fitted
        before, e.g. with its voters grouped otherwise: fewer rounds when the two are close)."""
        self.lf_voters = [list(v) for v in self.voters or [[lf] for lf in range(votes.shape[1])]]
        patterns, _, rows = vote_patterns(votes)
        voted = has_votes(patterns)
        patterns, rows = patterns[voted], rows[voted]
        codes = self._codes(patterns)
        self.responses = [np.union1d(code, [SILENT]) for code in codes.T]
        self.table_starts = np.cumsum([0] + [len(r) for r in self.responses[:-1]])
        seen = self._response_index(codes)
        initial = majority_vote(patterns) if start is None else start.predict_proba(patterns)
        state = np.append(initial, np.zeros(2))  # p_good per pattern, silent rows
        self.n_iter, self.converged = 0, False
        if (codes != SILENT).any(axis=0).sum() < 2:
            self._m_step(seen, state[:-2], rows, state[-2:])
            self.converged = True
            return self
        while not self.converged and self.n_iter < self.max_iter:
            state = self._accelerated_steps(partial(self._em_step, seen, rows), state)
        return self

    def _em_step(self, seen: np.ndarray, rows: np.ndarray, state: np.ndarray) -> np.ndarray:
        """One EM round from (p_good per pattern, silent rows per class); counts it, and sets
        ``converged`` once no pattern's p_good moved more than ``tol``."""
        p_good, silent = state[:-2], state[-2:]
        self._m_step(seen, p_good, rows, silent)
        updated = self._posterior(seen)
        self.n_iter += 1
        self.converged = bool(np.all(np.abs(updated - p_good) <= self.tol))
        return np.append(updated, self._silent_rows(updated, rows))

    def _accelerated_steps(self, em_step: Callable[[np.ndarray], np.ndarray], state: np.ndarray) -> np.ndarray:
        """Two EM rounds, then a jump along their direction and one more round (SQUAREM, Varadhan
        & Roland 2008): the same fixed point in far fewer rounds when EM crawls. A jump that
        leaves the valid states falls back to the two plain rounds."""
        first = em_step(state)
        if self.converged:
            return first
        second = em_step(first)
        step, curve = first - state, second - 2 * first + state
        if self.converged or not curve.any():
            return second
        alpha = min(-np.sqrt(step @ step / (curve @ curve)), -1.0)
        jumped = state - 2 * alpha * step + alpha**2 * curve
        valid = np.all((jumped[:-2] >= 0) & (jumped[:-2] <= 1)) and np.all(jumped[-2:] >= 0)
        return em_step(jumped if valid else second)

    def predict_proba(self, votes: np.ndarray) -> np.ndarray:
        """p_good per row, NaN where every LF abstained."""
        patterns, row_pattern, _ = vote_patterns(votes)
        p_good = self._posterior(self._response_index(self._codes(patterns)))
        return np.where(has_votes(patterns), p_good, np.nan)[row_pattern]

    def log_likelihood(self, votes: np.ndarray) -> float:
        """Log-likelihood of the rows with a vote under the fitted model; like the fit, it
        conditions on some LF voting (silent rows are truncated). A response the fit never saw
        counts as no evidence."""
        patterns, _, rows = vote_patterns(votes)
        voted = has_votes(patterns)
        index = self._response_index(self._codes(patterns[voted]))
        log_rates = np.vstack([np.log(self.rates), np.zeros((1, 2))])
        class_share = np.array([1 - self.prior_good, self.prior_good])
        joint = np.log(class_share) + log_rates[index].sum(axis=1)  # (patterns, class)
        all_silent = np.prod(self.rates[self.table_starts], axis=0) @ class_share
        return float(rows[voted] @ np.logaddexp.reduce(joint, axis=1) - rows[voted].sum() * np.log1p(-all_silent))

    @property
    def n_parameters(self) -> int:
        """Free parameters of the fitted model: each voter's table per class, and the prior."""
        return 2 * (self._table_rows - len(self.responses)) + 1

    def vote_rates(self) -> np.ndarray:
        """P(LF votes abstain / bad / good | true class), as [lf, vote + 1, class]."""
        rates = np.zeros((sum(map(len, self.lf_voters)), 3, 2))
        tables = zip(self.lf_voters, self.responses, np.split(self.rates, self.table_starts[1:]), strict=True)
        for voter, responses, table in tables:
            for digit, lf in enumerate(voter):
                lf_vote = responses // 3**digit % 3  # the LF's vote + 1 in each response
                np.add.at(rates[lf], lf_vote, table)
        return rates

    @property
    def sensitivity(self) -> np.ndarray:
        """Per LF, P(votes good | the impression is good)."""
        return self.vote_rates()[:, GOOD + 1, 1]

    @property
    def specificity(self) -> np.ndarray:
        """Per LF, P(votes bad | the impression is bad)."""
        return self.vote_rates()[:, BAD + 1, 0]

    def lf_accuracies(self) -> np.ndarray:
        """Per LF, P(its vote is right | it voted), NaN if it never voted in the fit.

        Comparable to its empirical accuracy on gold labels.
        """
        rates = self.vote_rates()
        class_share = np.array([1 - self.prior_good, self.prior_good])
        right = self.specificity * class_share[0] + self.sensitivity * class_share[1]
        voted = (rates[:, BAD + 1, :] + rates[:, GOOD + 1, :]) @ class_share
        with np.errstate(invalid="ignore"):
            return right / voted

    def _codes(self, patterns: np.ndarray) -> np.ndarray:
        """Each voter's response per pattern: its LFs' votes + 1 as base-3 digits (0 = silent)."""
        return np.column_stack(
            [
                (patterns[:, voter].astype(np.int64) + 1)
                @ 3 ** np.arange(len(voter), dtype=np.int64)
                for voter in self.lf_voters
            ]
        )

    @property
    def _table_rows(self) -> int:
        return sum(map(len, self.responses))

    def _response_index(self, codes: np.ndarray) -> np.ndarray:
        """Each pattern's row per voter in the stacked tables, (patterns, voters); a response the
        fit never saw points one past the last row (no evidence)."""
        index = np.full(codes.shape, self._table_rows)
        for voter, (code, responses) in enumerate(zip(codes.T, self.responses, strict=True)):
            position = np.minimum(np.searchsorted(responses, code), len(responses) - 1)
            seen = responses[position] == code
            index[seen, voter] = self.table_starts[voter] + position[seen]
        return index

    def _m_step(self, seen: np.ndarray, p_good: np.ndarray, rows: np.ndarray, silent: np.ndarray) -> None:
        """Tables and prior from expected counts: the rows seen plus ``silent`` rows per class."""
        weights = np.column_stack([1 - p_good, p_good]) * rows[:, None]  # (patterns, class)
        n_rows, n_voters = self._table_rows, seen.shape[1]
        counts = np.column_stack(
            [np.bincount(seen.ravel(), np.repeat(weights[:, y], n_voters), n_rows) for y in (0, 1)]
        )
        counts[self.table_starts] += silent  # each voter's SILENT response: first in its table
        counts += self.smoothing
        per_voter = np.add.reduceat(counts, self.table_starts, axis=0)
        self.rates = counts / np.repeat(per_voter, np.diff(self.table_starts, append=n_rows), axis=0)
        per_class = weights.sum(axis=0) + silent
        self.prior_good = (per_class[1] + self.smoothing) / (per_class.sum() + 2 * self.smoothing)

    def _silent_rows(self, p_good: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Expected rows per class on which every LF abstained, given the rows seen of it."""
        seen = np.array([((1 - p_good) * rows).sum(), (p_good * rows).sum()])
        all_silent = np.prod(self.rates[self.table_starts], axis=0)
        return np.divide(seen * all_silent, 1 - all_silent, out=np.zeros(2), where=all_silent < 1)

    def _posterior(self, index: np.ndarray) -> np.ndarray:
        log_odds = np.log(self.prior_good) - np.log1p(-self.prior_good)
        evidence = np.append(np.log(self.rates[:, 1]) - np.log(self.rates[:, 0]), 0.0)
        log_odds = log_odds + evidence[index].sum(axis=1)
        return 0.5 * (1 + np.tanh(log_odds / 2))  # the logistic function, without overflow


def vote_patterns(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct rows of ``votes``, each row's index among them, and how many rows each has."""
    if votes.shape[1] > MAX_LFS:
        raise ValueError(f"at most {MAX_LFS} labeling functions, got {votes.shape[1]}")
    keys = np.zeros(len(votes), dtype=np.int64)
    for digit, column in enumerate(votes.T):  # column by column: no int64 copy of the matrix
        keys += (column + 1).astype(np.int64) * 3**digit
    _, first, row_pattern, rows = np.unique(
        keys, return_index=True, return_inverse=True, return_counts=True
    )
    return votes[first], row_pattern, rows
