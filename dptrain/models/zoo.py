"""Build a model by name: logistic regression, MLP, CNN and a small GroupNorm ResNet."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from dptrain.config import ModelConfig
from dptrain.errors import UserError
from dptrain.models.features import Scattering, convolution, default_scattering_j, scattering_channels

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}

# Models that need (C, H, W) input; the others flatten whatever they get.
IMAGE_ONLY = ("cnn", "resnet")


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise UserError(f"model.activation={name} is unknown: choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _group_norm(groups: int, channels: int, affine: bool = True) -> nn.GroupNorm:
    # GroupNorm needs groups | channels; fall back to the largest divisor not above `groups`.
    g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
    return nn.GroupNorm(g, channels, affine=affine)


def logreg(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def mlp(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Fully connected network with hidden widths ``cfg.hidden``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for hidden in cfg.hidden:
        layers += [nn.Linear(width, hidden), _activation(cfg.activation)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _LinearSkip(nn.Module):
    """A linear head on the flattened input beside the convolutional features: logistic regression on the
    pixels plus what the convolutions add. Under ``model.zero_head`` it starts as the zero logistic
    regression, so DP-SGD's first steps move a linear model while the features are learned beside it."""

    def __init__(self, features: nn.Module, in_features: int, num_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.head(torch.cat([x.flatten(1), self.features(x)], dim=1))


def cnn(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Conv(3x3) -> GroupNorm -> activation per entry of ``cfg.channels``, then a linear head.

    Each block ends in a 2x2 max-pool, or with ``cfg.pool_to`` set none does and the last block's output
    is average-pooled to ``pool_to`` x ``pool_to``. With ``cfg.skip`` the head also reads the flattened
    input (``_LinearSkip``). GroupNorm instead of BatchNorm because BatchNorm mixes examples of a batch,
    which breaks per-example gradients (Opacus rejects it).
    """
    in_channels, height, width = input_shape
    conv = convolution(cfg.weight_standardization)
    layers: list[nn.Module] = []
    for channels in cfg.channels:
        layers += [
            conv(in_channels, channels, kernel_size=3, padding=1),
            _group_norm(cfg.groups, channels),
            _activation(cfg.activation),
        ]
        if cfg.pool_to is None and min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        in_channels = channels
    if cfg.pool_to is not None:
        layers.append(nn.AdaptiveAvgPool2d(cfg.pool_to))
        height = width = cfg.pool_to
    layers.append(nn.Flatten())
    features = in_channels * height * width
    if cfg.skip:
        return _LinearSkip(nn.Sequential(*layers), math.prod(input_shape) + features, num_classes)
    return nn.Sequential(*layers, nn.Linear(features, num_classes))


class _PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016) with GroupNorm."""

    def __init__(self, in_channels: int, channels: int, stride: int, groups: int, activation: str, conv=nn.Conv2d):
        super().__init__()
        self.norm1 = _group_norm(groups, in_channels)
        self.act1 = _activation(activation)
        self.conv1 = conv(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = _group_norm(groups, channels)
        self.act2 = _activation(activation)
        self.conv2 = conv(channels, channels, 3, padding=1, bias=False)
        self.projection = (
            conv(in_channels, channels, 1, stride=stride, bias=False)
            if stride != 1 or in_channels != channels
            else None
        )

    def forward(self, x):
        out = self.act1(self.norm1(x))
        shortcut = x if self.projection is None else self.projection(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(self.norm2(out)))
        return out + shortcut


def resnet(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A small pre-activation ResNet: stage i has ``cfg.blocks[i]`` blocks of width ``cfg.width * 2**i``."""
    in_channels = input_shape[0]
    conv = convolution(cfg.weight_standardization)
    layers: list[nn.Module] = [conv(in_channels, cfg.width, 3, padding=1, bias=False)]
    channels = cfg.width
    for stage, count in enumerate(cfg.blocks):
        stage_channels = cfg.width * 2**stage
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(_PreActBlock(channels, stage_channels, stride, cfg.groups, cfg.activation, conv))
            channels = stage_channels
    layers += [
        _group_norm(cfg.groups, channels),
        _activation(cfg.activation),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    ]
    return nn.Sequential(*layers)


def _on_scattering(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ScatterNet -> GroupNorm -> the ``cfg.name`` model on the scattering channels (Tramer & Boneh 2021,
    "Differentially Private Learning Needs Better Features (or Much More Data)": ScatterNet + linear / CNN).

    The features are normalized per example, by a GroupNorm of ``cfg.groups`` groups over the scattering
    channels, not by the training set's statistics: a per-example normalization reads no other record,
    so it costs no privacy (their alternative, the data's mean and variance, would have to be estimated
    with DP). It has no affine parameters before logistic regression, whose linear layer already scales
    and shifts every feature, and has them before the other models, as in their CNN.
    """
    j = default_scattering_j(input_shape) if cfg.scattering_j is None else cfg.scattering_j
    channels = scattering_channels(input_shape[0], j)
    shape = (channels, input_shape[1] // 2**j, input_shape[2] // 2**j)
    return nn.Sequential(
        Scattering(input_shape, j),
        _group_norm(cfg.groups, channels, affine=cfg.name != "logreg"),
        MODELS[cfg.name](cfg, shape, num_classes),
    )


MODELS: dict[str, Callable[[ModelConfig, Sequence[int], int], nn.Module]] = {
    "logreg": logreg,
    "mlp": mlp,
    "cnn": cnn,
    "resnet": resnet,
}


def build_model(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Return a freshly initialised ``cfg.name`` model for inputs of ``input_shape``.

    Precondition: image models (``IMAGE_ONLY``) get (C, H, W) inputs; config
    validation checks this before any data is loaded, and ``dptrain.models.features.check_features``
    that ``model.features=scattering`` can run. ``model.zero_head`` starts the last
    ``nn.Linear`` (every zoo model's output layer) at zero.
    """
    if cfg.name not in MODELS:
        raise UserError(f"model={cfg.name} is unknown: choose one of {', '.join(MODELS)}")
    if cfg.features == "scattering":
        model = _on_scattering(cfg, tuple(input_shape), num_classes)
    else:
        model = MODELS[cfg.name](cfg, tuple(input_shape), num_classes)
    if cfg.zero_head:
        # De et al. 2022 ("Unlocking High-Accuracy Differentially Private Image Classification through
        # Scale", section 3.2): every class starts equally likely, so the first noisy steps do not have to
        # undo a random head first.
        head = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return model
