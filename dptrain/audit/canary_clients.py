"""Canary clients for user-level DP-FedAvg (Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar 2024,
"One-shot Empirical Privacy Estimation for Federated Learning"): clients whose update is a random
direction of the clipping norm, sampled like every client, seen through the real server step.

Canary j's update is C c_j with c_j a uniformly random unit vector of the model's dimension D; it
joins each round independently with the client sampling rate q (Poisson, as DP-FedAvg's accounting
assumes) when its coin says it is included. Each round's aggregate comes from the recipe's own
server step (``dp_fedavg``: clip, sum, Gaussian noise, fixed denominator); the auditor projects it
on every canary direction, in units of one client's contribution C / (q N). An excluded canary's
direction is never sent: its projection is noise alone, Andrew et al.'s null.
Random directions in a small model are far from orthogonal (the other canaries of a round would
add about q m / (2 D) to each projection's variance), so the canaries run in groups of at most D,
each group an orthonormal set with its own server steps: a canary's coin still changes only its
own group's releases, and the projections carry no other canary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from dptrain.audit.implementation import AuditRun
from dptrain.privacy import PrivacyPlan
from dptrain.seeds import Stream, derived_seed

# dp_fedavg(updates, expected_clients, clip, noise_multiplier, generator) -> aggregate
ServerStep = Callable[[Tensor, float, float, float, torch.Generator], Tensor]


@dataclass(frozen=True)
class CanaryClients:
    """DP-FedAvg's server mechanism as the audit repeats it: the server's ``plan`` (q, sigma, C,
    rounds), its ``server_step``, the expected number of clients per round and the model's
    ``dimension``."""

    plan: PrivacyPlan
    server_step: ServerStep
    expected_clients: float
    dimension: int
    scope: str = "DP-FedAvg server (user level)"
    distributed: bool = False

    def run(self, cfg, *, canaries: int, seed: int, device: torch.device, tamper=None, with_epsilon: bool = True) -> AuditRun:
        """One audit run of ``plan.steps`` rounds with ``canaries`` canary clients and no others.

        Real clients' updates are left out: they are independent of the canaries, so they only add
        to the projections what the noise already dominates in a high dimension (Andrew et al.
        insert canaries in the real run; this is the same mechanism run on its own). ``tamper`` is
        not supported here. x[t, j] = <aggregate_t of j's group, c_j> q N / C.
        """
        if tamper is not None:
            raise ValueError("canary clients take no tamper")
        plan = self.plan
        included = np.random.default_rng(derived_seed(seed, Stream.CANARY_COINS)).random(canaries) < 0.5
        rng = np.random.default_rng(derived_seed(seed, Stream.SAMPLING))
        directions = torch.Generator().manual_seed(derived_seed(seed, Stream.CANARY_RECORDS))
        noise = torch.Generator(device=device).manual_seed(derived_seed(seed, Stream.NOISE))
        x = np.zeros((plan.steps, canaries))
        for start in range(0, canaries, self.dimension):
            group = np.arange(start, min(start + self.dimension, canaries))
            # Orthonormal columns of a Gaussian matrix (QR): uniformly random and exactly orthogonal.
            basis, _ = torch.linalg.qr(torch.randn(self.dimension, len(group), generator=directions, dtype=torch.float64))
            basis = basis.T.to(device)
            for t in range(plan.steps):
                sampled = torch.from_numpy(np.flatnonzero(included[group] & (rng.random(len(group)) < plan.sample_rate)))
                aggregate = self.server_step(
                    basis[sampled.to(device)] * plan.max_grad_norm,
                    self.expected_clients,
                    plan.max_grad_norm,
                    plan.noise_multiplier,
                    noise,
                )
                x[t, group] = (basis @ aggregate * (self.expected_clients / plan.max_grad_norm)).cpu().numpy()
        return AuditRun(x=x, included=included, batch_of=None, noise=plan.noise_multiplier, accountant_epsilon=None)
