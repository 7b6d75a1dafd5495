"""Epsilon of the Poisson-subsampled Gaussian mechanism under Opacus' accountants, and noise calibration."""

from __future__ import annotations

import functools
import math
import warnings
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp as _rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

# Opacus recomputes the one-step RDP of the subsampled Gaussian, a pure function of
# (q, sigma, alpha), on every epsilon query; the PRV accountant does too, to size its
# discretization domain, and that dominates its cost (about 1.5 s at q = 0.5). A run
# asks for the same (q, sigma) after every epoch, so memoizing the function makes
# those queries almost free without changing any number.
if not hasattr(_rdp_analysis._compute_rdp, "cache_info"):
    _rdp_analysis._compute_rdp = functools.lru_cache(maxsize=1 << 16)(_rdp_analysis._compute_rdp)

# The accountants whose epsilon dptrain reports; both are upper bounds on the true epsilon:
# prv: Gopi et al. 2021, numerical composition of privacy random variables (tight: within its
#      eps_error of 0.01 above the truth; Opacus returns the upper end of its error interval);
# rdp: Mironov 2017 / Mironov et al. 2019, Renyi DP converted to (epsilon, delta) (looser).
# Dong et al. 2019's Gaussian DP (Opacus' "gdp") is a central-limit approximation that
# under-reports epsilon for the step counts dptrain runs (3.19 spent at a target of 3 with
# q = 0.2 and 75 steps, by PLD): it is never reported, only used as the starting point of
# ``calibrate_noise``'s search.
ACCOUNTANTS = ("prv", "rdp")

# The accountant of the epsilon curve drawn per epoch (or round) in TensorBoard, whatever the run's:
# on the default job PRV costs 0.21 s per epoch, RDP 0.23 s once per (q, sigma) and then 0.3 ms per
# epoch (its per-step RDP is memoized; docs/guide/tensorboard.md), and the curve is only a picture.
# The reported epsilon is always the run's accountant's.
CURVE_ACCOUNTANT = "rdp"

# Relative slack of the noise search: the calibrated run spends an epsilon in
# [(1 - CALIBRATION_TOLERANCE) * target, target].
CALIBRATION_TOLERANCE = 0.005
# Noise multipliers searched: beyond MAX_NOISE a target is treated as unreachable.
MIN_NOISE, MAX_NOISE = 1e-3, 1e6


@contextmanager
def accountant_warnings_silenced() -> Iterator[None]:
    # GDP warns on every call that it is experimental, RDP that its alpha grid is saturated;
    # PRV takes log(1 - q) = -inf for a full batch (q = 1) inside an np.where that discards it.
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


@functools.lru_cache(maxsize=1 << 12)
def composed_epsilon(accountant: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of ``history``'s ``(noise_multiplier, sample_rate, steps)``
    blocks of Poisson-subsampled Gaussian steps, by the named accountant (0 for no step).

    A pure function of its arguments, memoized: a run asks for the same history after every epoch
    and the calibration's last probe is the plan's epsilon.
    """
    history = tuple((noise, rate, steps) for noise, rate, steps in history if steps > 0)
    if not history:
        return 0.0
    with accountant_warnings_silenced():
        account = create_accountant(mechanism=accountant)
        account.history = list(history)
        return float(account.get_epsilon(delta=delta))


def epsilon_spent(
    *, accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> float:
    """Epsilon at ``delta`` after ``steps`` Poisson-subsampled Gaussian steps, as the named accountant computes it.

    This is the computation Opacus' accountant does during training (its history is a list of
    ``(noise_multiplier, sample_rate, steps)``), so a reported epsilon can be recomputed from
    ``metrics.json`` alone.
    """
    return composed_epsilon(accountant, ((float(noise_multiplier), float(sample_rate), int(steps)),), delta)


def _gdp_start(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """Dong et al. 2019's CLT noise for the target: close to the tight answer for many steps, cheap to
    compute, and only ever a starting point (it under-reports, so the search below corrects it)."""
    try:
        with accountant_warnings_silenced():
            noise = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="gdp",
                epsilon_tolerance=0.01 * target_epsilon,
            )
    except (ValueError, ArithmeticError):
        return 1.0
    return float(min(max(noise, MIN_NOISE), MAX_NOISE)) if math.isfinite(noise) else 1.0


def calibrate_noise(
    *, accountant: str, target_epsilon: float, sample_rate: float, steps: int, delta: float
) -> float:
    """The smallest noise multiplier (up to the search tolerance) whose ``steps`` spend at most ``target_epsilon``.

    The returned sigma satisfies ``epsilon_spent(...) <= target_epsilon`` by the named accountant
    (it is the upper end of a bracket that was evaluated), and spends at least
    ``(1 - CALIBRATION_TOLERANCE) * target_epsilon`` unless the search hit ``MIN_NOISE``.
    The bracket starts from the GDP approximation, which puts it within a few percent of the answer,
    so the search needs a handful of accountant evaluations. Raises ValueError when even
    ``MAX_NOISE`` spends more than the target.
    """

    def spent(noise: float) -> float:
        return epsilon_spent(
            accountant=accountant, noise_multiplier=noise, sample_rate=sample_rate, steps=steps, delta=delta
        )

    low = high = _gdp_start(target_epsilon, sample_rate, steps, delta)
    if spent(high) > target_epsilon:
        while spent(high) > target_epsilon:
            low, high = high, high * 1.25
            if high > MAX_NOISE:
                raise ValueError(f"epsilon {target_epsilon} is out of reach even with noise multiplier {MAX_NOISE}")
    else:
        while low > MIN_NOISE and spent(low) <= target_epsilon:
            low, high = max(low / 1.25, MIN_NOISE), low
        if spent(low) <= target_epsilon:
            return low
    # Invariant: spent(low) > target >= spent(high); bisect in log-space.
    while spent(high) < (1.0 - CALIBRATION_TOLERANCE) * target_epsilon and high / low > 1.0 + 1e-9:
        middle = math.sqrt(low * high)
        if spent(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high

