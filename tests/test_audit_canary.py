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
from dptrain.audit.fdp import (
    SubsampledGaussianFamily,
    TradeOffCurve,
    fdp_audit,
    fdp_p_value,
    fdp_rejects,
    gaussian_least_false_positive_rate,
    weakest_rejected_noise,
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


# --- the f-DP one-run analysis (Mahloujifar, Melis & Chaudhuri 2025) ------------------------------------


def _worst_mechanism(m: int, r: int, v: int, epsilons, deltas) -> float:
    """max P[at least v of r guesses right] over every mechanism of m coins that is (eps_k, delta_k)-DP
    for each k in both directions, by linear programming: the mechanism's output is, without loss of
    generality, the guess vector itself (any adversary is post-processing), so this is exact."""
    from itertools import combinations, product

    from scipy import sparse
    from scipy.optimize import linprog

    coins = list(product((0, 1), repeat=m))
    outputs = [
        tuple(dict(zip(where, bits)).get(i) for i in range(m))
        for where in combinations(range(m), r)
        for bits in product((0, 1), repeat=r)
    ]
    n_p, n_out = len(coins) * len(outputs), len(outputs)
    rows, cols, values, bounds = [], [], [], []
    slack = n_p
    for s, coin in enumerate(coins):
        for j in range(m):
            t = coins.index(tuple(b ^ (i == j) for i, b in enumerate(coin)))
            for epsilon, delta in zip(epsilons, deltas):
                # slack_g >= p(g | s) - e^eps p(g | t) and sum_g slack_g <= delta: the hockey stick.
                for g in range(n_out):
                    rows += [len(bounds)] * 3
                    cols += [s * n_out + g, t * n_out + g, slack + g]
                    values += [1.0, -math.exp(epsilon), -1.0]
                    bounds.append(0.0)
                rows += [len(bounds)] * n_out
                cols += list(range(slack, slack + n_out))
                values += [1.0] * n_out
                bounds.append(delta)
                slack += n_out
    a_ub = sparse.csr_matrix((values, (rows, cols)), shape=(len(bounds), slack))
    a_eq = sparse.csr_matrix(
        ([1.0] * n_p, ([p // n_out for p in range(n_p)], list(range(n_p)))), shape=(len(coins), slack)
    )
    objective = np.zeros(slack)
    for s, coin in enumerate(coins):
        for g, guess in enumerate(outputs):
            if sum(guess[i] == coin[i] for i in range(m)) >= v:
                objective[s * n_out + g] = -1.0 / len(coins)
    result = linprog(objective, A_ub=a_ub, b_ub=bounds, A_eq=a_eq, b_eq=np.ones(len(coins)), method="highs")
    assert result.status == 0
    return -result.fun


@pytest.mark.parametrize(
    "epsilons, deltas", [([1.0], [0.0]), ([1.0], [0.05]), ([0.2, 1.5], [0.15, 0.01])], ids=["pure", "approx", "profile"]
)
def test_fdp_p_value_bounds_the_worst_mechanism_of_all_and_is_exact_when_every_guess_is_right(epsilons, deltas):
    curve = TradeOffCurve(epsilons, deltas)
    for m, r, v in [(3, 3, 3), (3, 3, 2), (3, 2, 2), (4, 2, 2), (4, 4, 4), (4, 4, 3), (4, 3, 3)]:
        worst = _worst_mechanism(m, r, v, epsilons, deltas)
        bound = fdp_p_value(curve, m, r, v)
        assert bound >= worst - 1e-7, (m, r, v)
        if v == r:
            assert bound == pytest.approx(worst, abs=1e-6), (m, r, v)


def test_fdp_p_value_of_pure_dp_with_every_guess_right_is_the_randomized_response_tail():
    # Randomized response at epsilon is e^eps / (1 + e^eps)-accurate per canary: it attains the bound.
    epsilon, r = 0.7, 20
    expected = _binomial_tail(r, r, epsilon)
    assert fdp_p_value(TradeOffCurve([epsilon], [0.0]), 1000, r, r) == pytest.approx(expected, rel=1e-6)
    assert one_run_p_value(1000, r, r, epsilon) == pytest.approx(expected, rel=1e-12)


def test_fdp_test_rejects_the_true_gaussian_curve_rarely_and_one_three_times_weaker_always():
    # 1000 canaries seen through N(mu b, 1), IN guessed on the 200 highest; 1-GDP tested at 5%.
    m, k, rejected = 1000, 200, {1.0: 0, 3.0: 0}
    curve = gaussian_least_false_positive_rate(1.0)
    for mu in rejected:
        for trial in range(100):
            rng = np.random.default_rng(trial)
            included = rng.random(m) < 0.5
            top = np.argsort(mu * included + rng.normal(size=m))[-k:]
            rejected[mu] += fdp_rejects(curve, m, k, int(included[top].sum()), 0.05)
    assert rejected[1.0] <= 5 and rejected[3.0] == 100


def test_fdp_rejection_is_monotone_in_the_curve_and_the_level():
    m, r, v = 2000, 100, 93
    levels = [fdp_rejects(gaussian_least_false_positive_rate(mu), m, r, v, 0.05) for mu in (0.5, 1.0, 2.0, 4.0)]
    assert levels == sorted(levels, reverse=True) and levels[0] and not levels[-1]
    p = fdp_p_value(gaussian_least_false_positive_rate(1.0), m, r, v)
    assert fdp_rejects(gaussian_least_false_positive_rate(1.0), m, r, v, p * 1.001)
    assert not fdp_rejects(gaussian_least_false_positive_rate(1.0), m, r, v, p * 0.999)


def test_trade_off_curve_of_the_gaussian_privacy_profile_is_dong_roth_sus_gdp_curve():
    mu, grid = 1.3, np.arange(0.0, 20.0, 0.01)
    profile = stats.norm.cdf(-grid / mu + mu / 2) - np.exp(grid) * stats.norm.cdf(-grid / mu - mu / 2)
    curve = TradeOffCurve(grid, profile)
    for power in np.concatenate([np.logspace(-9, -0.01, 30), [0.5, 0.99, 1 - 1e-9]]):
        exact = stats.norm.cdf(stats.norm.ppf(power) - mu)
        assert curve(power) <= exact + 1e-15
        assert curve(power) == pytest.approx(exact, rel=1e-4, abs=1e-12)


def test_upper_envelope_is_the_maximum_of_its_lines():
    from dptrain.audit.fdp import _UpperEnvelope

    rng = np.random.default_rng(0)
    slopes, intercepts = rng.normal(size=300), rng.normal(size=300)
    slopes[:50] = slopes[50:100]  # ties in slope
    envelope = _UpperEnvelope(slopes, intercepts)
    for x in rng.uniform(0, 5, 200):
        assert envelope(x) == pytest.approx(np.max(slopes * x + intercepts), abs=1e-12)


def test_family_curve_without_subsampling_is_the_composed_gaussian_and_never_above_it():
    # 4 full-batch steps of noise 2: sqrt(4) / 2 = 1-GDP exactly (Dong, Roth & Su 2019, Corollary 3.3).
    curve = SubsampledGaussianFamily(1.0, 4, 1e-5).curve(2.0)
    for power in np.logspace(-8, -0.001, 40):
        exact = stats.norm.cdf(stats.norm.ppf(power) - 1.0)
        assert exact * (1 - 1e-3) <= curve(power) <= exact


def test_family_curve_of_one_subsampled_step_is_below_both_directions_neyman_pearson_curves():
    # One step at q = 0.3, noise 1: remove (N(0,1) vs the mixture) and add (the mixture vs N(0,1)),
    # each a likelihood-ratio threshold on x, swept finely.
    q, x = 0.3, np.linspace(-15, 15, 200_001)
    mixture_above = (1 - q) * stats.norm.sf(x) + q * stats.norm.sf(x - 1)
    mixture_below = (1 - q) * stats.norm.cdf(x) + q * stats.norm.cdf(x - 1)
    directions = [(stats.norm.sf(x), mixture_above), (mixture_below, stats.norm.cdf(x))]  # (FPR, power)
    curve = SubsampledGaussianFamily(q, 1, 1e-5).curve(1.0)
    for power in (1e-4, 1e-2, 0.1, 0.5, 0.9, 0.99):
        least = [np.interp(power, np.sort(tpr), np.sort(fpr)) for fpr, tpr in directions]
        assert curve(power) <= min(least) * (1 + 1e-4)
        assert curve(power) >= 0.99 * min(least)


def test_weakest_rejected_noise_is_found_from_above_within_the_tolerance():
    assert weakest_rejected_noise(lambda noise: noise >= 1.234, claimed=1.0) == pytest.approx(1.234, rel=0.01)
    assert weakest_rejected_noise(lambda noise: noise >= 1.234, claimed=1.0) >= 1.234
    assert weakest_rejected_noise(lambda noise: noise >= 0.3, claimed=1.0) == pytest.approx(0.3, rel=0.01)
    assert weakest_rejected_noise(lambda noise: False, claimed=1.0) is None
    assert weakest_rejected_noise(lambda noise: True, claimed=1.0) == pytest.approx(1.0 / 64)


def test_fdp_audit_pools_runs_into_one_game_and_reports_the_rejecting_rule():
    rng = np.random.default_rng(0)
    included = rng.random(4000) < 0.5
    scores = included * 3.0 + rng.normal(size=4000)
    family = SubsampledGaussianFamily(1.0, 1, 1e-5)
    pooled = fdp_audit({"score": scores}, included, family, claimed_noise=2.0, runs=np.repeat([0, 1], 2000))
    assert pooled.n_runs == 2 and pooled.n_canaries == 4000 and pooled.n_tests == 2
    assert pooled.n_guesses == 2 * (pooled.k_plus + pooled.k_minus) and pooled.k_plus == 20
    # Scores of a 3-GDP mechanism against the 0.5-GDP member (noise 2): rejected.
    assert pooled.claimed_rejected and pooled.rejected_noise <= 2.0
    assert pooled.epsilon_lower_bound == family.epsilon(pooled.rejected_noise)
    chance = fdp_audit({"score": rng.normal(size=4000)}, included, family, claimed_noise=2.0)
    assert chance.epsilon_lower_bound == 0.0 and chance.rejected_noise is None and not chance.claimed_rejected
