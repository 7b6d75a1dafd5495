"""Input attacks in the data's own units: FGSM and PGD (L-infinity and L2), shared by the evasion audit
(``dptrain.audit.evasion``) and adversarial training (``dptrain.training.adversarial``).

Budgets are in the data's own units (``dptrain.data.InputUnits``: pixels in [0, 1] for images, standard
deviations for standardized tables), not in the standardized units the model sees: an attack works on
a perturbation ``delta`` in data units and feeds the model ``clamp(x + scale * delta, low, high)``, so
``||delta||`` (L-inf or L2) is the budget spent and every input stays valid. Features with scale 0
(one-hot and sensitive columns) are not moved. Vectorized torch, on the model's device.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from dptrain.data import InputUnits

NORMS = ("linf", "l2")


def pgd_step_size(eps: float, steps: int) -> float:
    """Madry et al. 2018's step size, 2.5 * eps / steps: PGD can walk from the ball's centre to its
    boundary and back within its steps."""
    return 2.5 * eps / steps


class _Box:
    """The valid perturbations of a batch ``x``: ``delta`` in data units, ``scale * delta`` inside
    ``[low, high]`` and zero where the scale is 0."""

    def __init__(self, x: torch.Tensor, units: InputUnits):
        device = x.device
        self.x = x
        self.scale, self.low, self.high = (part.to(device) for part in (units.scale, units.low, units.high))
        self.movable = self.scale > 0
        self.safe_scale = torch.where(self.movable, self.scale, torch.ones_like(self.scale))

    def inputs(self, delta: torch.Tensor) -> torch.Tensor:
        """The model's inputs ``x + scale * delta``, clamped into ``[low, high]``: with ``x`` valid,
        clamping moves every coordinate towards ``x``, so no norm of the perturbation grows. The
        gradient passes the clamp unchanged (straight through): the attacks clamp after each step, as
        torchattacks and ART do, and a clamp's gradient would halve at a pixel exactly on the bound."""
        moved = self.x + self.scale * delta
        return moved + (torch.maximum(torch.minimum(moved, self.high), self.low) - moved).detach()

    def clamp(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` moved into the valid range (the perturbation ``inputs`` applies)."""
        inside = self.inputs(delta)
        return torch.where(self.movable, (inside - self.x) / self.safe_scale, torch.zeros_like(delta))


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _steepest(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit-norm direction of steepest ascent: sign(g) for L-inf, g / ||g||_2 for L2 (0 where g is 0)."""
    if norm == "linf":
        return gradient.sign()
    length = _flat_norm(gradient)
    return torch.where(length > 0, gradient / length.clamp_min(1e-30), torch.zeros_like(gradient))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``delta`` projected onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    length = _flat_norm(delta)
    return delta * torch.clamp(eps / length.clamp_min(1e-30), max=1.0)


def _random_start(box: _Box, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """A uniform draw from the ``norm`` ball of radius ``eps`` over the movable features (L2: a Gaussian
    direction, radius eps * U^(1/d)), clamped into the valid range."""
    shape, device = box.x.shape, box.x.device
    if norm == "linf":
        delta = (torch.rand(shape, generator=generator, device=device) * 2 - 1) * eps
    else:
        direction = torch.randn(shape, generator=generator, device=device) * box.movable
        dimension = max(int(box.movable.sum()), 1)
        radius = eps * torch.rand(shape[0], generator=generator, device=device) ** (1 / dimension)
        delta = direction / _flat_norm(direction).clamp_min(1e-30) * radius.view(-1, *([1] * (len(shape) - 1)))
    return box.clamp(delta * box.movable)


def _loss_and_gradient(model: nn.Module, box: _Box, delta: torch.Tensor, y: torch.Tensor):
    """Per-example cross-entropy at ``delta``, whether the model is wrong there, and the gradient of the
    summed loss w.r.t. ``delta`` (each example's gradient is its own loss's)."""
    delta = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(box.inputs(delta))
        losses = F.cross_entropy(logits, y, reduction="none")
        (gradient,) = torch.autograd.grad(losses.sum(), delta)
    return losses.detach(), logits.argmax(dim=1) != y, gradient


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, units: InputUnits, eps: float, norm: str) -> torch.Tensor:
    """FGSM (Goodfellow et al. 2015; the L2 variant is the fast gradient method): one step of length
    ``eps`` (data units) along the loss gradient's steepest direction in ``norm``, clamped into the
    valid range. Returns the adversarial inputs in the model's units; ``model`` must be in eval mode."""
    box = _Box(x, units)
    _, _, gradient = _loss_and_gradient(model, box, torch.zeros_like(x), y)
    return box.inputs(box.clamp(eps * _steepest(gradient, norm))).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    units: InputUnits,
    eps: float,
    norm: str,
    steps: int,
    restarts: int,
    generator: torch.Generator,
    *,
    clean_start: bool = True,
    until_fooled: bool = True,
) -> torch.Tensor:
    """PGD (Madry et al. 2018) on the cross-entropy: ``steps`` steps of ``pgd_step_size(eps, steps)`` from
    the clean input (ART's default start) and from each of ``restarts`` uniform random points of the
    ball (Madry's random start). Every iterate is within the ``norm`` ball of radius ``eps`` (data
    units) and the valid range; per example the worst one over all runs and steps is kept: the first
    the model misclassifies, else the one of highest loss. The clean-input run walks first along
    FGSM's direction, which random starts alone can miss where the loss's maximum on the ball is not
    the misclassified point FGSM lands on. Returns the adversarial inputs in the model's units;
    ``model`` must be in eval mode.

    Adversarial training (Madry et al.'s recipe) sets ``clean_start=False`` (random starts only) and
    ``until_fooled=False``: every example runs all its steps and its highest-loss iterate is kept,
    since training on a point just past the decision boundary teaches less than on the loss's maximum."""
    alpha = pgd_step_size(eps, steps)
    best = torch.zeros_like(x)
    best_loss = torch.full((len(x),), -math.inf, dtype=x.dtype, device=x.device)
    best_fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for start in range(0 if clean_start else 1, restarts + 1):
        # An example stops once misclassified (``until_fooled``): any point of the ball that fools the
        # model is a valid adversarial example, so attacking it further costs time and changes no number.
        active = (~best_fooled).nonzero().squeeze(1)
        if len(active) == 0:
            break
        box = _Box(x[active], units)
        delta = torch.zeros_like(box.x) if start == 0 else _random_start(box, eps, norm, generator)
        for step in range(steps + 1):
            losses, fooled, gradient = _loss_and_gradient(model, box, delta, y[active])
            done = fooled if until_fooled else torch.zeros_like(fooled)
            better = done | (losses > best_loss[active])
            best[active[better]] = delta[better]
            best_loss[active[better]] = losses[better]
            best_fooled[active[done]] = True
            left = ~done
            if step == steps or not bool(left.any()):
                break
            delta = box.clamp(_project(delta + alpha * _steepest(gradient, norm), eps, norm))[left]
            active = active[left]
            box = _Box(x[active], units)
    return _Box(x, units).inputs(best).detach()
