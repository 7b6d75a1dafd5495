"""Turns a dataset and its split into the four tensor datasets training and audits consume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dptrain.data.dataset import InputUnits, LabeledData, SensitiveAttribute
from dptrain.data.splits import Split
from dptrain.errors import UserError


@dataclass(eq=False)
class SplitData:
    """The parts of a split as ``TensorDataset(x, y)``, preprocessed and ready for a model.

    ``sensitive.codes`` stays indexed by the canonical order: the true values of
    the members are ``sensitive.codes[split.members]``. ``units`` relates the prepared features to
    the data's own units (pixels in [0, 1], or standard deviations for tables).
    """

    members: TensorDataset
    non_members: TensorDataset
    population: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    sensitive: Optional[SensitiveAttribute]
    split: Split
    units: InputUnits


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
    standardization = population_standardization(data, split.population)
    features = population_standardized(data, standardization)

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
        units=prepared_units(data, standardization),
    )


Standardization = Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def population_standardization(data: LabeledData, population: np.ndarray) -> Standardization:
    """The ``numeric_mask`` columns (flattened indices) with their population mean and std (float64), or
    None when nothing is standardized. A column constant over the population gets std 1."""
    if data.numeric_mask is None or not bool(data.numeric_mask.any()):
        return None
    flat = data.features.reshape(len(data), -1)
    columns = data.numeric_mask.nonzero().squeeze(1)
    reference = flat[torch.from_numpy(population)][:, columns].double()
    mean = reference.mean(dim=0)
    # An exact test for constant columns: a tolerance on std would also flatten
    # columns that merely have a small scale.
    constant = reference.amax(dim=0) == reference.amin(dim=0)
    std = torch.where(constant, torch.ones_like(mean), reference.std(dim=0, unbiased=False))
    return columns, mean, std


def population_standardized(data: LabeledData, standardization: Standardization) -> torch.Tensor:
    """Return all features with each standardized column shifted and scaled by its population mean and std."""
    if standardization is None:
        return data.features
    columns, mean, std = standardization
    flat = data.features.reshape(len(data), -1)
    standardized = flat.clone()
    standardized[:, columns] = ((flat[:, columns].double() - mean) / std).float()
    return standardized.reshape(data.features.shape)


def prepared_units(data: LabeledData, standardization: Standardization) -> InputUnits:
    """The data's units as the prepared features see them. Images (``data.units``): pixels in [0, 1],
    carried through the standardization the same way as the features (so a valid pixel stays within
    ``[low, high]`` exactly). Tables: one standard deviation per standardized column, no bound, and
    scale 0 on columns left as loaded (one-hot blocks, the sensitive attribute), which an input
    attack does not move; a table with nothing standardized is in its loaded units."""
    shape = data.input_shape
    if data.units is None:
        standardized = torch.ones(shape).reshape(-1)
        if standardization is not None:
            standardized.zero_()
            standardized[standardization[0]] = 1.0
        infinite = torch.full(shape, float("inf"))
        return InputUnits(scale=standardized.reshape(shape), low=-infinite, high=infinite)
    if standardization is None:
        return data.units
    columns, mean, std = standardization
    scale, low, high = (part.reshape(-1).clone() for part in (data.units.scale, data.units.low, data.units.high))
    scale[columns] = (scale[columns].double() / std).float()
    low[columns] = ((low[columns].double() - mean) / std).float()
    high[columns] = ((high[columns].double() - mean) / std).float()
    return InputUnits(scale=scale.reshape(shape), low=low.reshape(shape), high=high.reshape(shape))
