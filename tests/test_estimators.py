"""Off-policy estimators against a synthetic logging policy whose target value is known exactly.

Each check allows four standard errors of the estimator itself (its per-interaction terms' standard
deviation over sqrt(n), or the delta method for a ratio), so a biased estimator fails and an
unbiased one passes with probability ~0.99994 whatever the seed.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from flywheel_pipeline.validation import estimators as est
from flywheel_pipeline.validation.evidence import Options, policy_terms

N_CONTEXTS, N_ITEMS, SLATE = 40, 8, 3
THETA = np.array([1.0, 0.6, 0.35])  # examination by position
POSITIONS = est.Positions.precision(THETA)  # the value: mean attraction of the policy's top 3
EXPLORATION = 0.3
N_LOGGED = 30_000
Z = 4.0


def marginals(ranking: np.ndarray, exploration: float) -> np.ndarray:
    """(contexts, items, SLATE): P(item at position) under epsilon-greedy over ``ranking``."""
    mu = np.full((N_CONTEXTS, N_ITEMS, SLATE), exploration / N_ITEMS)
    for x in range(N_CONTEXTS):
        for j in range(SLATE):
            mu[x, ranking[x, j], j] += 1 - exploration
    return mu


@pytest.fixture(scope="module")
def world():
    """Attractions, a logger's and a tied target's rankings, logged slates with PBM clicks."""
    rng = np.random.default_rng(11)
    attraction = rng.beta(2, 3, (N_CONTEXTS, N_ITEMS))
    logger_ranking = np.argsort(-(attraction + rng.normal(0, 0.4, attraction.shape)), axis=1)
    target_scores = np.round(attraction + rng.normal(0, 0.15, attraction.shape), 1)  # many ties
    mu = marginals(logger_ranking, EXPLORATION)

    context = rng.integers(N_CONTEXTS, size=N_LOGGED)
    explore = rng.random(N_LOGGED) < EXPLORATION
    random_slates = np.argsort(rng.random((N_LOGGED, N_ITEMS)), axis=1)
    slate = np.where(explore[:, None], random_slates, logger_ranking[context])[:, :SLATE]
    clicks = rng.random((N_LOGGED, SLATE)) < THETA * np.take_along_axis(attraction[context], slate, 1)

    shown_position = np.full((N_LOGGED, N_ITEMS), -1)
    np.put_along_axis(shown_position, slate, np.arange(SLATE)[None, :].repeat(N_LOGGED, 0), 1)
    reward = np.zeros((N_LOGGED, N_ITEMS))
    np.put_along_axis(reward, slate, clicks.astype(float), 1)
    options = pl.DataFrame({
        "unit": np.repeat(np.arange(N_LOGGED), N_ITEMS),
        "item": np.tile(np.arange(N_ITEMS), N_LOGGED),
        "position": pl.Series(shown_position.ravel()).replace(-1, None),
        "reward": reward.ravel(),
    })
    evidence = Options(options, mu[context].reshape(-1, SLATE))
    scores = pl.Series(target_scores[context].ravel())
    pi = est.position_probabilities(scores, options["unit"], SLATE)

    exact_pi = est.position_probabilities(pl.Series(target_scores.ravel()),
                                          pl.Series(np.repeat(np.arange(N_CONTEXTS), N_ITEMS)), SLATE)
    true_value = float((exact_pi @ POSITIONS.value * attraction.ravel()).sum() / N_CONTEXTS)
    return evidence, pi, attraction[context].ravel(), true_value, explore, slate, clicks


def _within(terms: np.ndarray, truth: float) -> None:
    estimate, se = terms.mean(), terms.std(ddof=1) / np.sqrt(len(terms))
    assert abs(estimate - truth) < Z * se, f"{estimate:.4f} vs truth {truth:.4f} (se {se:.4f})"


def test_position_probabilities_split_tied_positions_evenly():
    pi = est.position_probabilities(pl.Series([0.9, 0.5, 0.5, 0.5, 0.1]), pl.Series([0] * 5), 3)
    third = 1 / 3  # three tied items share positions 1 and 2
    assert np.allclose(pi, [[1, 0, 0], [0, third, third], [0, third, third], [0, third, third], [0, 0, 0]])
    assert np.allclose(pi.sum(axis=0), 1)


def test_pbm_ips_is_unbiased_for_a_new_ranking(world):
    evidence, pi, _, truth, *_ = world
    terms = policy_terms(evidence, pi, POSITIONS, np.zeros(evidence.frame.height), N_LOGGED)
    _within(terms.ips, truth)


def test_pbm_ips_is_unbiased_for_expected_clicks_when_positions_count_by_examination(world):
    evidence, pi, attraction, *_ = world
    clicks = est.Positions(THETA, THETA)
    terms = policy_terms(evidence, pi, clicks, np.zeros(evidence.frame.height), N_LOGGED)
    units = evidence.frame["unit"].to_numpy()
    per_unit = np.bincount(units, weights=(pi @ THETA) * attraction, minlength=N_LOGGED)
    _within(terms.ips, float(per_unit.mean()))  # the target's clicks in the logged contexts


def test_ips_with_the_examination_ignored_is_biased(world):
    """The check above can fail: weights that forget the examination curve miss the truth."""
    evidence, pi, _, truth, *_ = world
    blind = est.Positions(np.ones(SLATE), POSITIONS.value)
    terms = policy_terms(evidence, pi, blind, np.zeros(evidence.frame.height), N_LOGGED)
    estimate, se = terms.ips.mean(), terms.ips.std(ddof=1) / np.sqrt(N_LOGGED)
    assert abs(estimate - truth) > Z * se


@pytest.mark.parametrize("model", ["constant", "truth_plus_noise"])
def test_doubly_robust_is_unbiased_whatever_the_reward_model(world, model):
    evidence, pi, attraction, truth, *_ = world
    rng = np.random.default_rng(5)
    rho = (np.full_like(attraction, 0.5) if model == "constant"
           else np.clip(attraction + rng.normal(0, 0.2, attraction.shape), 0, 1))
    terms = policy_terms(evidence, pi, POSITIONS, rho, N_LOGGED)
    _within(terms.direct + terms.residual, truth)


def test_doubly_robust_with_a_good_reward_model_has_lower_variance_than_ips(world):
    evidence, pi, attraction, *_ = world
    terms = policy_terms(evidence, pi, POSITIONS, attraction, N_LOGGED)
    assert (terms.direct + terms.residual).var() < terms.ips.var()


def test_snips_is_consistent(world):
    evidence, pi, _, truth, *_ = world
    terms = policy_terms(evidence, pi, POSITIONS, np.zeros(evidence.frame.height), N_LOGGED)
    ones = np.ones((1, N_LOGGED))
    total = POSITIONS.value.sum()
    estimate = est.snips(terms, ones, POSITIONS)[0]
    normaliser = terms.weight.mean() / total
    residual = terms.ips - estimate * terms.weight / total
    se = residual.std(ddof=1) / normaliser / np.sqrt(N_LOGGED)
    assert abs(estimate - truth) < Z * se
    assert normaliser == pytest.approx(1, abs=Z * terms.weight.std() / total / np.sqrt(N_LOGGED))


def test_examination_curve_is_recovered_from_the_exploration_slice(world):
    *_, explore, _, clicks = world
    positions = np.tile(np.arange(SLATE), (explore.sum(), 1)).ravel()
    theta = est.examination_curve(positions, clicks[explore].ravel().astype(float), SLATE)
    rates = [clicks[explore][:, k] for k in range(SLATE)]
    se = [np.sqrt(r.var() / len(r)) / rates[0].mean() for r in rates]  # ratio se, dominated by k
    assert theta[0] == 1
    assert all(abs(theta[k] - THETA[k]) < Z * 2 * se[k] for k in range(1, SLATE))


def test_effective_sample_size_is_n_for_equal_weights_and_smaller_otherwise():
    counts = np.ones((1, 100))
    assert est.effective_sample_size(np.ones(100), counts)[0] == pytest.approx(100)
    skewed = np.r_[np.full(10, 10.0), np.full(90, 0.1)]
    assert est.effective_sample_size(skewed, counts)[0] < 15
