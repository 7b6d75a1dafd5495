"""Fixed features and reparametrized convolutions for DP-SGD: the ScatterNet front end of Tramer & Boneh
2021 and weight-standardized convolutions (Qiao et al. 2019)."""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
from torch import nn

from dptrain.config import ModelConfig
from dptrain.errors import UserError

FEATURES = ("none", "scattering")
CONVOLUTIONAL = ("cnn", "resnet")
# Tramer & Boneh 2021 (section 3.1) take kymatio's defaults: L=8 angles, scattering order 2.
ANGLES, ORDER = 8, 2
INSTALL = 'pip install "dptrain[scattering]"'


def default_scattering_j(input_shape: Sequence[int]) -> int:
    """Tramer & Boneh's scale J=2 for 28x28 and 32x32 images; J=1 below 16 pixels (8x8 digits keep 4x4)."""
    return 1 if min(input_shape[1:]) < 16 else 2


def scattering_channels(in_channels: int, j: int, angles: int = ANGLES) -> int:
    """Channels of the order-2 scattering of ``in_channels`` channels at scale ``j``: per input channel
    one low-pass, ``j * angles`` order-1 and ``angles**2 * j * (j - 1) / 2`` order-2 coefficients
    (Bruna & Mallat 2013; 81 for J=2, L=8 as in Tramer & Boneh)."""
    return in_channels * (1 + j * angles + angles * angles * j * (j - 1) // 2)


def check_features(model: ModelConfig, grad_sample_mode: str, modality: str, input_shape: Sequence[int]) -> None:
    """Refuse, in one line each, what ``model.features`` and ``model.weight_standardization`` cannot do
    soundly: an unknown feature set, scattering of tabular records, without kymatio or at a scale that
    does not divide the image; weight standardization of a model without convolutions, or under
    book-keeping clipping (plain Conv2d only)."""
    if model.features not in FEATURES:
        raise UserError(f"model.features={model.features} is unknown: choose one of {', '.join(FEATURES)}")
    if model.features == "none" and model.scattering_j is not None:
        raise UserError(
            f"model.scattering_j={model.scattering_j} is the scale of model.features=scattering: add that or drop it"
        )
    if model.features == "scattering":
        if modality != "image":
            raise UserError("model.features=scattering needs image input, not tabular records: use model.features=none")
        if importlib.util.find_spec("kymatio") is None:
            raise UserError(f"model.features=scattering needs kymatio, which is not installed: {INSTALL}")
        j = default_scattering_j(input_shape) if model.scattering_j is None else model.scattering_j
        height, width = input_shape[1:]
        if height % 2**j or width % 2**j:
            raise UserError(
                f"model.scattering_j={j} subsamples by 2^{j}={2**j}, which does not divide the {height}x{width} "
                "images: use a smaller model.scattering_j"
            )
    if model.weight_standardization:
        if model.name not in CONVOLUTIONAL:
            raise UserError(
                f"model.weight_standardization=true standardizes convolutions, and model={model.name} has none: "
                f"use model=cnn or model=resnet"
            )
        if grad_sample_mode == "bk":
            raise UserError(
                "privacy.grad_sample_mode=bk (book-keeping clipping) supports plain convolutions only, not "
                "model.weight_standardization=true: use privacy.grad_sample_mode=auto"
            )


class Scattering(nn.Module):
    """The order-2 wavelet scattering transform (Bruna & Mallat 2013; Oyallon & Mallat 2015) of every input
    channel, kymatio's ``Scattering2D`` with ``ANGLES`` angles: (N, C, H, W) -> (N, C * K, H / 2^J, W / 2^J),
    K = ``scattering_channels(1, J)``, channel c * K + k the k-th coefficient of input channel c.

    No parameters: its Morlet filters are buffers, so DP-SGD (every ``grad_sample_mode``) clips and
    noises the model behind it only, and the features cost no privacy. It stays differentiable in its
    input (adversarial training and the evasion audit craft through it)."""

    def __init__(self, input_shape: Sequence[int], j: int):
        super().__init__()
        # kymatio.torch (and kymatio.Scattering2D's frontend dispatch) also imports the 3-D scattering,
        # whose scipy.special.sph_harm scipy 1.17 removed: import the 2-D torch frontend alone.
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        self.transform = ScatteringTorch2D(J=j, shape=tuple(input_shape[1:]), L=ANGLES, max_order=ORDER)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # kymatio refuses non-contiguous inputs (a transposed or sliced batch).
        return self.transform(x.contiguous()).flatten(1, 2)


class StandardizedConv2d(nn.Conv2d):
    """A convolution whose kernel is standardized per output channel in every forward pass (Qiao et al.
    2019, "Micro-Batch Training with Batch-Channel Normalization and Weight Standardization"; De et al.
    2022 use it with GroupNorm for DP-SGD): W_o <- (W_o - mean(W_o)) / sqrt(var(W_o) + eps), the mean
    and (biased) variance over the output channel's fan-in.

    The trainable parameter is the raw kernel; Opacus has no grad sampler for this type, so every mode
    (hooks, ghost, functorch) takes its per-example gradients by its functorch fallback (``vmap`` of
    ``grad`` through this forward), exact for any forward. Book-keeping clipping supports plain Conv2d
    only and is refused for it."""

    eps = 1e-5

    def standardized_weight(self) -> torch.Tensor:
        weight = self.weight.flatten(1)
        mean, var = weight.mean(dim=1, keepdim=True), weight.var(dim=1, unbiased=False, keepdim=True)
        return ((weight - mean) / torch.sqrt(var + self.eps)).view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def convolution(weight_standardization: bool):
    """The conv class the zoo builds: ``StandardizedConv2d`` under ``model.weight_standardization``."""
    return StandardizedConv2d if weight_standardization else nn.Conv2d

