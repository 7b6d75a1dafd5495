"""Dirac gradient canaries that go through the real DP-SGD implementation: the probe model that
carries them, their records, and the observer of what each step releases along them.

The audited model is wrapped with a canary probe, an ``nn.Embedding(m + 1, 1)`` of one weight per
canary and a last, unused one: canary j reads w_j, scaled by M, and every other row reads the last
weight multiplied by zero, so the probe's per-example gradient is zero for a real record and its
clipping is unchanged. Canary j has a zero base input, its base logits are masked to zero (no
gradient on the real parameters) and s = M w_j is added to logit 0 under label 0. An embedding (not
a linear layer on one-hot inputs) lets ghost clipping handle m canaries in O(batch + m) per step.
With the probe held at zero, canary j's per-example gradient is M (1/K - 1) e_j for K classes: a
constant direction of norm ``CANARY_NORM_RATIO`` times the clipping norm, which the implementation's
clipping must cut to the clipping norm (a clipping bug shows up as a ten times larger signal).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

# A canary's unclipped gradient norm in units of its clipping norm: large enough that correct
# clipping must act on it, so that skipped clipping shows.
CANARY_NORM_RATIO = 10.0


# The last input column says what a row is: a real record, canary j (j >= 0), or a filler that
# holds the slot of an excluded canary.
REAL, FILLER = -1.0, -2.0


class CanaryProbe(nn.Module):
    """``model`` on inputs of ``input_shape`` flattened and followed by one code column.

    Real records (code -1) get ``model``'s logits. Canary j (code j) gets the probe's output s =
    ``magnitude`` w_j added to logit 0 and its base logits multiplied by zero, so its only gradient
    is on ``probe.weight[j]``. Fillers (code -2) get constant zero logits: no gradient at all, so a
    filler's presence changes no released gradient. ``probe.weight[m]`` is the slot every row that
    is not a canary reads, times zero.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], canaries: int, magnitude: float):
        super().__init__()
        self.model = model
        self.input_shape = tuple(input_shape)
        self.input_size = math.prod(self.input_shape)
        self.magnitude = magnitude
        self.probe = nn.Embedding(canaries + 1, 1)
        nn.init.zeros_(self.probe.weight)

    def forward(self, x: Tensor) -> Tensor:
        base, code = x[:, : self.input_size], x[:, self.input_size]
        real = (code == REAL).to(x.dtype).unsqueeze(1)
        canary = (code >= 0).to(x.dtype).unsqueeze(1)
        logits = self.model(base.reshape(-1, *self.input_shape)) * real
        slot = torch.where(code >= 0, code, torch.full_like(code, self.probe.num_embeddings - 1)).long()
        s = self.probe(slot) * canary * self.magnitude
        return torch.cat([logits[:, :1] + s, logits[:, 1:]], dim=1)


def canary_magnitude(clip_norm: float, num_classes: int) -> float:
    """M such that a canary's per-example gradient M (1 - 1/K) has norm ``CANARY_NORM_RATIO * clip_norm``.

    At s = 0 the K logits are equal, so d(cross-entropy)/ds = 1/K - 1 for label 0.
    """
    return CANARY_NORM_RATIO * clip_norm / (1.0 - 1.0 / num_classes)


def probe_records(records: TensorDataset, included: np.ndarray, size: int) -> TensorDataset:
    """``size`` records: ``records`` (code -1), then one slot per canary, canary j (code j, label 0)
    when ``included[j]`` and a filler otherwise, then fillers; base inputs of the slots are zero.

    Every slot is filled whatever the coins say, so the record count and canary j's position
    (``len(records) + j``) are fixed before the coins are drawn: a statistic may use positions
    without learning the coins. Precondition: ``size >= len(records) + len(included)``.
    """
    inputs, labels = records.tensors
    flat = inputs.reshape(len(inputs), -1)
    slots = size - len(flat)
    codes = np.full(slots, FILLER)
    codes[: len(included)] = np.where(included, np.arange(len(included)), FILLER)
    real = torch.cat([flat, flat.new_full((len(flat), 1), REAL)], dim=1)
    canaries = torch.cat([flat.new_zeros(slots, flat.shape[1]), torch.from_numpy(codes).to(flat.dtype).unsqueeze(1)], dim=1)
    return TensorDataset(torch.cat([real, canaries]), torch.cat([labels, labels.new_zeros(slots)]))


class ProbeObserver:
    """Wraps the optimizer that applies the released gradient (Opacus' ``original_optimizer``).

    ``step()`` records the probe's released gradient of the m canaries' weights in units of a
    canary's clipped norm, ``x_t = -grad * scale``, then steps the wrapped optimizer and resets the probe to zero, so
    every canary's gradient stays the same constant direction and the probe never reaches the
    real records' logits. With ``scale`` = the implementation's divisor (expected batch size)
    over the canary's clipped norm, x_t[j] = b_j(t) + noise, b_j(t) = 1 when canary j was in
    the step's batch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, probe: nn.Linear, scale: float):
        self.optimizer = optimizer
        self.probe = probe
        self.scale = scale
        self.releases: list[np.ndarray] = []

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)

    def step(self, closure=None):
        grad = self.probe.weight.grad
        released = torch.zeros_like(self.probe.weight) if grad is None else grad
        self.releases.append((-released.detach().reshape(-1)[:-1] * self.scale).double().cpu().numpy())
        result = self.optimizer.step(closure)
        with torch.no_grad():
            self.probe.weight.zero_()
        return result

    def observations(self) -> np.ndarray:
        """(steps, canaries) array of the recorded x_t."""
        return np.stack(self.releases) if self.releases else np.zeros((0, self.probe.num_embeddings - 1))
