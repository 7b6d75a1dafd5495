"""Scores of white-box gradient canaries and what they say about epsilon: the auditor's statistics of
the released gradients, the lower bounds (the f-DP one of Mahloujifar, Melis & Chaudhuri 2025 against
the accountant's family of curves, and Steinke, Nasr & Jagielski 2023's (epsilon, delta) one) and the
Gaussian-DP estimate (Nasr et al. 2023).

Observations are ``x[t, j]``, the released gradient of step t along canary j in units of the
canary's clipped norm: x = b + sigma N(0, 1), b = 1 when canary j was in step t's batch. Every
statistic here is a function of the releases alone, never of the canaries' inclusion coins.
"""

from __future__ import annotations

import math

import numpy as np
from opacus.accountants.analysis.gdp import eps_from_mu

from dptrain.audit.canary import one_run_audit
from dptrain.audit.fdp import FdpAudit, SubsampledGaussianFamily, fdp_audit
from dptrain.audit.results import OneRunAudit

SETTINGS = ("all_iterates", "final_model")


def poisson_scores(x: np.ndarray, sample_rate: float, noise: float) -> np.ndarray:
    """The Neyman-Pearson statistic of the Poisson-subsampled Gaussian, per canary:
    sum_t log(1 - q + q exp((x_t - 1/2) / sigma^2)).

    It is the log-likelihood ratio of "canary included" (x_t ~ (1 - q) N(0, sigma^2) + q N(1, sigma^2)
    at every step, independently) against "excluded" (x_t ~ N(0, sigma^2)): the most powerful
    test of one canary's membership when every iterate is seen (Neyman-Pearson lemma).
    """
    steps = (x - 0.5) / noise**2
    if sample_rate >= 1.0:
        # Every record in every batch: the Gaussian's ratio, without the mixture (log(1 - q) = -inf).
        return steps.sum(axis=0)
    return np.logaddexp(math.log1p(-sample_rate), math.log(sample_rate) + steps).sum(axis=0)


def fixed_order_scores(x: np.ndarray, batch_of: np.ndarray, steps_per_epoch: int, noise: float) -> np.ndarray:
    """The log-likelihood ratio of "canary j is in batch ``batch_of[j]`` of every epoch" against
    "excluded", per canary: (S_j - E/2) / sigma^2 with S_j the sum of x over those E steps.

    This is what a mechanism that takes fixed batches in record order (no Poisson sampling, the
    bug of issue 11) releases about an included record, whose batch the auditor knows from its
    position; under correct Poisson sampling it is just another statistic of the releases.
    Steps beyond the last whole epoch are left out.
    """
    epochs = x.shape[0] // steps_per_epoch
    by_batch = x[: epochs * steps_per_epoch].reshape(epochs, steps_per_epoch, -1).sum(axis=0)
    return (by_batch[batch_of, np.arange(x.shape[1])] - epochs / 2.0) / noise**2


def final_model_scores(x: np.ndarray) -> np.ndarray:
    """sum_t x_t per canary: what the final parameters reveal along the canary under plain SGD
    from a known start (the sum of all updates), the iterates unseen."""
    return x.sum(axis=0)


def setting_scores(
    setting: str,
    x: np.ndarray,
    *,
    sample_rate: float,
    noise: float,
    steps_per_epoch: int,
    batch_of: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """The statistics the auditor of ``setting`` tries, by name (the first is the one the mechanism's
    claim is about): all iterates seen, the Poisson Neyman-Pearson statistic and, where the canaries
    have batches in record order (``batch_of``), the fixed-order one; the final model only, the sum."""
    if setting == "all_iterates":
        scores = {"poisson": poisson_scores(x, sample_rate, noise)}
        if batch_of is not None:
            scores["fixed_order"] = fixed_order_scores(x, batch_of, steps_per_epoch, noise)
        return scores
    if setting == "final_model":
        return {"sum": final_model_scores(x)}
    raise ValueError(f"unknown white-box setting {setting!r}: choose one of {', '.join(SETTINGS)}")


def canary_lower_bounds(
    statistics: dict[str, np.ndarray],
    included: np.ndarray,
    runs: np.ndarray,
    *,
    family: SubsampledGaussianFamily,
    claimed_noise: float,
    confidence: float,
    seed: int,
) -> tuple[FdpAudit, tuple[str, OneRunAudit]]:
    """Both lower bounds over the auditor's ``statistics``, each holding at ``confidence``: the f-DP one
    (``fdp_audit``, the family's curves tested, ``claimed_noise`` being the accountant's), and
    Steinke et al.'s (epsilon, delta) one at the family's delta with the statistic that gave it,
    which assumes nothing about the curve's shape. For the latter each statistic's bound
    (``one_run_audit``) is taken at confidence 1 - (1 - confidence) / len(statistics), so the
    maximum holds at ``confidence`` (Bonferroni over the statistics on top of the one over guess
    counts); ``fdp_audit`` does the same over statistics and guess rules.
    """
    fdp = fdp_audit(
        statistics, included, family, claimed_noise=claimed_noise, confidence=confidence, seed=seed, runs=runs
    )
    each = 1.0 - (1.0 - confidence) / len(statistics)
    steinke = {
        name: one_run_audit(scores, included, delta=family.delta, confidence=each, seed=seed, runs=runs)
        for name, scores in statistics.items()
    }
    name = max(steinke, key=lambda key: steinke[key].epsilon_lower_bound)
    return fdp, (name, steinke[name])


def gdp_mu_estimate(included_scores: np.ndarray, excluded_scores: np.ndarray) -> float:
    """mu of the Gaussian trade-off curve fitted to the scores: (mean_in - mean_out) / std_out.

    Nasr et al. (2023, "Tight Auditing of Differentially Private Machine Learning") and Andrew et
    al. (2024) model the in and out scores as Gaussians of equal variance; for the log-likelihood
    ratio of a mu-GDP mechanism this gives mu exactly (the in and out ratios are N(+-mu^2/2, mu^2)).
    An estimate: no confidence is attached, and a subsampled mechanism's curve is only close to
    Gaussian.
    """
    spread = float(np.std(excluded_scores))
    if len(included_scores) == 0 or len(excluded_scores) < 2 or spread == 0.0:
        return float("nan")
    return max(0.0, (float(np.mean(included_scores)) - float(np.mean(excluded_scores))) / spread)


def gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon of mu-GDP at ``delta`` (Dong, Roth & Su 2019, Corollary 2.13; Opacus' ``eps_from_mu``)."""
    if not math.isfinite(mu):
        return float("nan")
    if mu == 0.0:
        return 0.0
    try:
        return float(eps_from_mu(mu=mu, delta=delta))
    except ValueError:
        # Beyond Opacus' bracket [0, 500]: no finite epsilon worth reporting.
        return float("inf")
