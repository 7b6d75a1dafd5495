"""Canary clients for user-level DP-FedAvg (Andrew, Kairouz, Oh, Oprea, McMahan & Suriyakumar 2024,
"One-shot Empirical Privacy Estimation for Federated Learning"): clients whose update is a random
direction of the clipping norm, sampled like every client, seen through the real server step.

Canary j's update is C c_j with c_j uniform on the unit sphere of the model's dimension; it joins
each round independently with the client sampling rate q (Poisson, as DP-FedAvg's accounting
assumes) when its coin says it is included. Each round's aggregate comes from the recipe's own
server step (``dp_fedavg``: clip, sum, Gaussian noise, fixed denominator); the auditor projects it
on every canary direction, in units of one client's contribution C / (q N). An excluded canary is
a fresh random direction, Andrew et al.'s null.
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
        not supported here. x[t, j] = <aggregate_t, c_j> q N / C.
        """
        if tamper is not None:
            raise ValueError("canary clients take no tamper")
        plan = self.plan
        included = np.random.default_rng(derived_seed(seed, Stream.CANARY_COINS)).random(canaries) < 0.5
        rng = np.random.default_rng(derived_seed(seed, Stream.SAMPLING))
        directions = torch.randn(
            canaries, self.dimension, generator=torch.Generator().manual_seed(derived_seed(seed, Stream.CANARY_RECORDS))
        )
        directions = (directions / torch.linalg.vector_norm(directions, dim=1, keepdim=True)).to(device)
        noise = torch.Generator(device=device).manual_seed(derived_seed(seed, Stream.NOISE))
        releases = []
        for _ in range(plan.steps):
            sampled = torch.from_numpy(np.flatnonzero(included & (rng.random(canaries) < plan.sample_rate)))
            updates = directions[sampled.to(device)] * plan.max_grad_norm
            aggregate = self.server_step(
                updates, self.expected_clients, plan.max_grad_norm, plan.noise_multiplier, noise
            )
            releases.append((directions @ aggregate * (self.expected_clients / plan.max_grad_norm)).cpu().numpy())
        return AuditRun(
            x=np.stack(releases).astype(np.float64),
            included=included,
            batch_of=None,
            noise=plan.noise_multiplier,
            accountant_epsilon=None,
        )
