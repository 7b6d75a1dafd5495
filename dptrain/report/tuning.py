"""The privacy cost of picking the best of several DP-SGD runs: Rényi-DP curves of each run (Opacus' RDP
analysis of the subsampled Gaussian), the random-stopping tuning bounds of Papernot & Steinke (2022),
plain composition, and the conversion to (epsilon, delta)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.optimize import brentq

from dptrain.privacy.accounting import accountant_warnings_silenced

# Opacus' RDP orders (1.1 to 63), extended upwards: the tuning bounds' log(E[K]) / (lambda - 1) term favours
# larger orders.
ORDERS = np.array([*RDPAccountant.DEFAULT_ALPHAS, 64, 96, 128, 192, 256, 384, 512, 768, 1024], dtype=float)


@dataclass(frozen=True)
class Mechanism:
    """One DP-SGD run as its accountant sees it: ``steps`` Poisson-subsampled Gaussian steps."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass(frozen=True)
class TuningBound:
    """The (epsilon, delta) guarantee of random-stopping tuning with K trials drawn from ``distribution``.

    ``miss_probability`` is the chance that a given candidate (the grid's best included) is never
    tried, P[no trial draws it] = E[(1 - 1/m)^K] for m candidates drawn uniformly.
    """

    distribution: str
    parameters: str
    expected_trials: float
    miss_probability: float
    epsilon: float


def rdp_curve(mechanism: Mechanism) -> np.ndarray:
    """RDP epsilon of the run at each of ``ORDERS`` (Mironov et al. 2019, as Opacus' RDP accountant computes it)."""
    return np.asarray(
        compute_rdp(
            q=mechanism.sample_rate,
            noise_multiplier=mechanism.noise_multiplier,
            steps=mechanism.steps,
            orders=list(ORDERS),
        ),
        dtype=float,
    )


def epsilon_from_rdp(curve: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` from an RDP curve over ``ORDERS`` (Balle et al. 2020, Theorem 21; Opacus' conversion)."""
    with accountant_warnings_silenced():
        epsilon, _ = get_privacy_spent(orders=list(ORDERS), rdp=list(curve), delta=delta)
    return float(epsilon)


def delta_from_rdp(curve: np.ndarray, epsilon: float) -> float:
    """The smallest delta for which the RDP curve gives (``epsilon``, delta)-DP, by inverting the
    conversion of ``epsilon_from_rdp`` at every order."""
    with np.errstate(over="ignore", invalid="ignore"):
        log_delta = (ORDERS - 1) * (curve - epsilon + np.log1p(-1 / ORDERS)) - np.log(ORDERS)
    return float(min(1.0, np.exp(np.nanmin(log_delta))))


def composition_epsilon(curves: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` of running every candidate once (RDP composes additively; Mironov 2017):
    the guarantee of a fixed grid, whatever is then selected and released."""
    return epsilon_from_rdp(curves.sum(axis=0), delta)


def _expected_trials(eta: float, gamma: float) -> float:
    if eta == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    return eta * (1 - gamma) / (gamma * (1 - gamma**eta))


def negative_binomial_gamma(eta: float, expected_trials: float) -> float:
    """The gamma in (0, 1) at which the truncated negative binomial D(eta, gamma) has mean ``expected_trials`` (> 1);
    the mean decreases from infinity to 1 as gamma goes from 0 to 1."""
    return brentq(lambda gamma: _expected_trials(eta, gamma) - expected_trials, 1e-12, 1 - 1e-12, xtol=1e-14)


def truncated_negative_binomial_bound(
    curves: np.ndarray, delta: float, eta: float, expected_trials: float
) -> TuningBound:
    """Random stopping with K ~ D(eta, gamma), P[K = k] proportional to (1 - gamma)^k * C(k + eta - 1, k) for
    k >= 1 (eta = 1: geometric, eta = 0: logarithmic), gamma chosen so that E[K] = ``expected_trials``.

    Papernot & Steinke (2022), Theorem 2: if one trial Q is (lambda, eps(lambda))-RDP at every order,
    releasing the best of K trials is (lambda, eps')-RDP with
    eps' = eps(lambda) + (1 + eta)(1 - 1/lambda_hat) eps(lambda_hat) + (1 + eta) log(1/gamma) / lambda_hat
           + log(E[K]) / (lambda - 1)
    for any lambda_hat >= 1 (minimised over ``ORDERS``). A trial draws one of the candidates whose RDP
    curves are the rows of ``curves``, independently of the data, so Q's curve is at most their
    pointwise maximum (Rényi divergence is jointly quasi-convex). Precondition: ``expected_trials`` > 1.
    """
    gamma = negative_binomial_gamma(eta, expected_trials)
    q_curve = curves.max(axis=0)
    overhead = np.min((1 + eta) * (1 - 1 / ORDERS) * q_curve + (1 + eta) * math.log(1 / gamma) / ORDERS)
    tuned = q_curve + overhead + math.log(expected_trials) / (ORDERS - 1)
    s = 1 - 1 / len(curves)
    if eta == 0:
        miss = math.log(1 - (1 - gamma) * s) / math.log(gamma)
    else:
        miss = ((1 - (1 - gamma) * s) ** -eta - 1) / (gamma**-eta - 1)
    name = {0: "logarithmic", 1: "geometric"}.get(eta)
    return TuningBound(
        distribution=f"truncated negative binomial, η = {eta:g}" + (f" ({name})" if name else ""),
        parameters=f"γ = {gamma:.4g}",
        expected_trials=expected_trials,
        miss_probability=miss,
        epsilon=epsilon_from_rdp(tuned, delta),
    )


def poisson_bound(curves: np.ndarray, delta: float, mu: float) -> TuningBound:
    """Random stopping with K ~ Poisson(mu) (K = 0 releases nothing).

    Papernot & Steinke (2022), Theorem 6: if one trial Q is (lambda, eps(lambda))-RDP and
    (eps_hat, delta_hat)-DP with e^eps_hat <= 1 + 1/(lambda - 1), releasing the best of K trials is
    (lambda, eps(lambda) + mu * delta_hat + log(mu) / (lambda - 1))-RDP. Here eps_hat = log(1 + 1/(lambda - 1))
    and delta_hat is what Q's RDP curve (the candidates' pointwise maximum) gives at it.
    """
    q_curve = curves.max(axis=0)
    delta_hat = np.array([delta_from_rdp(q_curve, math.log1p(1 / (order - 1))) for order in ORDERS])
    tuned = q_curve + mu * delta_hat + math.log(mu) / (ORDERS - 1)
    return TuningBound(
        distribution="Poisson",
        parameters=f"μ = {mu:g}",
        expected_trials=mu,
        miss_probability=math.exp(-mu / len(curves)),
        epsilon=epsilon_from_rdp(tuned, delta),
    )


def random_stopping_bounds(curves: np.ndarray, delta: float) -> list[TuningBound]:
    """The tuning bounds for m = len(curves) candidates with as many trials expected as the grid ran (E[K] = m):
    geometric, logarithmic and Poisson. Precondition: m >= 2."""
    m = len(curves)
    return [
        truncated_negative_binomial_bound(curves, delta, eta=1, expected_trials=m),
        truncated_negative_binomial_bound(curves, delta, eta=0, expected_trials=m),
        poisson_bound(curves, delta, mu=m),
    ]
