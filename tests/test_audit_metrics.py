from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from dptrain.audit.metrics import (
    auc,
    clopper_pearson_interval,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_from_counts,
    epsilon_lower_bound,
    membership_advantage,
    membership_metrics,
    roc_curve,
    tpr_at_fpr,
)

MEMBERS = [0.9, 0.8, 0.7, 0.3]
NONMEMBERS = [0.85, 0.6, 0.5, 0.45, 0.4, 0.35, 0.2, 0.15, 0.1, 0.05]


def test_roc_starts_at_origin_ends_at_one_and_counts_ties_together():
    roc = roc_curve([1.0, 0.5, 0.5], [0.5, 0.0])
    assert roc.thresholds[0] == np.inf
    assert (roc.tpr[0], roc.fpr[0]) == (0.0, 0.0)
    assert (roc.tpr[-1], roc.fpr[-1]) == (1.0, 1.0)
    # threshold 0.5 admits both tied members and the tied non-member at once
    assert list(zip(roc.true_positives, roc.false_positives)) == [(0, 0), (1, 0), (3, 1), (3, 2)]


def test_auc_equals_mann_whitney_with_ties_as_sklearn():
    rng = np.random.default_rng(0)
    members = rng.integers(0, 20, 300).astype(float)
    nonmembers = rng.integers(0, 18, 250).astype(float)
    labels = np.r_[np.ones(300), np.zeros(250)]
    expected = roc_auc_score(labels, np.r_[members, nonmembers])
    assert auc(roc_curve(members, nonmembers)) == pytest.approx(expected, abs=1e-12)


def test_tpr_at_fpr_is_highest_tpr_with_fpr_at_most_target_without_interpolation():
    roc = roc_curve(MEMBERS, NONMEMBERS)
    # 10 non-members: FPR 0.1 allows one false positive (0.85), reached at threshold 0.7 -> 3 of 4 members
    assert tpr_at_fpr(roc, 0.1) == 0.75
    # FPR 0.15 still allows only one false positive: no interpolation towards the next point
    assert tpr_at_fpr(roc, 0.15) == 0.75
    assert tpr_at_fpr(roc, 0.3) == 0.75
    assert tpr_at_fpr(roc, 0.9) == 1.0


def test_tpr_at_fpr_is_none_with_fewer_than_one_over_target_nonmembers():
    roc = roc_curve(MEMBERS, NONMEMBERS)
    assert tpr_at_fpr(roc, 0.01) is None
    assert tpr_at_fpr(roc_curve(np.arange(5.0), np.arange(1000.0)), 0.001) is not None


def test_advantage_is_max_tpr_minus_fpr():
    # threshold 0.7: TPR 0.75, FPR 0.1
    assert membership_advantage(roc_curve(MEMBERS, NONMEMBERS)) == pytest.approx(0.65)


def test_clopper_pearson_matches_beta_quantiles():
    assert clopper_pearson_lower(7, 20, 0.025) == pytest.approx(stats.beta.ppf(0.025, 7, 14), rel=1e-12)
    assert clopper_pearson_upper(7, 20, 0.025) == pytest.approx(stats.beta.ppf(0.975, 8, 13), rel=1e-12)
    interval = clopper_pearson_interval(7, 20, 0.95)
    assert (interval.low, interval.high) == pytest.approx((0.1539092, 0.5921885), abs=1e-6)


def test_clopper_pearson_edges_have_closed_forms():
    n, alpha = 40, 0.05
    assert clopper_pearson_lower(0, n, alpha) == 0.0
    assert clopper_pearson_upper(0, n, alpha) == pytest.approx(1 - alpha ** (1 / n), rel=1e-10)
    assert clopper_pearson_lower(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-10)
    assert clopper_pearson_upper(n, n, alpha) == 1.0


def test_epsilon_from_counts_uses_bonferroni_split_clopper_pearson():
    n, alpha = 500, 0.05 / 2
    tpr_lo = alpha ** (1 / n)
    fpr_hi = 1 - alpha ** (1 / n)
    expected = math.log(tpr_lo / fpr_hi)
    assert epsilon_from_counts(n, n, 0, n, confidence=0.95) == pytest.approx(expected, rel=1e-9)
    with_delta = math.log((tpr_lo - 1e-3) / fpr_hi)
    assert epsilon_from_counts(n, n, 0, n, delta=1e-3) == pytest.approx(with_delta, rel=1e-9)


def test_epsilon_from_counts_uses_the_symmetric_bound_when_it_is_larger():
    # A rule that rarely fires but is never wrong about non-members when it stays silent:
    # FNR small, TNR large -> ln(TNR_lo / FNR_hi) carries the bound.
    n, alpha = 400, 0.025
    tp, fp = 400, 300
    fnr_hi = 1 - clopper_pearson_lower(tp, n, alpha)
    tnr_lo = 1 - clopper_pearson_upper(fp, n, alpha)
    assert epsilon_from_counts(tp, n, fp, n) == pytest.approx(math.log(tnr_lo / fnr_hi), rel=1e-9)


def test_epsilon_from_counts_is_zero_without_signal():
    assert epsilon_from_counts(50, 100, 50, 100) == 0.0


def test_perfectly_separated_scores_give_auc_one_and_positive_epsilon():
    members, nonmembers = np.arange(1000.0) + 1000.0, np.arange(1000.0)
    result = membership_metrics(members, nonmembers, n_bootstrap=50)
    assert result.auc == 1.0
    assert result.tpr_at_fpr == {"0.001": 1.0, "0.01": 1.0, "0.1": 1.0}
    bound = result.epsilon_lower_bound
    assert bound.value > 4.0
    assert bound.n_members + bound.n_calibration_members == 1000
    assert bound.true_positives == bound.n_members and bound.false_positives == 0


def test_identical_distributions_give_auc_near_half_with_ci_covering_half():
    rng = np.random.default_rng(1)
    result = membership_metrics(rng.normal(size=1000), rng.normal(size=1000), n_bootstrap=300, seed=1)
    assert abs(result.auc - 0.5) < 0.05
    assert result.auc_ci.low <= 0.5 <= result.auc_ci.high
    assert result.epsilon_lower_bound.value == 0.0


def test_epsilon_lower_bound_on_null_scores_is_zero_in_at_least_90_percent_of_seeds():
    zeros = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        bound = epsilon_lower_bound(rng.normal(size=400), rng.normal(size=400), seed=seed)
        zeros += bound.value == 0.0
    assert zeros >= 54


def test_epsilon_lower_bound_threshold_comes_from_calibration_half_only():
    # Evaluation counts are recomputed from the reported threshold: nothing else was tuned.
    rng = np.random.default_rng(2)
    members, nonmembers = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 300)
    bound = epsilon_lower_bound(members, nonmembers, seed=5)
    split = np.random.default_rng(5)
    eval_members = members[split.permutation(300)][150:]
    eval_nonmembers = nonmembers[split.permutation(300)][150:]
    assert bound.true_positives == np.count_nonzero(eval_members >= bound.threshold)
    assert bound.false_positives == np.count_nonzero(eval_nonmembers >= bound.threshold)
    assert bound.value == epsilon_from_counts(bound.true_positives, 150, bound.false_positives, 150)


def test_membership_metrics_is_strict_json_with_counts_and_none_for_unmeasurable_tpr():
    rng = np.random.default_rng(3)
    result = membership_metrics(rng.normal(0.5, 1, 500), rng.normal(size=500), n_bootstrap=20)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(data["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
    assert data["tpr_at_fpr"]["0.001"] is None and data["tpr_at_fpr_ci"]["0.001"] is None
    assert data["tpr_at_fpr"]["0.1"] is not None
    assert (data["n_members"], data["n_nonmembers"]) == (500, 500)
    assert data["epsilon_lower_bound"]["confidence"] == 0.95


def test_bootstrap_is_reproducible_under_a_seed():
    rng = np.random.default_rng(4)
    members, nonmembers = rng.normal(0.3, 1, 200), rng.normal(size=200)
    first = membership_metrics(members, nonmembers, n_bootstrap=100, seed=7)
    assert first == membership_metrics(members, nonmembers, n_bootstrap=100, seed=7)
    assert first.auc_ci != membership_metrics(members, nonmembers, n_bootstrap=100, seed=8).auc_ci


def test_scores_with_nan_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        roc_curve([0.1, np.nan], [0.2])


def test_epsilon_lower_bound_stays_below_a_known_epsilon_and_is_not_vacuous():
    # Randomized response is exactly (1, 0)-DP: a member scores 1 w.p. e/(1+e), a non-member w.p. 1/(1+e).
    epsilon, q = 1.0, math.e / (1 + math.e)
    bounds = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        members = (rng.random(2000) < q).astype(float)
        nonmembers = (rng.random(2000) < 1 - q).astype(float)
        bounds.append(epsilon_lower_bound(members, nonmembers, seed=seed).value)
    assert np.mean(np.array(bounds) > epsilon) <= 0.05
    assert np.mean(bounds) > 0.7


@pytest.mark.parametrize("decimals", [1, None], ids=["ties", "distinct"])
def test_vectorised_bootstrap_matches_recomputing_each_replicate(decimals):
    from dptrain.audit.metrics import _Replicates, _roc

    rng = np.random.default_rng(3)
    members, nonmembers = rng.normal(0.3, 1, 300), rng.normal(0, 1, 400)
    if decimals is not None:
        # Rounded scores force ties between and within members and non-members.
        members, nonmembers = np.round(members, decimals), np.round(nonmembers, decimals)
    members, nonmembers = np.sort(members), np.sort(nonmembers)
    u = rng.multinomial(300, np.full(300, 1 / 300), size=40)
    w = rng.multinomial(400, np.full(400, 1 / 400), size=40)
    replicates = [_roc(np.repeat(members, u[b]), np.repeat(nonmembers, w[b])) for b in range(40)]
    vectorised = _Replicates(members, nonmembers, u, w)
    assert np.allclose(vectorised.auc(), [auc(r) for r in replicates])
    for target in (0.01, 0.1, 0.5):
        expected = [tpr_at_fpr(r, target) for r in replicates]
        assert np.array_equal(vectorised.tpr_at_fpr(target), expected)


def test_bootstrap_in_chunks_gives_the_numbers_of_the_whole_bootstrap_at_once(monkeypatch):
    from dptrain.audit import metrics

    rng = np.random.default_rng(5)
    members, nonmembers = np.round(rng.normal(0.4, 1, 150), 1), np.round(rng.normal(0, 1, 250), 1)
    at_once = membership_metrics(members, nonmembers, n_bootstrap=60, seed=3)
    assert metrics.BOOTSTRAP_CHUNK_ELEMENTS >= 60 * (150 + 250)  # the default takes all 60 in one chunk
    for rows in (1, 7):
        monkeypatch.setattr(metrics, "BOOTSTRAP_CHUNK_ELEMENTS", rows * (150 + 250))
        assert membership_metrics(members, nonmembers, n_bootstrap=60, seed=3) == at_once


def test_bootstrap_peak_memory_does_not_grow_with_the_replicates():
    import tracemalloc

    rng = np.random.default_rng(6)
    members, nonmembers = rng.normal(0.2, 1, 5000), rng.normal(0, 1, 5000)
    peaks = {}
    for replicates in (250, 2500):
        tracemalloc.start()
        membership_metrics(members, nonmembers, n_bootstrap=replicates)
        peaks[replicates] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # Unchunked, 2500 replicates hold ten times the (replicates, records) arrays of 250.
    assert peaks[2500] < 1.3 * peaks[250]


def test_each_bootstrap_replicate_auc_is_sklearns_weighted_auc():
    # A replicate is the records repeated by their multiplicities: sklearn's AUC with those as sample
    # weights, ties between members and non-members counting one half, is an independent answer.
    from dptrain.audit.metrics import _Replicates

    rng = np.random.default_rng(8)
    members, nonmembers = np.sort(np.round(rng.normal(0.3, 1, 120), 1)), np.sort(np.round(rng.normal(0, 1, 90), 1))
    u, w = rng.multinomial(120, np.full(120, 1 / 120), size=25), rng.multinomial(90, np.full(90, 1 / 90), size=25)
    labels, scores = np.r_[np.ones(120), np.zeros(90)], np.r_[members, nonmembers]
    expected = [roc_auc_score(labels, scores, sample_weight=np.r_[u[b], w[b]]) for b in range(25)]
    assert np.allclose(_Replicates(members, nonmembers, u, w).auc(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "members, nonmembers, expected",
    [(np.full(50, 0.3), np.full(40, 0.3), 0.5), (np.arange(50.0) + 100, np.arange(40.0), 1.0)],
    ids=["all tied", "separated"],
)
def test_auc_interval_of_all_tied_or_separated_scores_is_the_point(members, nonmembers, expected):
    # Every replicate of these has the same AUC (1/2 by ties alone, 1 by separation), so its interval is that point.
    result = membership_metrics(members, nonmembers, n_bootstrap=200)
    assert (result.auc, result.auc_ci.low, result.auc_ci.high) == (expected, expected, expected)


def test_bootstrap_intervals_agree_with_scipys_two_sample_percentile_bootstrap():
    # scipy.stats.bootstrap with paired=False resamples members and non-members separately, as ours
    # does; percentile endpoints from 2000 replicates each differ by Monte Carlo error only (sd ~0.003
    # for the AUC here), while resampling one group only or the pooled records moves them by ~0.02.
    rng = np.random.default_rng(9)
    members, nonmembers = np.round(rng.normal(0.5, 1, 150), 1), np.round(rng.normal(0, 1, 150), 1)

    def scipy_auc(m, n, axis):
        return stats.mannwhitneyu(m, n, axis=axis).statistic / (m.shape[axis] * n.shape[axis])

    def scipy_tpr(m, n):
        return tpr_at_fpr(roc_curve(m, n), 0.1)

    ours = membership_metrics(members, nonmembers, n_bootstrap=2000, seed=2)
    common = dict(paired=False, method="percentile", confidence_level=0.95, random_state=3)
    auc_ci = stats.bootstrap((members, nonmembers), scipy_auc, n_resamples=2000, **common).confidence_interval
    assert ours.auc_ci.low == pytest.approx(auc_ci.low, abs=0.01)
    assert ours.auc_ci.high == pytest.approx(auc_ci.high, abs=0.01)
    tpr_ci = stats.bootstrap(
        (members, nonmembers), scipy_tpr, n_resamples=1000, vectorized=False, **common
    ).confidence_interval
    # TPR moves in steps of 1/150; its endpoints agree to two steps.
    assert ours.tpr_at_fpr_ci["0.1"].low == pytest.approx(tpr_ci.low, abs=2 / 150 + 1e-9)
    assert ours.tpr_at_fpr_ci["0.1"].high == pytest.approx(tpr_ci.high, abs=2 / 150 + 1e-9)
