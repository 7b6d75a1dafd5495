"""One-run audit of f-DP (Mahloujifar, Melis & Chaudhuri 2025, "Auditing f-Differential Privacy in One
Run", ICML, arXiv 2410.22235): whether v correct guesses out of r on m canaries reject the hypothesis
"the mechanism is f-DP" for a trade-off curve f, and the weakest curve of a family that they reject.

The analysis bounds the chance of v correct guesses through the curve f itself. Steinke, Nasr &
Jagielski's (epsilon, delta) analysis (``dptrain.audit.canary``) pays 2 m delta for it instead, which
caps what one run of many canaries can show; here more canaries only help.

A curve is held as ``g(y) = inf {x : 1 - f(x) >= y}``: the least false-positive rate of any test of
power y against f (the inverse of the paper's blow-up function 1 - f). Every f here is symmetric
and lower-bounds the trade-off curves of both add and remove neighbours, as the analysis needs.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import special

from dptrain.audit.canary import one_run_guesses

LeastFalsePositiveRate = Callable[[float], float]

# Rejection must clear the total r / m by this relative margin, so that rounding never rejects.
ROUNDING_MARGIN = 1e-12


def fdp_rejects(g: LeastFalsePositiveRate, m: int, r: int, v: int, alpha: float) -> bool:
    """Whether v correct guesses out of r, on m canaries, reject "the mechanism is f-DP" at level ``alpha``.

    Mahloujifar, Melis & Chaudhuri (2025), the audit with abstentions (two-letter alphabet: each
    canary included independently with probability 1/2, the r guesses a function of the output,
    r fixed in advance). With g the least false-positive rate of f, start from
    r_v = alpha v / m, h_v = alpha (r - v) / m and for i = v-1, ..., 0

        h_i = max(h_{i+1}, g(r_{i+1})),   r_i = r_{i+1} + i / (r - i) (h_i - h_{i+1});

    reject when r_0 + h_0 > r / m. Guarantee: if the mechanism is f-DP, P[reject] <= alpha.
    Why: let N be the number of correct guesses, A_i = E[N/m; N >= i] and B_i = E[(r-N)/m; N >= i].
    f-DP for a uniformly random canary J, tested by "the guess on J is b and the other guesses
    have at least i - 1 right", gives A_i <= 1 - f(B_{i-1}) (by concavity of 1 - f over the
    averaged tests), i.e. B_{i-1} >= g(A_i); and A_0 + B_0 = r / m. If P[N >= v] >= alpha, moving
    the mass above v down to v keeps these constraints, and (r_i, h_i) is the least path they
    allow from there: any other has B_i >= h_i and A_i - r_i >= i / (r - i) (B_i - h_i) at every i,
    so its total A_0 + B_0 is at least r_0 + h_0. A total above r / m is a contradiction. The
    test is monotone: a larger g (a more private f) or a larger alpha rejects whenever a smaller
    one does.
    """
    _check_counts(m, r, v)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    limit = r / m * (1.0 + ROUNDING_MARGIN)
    right, wrong = alpha * v / m, alpha * (r - v) / m
    for i in range(v - 1, -1, -1):
        if right + wrong > limit:
            return True
        needed = g(right)
        if needed <= wrong:
            # A fixed point: no later step changes (right, wrong).
            return False
        right += i / (r - i) * (needed - wrong)
        wrong = needed
    return right + wrong > limit


def fdp_p_value(g: LeastFalsePositiveRate, m: int, r: int, v: int, *, tolerance: float = 1e-9) -> float:
    """An upper bound on P[N >= v] for the correct guesses N of an f-DP mechanism: the smallest level
    ``fdp_rejects`` rejects at (by bisection, from above, to ``tolerance``), or 1."""
    _check_counts(m, r, v)
    if v == 0 or not fdp_rejects(g, m, r, v, 1.0):
        return 1.0
    low, high = 0.0, 1.0  # rejects at high, not at low
    while high - low > tolerance:
        middle = (low + high) / 2
        if fdp_rejects(g, m, r, v, middle):
            high = middle
        else:
            low = middle
    return high


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m or m < 1:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m}) and canaries >= 1")


class _UpperEnvelope:
    """max_k (slope_k x + intercept_k) for x >= 0, evaluated in O(log K) from its hull."""

    def __init__(self, slopes: np.ndarray, intercepts: np.ndarray):
        order = np.lexsort((intercepts, slopes))
        kept: list[tuple[float, float]] = []
        for slope, intercept in zip(slopes[order].tolist(), intercepts[order].tolist()):
            if kept and kept[-1][0] == slope:
                kept.pop()  # same slope, smaller intercept (sorted): never above this one
            # The last line is dominated when the new one overtakes the one before it no later.
            while len(kept) >= 2 and (intercept - kept[-2][1]) * (kept[-1][0] - kept[-2][0]) >= (
                kept[-1][1] - kept[-2][1]
            ) * (slope - kept[-2][0]):
                kept.pop()
            kept.append((slope, intercept))
        self.slopes = [s for s, _ in kept]
        self.intercepts = [b for _, b in kept]
        self.breaks = [
            (b0 - b1) / (s1 - s0) for (s0, b0), (s1, b1) in zip(kept[:-1], kept[1:])
        ]

    def __call__(self, x: float) -> float:
        k = bisect.bisect_right(self.breaks, x)
        return self.slopes[k] * x + self.intercepts[k]


class TradeOffCurve:
    """The symmetric trade-off curve of a privacy profile: the largest f with f <= T(P, Q) and
    f <= T(Q, P) for every pair whose hockey-stick divergences, both ways, are at most
    ``deltas[k]`` at ``epsilons[k]`` (Dong, Roth & Su 2019, Proposition 2.12):

        f(x) = max(0, max_k max(1 - delta_k - e^{eps_k} x, e^{-eps_k} (1 - delta_k - x))).

    Calling it returns g(y), the least false-positive rate of power y under f, exactly:
    g(y) = max(0, max_k max(e^{-eps_k} (y - delta_k), 1 - delta_k - e^{eps_k} (1 - y))). A profile
    known only at some epsilons gives a smaller f (fewer lines), never a larger one.
    """

    def __init__(self, epsilons: Sequence[float] | np.ndarray, deltas: Sequence[float] | np.ndarray):
        eps = np.asarray(epsilons, dtype=np.float64)
        dlt = np.clip(np.asarray(deltas, dtype=np.float64), 0.0, 1.0)
        if eps.ndim != 1 or eps.shape != dlt.shape or eps.size == 0 or np.any(eps < 0) or np.any(eps > 700):
            raise ValueError("epsilons and deltas must be equal-length 1-D arrays with 0 <= epsilon <= 700")
        # The second family is kept in u = 1 - y: its slopes e^eps would cancel catastrophically in y.
        self._low = _UpperEnvelope(np.exp(-eps), -dlt * np.exp(-eps))
        self._high = _UpperEnvelope(-np.exp(eps), 1.0 - dlt)

    def __call__(self, power: float) -> float:
        return max(0.0, self._low(power), self._high(1.0 - power))


def gaussian_least_false_positive_rate(mu: float) -> LeastFalsePositiveRate:
    """g of mu-GDP, G_mu(x) = Phi(Phi^{-1}(1 - x) - mu) (Dong, Roth & Su 2019): g(y) = Phi(Phi^{-1}(y) - mu)."""
    return lambda power: float(special.ndtr(special.ndtri(power) - mu))


# dp-accounting's privacy-loss discretization: pessimistic (losses are rounded up, so hockey-stick
# divergences are over-estimated and curves under-estimated). The curves the tests use are coarse
# (cheap, and within 0.4% of the 1e-3 ones on the default job, whose 100 000-canary run rejects the
# same member with either); a rejected member's epsilon is read finer, so that it is not inflated
# (1e-3 is within 1e-5 of 1e-4's on the default job, at a tenth of the time).
CURVE_DISCRETIZATION = 1e-2
EPSILON_DISCRETIZATION = 1e-3
# Epsilons at which a member's hockey-stick divergence is read: fine where curves bend, up to where
# e^eps stays finite; every missing line only lowers f.
EPSILON_GRID = np.concatenate([np.arange(0.0, 20.0, 0.01), np.arange(20.0, 100.0, 0.1), np.arange(100.0, 701.0, 1.0)])


def _composed_pld(noise: float, sample_rate: float, steps: int, interval: float):
    from dp_accounting.pld import privacy_loss_distribution

    # Losses grow as 1 / noise^2: a coarser grid keeps small noises affordable (still pessimistic).
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise,
        sampling_prob=min(sample_rate, 1.0),
        value_discretization_interval=max(interval, 1e-4 / noise**2),
    ).self_compose(steps)


@functools.lru_cache(maxsize=256)
def _member_curve(noise: float, sample_rate: float, steps: int) -> TradeOffCurve:
    pld = _composed_pld(noise, sample_rate, steps, CURVE_DISCRETIZATION)
    return TradeOffCurve(EPSILON_GRID, pld.get_delta_for_epsilon(EPSILON_GRID))


@functools.lru_cache(maxsize=64)
def _member_epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    return float(_composed_pld(noise, sample_rate, steps, EPSILON_DISCRETIZATION).get_epsilon_for_delta(delta))


@dataclass(frozen=True)
class SubsampledGaussianFamily:
    """The curves of ``steps`` Poisson-subsampled Gaussian steps at ``sample_rate`` (add/remove
    neighbours, sensitivity 1), indexed by the noise multiplier: the mechanism DP-SGD's accountant
    charges for. Each curve is dp-accounting's PLD (both directions, pessimistic), a lower bound on
    the true one; a larger noise multiplier gives a larger (more private) true curve."""

    sample_rate: float
    steps: int
    delta: float

    def curve(self, noise: float) -> TradeOffCurve:
        return _member_curve(float(noise), float(self.sample_rate), int(self.steps))

    def epsilon(self, noise: float) -> float:
        """Epsilon at ``delta`` of the member (dp-accounting's PLD, as the accountant's cross-check)."""
        return _member_epsilon(float(noise), float(self.sample_rate), int(self.steps), float(self.delta))


# The search for the weakest rejected member: noise multipliers within this factor of the claimed one
# each way, to this relative resolution.
NOISE_RANGE = 64.0
NOISE_TOLERANCE = 0.01


def weakest_rejected_noise(rejects: Callable[[float], bool], claimed: float) -> float | None:
    """The smallest noise multiplier (to ``NOISE_TOLERANCE``, from above) whose member ``rejects``, searched
    from ``claimed`` down to claimed / NOISE_RANGE and up to claimed * NOISE_RANGE; None when even the
    largest is not rejected. Precondition: rejection is monotone (true members grow with the noise)."""
    if rejects(claimed):
        low = high = claimed
        while low > claimed / NOISE_RANGE:
            low = high / 2
            if not rejects(low):
                break
            high = low
        else:
            return high
    else:
        low = high = claimed
        while True:
            if high >= claimed * NOISE_RANGE:
                return None
            high = low * 2
            if rejects(high):
                break
            low = high
    # Invariant: high is rejected, low is not.
    while high / low > 1.0 + NOISE_TOLERANCE:
        middle = math.sqrt(low * high)
        if rejects(middle):
            high = middle
        else:
            low = middle
    return high


def fdp_guess_counts(m: int) -> list[tuple[int, int]]:
    """The guess rules (k_plus, k_minus) the f-DP audit tries on m canaries: k IN on the highest scores
    alone, and k IN plus k OUT on the lowest, k = max(1, m // 100).

    Two rules fixed in advance, not a sweep: with the f-DP analysis the best number of guesses is
    about 1% to 3% of the canaries (a NumPy simulation of the default job's releases, 10^4 to 10^5
    canaries), and each rule tried costs a Bonferroni factor. IN-only wins where included
    canaries can go unsampled in every step (they look excluded); both sides win where the noise
    is large.
    """
    k = max(1, m // 100)
    return [(k, 0), (k, k)] if 2 * k <= m else [(k, 0)]


@dataclass(frozen=True)
class FdpAudit:
    """The f-DP one-run bound and the guesses it came from.

    ``epsilon_lower_bound`` is the epsilon at ``delta`` of the weakest member of the family that the
    guesses reject (0 when none is), ``rejected_noise`` its noise multiplier (None when none is),
    ``statistic`` and the counts those of a test that rejects it (of the first test when none
    does); ``claimed_rejected`` says whether the member of ``claimed_noise`` (the accountant's own
    curve) is rejected. Counts are as in ``OneRunAudit``: totals over ``n_runs`` runs, each guessing
    k_plus IN and k_minus OUT among its own canaries; each of the ``n_tests`` (statistic, rule)
    pairs was tested at level (1 - confidence) / n_tests.
    """

    epsilon_lower_bound: float
    confidence: float
    delta: float
    rejected_noise: float | None
    claimed_noise: float
    claimed_rejected: bool
    statistic: str
    n_canaries: int
    n_guesses: int
    n_correct: int
    k_plus: int
    k_minus: int
    n_tests: int
    n_runs: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fdp_audit(
    statistics: Mapping[str, Sequence[float] | np.ndarray],
    included: Sequence[bool] | np.ndarray,
    family: SubsampledGaussianFamily,
    *,
    claimed_noise: float,
    confidence: float = 0.95,
    seed: int = 0,
    runs: Sequence[int] | np.ndarray | None = None,
) -> FdpAudit:
    """The one-run f-DP lower bound from the canaries' scores under each of the auditor's ``statistics``
    (higher = "trained on") and their inclusion bits.

    Every (statistic, rule of ``fdp_guess_counts``) pair is a test at level (1 - confidence) /
    (number of pairs) (Bonferroni); a member is rejected when some test rejects it, and the
    reported one is the weakest rejected. Guarantee: if the mechanism is f-DP for the family's
    member of noise multiplier sigma, the probability that a member of noise sigma or more is
    reported rejected is at most 1 - confidence. So ``claimed_rejected``, with ``claimed_noise`` the
    accountant's, is proof at ``confidence`` that the mechanism is not the one the accountant
    charged for, and ``epsilon_lower_bound`` is a lower bound on the epsilon of every member of the
    family the mechanism satisfies; it is not a bound for curves of other shapes (Steinke et al.'s
    bound, ``dptrain.audit.canary``, is).
    ``runs[i]`` names the independent run canary i was in (every run with the same number of
    canaries): each run guesses among its own canaries and the game is the union of the runs'
    (a canary's coin changes only its own run's output, so the union is f-DP in each coin), with no
    cost for pooling. Precondition: each canary included independently with probability 1/2, and a
    run's scores depending only on what that run released.
    """
    bits = np.asarray(included, dtype=bool)
    labels = np.zeros(bits.size, dtype=np.int64) if runs is None else np.asarray(runs)
    groups = [np.flatnonzero(labels == run) for run in np.unique(labels)]
    m = len(groups[0])
    if bits.ndim != 1 or bits.size < 2 or labels.shape != bits.shape or any(len(group) != m for group in groups):
        raise ValueError(
            "included must be 1-D with 2 or more canaries, and runs must label each and give every run as many"
        )
    tests = []
    for name, scores in statistics.items():
        values = np.asarray(scores, dtype=np.float64)
        if values.shape != bits.shape:
            raise ValueError(f"scores of {name!r} have shape {values.shape}, the inclusion bits {bits.shape}")
        for plus, minus in fdp_guess_counts(m):
            correct = 0
            for group in groups:
                guesses = one_run_guesses(values[group], plus, minus, seed=seed)
                correct += int(
                    np.count_nonzero((guesses == 1) & bits[group]) + np.count_nonzero((guesses == -1) & ~bits[group])
                )
            tests.append((name, plus, minus, (plus + minus) * len(groups), correct))
    alpha = (1.0 - confidence) / len(tests)

    def rejecting(noise: float) -> list[tuple[str, int, int, int, int]]:
        curve = family.curve(noise)
        return [test for test in tests if fdp_rejects(curve, bits.size, test[3], test[4], alpha)]

    # "Some test rejects" is monotone in the noise as each test is: one search finds the weakest.
    noise = weakest_rejected_noise(lambda candidate: bool(rejecting(candidate)), claimed_noise)
    name, plus, minus, n_guesses, n_correct = tests[0] if noise is None else rejecting(noise)[0]
    return FdpAudit(
        epsilon_lower_bound=0.0 if noise is None else family.epsilon(noise),
        confidence=confidence,
        delta=family.delta,
        rejected_noise=noise,
        claimed_noise=claimed_noise,
        claimed_rejected=noise is not None and noise <= claimed_noise,
        statistic=name,
        n_canaries=bits.size,
        n_guesses=n_guesses,
        n_correct=n_correct,
        k_plus=plus,
        k_minus=minus,
        n_tests=len(tests),
        n_runs=len(groups),
    )
