"""Data poisoning: label flipping (random and targeted) and backdoor triggers on the records an attacker
controls, the centralized recipe's poisoned members or a Byzantine client's or worker's own records."""

from __future__ import annotations

import torch
from torch import Tensor

from dptrain.errors import require


def label_flip(labels: Tensor, num_classes: int) -> Tensor:
    """Labels mapped ``y -> num_classes - 1 - y`` (a new tensor).

    The label-flipping Byzantine client of Allen-Zhu et al., ICLR 2021 and Karimireddy et al.,
    ICML 2021: it trains honestly on wrong labels. Precondition 0 <= y < num_classes.
    """
    require(num_classes >= 2, f"label_flip needs num_classes >= 2, got {num_classes}")
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        require(0 <= low and high < num_classes, f"label_flip needs labels in [0, {num_classes}), got [{low}, {high}]")
    return num_classes - 1 - labels


def targeted_label_flip(labels: Tensor, num_classes: int, source: int, target: int) -> Tensor:
    """Labels with every ``source`` relabelled ``target``, the others unchanged (a new tensor).

    The targeted label flip of Tolpegin et al., "Data Poisoning Attacks Against Federated Learning
    Systems", ESORICS 2020: one class pair, so the damage concentrates on the source class.
    Preconditions 0 <= source, target < num_classes, source != target.
    """
    require(
        0 <= source < num_classes and 0 <= target < num_classes and source != target,
        f"targeted label_flip needs two different classes in [0, {num_classes}), got {source} -> {target}",
    )
    return torch.where(labels == source, torch.full_like(labels, target), labels)


def stamp_trigger(inputs: Tensor, size: int, value: float) -> Tensor:
    """A copy of ``inputs`` with the trigger stamped on every record.

    Images, (N, C, H, W) or (N, H, W): the bottom-right ``size`` x ``size`` square set to
    ``value`` in every channel (the BadNets patch, Gu et al. 2017). Tabular (N, F): the last
    ``size`` features set to ``value``. Precondition: the trigger fits.
    """
    require(
        inputs.ndim >= 2, f"backdoor trigger needs (N, F) or (N, [C,] H, W) inputs, got shape {tuple(inputs.shape)}"
    )
    spatial = inputs.shape[-2:] if inputs.ndim >= 3 else inputs.shape[-1:]
    require(
        1 <= size <= min(spatial),
        f"backdoor trigger_size must be in [1, {min(spatial)}] for inputs of shape {tuple(inputs.shape)}, got {size}",
    )
    stamped = inputs.clone()
    if inputs.ndim >= 3:
        stamped[..., -size:, -size:] = value
    else:
        stamped[:, -size:] = value
    return stamped


def backdoor(
    inputs: Tensor,
    labels: Tensor,
    target_label: int,
    fraction: float,
    size: int,
    value: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The attacker's records with ``floor(fraction * N)`` of them, drawn from ``generator``,
    triggered (``stamp_trigger``) and relabelled ``target_label``; new tensors.

    Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How To Backdoor Federated Learning", AISTATS
    2020: keeping clean records beside triggered ones preserves the main task.
    Precondition 0 <= fraction <= 1.
    """
    require(0 <= fraction <= 1, f"backdoor poison_fraction must be in [0, 1], got {fraction}")
    count = int(fraction * inputs.shape[0])
    chosen = torch.randperm(inputs.shape[0], generator=generator)[:count].to(inputs.device)
    poisoned_inputs = inputs.clone()
    poisoned_inputs[chosen] = stamp_trigger(inputs[chosen], size, value)
    poisoned_labels = labels.clone()
    poisoned_labels[chosen] = target_label
    return poisoned_inputs, poisoned_labels
