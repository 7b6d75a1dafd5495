"""Pre-aggregators: maps from (n, d) updates to (n', d) updates applied before a robust rule.

Nearest-neighbour mixing and bucketing are linear mixes ``M @ X`` with a small (n', n) matrix,
built here explicitly so neither ever holds more than the output beside the input; static
clipping rescales rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dptrain.errors import require
from dptrain.robust.primitives import check_updates, pairwise_sq_distances, require_honest_majority


def check_nnm(n: int, f: int) -> None:
    """NNM needs n > 2f (Allouah et al.'s standing assumption; ByzFL only checks f < n)."""
    require_honest_majority(n, f, "nnm")


def nnm_matrix(updates: Tensor, f: int) -> Tensor:
    """The (n, n) mixing matrix of NNM: row i holds 1/(n - f) on the n - f nearest neighbours of
    x_i (x_i itself always among them) and 0 elsewhere, in the dtype of ``updates``."""
    n = check_updates(updates, "nnm")
    check_nnm(n, f)
    dist = pairwise_sq_distances(updates)
    # -1 on the diagonal keeps x_i in its own neighbourhood even when another row duplicates it.
    dist.fill_diagonal_(-1.0)
    # A stable sort, not topk: equally distant neighbours go to the lower index on every device.
    neighbours = dist.argsort(dim=1, stable=True)[:, : n - f]
    mixing = torch.zeros(n, n, dtype=updates.dtype, device=updates.device)
    return mixing.scatter_(1, neighbours, 1.0 / (n - f))


def nnm(updates: Tensor, f: int) -> Tensor:
    """Nearest-neighbour mixing: ``y_i = 1/(n - f) sum_{j in N_i} x_j``, N_i the n - f nearest
    neighbours of x_i including itself.

    Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A Recipe for Optimal
    Byzantine ML under Heterogeneity", AISTATS 2023. One GEMM with ``nnm_matrix``: memory is the
    (n, d) output, where gathering the neighbours (ByzFL) builds an (n, n - f, d) array.
    Precondition n > 2f.
    """
    return nnm_matrix(updates, f) @ updates


def check_bucket_size(bucket_size: int) -> None:
    """Buckets hold at least one update."""
    require(bucket_size >= 1, f"bucketing needs bucket_size >= 1, got bucket_size={bucket_size}")


def bucketing_matrix(
    n: int,
    bucket_size: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The (ceil(n / s), n) averaging matrix of bucketing: a uniformly random partition of the n
    updates into buckets of s consecutive positions of a permutation (the last may be smaller);
    row b holds 1/|bucket b| on its members. The permutation is drawn on CPU from ``generator``, so
    a seed gives the same buckets on every device."""
    check_bucket_size(bucket_size)
    order = torch.randperm(n, generator=generator)
    bucket_of = torch.empty(n, dtype=torch.long)
    bucket_of[order] = torch.arange(n) // bucket_size
    membership = torch.zeros(math.ceil(n / bucket_size), n, dtype=dtype)
    membership[bucket_of, torch.arange(n)] = 1.0
    return (membership / membership.sum(dim=1, keepdim=True)).to(device)


def bucketing(updates: Tensor, bucket_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Bucketing: the means of ceil(n / s) random buckets of s updates (the last may hold fewer).

    ``y_b = 1/|B_b| sum_{i in B_b} x_i``. Karimireddy, He, Jaggi, "Byzantine-Robust Learning on
    Heterogeneous Datasets via Bucketing", ICLR 2022; the incomplete last bucket is ByzFL's
    convention. Each Byzantine update spoils at most one bucket, so the rule that follows keeps
    the same f over fewer, less heterogeneous inputs. Precondition s >= 1.
    """
    n = check_updates(updates, "bucketing")
    return bucketing_matrix(n, bucket_size, generator, updates.dtype, updates.device) @ updates


def check_clip_threshold(threshold: float) -> None:
    """Static clipping needs a positive norm bound."""
    require(threshold > 0, f"clipping needs clip_threshold > 0, got clip_threshold={threshold}")


def static_clipping(updates: Tensor, threshold: float) -> Tensor:
    """Each update rescaled to norm at most ``threshold``: ``x_i min(1, c / ||x_i||)``.

    A fixed clipping level bounds what one Byzantine update can contribute. Precondition c > 0.
    """
    check_updates(updates, "clipping")
    check_clip_threshold(threshold)
    # c / 0 = inf clamps to 1: a zero update stays zero.
    scale = (threshold / torch.linalg.vector_norm(updates, dim=1)).clamp(max=1.0)
    return updates * scale[:, None]
