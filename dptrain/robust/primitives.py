"""Tensor primitives the robust rules share: input checks, one-line preconditions and state checks,
pairwise squared distances (and the Gram matrix they come from), and reductions over each coordinate
sorted across updates."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from dptrain.errors import require

# Relative accuracy the one-pass Gram distances must keep; beyond it we pay for a recentred pass.
_CANCELLATION_BUDGET = 1e-5


def check_updates(updates: Tensor, rule: str) -> int:
    """Return n for an (n, d) float32/float64 tensor with n >= 1; raise ValueError otherwise.

    A malformed tensor is a bug in the caller, not a configuration a user can fix, hence
    ValueError rather than UserError.
    """
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"{rule} takes an (n, d) tensor of updates with n >= 1, got shape {tuple(updates.shape)}")
    if updates.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{rule} takes float32 or float64 updates, got {updates.dtype}")
    return updates.shape[0]


def require_f(f: int, rule: str) -> None:
    """The number of Byzantine updates a rule tolerates is a non-negative integer."""
    require(isinstance(f, int) and f >= 0, f"{rule} needs an integer f >= 0, got f={f!r}")


def require_honest_majority(n: int, f: int, rule: str) -> None:
    """n > 2f: no rule can tell f Byzantine updates from the honest ones once they are half of n (the
    breakdown point of the median and the geometric median is 1/2), so every rule claiming robustness
    to f needs at least this."""
    require_f(f, rule)
    require(n > 2 * f, f"{rule} needs n > 2f (n={n}, f={f}): add clients or lower aggregator.f")


def state_error(owner: str, problem: str) -> str:
    """The one line refusing a state that ``owner``'s ``state_dict`` did not write."""
    return (
        f"{owner} state {problem}; it was not written by this aggregator: resume with the dptrain version "
        "that wrote the checkpoint, or start the run again in a new directory"
    )


def require_state(owner: str, state: Any, keys: tuple[str, ...]) -> None:
    """Raise ``UserError`` unless ``state`` is a dict with exactly ``keys`` (as the privacy ledger
    refuses a malformed checkpoint, in one line rather than a KeyError on resume)."""
    found = sorted(state) if isinstance(state, dict) else type(state).__name__
    require(
        isinstance(state, dict) and set(state) == set(keys),
        state_error(owner, f"must have exactly the keys {list(keys)}, got {found}"),
    )


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block, restoring the thread count after it.

    For the (n, n) work after a Gram matrix: tens of thousands of elements, enough for torch to
    split each operation across its intra-op threads, too few to pay for waking them. Measured on
    the shared 2-core machine at n = 200, d = 1e5: with two threads each such operation could stall
    for ~20 ms, and the distances took 2.3x the Gram product they come from; single-threaded, 1.03x.
    The setting is process-wide, so other threads running torch meanwhile run single-threaded too.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _gram_sq_distances(updates: Tensor) -> tuple[Tensor, Tensor]:
    """(D, G): the pairwise squared distances and the symmetric Gram matrix of ``updates``, float64."""
    gram = (updates @ updates.T).to(torch.float64)
    with one_thread():
        overflowed = not torch.isfinite(gram).all()
    if overflowed:
        # Entries beyond float32's range (a Byzantine update of norm ~1e19) overflow: redo in float64.
        wide = updates.to(torch.float64)
        gram = wide @ wide.T
    with one_thread():
        # BLAS need not round g_ij and g_ji alike; a symmetric D keeps Krum's tie-breaking order-free.
        gram = 0.5 * (gram + gram.T)
        sq_norms = gram.diagonal()
        dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram).clamp_min_(0.0)
        dist.fill_diagonal_(0.0)
    return dist, gram


def pairwise_sq_distances(updates: Tensor) -> Tensor:
    """Squared Euclidean distances ``D[i, j] = ||x_i - x_j||^2`` as an (n, n) float64 tensor (see
    ``sq_distances_and_gram``)."""
    return sq_distances_and_gram(updates)[0]


def sq_distances_and_gram(updates: Tensor) -> tuple[Tensor, Tensor]:
    """(D, G), (n, n) float64: ``D[i, j] = ||x_i - x_j||^2`` and ``G[i, j] = <x_i - a, x_j - a>``, the
    Gram matrix about an anchor a near the rows (zero, or the medoid when the rows were recentred).

    One GEMM on the Gram matrix, ``D = diag(G) 1^T + 1 diag(G)^T - 2 G`` with ``G = X X^T``: no
    (n, n, d) temporary and no pass per pair. The trap is cancellation: each entry carries an error
    of about ``eps * (||x_i||^2 + ||x_j||^2)`` (measured: up to 8x that), large when the updates share
    a big common component. When ``eps * median ||x_i||^2`` exceeds 1e-5 of the median distance, the
    rows are recentred on their medoid (the row with the smallest sum of squared distances) and the Gram
    matrix recomputed once, which keeps distances to about 1e-4 relative accuracy. D's entries are
    clamped at 0 and its diagonal is exactly 0.
    """
    dist, gram = _gram_sq_distances(updates)
    n = updates.shape[0]
    if n > 1:
        with one_thread():
            off_diagonal = dist[~torch.eye(n, dtype=torch.bool, device=dist.device)]
            eps = torch.finfo(updates.dtype).eps
            cancelled = bool(eps * gram.diagonal().median() > _CANCELLATION_BUDGET * off_diagonal.median())
        if cancelled:
            medoid = dist.sum(dim=1).argmin()
            dist, gram = _gram_sq_distances(updates - updates[medoid])
    return dist, gram


def sq_distances_to_mixture(gram: Tensor, weights: Tensor) -> Tensor:
    """``||x_i - v||^2`` for every row i and ``v = sum_j w_j x_j`` (weights summing to one), from the
    Gram matrix about any anchor (``sq_distances_and_gram``): ``G_ii - 2 (G w)_i + w^T G w``.

    O(n^2) instead of a pass over the (n, d) updates. The Gram form, not the translation-free
    ``sum_j w_j D_ij - 1/2 w^T D w``: there a far row j enters linearly, as w_j D_ij, and with rows at
    1e20 and w_j ~ 1e-21 the two terms (~1e19) cancel to garbage for the near rows; in the Gram form it
    enters as w_j G_ij and w_j^2 G_jj, both small. Computed in the dtype of ``gram`` (float64) and
    clamped at 0.
    """
    to_rows = gram @ weights
    return (gram.diagonal() - 2.0 * to_rows + weights @ to_rows).clamp_min(0.0)


# Columns per block in ``reduce_sorted_columns``: a (block, n) float32 block of n = 50 rows is 400 KB,
# small enough to stay in L2 between its transpose, its sort and its reduction.
_BLOCK_FLOATS = 2**17


def reduce_sorted_columns(updates: Tensor, reduce: Callable[[Tensor], Tensor], rows: Tensor | None = None) -> Tensor:
    """``reduce(sorted)`` for ``sorted`` each coordinate of ``updates[rows]`` (all rows by default)
    sorted across those rows (along dim 0), computed block by block of columns; ``reduce`` maps an
    (n, w) block of sorted columns to their (w,) values and must treat columns independently.

    On CPU each block of columns is transposed into a cache-sized buffer and sorted there by NumPy's
    SIMD sort (x86-simd-sort on AVX2/AVX-512), so the sorted (n, d) copy is never written to memory:
    the updates are read once and the extra memory is one block, not n * d. Single-threaded. Measured on
    (50, 1e6) float32 at one thread (the shared 2-core machine, a ``torch.sum`` over the stack 47-60 ms
    there), NumPy's sort of each 50-value column (143 ms on the transposed array) beats every selection
    torch and NumPy offer: ``np.partition`` (207 ms for one kth, 1.8 s for two), ``torch.topk`` of 11
    (1.2 s), ``torch.kthvalue`` (3.4 s); the median and the trimmed mean run the compiled network of
    ``sorting_network`` instead where a C compiler works, and this sort where none does. On other
    devices ``torch.sort``.
    """
    n, d = updates.shape if rows is None else (rows.numel(), updates.shape[1])
    if updates.device.type != "cpu":
        return reduce(torch.sort(updates if rows is None else updates[rows], dim=0).values)
    values = updates.detach().numpy()
    width = max(1, _BLOCK_FLOATS // max(n, 1))
    out = torch.empty(d, dtype=updates.dtype)
    picked = None if rows is None else rows.numpy()
    # ``reduce`` on a block is one small torch operation after another: with more than one intra-op
    # thread each could stall waking the others (``one_thread``), measured 4.3 s instead of 0.2 s for
    # the trimmed mean of (50, 1e6) float32 at two threads.
    with one_thread():
        for start in range(0, d, width):
            block = values[:, start : start + width]
            # The transposed copy puts each column's n values side by side for the row-wise sort.
            ordered = np.ascontiguousarray((block if picked is None else block[picked]).T)
            ordered.sort(axis=1)
            out[start : start + block.shape[1]] = reduce(torch.from_numpy(ordered).T)
    return out
