"""One-run canary audit (Steinke, Nasr & Jagielski 2023): membership guesses on canaries and the
epsilon lower bound implied by the number of correct guesses, from one training run or pooled over
several independent ones.

The canaries themselves (which records, their random inclusion bits) belong to
``dptrain.data``; this module sees only their scores and inclusion bits.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import special, stats

from dptrain.audit.results import OneRunAudit


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """p-value of v correct guesses out of r: an upper bound on P[W >= v] under (epsilon, delta)-DP.

    Steinke, Nasr & Jagielski (2023), main result in its pure- and approximate-DP
    forms: with m canaries each
    included independently with probability 1/2, and guesses that depend only on
    the trained model, the number W of correct guesses satisfies

        P[W >= v] <= P[Bin(r, q) >= v] + 2 m delta * max_{1<=i<=v} P[v - i <= Bin(r, q) < v] / i,

    q = e^eps / (1 + e^eps). For delta = 0 it is the binomial tail alone.
    Returned value is capped at 1.
    """
    _check_counts(m, r, v)
    if epsilon < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    if v == 0:
        return 1.0
    q = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0.0:
        return min(tail, 1.0)
    # P[v - i <= Bin < v] for i = 1..v, accumulated from pmf terms rather than as a
    # difference of tails, which cancels catastrophically when the tail is near 1.
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    worst = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * worst, 1.0)


def one_run_epsilon(m: int, r: int, v: int, *, delta: float = 0.0, confidence: float = 0.95) -> float:
    """Largest epsilon that v correct guesses out of r rule out at ``confidence``.

    Returns eps_lb with ``one_run_p_value(m, r, v, eps_lb, delta) <= 1 - confidence``
    (to bisection tolerance 1e-9 from below, never above), or 0 when even epsilon = 0
    is not rejected. Guarantee (Steinke et al. 2023): if training is
    (eps, delta)-DP with eps >= eps_lb > 0, this outcome has probability at most
    1 - confidence; since (eps', delta)-DP implies (eps, delta)-DP for eps' < eps,
    every smaller epsilon is ruled out too.
    """
    _check_counts(m, r, v)
    return _largest_rejected(lambda epsilon: one_run_p_value(m, r, v, epsilon, delta), confidence, tolerance=1e-9)


def _largest_rejected(p_value, confidence: float, tolerance: float) -> float:
    """The largest epsilon (bisection, from below) whose p-value is at most 1 - confidence, or 0."""
    alpha = 1.0 - confidence
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if p_value(0.0) > alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(high) <= alpha:
        low, high = high, 2.0 * high
    while high - low > tolerance:
        middle = (low + high) / 2
        if p_value(middle) <= alpha:
            low = middle
        else:
            high = middle
    return low


def correct_guess_survival(m: int, r: int, epsilon: float, delta: float = 0.0) -> np.ndarray:
    """``S[v]`` for v = 0..r+1: an upper bound on P[W >= v] for the correct guesses W of one run.

    S[v] = min(1, min_{u <= v} one_run_p_value(m, r, u, epsilon, delta)), S[r+1] = 0: the
    theorem of Steinke et al. (2023) bounds P[W >= u] for every u at once and P[W >= v] <=
    P[W >= u] for u <= v, so W is stochastically dominated by the variable Y whose survival
    function is S (non-increasing by construction).
    """
    _check_counts(m, r, r)
    q = float(special.expit(epsilon))
    correct = np.arange(r + 2)
    bound = stats.binom.sf(correct - 1, r, q)
    if delta > 0.0:
        bound = bound + 2.0 * m * delta * _widest_window_means(stats.binom.pmf(np.arange(r + 1), r, q))
    survival = np.minimum(1.0, np.minimum.accumulate(bound))
    survival[0], survival[-1] = 1.0, 0.0
    return survival


def _widest_window_means(pmf: np.ndarray) -> np.ndarray:
    """``g[v]`` = max over 1 <= i <= v of (pmf[v-i] + ... + pmf[v-1]) / i, for v = 0..len(pmf) (g[0] = 0).

    The binomial pmf is unimodal, so the mean of a window ending at v - 1 and growing to the
    left rises while the next value is at least the mean and falls from the first value below
    it on (every later value is smaller still): the best width is found by bisecting on that
    predicate, for all v at once, in O(r log r) instead of the O(r^2) of trying every width.
    """
    prefix = np.concatenate([[0.0], np.cumsum(pmf)])
    ends = np.arange(len(pmf) + 1)  # v; the window is pmf[v - i .. v - 1]
    low = np.ones_like(ends)  # widths known to be reached (the mean rose up to them)
    high = np.maximum(ends, 1)  # no wider window exists
    # Invariant: the best width lies in [low, high]; width w + 1 beats w iff pmf[v-1-w] >= mean(w).
    while np.any(low < high):
        middle = (low + high + 1) // 2
        width = middle - 1
        start = np.clip(ends - width, 0, None)
        mean = (prefix[ends] - prefix[start]) / np.maximum(width, 1)
        nxt = pmf[np.clip(ends - 1 - width, 0, len(pmf) - 1)]
        grows = (ends - 1 - width >= 0) & (nxt >= mean)
        low = np.where((low < high) & grows, middle, low)
        high = np.where((low < high) & ~grows, middle - 1, high)
    best = np.where(ends > 0, (prefix[ends] - prefix[np.clip(ends - low, 0, None)]) / low, 0.0)
    return best


def runs_p_value(m: int, r: int, correct: Sequence[int], epsilon: float, delta: float = 0.0) -> float:
    """p-value of ``sum(correct)`` correct guesses over independent runs, each making r guesses among m canaries.

    Under (epsilon, delta)-DP each run's count is dominated by an independent copy of the
    variable of ``correct_guess_survival`` (the runs are separate trainings with separate
    seeds and coins), so their total is dominated by the sum of the copies: the p-value is
    that sum's upper tail. For one run it is ``one_run_p_value``. Pooling the canaries of R
    runs into one audit of R m canaries would pay the delta term 2 (R m) delta once for
    all of them; run by run it stays 2 m delta per run.
    """
    counts = [int(v) for v in correct]
    for v in counts:
        _check_counts(m, r, v)
    if len(counts) == 1:
        return one_run_p_value(m, r, counts[0], epsilon, delta)
    survival = correct_guess_survival(m, r, epsilon, delta)
    one_run = survival[:-1] - survival[1:]
    size = len(counts) * r + 1
    total = np.fft.irfft(np.fft.rfft(one_run, n=size) ** len(counts), n=size)
    return float(min(1.0, max(0.0, np.clip(total, 0.0, None)[sum(counts) :].sum())))


def runs_epsilon(m: int, r: int, correct: Sequence[int], *, delta: float = 0.0, confidence: float = 0.95) -> float:
    """Largest epsilon that the correct guesses of independent runs rule out at ``confidence``
    (``runs_p_value`` at most 1 - confidence), to bisection tolerance 1e-4 from below, or 0."""
    return _largest_rejected(lambda epsilon: runs_p_value(m, r, correct, epsilon, delta), confidence, tolerance=1e-4)


def one_run_guesses(scores: Sequence[float] | np.ndarray, k_plus: int, k_minus: int, *, seed: int = 0) -> np.ndarray:
    """Guesses of Algorithm 1 (Steinke et al. 2023): +1 (IN) for the k_plus highest scores,
    -1 (OUT) for the k_minus lowest, 0 (abstain) for the rest.

    Ties are broken by a seeded random order, never by position, so an ordering of
    the canaries cannot leak into the guesses. Precondition: k_plus + k_minus <= m.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or np.any(np.isnan(values)):
        raise ValueError("scores must be a 1-D array without NaN")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > values.size:
        raise ValueError(f"need k_plus, k_minus >= 0 and k_plus + k_minus <= {values.size}, got {k_plus}, {k_minus}")
    tie_break = np.random.default_rng(seed).permutation(values.size)
    ascending = np.lexsort((tie_break, values))
    guesses = np.zeros(values.size, dtype=np.int8)
    guesses[ascending[: k_minus]] = -1
    guesses[ascending[values.size - k_plus :]] = 1
    return guesses


def guess_count_candidates(m: int) -> list[tuple[int, int]]:
    """Default (k_plus, k_minus) sweep: k in {1, 2, 5} x 10^j with 2k <= m, both symmetric (k, k) and IN-only (k, 0).

    Steinke et al. (2023) guess on the most confident canaries and abstain on the
    rest, sweeping the number of guesses; a log-spaced grid keeps the Bonferroni
    cost of the sweep to a factor of about 6 per decade of m.
    """
    counts = [c * 10**j for j in range(int(math.log10(max(m, 1))) + 1) for c in (1, 2, 5) if 2 * c * 10**j <= m]
    return [(k, k) for k in counts] + [(k, 0) for k in counts]


def one_run_audit(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    k_plus: int | None = None,
    k_minus: int | None = None,
    seed: int = 0,
    runs: Sequence[int] | np.ndarray | None = None,
) -> OneRunAudit:
    """One-run epsilon lower bound from canary scores (higher = "trained on") and inclusion bits.

    With ``k_plus`` and ``k_minus`` given, one guess rule is evaluated at
    ``confidence``. Otherwise every pair of ``guess_count_candidates(m)`` is tried
    and the largest bound is reported, each computed at confidence
    1 - (1 - confidence) / n_candidates (Bonferroni), so picking the best pair
    after seeing the inclusion bits keeps the overall level.
    ``runs[i]`` names the independent training run canary i was in (every run
    with the same number m of canaries): each run then guesses among its own
    canaries and the bound is ``runs_epsilon`` of the counts.
    Precondition: each canary was included independently with probability 1/2,
    and the scores of a run depend only on that run's trained model(s).
    """
    values = np.asarray(scores, dtype=np.float64)
    bits = np.asarray(included, dtype=bool)
    if bits.shape != values.shape or values.ndim != 1 or values.size == 0:
        raise ValueError(f"scores and included must be equal-length 1-D arrays, got {values.shape} and {bits.shape}")
    if (k_plus is None) != (k_minus is None):
        raise ValueError("give both k_plus and k_minus, or neither to sweep guess_count_candidates")
    labels = np.zeros(values.size, dtype=np.int64) if runs is None else np.asarray(runs)
    groups = [np.flatnonzero(labels == run) for run in np.unique(labels)]
    m = len(groups[0])
    if labels.shape != values.shape or any(len(group) != m for group in groups):
        raise ValueError("runs must label every canary and give every run the same number of canaries")
    candidates = [(k_plus, k_minus)] if k_plus is not None else guess_count_candidates(m)
    if not candidates:
        raise ValueError(f"{m} canaries per run are too few for a one-run audit (need at least 2)")
    per_candidate_confidence = 1.0 - (1.0 - confidence) / len(candidates)

    best: tuple[float, int, int, int, int] | None = None
    for plus, minus in candidates:
        correct = []
        for group in groups:
            guesses = one_run_guesses(values[group], plus, minus, seed=seed)
            run_bits = bits[group]
            correct.append(int(np.count_nonzero((guesses == 1) & run_bits) + np.count_nonzero((guesses == -1) & ~run_bits)))
        n_guesses = plus + minus
        if len(groups) == 1:
            bound = one_run_epsilon(m, n_guesses, correct[0], delta=delta, confidence=per_candidate_confidence)
        elif best is not None and runs_epsilon(m, n_guesses, correct, confidence=per_candidate_confidence) <= best[0]:
            # The delta term only lowers a bound: a pair whose pure-DP bound is no better is skipped.
            continue
        else:
            bound = runs_epsilon(m, n_guesses, correct, delta=delta, confidence=per_candidate_confidence)
        if best is None or bound > best[0]:
            best = (bound, n_guesses * len(groups), sum(correct), plus, minus)
    bound, n_guesses, n_correct, plus, minus = best
    return OneRunAudit(
        epsilon_lower_bound=bound,
        confidence=confidence,
        delta=delta,
        n_canaries=values.size,
        n_included=int(bits.sum()),
        n_excluded=int(values.size - bits.sum()),
        n_guesses=n_guesses,
        n_correct=n_correct,
        k_plus=plus,
        k_minus=minus,
        n_candidates=len(candidates),
        n_runs=len(groups),
    )
