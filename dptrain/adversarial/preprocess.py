"""Input preprocessing defences applied at inference (``defense.preprocess``): feature squeezing by bit
depth and median smoothing (Xu et al. 2018, "Feature Squeezing: Detecting Adversarial Examples in Deep
Neural Networks"), and the model they defend, whose gradient is BPDA's (Athalye et al. 2018,
"Obfuscated Gradients Give a False Sense of Security").

Both operations work on pixels in [0, 1] (the data's own units for images, ``dptrain.data.InputUnits``):
a standardized feature is mapped back to its pixel, transformed, and standardized again, so a median
compares pixels and not features standardized by different means and deviations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dptrain.data import InputUnits

PREPROCESSORS = ("none", "squeeze", "median")


def squeeze_bits(pixels: torch.Tensor, bits: int) -> torch.Tensor:
    """Xu et al. 2018's bit-depth reduction: each pixel in [0, 1] rounded to the nearest of the ``2**bits``
    levels ``k / (2**bits - 1)``, ``round(x * (2**bits - 1)) / (2**bits - 1)`` (torch rounds half to even,
    as NumPy does in the authors' code). Its gradient is zero almost everywhere."""
    levels = 2**bits - 1
    return torch.round(pixels * levels) / levels


def _symmetric_indices(length: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices that pad an axis of ``length`` by ``before`` / ``after`` entries mirrored with the edge
    repeated (d c b a | a b c d | d c b a): scipy.ndimage's ``mode="reflect"``, the authors' padding."""
    index = torch.arange(-before, length + after, device=device)
    index = torch.where(index < 0, -index - 1, index)
    return torch.where(index >= length, 2 * length - index - 1, index)


def median_smooth(pixels: torch.Tensor, kernel: int) -> torch.Tensor:
    """Xu et al. 2018's local smoothing: each pixel replaced by the median of the ``kernel`` x ``kernel``
    window over the last two axes (height, width; each channel apart), padded as scipy.ndimage's
    ``median_filter(size=kernel, mode="reflect")`` pads. For an even kernel the window reaches one pixel
    further before than after, and of its two middle values the upper one is taken, as scipy's rank
    filter does (rank ``kernel**2 // 2``)."""
    height, width = pixels.shape[-2:]
    before, after = kernel // 2, (kernel - 1) // 2
    padded = pixels.index_select(-2, _symmetric_indices(height, before, after, pixels.device))
    padded = padded.index_select(-1, _symmetric_indices(width, before, after, pixels.device))
    windows = padded.unfold(-2, kernel, 1).unfold(-2, kernel, 1).flatten(-2)
    return windows.sort(dim=-1).values[..., kernel * kernel // 2]


@dataclass(frozen=True)
class Preprocessing:
    """One of ``PREPROCESSORS`` with its parameter, a map from pixels in [0, 1] to pixels in [0, 1]."""

    name: str
    bits: int = 4
    kernel: int = 2

    @property
    def label(self) -> str:
        """``none``, ``squeeze(bits=3)`` or ``median(kernel=2)``: what ``audit.json`` records."""
        if self.name == "squeeze":
            return f"squeeze(bits={self.bits})"
        if self.name == "median":
            return f"median(kernel={self.kernel})"
        return self.name

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.name == "squeeze":
            return squeeze_bits(pixels, self.bits)
        if self.name == "median":
            return median_smooth(pixels, self.kernel)
        return pixels


class Defended(nn.Module):
    """``model`` behind ``preprocessing``: the input (in the model's units) is mapped to pixels by
    ``units``, preprocessed, and mapped back; features an attack may not move (scale 0) pass as they are.

    The forward pass is exactly the defended model's, so every accuracy measured through it is the
    deployed model's. With ``adaptive`` (the default) the backward pass treats the preprocessing as the
    identity: BPDA (Athalye et al. 2018, section 4.1), the approximation they use for both defences
    here, since each output pixel stays close to its input. Without it gradients run through the
    operation itself, which for squeezing are zero: an attack then sees no signal and reports
    robustness that is only gradient masking (a labelled diagnostic, never a headline number)."""

    def __init__(self, model: nn.Module, units: InputUnits, preprocessing: Preprocessing, adaptive: bool = True):
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.adaptive = adaptive
        movable = units.scale > 0
        self.register_buffer("movable", movable, persistent=False)
        self.register_buffer("low", torch.where(movable, units.low, torch.zeros_like(units.low)), persistent=False)
        self.register_buffer("scale", torch.where(movable, units.scale, torch.ones_like(units.scale)), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """The preprocessed input, in the model's units."""
        preprocessed = self.low + self.scale * self.preprocessing((x - self.low) / self.scale)
        return torch.where(self.movable, preprocessed, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preprocessed = self.preprocess(x)
        if self.adaptive:
            preprocessed = x + (preprocessed - x).detach()
        return self.model(preprocessed)
