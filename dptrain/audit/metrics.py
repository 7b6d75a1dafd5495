"""Membership-inference metrics from attack scores: ROC, AUC, TPR at low FPR, advantage,
bootstrap confidence intervals, Clopper-Pearson bounds and the empirical epsilon lower bound.

Every function takes the scores of members and of non-members separately; a higher
score means "more likely a member". Results are the dataclasses of ``dptrain.audit.results``,
whose ``to_dict`` is strict JSON (no NaN or Infinity; an undefined value is ``None``), and every
result carries the member / non-member counts it was measured on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import stats

from dptrain.audit.results import EpsilonLowerBound, Interval, MembershipMetrics

FPR_TARGETS: tuple[float, ...] = (0.001, 0.01, 0.1)


def fpr_key(target: float) -> str:
    """The JSON key of a TPR-at-FPR target: ``0.001 -> "0.001"``, ``0.1 -> "0.1"``."""
    return f"{target:g}"


@dataclass(frozen=True)
class RocCurve:
    """ROC of the rule "member iff score >= threshold", one point per distinct score.

    Point 0 has ``threshold = +inf`` (no record called a member, TPR = FPR = 0); the
    last point has the smallest score as threshold (every record called a member).
    FPR and TPR are non-decreasing along the arrays.
    """

    thresholds: np.ndarray
    true_positives: np.ndarray
    false_positives: np.ndarray
    n_members: int
    n_nonmembers: int

    @property
    def tpr(self) -> np.ndarray:
        return self.true_positives / self.n_members

    @property
    def fpr(self) -> np.ndarray:
        return self.false_positives / self.n_nonmembers


def _scores(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} contains NaN or infinite scores")
    return scores


def _count_at_least(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="left")


def _roc(members: np.ndarray, nonmembers: np.ndarray) -> RocCurve:
    distinct = np.unique(np.concatenate((members, nonmembers)))[::-1]
    thresholds = np.concatenate(([np.inf], distinct))
    return RocCurve(
        thresholds=thresholds,
        true_positives=_count_at_least(np.sort(members), thresholds),
        false_positives=_count_at_least(np.sort(nonmembers), thresholds),
        n_members=members.size,
        n_nonmembers=nonmembers.size,
    )


def roc_curve(member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray) -> RocCurve:
    """The empirical ROC of the threshold rule "member iff score >= t" over every distinct score.

    Ties between a member and a non-member move both counts at the same threshold,
    so the curve has a diagonal segment there (no arbitrary tie order).
    Precondition: both arrays non-empty, finite.
    """
    return _roc(_scores(member_scores, "member_scores"), _scores(nonmember_scores, "nonmember_scores"))


def auc(roc: RocCurve) -> float:
    """Area under the ROC by the trapezoid rule.

    Equals the Mann-Whitney probability P[s_member > s_nonmember] + P[tie] / 2.
    """
    fpr, tpr = roc.fpr, roc.tpr
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def _allowed_false_positives(target: float, n_nonmembers: int) -> int:
    """floor(target * n): the false positives a rule at FPR <= target may make. The small tolerance
    keeps 0.001 * 1000 (and the like) at exactly one despite binary floating point."""
    return math.floor(target * n_nonmembers + 1e-9)


def tpr_at_fpr(roc: RocCurve, target: float) -> float | None:
    """TPR at a target FPR: the highest TPR among thresholds whose FPR <= target.

    No interpolation between ROC points (interpolating would report a randomised
    rule that no threshold realises). Returns ``None`` when fewer than
    ``1 / target`` non-members were scored: then no threshold may make even one
    false positive, and the number would silently be TPR at FPR = 0.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target FPR must lie in (0, 1), got {target}")
    allowed = _allowed_false_positives(target, roc.n_nonmembers)
    if allowed < 1:
        return None
    return float(roc.tpr[roc.false_positives <= allowed].max())


def membership_advantage(roc: RocCurve) -> float:
    """Membership advantage (Yeom et al. 2018): max over thresholds of TPR - FPR, in [0, 1]."""
    return float(np.max(roc.tpr - roc.fpr))


def _unbox(values: np.ndarray) -> float | np.ndarray:
    return float(values) if np.ndim(values) == 0 else values


def _check_binomial(successes: Any, trials: Any, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n) or np.any(k != np.round(k)):
        raise ValueError("need integer counts with 0 <= successes <= trials and trials >= 1")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return k, n


def clopper_pearson_lower(successes: Any, trials: Any, alpha: float) -> float | np.ndarray:
    """One-sided Clopper-Pearson lower bound on a binomial proportion (Clopper & Pearson 1934).

    p_lo = Beta quantile(alpha; k, n - k + 1), and 0 when k = 0. Guarantee:
    P[p_lo <= p] >= 1 - alpha for every true p. Vectorised over the counts.
    """
    k, n = _check_binomial(successes, trials, alpha)
    with np.errstate(invalid="ignore"):
        bound = stats.beta.ppf(alpha, k, n - k + 1)
    return _unbox(np.where(k > 0, bound, 0.0))


def clopper_pearson_upper(successes: Any, trials: Any, alpha: float) -> float | np.ndarray:
    """One-sided Clopper-Pearson upper bound: Beta quantile(1 - alpha; k + 1, n - k), and 1 when k = n.

    Guarantee: P[p_hi >= p] >= 1 - alpha for every true p. Vectorised over the counts.
    """
    k, n = _check_binomial(successes, trials, alpha)
    with np.errstate(invalid="ignore"):
        bound = stats.beta.ppf(1.0 - alpha, k + 1, n - k)
    return _unbox(np.where(k < n, bound, 1.0))


def clopper_pearson_interval(successes: int, trials: int, confidence: float = 0.95) -> Interval:
    """Two-sided equal-tailed Clopper-Pearson interval: each side at miscoverage (1 - confidence) / 2."""
    alpha = 1.0 - confidence
    return Interval(
        low=float(clopper_pearson_lower(successes, trials, alpha / 2)),
        high=float(clopper_pearson_upper(successes, trials, alpha / 2)),
        confidence=confidence,
    )


def _epsilon_bounds(
    true_positives: Any, n_members: int, false_positives: Any, n_nonmembers: int, delta: float, confidence: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must lie in [0, 1), got {delta}")
    # Both expressions below hold on the same event {TPR >= tpr_lo and FPR <= fpr_hi},
    # so Bonferroni over these two one-sided intervals covers the max of both.
    alpha = (1.0 - confidence) / 2.0
    tpr_lo = np.asarray(clopper_pearson_lower(true_positives, n_members, alpha))
    fpr_hi = np.asarray(clopper_pearson_upper(false_positives, n_nonmembers, alpha))
    tnr_lo, fnr_hi = 1.0 - fpr_hi, 1.0 - tpr_lo
    with np.errstate(divide="ignore", invalid="ignore"):
        forward = np.where(tpr_lo > delta, np.log((tpr_lo - delta) / fpr_hi), 0.0)
        backward = np.where(tnr_lo > delta, np.log((tnr_lo - delta) / fnr_hi), 0.0)
    return np.maximum(np.maximum(forward, backward), 0.0), tpr_lo, fpr_hi


def epsilon_from_counts(
    true_positives: int,
    n_members: int,
    false_positives: int,
    n_nonmembers: int,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> float:
    """Epsilon lower bound from the counts of one fixed threshold rule.

    (eps, delta)-DP implies TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta
    (Kairouz et al. 2015; Jagielski et al. 2020), hence

        eps >= max(ln((TPR_lo - delta) / FPR_hi), ln((TNR_lo - delta) / FNR_hi), 0)

    with TPR_lo, FPR_hi one-sided Clopper-Pearson bounds at miscoverage
    (1 - confidence) / 2 each (Bonferroni), TNR_lo = 1 - FPR_hi and FNR_hi = 1 - TPR_lo.
    Precondition: the rule was fixed before these records were seen. Guarantee: the
    bound exceeds the true epsilon of the per-record distinguishing game with
    probability at most 1 - confidence.
    """
    value, _, _ = _epsilon_bounds(true_positives, n_members, false_positives, n_nonmembers, delta, confidence)
    return float(value)


def _split(scores: np.ndarray, fraction: float, rng: np.random.Generator, name: str) -> tuple[np.ndarray, np.ndarray]:
    n_calibration = int(round(fraction * scores.size))
    if not 1 <= n_calibration < scores.size:
        raise ValueError(f"{name}: {scores.size} scores cannot be split into non-empty calibration and evaluation halves")
    permuted = scores[rng.permutation(scores.size)]
    return permuted[:n_calibration], permuted[n_calibration:]


def epsilon_lower_bound(
    member_scores: Sequence[float] | np.ndarray,
    nonmember_scores: Sequence[float] | np.ndarray,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    calibration_fraction: float = 0.5,
    seed: int = 0,
) -> EpsilonLowerBound:
    """Empirical epsilon lower bound of a membership attack, threshold never tuned on its evaluation records.

    Members and non-members are each split at random (seeded) into a calibration part
    (``calibration_fraction``) and an evaluation part. On the calibration part, the
    rule maximising ``epsilon_from_counts`` (ties: the larger TPR - FPR) is chosen,
    its threshold placed midway between that calibration score and the next lower
    one; on the evaluation part, the counts of that single rule give the bound of
    ``epsilon_from_counts`` (Clopper-Pearson, Bonferroni over the two one-sided
    intervals, overall level ``confidence``).

    Guarantee: since the rule is independent of the evaluation records, the bound
    exceeds the true epsilon with probability at most 1 - confidence, under the usual
    MIA-audit assumption that each record's membership is an independent trial; with
    one trained model this is a heuristic audit, the one-run bound of
    ``dptrain.audit.canary`` is the rigorous one.
    """
    members = _scores(member_scores, "member_scores")
    nonmembers = _scores(nonmember_scores, "nonmember_scores")
    rng = np.random.default_rng(seed)
    members_cal, members_eval = _split(members, calibration_fraction, rng, "member_scores")
    nonmembers_cal, nonmembers_eval = _split(nonmembers, calibration_fraction, rng, "nonmember_scores")

    calibration = _roc(members_cal, nonmembers_cal)
    calibration_eps, _, _ = _epsilon_bounds(
        calibration.true_positives, members_cal.size, calibration.false_positives, nonmembers_cal.size, delta, confidence
    )
    best = np.lexsort((calibration.tpr - calibration.fpr, calibration_eps))[-1]
    upper = float(calibration.thresholds[best])
    lower = float(calibration.thresholds[best + 1]) if best + 1 < calibration.thresholds.size else upper
    # Every threshold in (lower, upper] makes the same calibration decisions; the
    # midpoint, unlike a calibration record's own score, does not sit at the edge
    # of the gap where it would drop evaluation records scored just below it.
    threshold = (upper + lower) / 2 if math.isfinite(upper) else upper

    true_positives = int(np.count_nonzero(members_eval >= threshold))
    false_positives = int(np.count_nonzero(nonmembers_eval >= threshold))
    value, tpr_lo, fpr_hi = _epsilon_bounds(
        true_positives, members_eval.size, false_positives, nonmembers_eval.size, delta, confidence
    )
    return EpsilonLowerBound(
        value=float(value),
        confidence=confidence,
        delta=delta,
        threshold=threshold if math.isfinite(threshold) else None,
        true_positives=true_positives,
        false_positives=false_positives,
        n_members=int(members_eval.size),
        n_nonmembers=int(nonmembers_eval.size),
        tpr_lower=float(tpr_lo),
        fpr_upper=float(fpr_hi),
        n_calibration_members=int(members_cal.size),
        n_calibration_nonmembers=int(nonmembers_cal.size),
    )


def _percentile_interval(samples: np.ndarray, confidence: float) -> Interval:
    alpha = 1.0 - confidence
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return Interval(low=float(low), high=float(high), confidence=confidence)


# Replicates x records of one bootstrap array held at a time (16 MB as int64): the bootstrap works
# through its replicates in chunks of this size, so its memory is O(records + replicates). The
# default audit's 1000 replicates of 1150 records fit in one chunk.
BOOTSTRAP_CHUNK_ELEMENTS = 2**21


def _resample_counts(rng: np.random.Generator, size: int, replicates: int) -> np.ndarray:
    """(replicates, size) multiplicities of ``size`` records drawn with replacement, one row per
    replicate (a Multinomial(size, uniform) draw, from uniform indices: several times faster).

    Index floor(size * U) of a uniform double U (probabilities uniform within size / 2^53) consumes
    exactly one output of the generator, unlike ``Generator.integers``, whose 32-bit draws are
    buffered within a call and rejected a data-dependent number of times: so rows drawn in chunks
    are the rows drawn at once.
    """
    drawn = np.minimum((rng.random((replicates, size)) * size).astype(np.int64), size - 1)
    drawn += size * np.arange(replicates)[:, None]
    return np.bincount(drawn.ravel(), minlength=replicates * size).reshape(replicates, size)


def _prefix_sums(weights: np.ndarray) -> np.ndarray:
    """(B, k + 1) running totals: column i holds the weight of the first i records."""
    totals = np.zeros((weights.shape[0], weights.shape[1] + 1), dtype=weights.dtype)
    np.cumsum(weights, axis=1, out=totals[:, 1:])
    return totals


class _Replicates:
    """B bootstrap replicates given as multiplicities u (B, m) of the members and w (B, n) of the
    non-members, with the running totals that every statistic reads, made once.

    Precondition: both score arrays sorted ascending, the multiplicities' columns in that order.
    Resampling treats records alike, so the multiplicities of sorted records can be drawn directly.
    """

    def __init__(
        self, sorted_members: np.ndarray, sorted_nonmembers: np.ndarray, member_weights: np.ndarray, nonmember_weights: np.ndarray
    ):
        self.sorted_members, self.sorted_nonmembers = sorted_members, sorted_nonmembers
        self.member_weights = member_weights
        self.member_totals = _prefix_sums(member_weights)
        self.nonmember_totals = _prefix_sums(nonmember_weights)

    def auc(self) -> np.ndarray:
        """AUC of every replicate: its Mann-Whitney sum sum_i u_i (#{N_j < M_i} + #{N_j = M_i} / 2),
        the counts read from the non-members' running totals, so all replicates cost O(B (m + n))."""
        below = np.searchsorted(self.sorted_nonmembers, self.sorted_members, side="left")
        not_above = np.searchsorted(self.sorted_nonmembers, self.sorted_members, side="right")
        wins = 2 * np.einsum("bi,bi->b", self.member_weights, self.nonmember_totals.take(below, axis=1))
        if not np.array_equal(below, not_above):
            # Ties between members and non-members count one half each.
            ties = self.nonmember_totals.take(not_above, axis=1) - self.nonmember_totals.take(below, axis=1)
            wins += np.einsum("bi,bi->b", self.member_weights, ties)
        return wins / (2.0 * self.sorted_members.size * self.sorted_nonmembers.size)

    def tpr_at_fpr(self, target: float) -> np.ndarray:
        """``tpr_at_fpr`` of every replicate.

        With k = floor(target * n) false positives allowed, the best rule calls a member
        every score strictly above s_k, the highest non-member score whose count of
        non-members at or above it exceeds k; its TPR is the weight of members above s_k.
        In ascending order, s_k is at the last position i where the weight from i upwards,
        n - totals[i], exceeds k.
        """
        n, m = self.sorted_nonmembers.size, self.sorted_members.size
        allowed = _allowed_false_positives(target, n)
        last = (self.nonmember_totals[:, :n] < n - allowed).sum(axis=1) - 1
        cutoff = self.sorted_nonmembers[last]
        not_above = self.member_totals[
            np.arange(len(cutoff)), np.searchsorted(self.sorted_members, cutoff, side="right")
        ]
        return (m - not_above) / m


def _bootstrap(
    members: np.ndarray,
    nonmembers: np.ndarray,
    n_bootstrap: int,
    fpr_targets: dict[str, float],
    seed: np.random.SeedSequence,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """AUC and TPR at each of ``fpr_targets`` (by key) of ``n_bootstrap`` replicates, members and
    non-members each resampled from a stream of their own, BOOTSTRAP_CHUNK_ELEMENTS at a time.

    The streams do not depend on the chunk size, so neither do the samples: chunking bounds the
    memory (O(m + n + n_bootstrap), not O((m + n) n_bootstrap)) and nothing else.
    """
    member_rng, nonmember_rng = (np.random.default_rng(stream) for stream in seed.spawn(2))
    sorted_members, sorted_nonmembers = np.sort(members), np.sort(nonmembers)
    auc_samples = np.empty(n_bootstrap)
    tpr_samples = {key: np.empty(n_bootstrap) for key in fpr_targets}
    rows = max(1, BOOTSTRAP_CHUNK_ELEMENTS // (members.size + nonmembers.size))
    for start in range(0, n_bootstrap, rows):
        chunk = slice(start, min(start + rows, n_bootstrap))
        count = chunk.stop - chunk.start
        replicates = _Replicates(
            sorted_members,
            sorted_nonmembers,
            _resample_counts(member_rng, members.size, count),
            _resample_counts(nonmember_rng, nonmembers.size, count),
        )
        auc_samples[chunk] = replicates.auc()
        for key, target in fpr_targets.items():
            tpr_samples[key][chunk] = replicates.tpr_at_fpr(target)
        # Freed before the next chunk is drawn, not after: one chunk's arrays at a time.
        del replicates
    return auc_samples, tpr_samples


def membership_metrics(
    member_scores: Sequence[float] | np.ndarray,
    nonmember_scores: Sequence[float] | np.ndarray,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    fpr_targets: Sequence[float] = FPR_TARGETS,
    seed: int = 0,
) -> MembershipMetrics:
    """AUC, TPR at each target FPR, advantage, their bootstrap intervals and the epsilon lower bound.

    Intervals are percentile bootstrap intervals (Efron & Tibshirani 1993) at level
    ``confidence``: members and non-members are resampled with replacement
    separately, so every replicate keeps the observed counts; ``n_bootstrap``
    replicates, seeded by ``seed``, drawn and measured in chunks (``_bootstrap``), so
    memory stays O(m + n + n_bootstrap). The epsilon bound is ``epsilon_lower_bound`` at
    ``delta`` and ``confidence``. TPR at FPR follows ``tpr_at_fpr`` (``None`` where
    fewer than 1 / target non-members were scored).
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    members = _scores(member_scores, "member_scores")
    nonmembers = _scores(nonmember_scores, "nonmember_scores")
    bootstrap_seed, split_seed = np.random.SeedSequence(seed).spawn(2)

    roc = _roc(members, nonmembers)
    keys = [fpr_key(t) for t in fpr_targets]
    tprs = {key: tpr_at_fpr(roc, t) for key, t in zip(keys, fpr_targets)}
    measured = {key: target for key, target in zip(keys, fpr_targets) if tprs[key] is not None}
    auc_samples, tpr_samples = _bootstrap(members, nonmembers, n_bootstrap, measured, bootstrap_seed)

    return MembershipMetrics(
        auc=auc(roc),
        auc_ci=_percentile_interval(auc_samples, confidence),
        tpr_at_fpr=tprs,
        tpr_at_fpr_ci={
            key: _percentile_interval(tpr_samples[key], confidence) if key in tpr_samples else None for key in keys
        },
        advantage=membership_advantage(roc),
        epsilon_lower_bound=epsilon_lower_bound(
            members, nonmembers, delta=delta, confidence=confidence, seed=int(split_seed.generate_state(1)[0])
        ),
        n_members=int(members.size),
        n_nonmembers=int(nonmembers.size),
        n_bootstrap=n_bootstrap,
    )
