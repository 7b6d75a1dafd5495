"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", AutoAttack's first attack) through the ``torchattacks`` library, the optional
``attacks`` extra: a well-kept implementation that confirms our PGD's numbers in the evasion audit.

torchattacks clamps every input into [0, 1], so the attack runs on pixels: inputs whose every feature
is a pixel (``InputUnits`` with a finite range of exactly one pixel unit, ``pixel_units``), i.e. images,
mapped to the model's units by ``low + scale * pixel``. Tables in standard deviations have no such range.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from dptrain.data import InputUnits

LIBRARY_NORMS = {"linf": "Linf", "l2": "L2"}


def available() -> bool:
    """Whether torchattacks is installed (``pip install "dptrain[attacks]"``)."""
    return importlib.util.find_spec("torchattacks") is not None


def pixel_units(units: InputUnits) -> bool:
    """Whether every feature is a pixel: movable, with ``[low, high]`` one pixel unit (``scale``) wide."""
    return bool(
        torch.all(units.scale > 0)
        and torch.all(torch.isfinite(units.low))
        and torch.allclose(units.high - units.low, units.scale, rtol=1e-5)
    )


class _OnPixels(nn.Module):
    """``model`` fed pixels in [0, 1]: the input the library attacks, mapped to the model's units."""

    def __init__(self, model: nn.Module, units: InputUnits):
        super().__init__()
        self.model = model
        self.low, self.scale = units.low, units.scale

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.low + self.scale * pixels)


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    units: InputUnits,
    eps: float,
    norm: str,
    steps: int,
    restarts: int,
    seed: int,
) -> torch.Tensor:
    """torchattacks' APGD on the cross-entropy (APGD-CE) with ``steps`` steps and ``restarts`` random
    restarts, budget ``eps`` in pixels under ``norm``; the adversarial inputs in the model's units. Each
    example keeps the first restart's point that fools the model (torchattacks' ``perturb``), else its
    clean input. ``units`` must be ``pixel_units``; ``model`` must be in eval mode. torchattacks seeds
    the global generators with ``seed``: the CPU generator's state, and on CUDA the device's, are
    restored afterwards."""
    import torchattacks

    if not pixel_units(units):
        raise ValueError("APGD through torchattacks needs inputs whose every feature is a pixel in [0, 1]")
    device = x.device
    low, scale = units.low.to(device), units.scale.to(device)
    on_pixels = _OnPixels(model, InputUnits(scale=scale, low=low, high=units.high.to(device)))
    attack = torchattacks.APGD(
        on_pixels, norm=LIBRARY_NORMS[norm], eps=eps, steps=steps, n_restarts=restarts, seed=seed, loss="ce"
    )
    pixels = ((x - low) / scale).clamp(0.0, 1.0)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        adversarial = attack(pixels, y)
    return (low + scale * adversarial).detach()
