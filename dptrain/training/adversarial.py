"""Adversarial training (``train.adversarial=pgd``, Madry et al. 2018, "Towards Deep Learning Models
Resistant to Adversarial Attacks"), composable with DP-SGD.

Each training batch is replaced by PGD adversarial examples of its own records: L-infinity, radius
``train.adversarial_eps`` in the data's units (``dptrain.data.InputUnits``), ``train.adversarial_steps``
steps of 2.5 * eps / steps from a uniform random start, the highest-loss iterate kept, crafted with the
model in eval mode on the current parameters. The optimizer step then runs on them as usual.

Why the accountant's epsilon still holds: each example's adversarial version is a function of that
example, the current parameters (already released by the previous steps' noisy updates) and
randomness independent of the data; eval mode makes every example's forward pass its own (no batch
statistics). A record therefore still enters the step only through its own clipped gradient, whose
norm per-example clipping bounds by ``max_grad_norm`` whatever the record's input is, so the sensitivity
of the summed gradient, and with it the subsampled Gaussian's guarantee, is unchanged.

Crafting runs with Opacus' per-sample gradient hooks disabled and differentiates only with respect
to the input perturbation, so no ``grad_sample`` (or ``.grad``) accumulates on the parameters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from torch import nn

from dptrain.adversarial import pgd
from dptrain.config import Config
from dptrain.data import InputUnits
from dptrain.errors import UserError
from dptrain.privacy import unwrap

MODES = ("none", "pgd")


def check_adversarial(cfg: Config) -> None:
    """Refuse, in one line each, ``train.adversarial`` settings this recipe cannot run soundly (the
    ranges of ``adversarial_eps`` and ``adversarial_steps`` are ``dptrain.validation.keys``')."""
    train = cfg.train
    if train.adversarial not in MODES:
        raise UserError(f"train.adversarial={train.adversarial} is unknown: use one of {', '.join(MODES)}")
    if train.adversarial == "none":
        return
    if cfg.federation.name != "none":
        raise UserError(
            "train.adversarial=pgd runs in the centralized recipe only: use federation=none or train.adversarial=none"
        )
    if cfg.audit.mia.reference_models > 0:
        raise UserError(
            f"train.adversarial=pgd with audit.mia.reference_models={cfg.audit.mia.reference_models}: reference models "
            "are not trained adversarially, so they would not imitate the target; use audit.mia.reference_models=0 "
            "(e.g. audit=fast)"
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
        module = unwrap(model)
        module.eval()
        try:
            with _per_sample_hooks_off(model):
                return pgd(
                    module, inputs, labels, self.units, self.eps, "linf", self.steps, 1, self.generator,
                    clean_start=False, until_fooled=False,
                )
        finally:
            model.train()


def adversarial_examples(cfg: Config, units: InputUnits | None, seed: int, device: torch.device):
    """The batch transform ``cfg.train.adversarial`` asks for, or None for ``none``."""
    train = cfg.train
    if train.adversarial == "none":
        return None
    if units is None:
        raise UserError("train.adversarial=pgd needs the data's units: this training path does not provide them")
    generator = torch.Generator(device=device).manual_seed(seed)
    return AdversarialExamples(units, train.adversarial_eps, train.adversarial_steps, generator)
