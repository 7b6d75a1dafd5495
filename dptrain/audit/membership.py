"""Membership-inference scores (LOSS, LiRA, RMIA) on arrays, and the one signal computation they share.

Querying models is the caller's job: it runs the target and reference models,
turns their logits into ``Signals`` with ``compute_signals``, and passes the
arrays here. Every score is "higher = more likely a member".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats


@dataclass(frozen=True)
class Signals:
    """Per-example signals of one model, float64 numpy arrays of shape (n,).

    ``loss``: cross-entropy -log p_y. ``true_class_prob``: p_y. ``logit_confidence``:
    phi = log(p_y / (1 - p_y)), the statistic LiRA models as Gaussian.
    """

    loss: np.ndarray
    true_class_prob: np.ndarray
    logit_confidence: np.ndarray


def compute_signals(logits: torch.Tensor, labels: torch.Tensor) -> Signals:
    """Loss, true-class probability and logit-scaled confidence from logits (Carlini et al. 2022, Sec. IV).

    With z the logits and y the label, in float64 and without clamping p:
    loss = logsumexp(z) - z_y, p_y = exp(-loss), and
    phi = log p_y - log(1 - p_y) = z_y - logsumexp_{j != y} z_j,
    which stays finite and exact where p_y rounds to 1 (clamping p would saturate
    phi exactly for the confidently memorised examples LiRA needs to rank).
    Logits of shape (n, C) with C >= 2, or (n,) / (n, 1) for a binary model
    whose single logit is that of class 1. Labels: integers of shape (n,).
    """
    z = logits.detach().to(device="cpu", dtype=torch.float64)
    if z.ndim == 1 or (z.ndim == 2 and z.shape[1] == 1):
        z = torch.cat([torch.zeros_like(z.reshape(-1, 1)), z.reshape(-1, 1)], dim=1)
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (n, C), (n,) or (n, 1), got {tuple(logits.shape)}")
    y = labels.detach().to(device="cpu", dtype=torch.long).reshape(-1, 1)
    if y.shape[0] != z.shape[0]:
        raise ValueError(f"{y.shape[0]} labels for {z.shape[0]} rows of logits")
    if torch.any(y < 0) or torch.any(y >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]})")
    z_y = z.gather(1, y).squeeze(1)
    loss = torch.logsumexp(z, dim=1) - z_y
    others = torch.logsumexp(z.scatter(1, y, float("-inf")), dim=1)
    return Signals(
        loss=loss.numpy(),
        true_class_prob=torch.exp(-loss).numpy(),
        logit_confidence=(z_y - others).numpy(),
    )


def loss_scores(loss: np.ndarray) -> np.ndarray:
    """LOSS attack (Yeom et al. 2018): score = -loss; members tend to have lower loss."""
    return -np.asarray(loss, dtype=np.float64)


def _reference_arrays(
    target: np.ndarray, reference: np.ndarray, reference_in: np.ndarray | None, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    target = np.asarray(target, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if target.ndim != 1 or reference.ndim != 2 or reference.shape[1] != target.size:
        raise ValueError(f"{what}: need target (n,) and reference (k, n), got {target.shape} and {reference.shape}")
    mask = np.zeros(reference.shape, dtype=bool) if reference_in is None else np.asarray(reference_in, dtype=bool)
    if mask.shape != reference.shape:
        raise ValueError(f"{what}: reference_in must have shape {reference.shape}, got {mask.shape}")
    return target, reference, mask


# How LiRA estimates the variances of its IN and OUT Gaussians: per example, or one value shared by
# all examples, the "fixed variance" Carlini et al. 2022 find better with fewer than about 64
# reference models (see ``lira_scores`` for which one).
LIRA_VARIANCES = ("per_example", "pooled_within", "global")


def _gaussian_fit(values: np.ndarray, mask: np.ndarray, variance: str, group: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean of ``values`` over the models selected by ``mask`` (k, n), and the variance
    ``variance`` names (see ``lira_scores``)."""
    counts = mask.sum(axis=0)
    if np.any(counts == 0):
        raise ValueError(
            f"{int(np.sum(counts == 0))} examples have no {group} reference model; assign each example "
            f"to half of the reference models (e.g. the k/2 smallest of k uniform draws per example)"
        )
    means = np.where(mask, values, 0.0).sum(axis=0) / counts
    squared = np.where(mask, (values - means) ** 2, 0.0)
    if variance == "per_example":
        if np.any(counts < 2):
            raise ValueError(
                f"per-example variances need >= 2 {group} reference models per example; "
                f"use variance='pooled_within' or 'global' with few reference models"
            )
        variances = squared.sum(axis=0) / (counts - 1)
    elif variance == "pooled_within":
        dof = int(counts.sum() - counts.size)
        if dof < 1:
            raise ValueError(f"pooled within-example variance needs some example with >= 2 {group} reference models")
        variances = np.full(counts.size, squared.sum() / dof)
    elif variance == "global":
        variances = np.full(counts.size, values[mask].var())
    else:
        raise ValueError(f"variance={variance!r} is unknown: choose one of {', '.join(LIRA_VARIANCES)}")
    # A floor keeps a signal that is constant across models from dividing by zero.
    return means, np.maximum(variances, 1e-12)


def lira_scores(
    target_phi: np.ndarray,
    reference_phi: np.ndarray,
    reference_in: np.ndarray,
    *,
    online: bool = True,
    variance: str = "per_example",
) -> np.ndarray:
    """LiRA (Carlini et al. 2022) on the logit-scaled confidence phi.

    Inputs: the target model's phi (n,), reference models' phi (k, n), and
    ``reference_in`` (k, n), True where reference model j trained on example i.
    Online: fit N(mu_in, s_in^2) and N(mu_out, s_out^2) per example and score
    log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2). Offline (OUT models
    only): the one-sided test of the paper, score = -log P_out[phi' >= phi]
    = -log(1 - Phi((phi - mu_out) / s_out)), large when phi is too high for a
    non-member. The means are always per example; ``variance`` says how each
    group's s^2 is estimated:

    - ``per_example``: the unbiased variance of the example's own IN (OUT)
      values, the paper's main attack.
    - ``pooled_within``: one s^2 for all examples, the squared deviations of
      every example's values from that example's mean summed over examples and
      divided by (values - examples): the spread across models without the
      spread between examples' means.
    - ``global``: one s^2 for all examples, the variance (1/N) of all examples'
      IN (OUT) values about their common mean: the paper's fixed variance as its
      released code computes it (``np.std`` over every example's scores,
      tensorflow/privacy research/mi_lira_2021/plot.py); it includes the spread
      between examples' means, which widens every Gaussian.

    Preconditions: online needs >= 1 IN and >= 1 OUT model per example (offline:
    >= 1 OUT), and >= 2 per group for ``per_example``.
    """
    phi, reference, mask = _reference_arrays(target_phi, reference_phi, reference_in, "lira_scores")
    mu_out, var_out = _gaussian_fit(reference, ~mask, variance, "OUT")
    if not online:
        return -stats.norm.logsf(phi, loc=mu_out, scale=np.sqrt(var_out))
    mu_in, var_in = _gaussian_fit(reference, mask, variance, "IN")
    return stats.norm.logpdf(phi, loc=mu_in, scale=np.sqrt(var_in)) - stats.norm.logpdf(
        phi, loc=mu_out, scale=np.sqrt(var_out)
    )


def _offline_marginal(reference_prob: np.ndarray, out_mask: np.ndarray, offline_a: float) -> np.ndarray:
    counts = out_mask.sum(axis=0)
    if np.any(counts == 0):
        raise ValueError(f"{int(np.sum(counts == 0))} examples have no OUT reference model for RMIA")
    mean_out = np.where(out_mask, reference_prob, 0.0).sum(axis=0) / counts
    return ((1.0 + offline_a) * mean_out + (1.0 - offline_a)) / 2.0


def rmia_scores(
    target_prob: np.ndarray,
    reference_prob: np.ndarray,
    population_target_prob: np.ndarray,
    population_reference_prob: np.ndarray,
    *,
    reference_in: np.ndarray | None = None,
    gamma: float = 2.0,
    offline_a: float = 0.3,
) -> np.ndarray:
    """Offline RMIA (Zarifzadeh et al. 2024) on true-class probabilities.

    For an example x and population samples z:
    ratio(x) = Pr(x | theta) / Pr(x), with the offline estimate
    Pr(x) = ((1 + a) * mean_OUT Pr(x | theta_ref) + (1 - a)) / 2 (the paper's
    linear approximation Pr_IN(x) ~ a * Pr_OUT(x) + (1 - a) averaged with Pr_OUT),
    and the same for z; score(x) = fraction of z with ratio(x) / ratio(z) >= gamma.
    Counting is exact without the (n, |z|) pairwise matrix: ratio(x) / ratio(z) >= gamma
    iff log ratio(z) <= log ratio(x) - log gamma, a search in the sorted log ratio(z).

    Inputs: target probabilities of the examples (n,) and of the population (nz,),
    reference models' probabilities (k, n) and (k, nz). ``reference_in`` (k, n)
    marks reference models that trained on an example (averaged out of Pr(x));
    None means none did. Preconditions: population samples were in no reference
    model's training set; 0 <= a <= 1, gamma > 0. Returns scores in [0, 1].
    """
    if not 0.0 <= offline_a <= 1.0 or gamma <= 0:
        raise ValueError(f"need 0 <= offline_a <= 1 and gamma > 0, got {offline_a}, {gamma}")
    target, reference, mask = _reference_arrays(target_prob, reference_prob, reference_in, "rmia_scores")
    pop_target, pop_reference, pop_mask = _reference_arrays(
        population_target_prob, population_reference_prob, None, "rmia_scores (population)"
    )
    if pop_reference.shape[0] != reference.shape[0]:
        raise ValueError("the same reference models must score the examples and the population")
    with np.errstate(divide="ignore"):
        log_ratio_x = np.log(target) - np.log(_offline_marginal(reference, ~mask, offline_a))
        log_ratio_z = np.sort(np.log(pop_target) - np.log(_offline_marginal(pop_reference, ~pop_mask, offline_a)))
    dominated = np.searchsorted(log_ratio_z, log_ratio_x - np.log(gamma), side="right")
    return dominated / log_ratio_z.size
