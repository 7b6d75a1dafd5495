"""Client partitions for federated learning: IID, and label-skewed Dirichlet (Hsu et al., 2019).

A partition is a list with one sorted int64 array of positions per client;
together the arrays cover every position exactly once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dptrain.errors import UserError

# Dirichlet draws that leave a client below min_size are redrawn; a cap turns an
# impossible request (tiny alpha, many clients, few records) into an error
# instead of an endless loop.
MAX_DIRICHLET_DRAWS = 1000


def iid_partition(n: int, clients: int, seed: int) -> list[np.ndarray]:
    """Return ``clients`` random parts of ``range(n)`` whose sizes differ by at most one."""
    _check_clients(n, clients)
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return [np.sort(part) for part in np.array_split(order, clients)]


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Return a label-skewed partition: each class is spread over clients in proportions ~ Dirichlet(alpha).

    Following Hsu, Qi and Brown (2019), "Measuring the Effects of Non-Identical
    Data Distribution for Federated Visual Classification": small ``alpha``
    gives each client few classes, large ``alpha`` approaches IID. The whole
    draw is repeated (same generator, so still seeded) until every client holds
    at least ``min_size`` records.
    """
    labels = np.asarray(labels)
    _check_clients(len(labels), clients)
    if not alpha > 0:
        raise UserError(f"federation.alpha={alpha} must be positive (small: skewed labels, large: near IID)")
    if min_size * clients > len(labels):
        raise UserError(
            f"cannot give each of federation.clients={clients} clients {min_size} of {len(labels)} records; "
            "lower federation.clients"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_DRAWS):
        shares: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for members in by_class:
            proportions = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for client, part in enumerate(np.split(rng.permutation(members), cuts)):
                shares[client].append(part)
        parts = [np.sort(np.concatenate(share)).astype(np.int64) for share in shares]
        if min(len(part) for part in parts) >= min_size:
            return parts
    raise UserError(
        f"no Dirichlet draw with federation.alpha={alpha} gave all {clients} clients {min_size}+ records in "
        f"{MAX_DIRICHLET_DRAWS} tries; raise federation.alpha or lower federation.clients"
    )


def _check_clients(n: int, clients: int) -> None:
    if clients < 1:
        raise UserError(f"federation.clients={clients} must be at least 1")
    if clients > n:
        raise UserError(f"federation.clients={clients} exceeds the {n} training records; lower federation.clients")
