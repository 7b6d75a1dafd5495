"""Turns a dataset and its split into the four tensor datasets training and audits consume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dptrain.data.dataset import LabeledData, SensitiveAttribute
from dptrain.data.splits import Split
from dptrain.errors import UserError


@dataclass(eq=False)
class SplitData:
    """The parts of a split as ``TensorDataset(x, y)``, preprocessed and ready for a model.

    ``sensitive.codes`` stays indexed by the canonical order: the true values of
    the members are ``sensitive.codes[split.members]``.
    """

    members: TensorDataset
    non_members: TensorDataset
    population: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    sensitive: Optional[SensitiveAttribute]
    split: Split


def prepare(data: LabeledData, split: Split) -> SplitData:
    """Return the split's four parts, with numeric columns standardized by the POPULATION's mean and std.

    The population is disjoint from members and non-members, so preprocessing
    releases nothing about the DP-protected training records and treats members
    and non-members alike (no membership signal is planted by preprocessing).
    A column constant over the population gets std 1. Columns outside
    ``numeric_mask`` (one-hot blocks, the sensitive attribute) and images without
    a mask are left as loaded. Raises a UserError when the split was made for
    other data.
    """
    if split.fingerprint != data.fingerprint:
        raise UserError(
            f"the split was made for {split.dataset} data with fingerprint {split.fingerprint[:16]}, but the data "
            f"has {data.fingerprint[:16]}; load the same dataset.* settings the split was made with"
        )
    features = population_standardized(data, split.population)

    def part(indices: np.ndarray) -> TensorDataset:
        rows = torch.from_numpy(indices)
        return TensorDataset(features[rows], data.labels[rows])

    return SplitData(
        members=part(split.members),
        non_members=part(split.non_members),
        population=part(split.population),
        test=part(split.test),
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        sensitive=data.sensitive,
        split=split,
    )


def population_standardized(data: LabeledData, population: np.ndarray) -> torch.Tensor:
    """Return all features with each ``numeric_mask`` column shifted and scaled by its population mean and std."""
    if data.numeric_mask is None or not bool(data.numeric_mask.any()):
        return data.features
    flat = data.features.reshape(len(data), -1)
    columns = data.numeric_mask.nonzero().squeeze(1)
    reference = flat[torch.from_numpy(population)][:, columns].double()
    mean = reference.mean(dim=0)
    # An exact test for constant columns: a tolerance on std would also flatten
    # columns that merely have a small scale.
    constant = reference.amax(dim=0) == reference.amin(dim=0)
    std = torch.where(constant, torch.ones_like(mean), reference.std(dim=0, unbiased=False))
    standardized = flat.clone()
    standardized[:, columns] = ((flat[:, columns].double() - mean) / std).float()
    return standardized.reshape(data.features.shape)
