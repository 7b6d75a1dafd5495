"""Adversarial training, composable with DP-SGD: ``train.adversarial=pgd`` (Madry et al. 2018, "Towards
Deep Learning Models Resistant to Adversarial Attacks") and ``train.adversarial=trades`` (Zhang et al.
2019, "Theoretically Principled Trade-off between Robustness and Accuracy").

``pgd`` replaces each training batch by PGD adversarial examples of its own records: L-infinity, radius
``train.adversarial_eps`` in the data's units (``dptrain.data.InputUnits``), ``train.adversarial_steps``
steps of 2.5 * eps / steps from a uniform random start, the highest-loss iterate kept; the step then
minimises the cross-entropy on them. ``trades`` crafts, with the same radius and steps, the point of the
ball that moves the model's prediction furthest in KL divergence (``dptrain.adversarial.trades_pgd``),
and minimises each example's CE(f(x), y) + ``train.trades_beta`` * KL(f(x) || f(x_adv)). Both craft with
the model in eval mode on the current parameters.

Why the accountant's epsilon still holds: each example's adversarial version is a function of that
example, the current parameters (already released by the previous steps' noisy updates) and
randomness independent of the data; eval mode makes every example's forward pass its own (no batch
statistics; the zoo has no BatchNorm). A record therefore still enters the step only through its own
clipped gradient, whose norm per-example clipping bounds by ``max_grad_norm`` whatever the record's
input is, so the sensitivity of the summed gradient, and with it the subsampled Gaussian's guarantee,
is unchanged. TRADES' loss of example i involves two forward passes (x_i and x_adv_i); both go through
the same Opacus ``GradSampleModule``, which sums a parameter's per-sample gradients over the forward
passes before a backward (its ``_forward_counter``, built for tied weights), so example i still has ONE
per-sample gradient, the gradient of its whole loss, clipped once. Concatenating [x; x_adv] into one
batch would instead give each record two gradients clipped to C each: sensitivity 2C. Ghost clipping
computes norms from one pass's activations and cannot sum two, so it is refused for ``trades``.

Crafting runs with Opacus' per-sample gradient hooks disabled and differentiates only with respect
to the input perturbation, so no ``grad_sample`` (or ``.grad``) accumulates on the parameters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from torch import nn
from torch.nn import functional as F

from dptrain.adversarial import pgd, prediction_divergence, trades_pgd
from dptrain.config import Config
from dptrain.data import InputUnits
from dptrain.errors import UserError
from dptrain.privacy import unwrap
from dptrain.privacy.plan import is_private

MODES = ("none", "pgd", "trades")


def _clips_per_example(cfg: Config) -> bool:
    """Whether training runs DP-SGD's per-example clipping: a private centralized run, or a private
    federated one at sample level (at user level clients train without it and the server clips)."""
    user_level = cfg.federation.name != "none" and cfg.federation.dp_level == "user"
    return is_private(cfg.privacy) and not user_level


def check_adversarial(cfg: Config) -> None:
    """Refuse, in one line each, ``train.adversarial`` settings that cannot run soundly (the ranges of
    ``adversarial_eps``, ``adversarial_steps`` and ``trades_beta`` are ``dptrain.validation.keys``')."""
    train = cfg.train
    if train.adversarial not in MODES:
        raise UserError(f"train.adversarial={train.adversarial} is unknown: use one of {', '.join(MODES)}")
    if train.adversarial == "none":
        return
    if cfg.audit.mia.reference_models > 0:
        raise UserError(
            f"train.adversarial={train.adversarial} with audit.mia.reference_models={cfg.audit.mia.reference_models}: "
            "reference models are not trained adversarially, so they would not imitate the target; use "
            "audit.mia.reference_models=0 (e.g. audit=fast)"
        )
    mode = cfg.privacy.grad_sample_mode
    if train.adversarial == "trades" and _clips_per_example(cfg) and mode in ("ghost", "bk"):
        raise UserError(
            f"train.adversarial=trades with privacy.grad_sample_mode={mode}: {mode} clipping takes each example's "
            "gradient norm from one forward pass and TRADES' loss needs two (clean and adversarial); use "
            "privacy.grad_sample_mode=hooks (or auto)"
        )


@contextlib.contextmanager
def _per_sample_hooks_off(model: nn.Module):
    """Opacus' per-sample gradient hooks of ``model`` disabled (a no-op for a plain module)."""
    hooked = isinstance(model, GradSampleHooks) and model.hooks_enabled
    if hooked:
        model.disable_hooks()
    try:
        yield
    finally:
        if hooked:
            model.enable_hooks()


@contextlib.contextmanager
def _crafting(model: nn.Module):
    """``model``'s plain module in eval mode with the per-sample hooks off; train mode again after."""
    module = unwrap(model)
    module.eval()
    try:
        with _per_sample_hooks_off(model):
            yield module
    finally:
        model.train()


@dataclass
class AdversarialExamples:
    """PGD L-infinity adversarial examples for training, radius ``eps`` in ``units``, ``steps`` steps,
    random starts drawn from ``generator`` (on the model's device, seeded apart from the data)."""

    units: InputUnits
    eps: float
    steps: int
    generator: torch.Generator

    def __call__(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``inputs`` replaced by their adversarial versions under ``model``'s current parameters, each
        within ``eps`` of its own input and inside the valid range; ``model`` is left in train mode."""
        if len(labels) == 0:
            return inputs
        with _crafting(model) as module:
            return pgd(
                module, inputs, labels, self.units, self.eps, "linf", self.steps, 1, self.generator,
                clean_start=False, until_fooled=False,
            )  # fmt: skip

    def loss(self, model: nn.Module, loss_fn: Callable, inputs: torch.Tensor, labels: torch.Tensor):
        """``(loss, logits)`` of the step: ``loss_fn`` on the model's logits at the adversarial inputs."""
        logits = model(self(model, inputs, labels))
        return loss_fn(logits, labels), logits


@dataclass
class Trades:
    """TRADES' training loss (Zhang et al. 2019, eq. 5): per example CE(f(x), y) + ``beta`` *
    KL(f(x) || f(x_adv)), with x_adv from ``trades_pgd`` (radius ``eps`` in ``units``, ``steps`` steps,
    start noise from ``generator``), averaged over the batch.

    Precondition for DP-SGD: ``model`` is Opacus' hooks or functorch ``GradSampleModule``, whose
    per-sample gradients of the two forward passes add up into one per example before clipping."""

    units: InputUnits
    eps: float
    steps: int
    beta: float
    generator: torch.Generator

    def __call__(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """TRADES' adversarial versions of ``inputs`` under ``model``'s current parameters, each within
        ``eps`` of its own input and inside the valid range; ``model`` is left in train mode."""
        if len(labels) == 0:
            return inputs
        with _crafting(model) as module:
            return trades_pgd(module, inputs, self.units, self.eps, self.steps, self.generator)

    def loss(self, model: nn.Module, loss_fn: Callable, inputs: torch.Tensor, labels: torch.Tensor):
        """``(loss, logits)`` of the step, the logits those at the clean inputs. ``loss_fn`` is not used:
        the loss is TRADES' own (with ghost clipping refused, ``loss_fn`` is a plain cross-entropy)."""
        adversarial = self(model, inputs, labels)
        logits = model(inputs)
        per_example = F.cross_entropy(logits, labels, reduction="none")
        per_example = per_example + self.beta * prediction_divergence(logits, model(adversarial))
        # The mean, as Opacus' loss_reduction="mean" expects: it rescales by the batch size.
        return per_example.mean(), logits


def adversarial_examples(cfg: Config, units: InputUnits | None, seed: int, device: torch.device):
    """The training objective ``cfg.train.adversarial`` asks for (``AdversarialExamples`` or ``Trades``),
    or None for ``none``."""
    train = cfg.train
    if train.adversarial == "none":
        return None
    if units is None:
        raise UserError(
            f"train.adversarial={train.adversarial} needs the data's units: this training path does not provide them"
        )
    generator = torch.Generator(device=device).manual_seed(seed)
    if train.adversarial == "trades":
        return Trades(units, train.adversarial_eps, train.adversarial_steps, train.trades_beta, generator)
    return AdversarialExamples(units, train.adversarial_eps, train.adversarial_steps, generator)
