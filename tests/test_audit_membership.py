from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from conftest import make_config
from dptrain.audit.membership import compute_signals, lira_scores, loss_scores, rmia_scores
from dptrain.audit.metrics import auc, roc_curve
from dptrain.errors import UserError
from dptrain.validation import validate


def _auc(scores: np.ndarray, is_member: np.ndarray) -> float:
    return auc(roc_curve(scores[is_member], scores[~is_member]))


def _balanced_inclusion(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    # Each example is IN exactly k/2 reference models, as Carlini et al. assign them.
    return rng.random((k, n)).argsort(axis=0) < k // 2


def test_signals_match_cross_entropy_and_softmax():
    torch.manual_seed(0)
    logits, labels = torch.randn(50, 5), torch.randint(0, 5, (50,))
    signals = compute_signals(logits, labels)
    p = torch.softmax(logits.double(), 1)[torch.arange(50), labels].numpy()
    np.testing.assert_allclose(signals.loss, F.cross_entropy(logits.double(), labels, reduction="none").numpy())
    np.testing.assert_allclose(signals.true_class_prob, p)
    np.testing.assert_allclose(signals.logit_confidence, np.log(p / (1 - p)), rtol=1e-9)


def test_logit_confidence_does_not_saturate_when_p_rounds_to_one():
    signals = compute_signals(torch.tensor([[60.0, 0.0, 0.0], [80.0, 0.0, 0.0]]), torch.tensor([0, 0]))
    np.testing.assert_allclose(signals.logit_confidence, [60.0 - np.log(2), 80.0 - np.log(2)])


def test_single_logit_binary_model_is_the_logit_of_class_one():
    signals = compute_signals(torch.tensor([2.0, -1.0]), torch.tensor([1, 1]))
    np.testing.assert_allclose(signals.logit_confidence, [2.0, -1.0])


def test_loss_score_is_negative_loss():
    np.testing.assert_array_equal(loss_scores(np.array([0.1, 2.0])), [-0.1, -2.0])


def _synthetic_lira(k: int, n: int = 400, seed: int = 0):
    # Each example has its own difficulty (mean phi); training on it raises phi by 2.
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 3, n)
    reference_in = _balanced_inclusion(k, n, rng)
    reference_phi = difficulty + 2.0 * reference_in + rng.normal(0, 1, (k, n))
    is_member = rng.random(n) < 0.5
    target_phi = difficulty + 2.0 * is_member + rng.normal(0, 1, n)
    return target_phi, reference_phi, reference_in, is_member


def test_online_lira_separates_in_and_out_better_than_raw_confidence():
    target, reference, reference_in, is_member = _synthetic_lira(k=16)
    scores = lira_scores(target, reference, reference_in)
    assert _auc(scores, is_member) > 0.85
    assert _auc(scores, is_member) > _auc(target, is_member) + 0.1


def test_offline_lira_separates_in_and_out_from_out_models_only():
    target, reference, reference_in, is_member = _synthetic_lira(k=16)
    scores = lira_scores(target, reference, reference_in, online=False)
    assert _auc(scores, is_member) > 0.8


def test_per_example_variance_needs_two_models_per_group():
    target, reference, reference_in, _ = _synthetic_lira(k=2)
    with pytest.raises(ValueError, match="pooled_within"):
        lira_scores(target, reference, reference_in)


def test_pooled_variance_lira_beats_per_example_variance_with_four_reference_models():
    target, reference, reference_in, is_member = _synthetic_lira(k=4)
    fixed = _auc(lira_scores(target, reference, reference_in, variance="pooled_within"), is_member)
    per_example = _auc(lira_scores(target, reference, reference_in), is_member)
    assert fixed > 0.8 and fixed > per_example


def test_online_lira_rejects_examples_without_in_models():
    target, reference, reference_in, _ = _synthetic_lira(k=4)
    reference_in[:, 0] = False
    with pytest.raises(ValueError, match="no IN reference model"):
        lira_scores(target, reference, reference_in, variance="pooled_within")


# Three examples, four reference models, each example IN for two of them (worked out by hand below).
PHI = np.array([[1.0, 4.0, 0.0], [3.0, 6.0, 2.0], [2.0, 5.0, 1.0], [6.0, 1.0, 3.0]])
IN = np.array([[True, False, True], [True, True, False], [False, True, True], [False, False, False]])
TARGET_PHI = np.array([2.0, 3.0, 1.0])
# IN values per example: [1, 3], [6, 5], [0, 1] (means 2, 5.5, 0.5); OUT: [2, 6], [4, 1], [2, 3] (means 4, 2.5, 2.5).
MU_IN, MU_OUT = np.array([2.0, 5.5, 0.5]), np.array([4.0, 2.5, 2.5])
VARIANCES = {
    # Unbiased per example: IN (2, 0.5, 0.5), OUT (8, 4.5, 0.5).
    "per_example": (np.array([2.0, 0.5, 0.5]), np.array([8.0, 4.5, 0.5])),
    # Squared deviations from each example's mean, summed (IN 3, OUT 13), over 6 values - 3 examples.
    "pooled_within": (np.full(3, 1.0), np.full(3, 13.0 / 3.0)),
    # All six IN values (mean 8/3, mean square 12) and OUT values (mean 3, mean square 35/3), 1/N.
    "global": (np.full(3, 12.0 - 64.0 / 9.0), np.full(3, 35.0 / 3.0 - 9.0)),
}


@pytest.mark.parametrize("variance", sorted(VARIANCES))
def test_online_lira_is_the_gaussian_log_likelihood_ratio_with_each_variance_estimate(variance):
    var_in, var_out = VARIANCES[variance]
    expected = stats.norm.logpdf(TARGET_PHI, MU_IN, np.sqrt(var_in)) - stats.norm.logpdf(
        TARGET_PHI, MU_OUT, np.sqrt(var_out)
    )
    by_hand = (
        -0.5 * np.log(var_in) - (TARGET_PHI - MU_IN) ** 2 / (2 * var_in)
        + 0.5 * np.log(var_out) + (TARGET_PHI - MU_OUT) ** 2 / (2 * var_out)
    )
    scores = lira_scores(TARGET_PHI, PHI, IN, variance=variance)
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    np.testing.assert_allclose(scores, by_hand, rtol=1e-12)


@pytest.mark.parametrize("variance", sorted(VARIANCES))
def test_offline_lira_is_the_out_gaussians_upper_tail_with_each_variance_estimate(variance):
    _, var_out = VARIANCES[variance]
    expected = -np.log(stats.norm.sf(TARGET_PHI, MU_OUT, np.sqrt(var_out)))
    np.testing.assert_allclose(lira_scores(TARGET_PHI, PHI, IN, online=False, variance=variance), expected, rtol=1e-12)


def test_unknown_lira_variance_is_refused_by_the_scores_and_before_training():
    with pytest.raises(ValueError, match="per_example, pooled_within, global"):
        lira_scores(TARGET_PHI, PHI, IN, variance="fixed")
    with pytest.raises(UserError, match="audit.mia.lira_variance=fixed is unknown"):
        validate(make_config("audit.mia.lira_variance=fixed"))


def _synthetic_rmia(n: int = 300, nz: int = 500, k: int = 4, seed: int = 0):
    # Per-example base confidence; the target model is more confident on members.
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.8, n)
    base_z = rng.uniform(0.2, 0.8, nz)
    reference = np.clip(base + rng.normal(0, 0.03, (k, n)), 1e-6, 1)
    reference_z = np.clip(base_z + rng.normal(0, 0.03, (k, nz)), 1e-6, 1)
    is_member = rng.random(n) < 0.5
    target = np.clip(base + 0.15 * is_member + rng.normal(0, 0.03, n), 1e-6, 1)
    target_z = np.clip(base_z + rng.normal(0, 0.03, nz), 1e-6, 1)
    return target, reference, target_z, reference_z, is_member


def test_rmia_scores_lie_in_unit_interval_and_separate_members():
    target, reference, target_z, reference_z, is_member = _synthetic_rmia()
    scores = rmia_scores(target, reference, target_z, reference_z, gamma=1.0)
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    assert _auc(scores, is_member) > 0.85
    assert _auc(scores, is_member) > _auc(target, is_member) + 0.1


def test_rmia_counts_exactly_the_pairwise_likelihood_ratios():
    target, reference, target_z, reference_z, _ = _synthetic_rmia(n=40, nz=30)
    gamma, a = 1.5, 0.3
    prior_x = ((1 + a) * reference.mean(0) + (1 - a)) / 2
    prior_z = ((1 + a) * reference_z.mean(0) + (1 - a)) / 2
    pairwise = (target / prior_x)[:, None] / (target_z / prior_z)[None, :]
    expected = (pairwise >= gamma).mean(axis=1)
    np.testing.assert_allclose(rmia_scores(target, reference, target_z, reference_z, gamma=gamma, offline_a=a), expected)


def test_rmia_averages_pr_x_over_out_models_only():
    target, reference, target_z, reference_z, _ = _synthetic_rmia(n=20, nz=30)
    reference_in = np.zeros(reference.shape, dtype=bool)
    reference_in[0] = True
    poisoned, neutral = reference.copy(), reference.copy()
    poisoned[0] = 1.0
    # Model 0 replaced by the mean of the OUT models leaves their mean unchanged.
    neutral[0] = reference[1:].mean(axis=0)
    np.testing.assert_array_equal(
        rmia_scores(target, poisoned, target_z, reference_z, reference_in=reference_in),
        rmia_scores(target, neutral, target_z, reference_z),
    )


def test_rmia_larger_gamma_never_raises_a_score():
    target, reference, target_z, reference_z, _ = _synthetic_rmia()
    low = rmia_scores(target, reference, target_z, reference_z, gamma=1.0)
    high = rmia_scores(target, reference, target_z, reference_z, gamma=2.0)
    assert np.all(high <= low)
