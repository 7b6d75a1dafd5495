from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from dptrain.audit.canary import (
    guess_count_candidates,
    one_run_audit,
    one_run_epsilon,
    one_run_guesses,
    one_run_p_value,
)


def _binomial_tail(r: int, v: int, epsilon: float) -> float:
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    return float(stats.binom.sf(v - 1, r, q))


def test_pure_dp_p_value_is_the_binomial_tail():
    assert one_run_p_value(1000, 100, 70, 0.8) == pytest.approx(_binomial_tail(100, 70, 0.8), rel=1e-12)


def test_approximate_dp_p_value_adds_the_delta_term():
    m, r, v, epsilon, delta = 1000, 60, 45, 0.5, 1e-5
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    worst = max(
        sum(stats.binom.pmf(j, r, q) for j in range(v - i, v)) / i for i in range(1, v + 1)
    )
    expected = _binomial_tail(r, v, epsilon) + 2 * m * delta * worst
    assert one_run_p_value(m, r, v, epsilon, delta) == pytest.approx(expected, rel=1e-9)


def test_pure_dp_bound_is_where_the_binomial_tail_reaches_alpha():
    r, v = 200, 160
    epsilon = one_run_epsilon(1000, r, v, confidence=0.95)
    assert epsilon > 0
    assert _binomial_tail(r, v, epsilon) <= 0.05
    assert _binomial_tail(r, v, epsilon + 1e-6) > 0.05


def test_bound_is_zero_at_chance_level_accuracy():
    assert one_run_epsilon(1000, 200, 100) == 0.0
    assert one_run_epsilon(1000, 200, 105) == 0.0


def test_bound_increases_with_correct_guesses_and_with_guesses_at_fixed_accuracy():
    by_correct = [one_run_epsilon(1000, 100, v) for v in (70, 80, 90, 100)]
    assert by_correct == sorted(by_correct) and by_correct[0] > 0
    by_guesses = [one_run_epsilon(1000, r, int(0.9 * r)) for r in (20, 100, 500)]
    assert by_guesses == sorted(by_guesses) and by_guesses[0] < by_guesses[-1]


def test_delta_only_weakens_the_bound():
    pure = one_run_epsilon(1000, 200, 180)
    approximate = one_run_epsilon(1000, 200, 180, delta=1e-5)
    assert 0 < approximate <= pure
    assert one_run_epsilon(1000, 200, 180, delta=0.01) == 0.0


def test_guesses_are_top_in_bottom_out_and_abstain_elsewhere():
    scores = np.array([0.5, 0.9, 0.1, 0.7, 0.3, 0.2])
    assert one_run_guesses(scores, 2, 1).tolist() == [0, 1, -1, 1, 0, 0]
    with pytest.raises(ValueError):
        one_run_guesses(scores, 4, 3)


def test_tied_scores_are_broken_by_a_seeded_shuffle_not_by_position():
    scores = np.zeros(100)
    picked = [np.flatnonzero(one_run_guesses(scores, 10, 0, seed=s) == 1) for s in range(5)]
    assert not np.array_equal(picked[0], np.arange(90, 100))
    assert np.array_equal(picked[0], np.flatnonzero(one_run_guesses(scores, 10, 0, seed=0) == 1))


def test_candidate_grid_is_log_spaced_and_fits_the_canaries():
    candidates = guess_count_candidates(100)
    assert (50, 50) in candidates and (1, 0) in candidates
    assert all(plus + minus <= 100 for plus, minus in candidates)


def test_audit_finds_a_positive_bound_when_scores_reveal_inclusion():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    scores = included + rng.normal(0, 0.3, 1000)
    result = one_run_audit(scores, included)
    assert result.epsilon_lower_bound > 1.0
    assert result.n_included + result.n_excluded == 1000
    assert result.n_guesses == result.k_plus + result.k_minus
    json.dumps(result.to_dict(), allow_nan=False)


def test_audit_with_given_guess_counts_matches_the_formula():
    rng = np.random.default_rng(1)
    included = rng.random(500) < 0.5
    scores = included + rng.normal(0, 1.0, 500)
    result = one_run_audit(scores, included, k_plus=50, k_minus=50)
    assert result.n_candidates == 1
    assert result.epsilon_lower_bound == one_run_epsilon(500, 100, result.n_correct)


def test_audit_on_uninformative_scores_is_zero_in_at_least_90_percent_of_seeds():
    zeros = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        zeros += one_run_audit(rng.normal(size=400), rng.random(400) < 0.5, seed=seed).epsilon_lower_bound == 0.0
    assert zeros >= 36
