"""The inner maximisation of TRADES (Zhang et al. 2019, "Theoretically Principled Trade-off between
Robustness and Accuracy", Algorithm 1): PGD on the KL divergence between the model's prediction at the
clean input and at the perturbed one, in the data's own units like ``dptrain.adversarial.attacks``."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dptrain.adversarial.attacks import _Box, _project, _steepest, pgd_step_size
from dptrain.data import InputUnits

# The paper's random start: x + 0.001 * N(0, 1), a nudge off x, where the KL term and its gradient are 0.
START_SCALE = 0.001


def prediction_divergence(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-example KL(softmax(clean_logits) || softmax(logits)), TRADES' robust regulariser."""
    return F.kl_div(
        F.log_softmax(logits, dim=1), F.log_softmax(clean_logits, dim=1), reduction="none", log_target=True
    ).sum(dim=1)


def trades_pgd(
    model: nn.Module, x: torch.Tensor, units: InputUnits, eps: float, steps: int, generator: torch.Generator
) -> torch.Tensor:
    """TRADES' adversarial inputs for ``x``: from ``x + START_SCALE * N(0, 1)`` (data units), ``steps``
    L-infinity steps of ``pgd_step_size(eps, steps)`` ascending the KL divergence from the model's
    prediction at ``x``, each projected onto the ``eps`` ball and the valid range; the last iterate
    is returned, as in the paper, in the model's units. ``model`` must be in eval mode, so that each
    example's result depends on that example alone."""
    box = _Box(x, units)
    alpha = pgd_step_size(eps, steps)
    with torch.no_grad():
        clean_logits = model(x)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    delta = box.clamp(_project(START_SCALE * noise * box.movable, eps, "linf"))
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            divergence = prediction_divergence(clean_logits, model(box.inputs(delta)))
            (gradient,) = torch.autograd.grad(divergence.sum(), delta)
        delta = box.clamp(_project(delta.detach() + alpha * _steepest(gradient, "linf"), eps, "linf"))
    return box.inputs(delta).detach()
