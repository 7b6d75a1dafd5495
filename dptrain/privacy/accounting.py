"""Epsilon of the subsampled Gaussian mechanism under Opacus' accountants, and noise calibration."""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from typing import Iterator

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

# prv: Gopi et al. 2021 (numerical composition of privacy random variables, tight);
# rdp: Mironov 2017 / Mironov et al. 2019 (an upper bound, looser);
# gdp: Dong et al. 2019 (CLT approximation, may underestimate for few steps).
ACCOUNTANTS = ("prv", "rdp", "gdp")

# Relative slack of the noise search: the calibrated run spends an epsilon in
# [(1 - CALIBRATION_TOLERANCE) * target, target].
CALIBRATION_TOLERANCE = 0.005


@contextmanager
def accountant_warnings_silenced() -> Iterator[None]:
    # GDP warns on every call that it is experimental, RDP that its alpha grid is
    # saturated; the README says what each accountant guarantees.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def epsilon_spent(
    *, accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> float:
    """Epsilon at ``delta`` after ``steps`` Poisson-subsampled Gaussian steps, as the named accountant computes it.

    This is the same computation Opacus' accountant does during training (its
    history is a list of ``(noise_multiplier, sample_rate, steps)``), so a
    reported epsilon can be recomputed from ``metrics.json`` alone.
    """
    if steps == 0:
        return 0.0
    with accountant_warnings_silenced():
        account = create_accountant(mechanism=accountant)
        account.history = [(noise_multiplier, sample_rate, steps)]
        return float(account.get_epsilon(delta=delta))


def calibrate_noise(
    *, accountant: str, target_epsilon: float, sample_rate: float, steps: int, delta: float
) -> float:
    """The smallest noise multiplier (up to the search tolerance) whose ``steps`` spend at most ``target_epsilon``.

    Opacus' binary search returns the upper end of its bracket, so the
    guarantee ``epsilon_spent(...) <= target_epsilon`` holds for the result.
    """
    with accountant_warnings_silenced():
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=CALIBRATION_TOLERANCE * target_epsilon,
            )
        )
