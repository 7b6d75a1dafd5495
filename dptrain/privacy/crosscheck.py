"""An independent recomputation of a run's epsilon with Google's dp-accounting PLD accountant.

dptrain reports Opacus' PRV or RDP epsilon. Privacy loss distributions (Meiser & Mohammadi 2018;
Koskela et al. 2020; Doroshenko et al. 2022, the implementation in ``dp_accounting.pld``) compose the
same Poisson-subsampled Gaussian steps by a different numerical method in a different code base,
with a pessimistic discretization, so they bound epsilon from above independently. A reported epsilon
more than ``TOLERANCE`` below PLD's means one of the two is wrong, and the run says so.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Iterable, Mapping

from dptrain.errors import UserError

log = logging.getLogger(__name__)

# Relative slack between the two upper bounds (discretization error of either side).
TOLERANCE = 0.01
# dp-accounting's discretization of the privacy loss: 1e-4 keeps its pessimism far below TOLERANCE
# for the step counts dptrain runs, at 0.02 to 0.6 s per mechanism on a laptop CPU.
DISCRETIZATION = 1e-4


def available() -> bool:
    """Whether the optional ``dp-accounting`` package is installed (``pip install "dptrain[accounting]"``)."""
    return importlib.util.find_spec("dp_accounting") is not None


def pld_check_enabled(requested: bool | None) -> bool:
    """``privacy.pld_check``: null runs the check when dp-accounting is installed, true requires it."""
    if requested and not available():
        raise UserError(
            'privacy.pld_check=true needs the dp-accounting package: pip install "dptrain[accounting]", '
            "or privacy.pld_check=null to check only where it is installed"
        )
    return available() if requested is None else requested


def pld_epsilon(mechanisms: Iterable[Mapping], delta: float, discretization: float = DISCRETIZATION) -> float:
    """Epsilon at ``delta`` of the composition of ``mechanisms``, each ``{"noise_multiplier", "sample_rate",
    "steps"}`` Poisson-subsampled Gaussian steps, by dp-accounting's PLD accountant (add/remove
    adjacency, as Opacus'). Precondition: dp-accounting is installed."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=discretization)
    for mechanism in mechanisms:
        if mechanism["steps"] > 0:
            step = dp_accounting.PoissonSampledDpEvent(
                mechanism["sample_rate"], dp_accounting.GaussianDpEvent(mechanism["noise_multiplier"])
            )
            accountant.compose(dp_accounting.SelfComposedDpEvent(step, mechanism["steps"]))
    return float(accountant.get_epsilon(delta))


def cross_check(epsilon: float, independent: float, what: str) -> float:
    """Return PLD's ``independent`` epsilon after logging a warning when the reported ``epsilon`` is below it
    by more than ``TOLERANCE`` (a guarantee must never be under-reported)."""
    if epsilon < (1.0 - TOLERANCE) * independent:
        log.warning(
            "%s: the reported epsilon %.4f is below dp-accounting's PLD epsilon %.4f of the same mechanism; "
            "report the larger one and file a bug",
            what,
            epsilon,
            independent,
        )
    return independent
