"""Canaries for the one-run audit (Steinke, Nasr & Jagielski 2023): mislabelled population records,
each included in training independently with probability 1/2."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dptrain.data.splits import Split
from dptrain.seeds import Stream, derived_seed


@dataclass(eq=False)
class Canaries:
    """``indices`` (canonical order, drawn from the population) relabelled to ``labels``;
    ``included[i]`` says whether canary i is in the target's training set."""

    indices: np.ndarray
    labels: torch.Tensor
    included: np.ndarray

    def dataset(self, population_features: torch.Tensor, population_indices: np.ndarray) -> TensorDataset:
        """The canaries as ``TensorDataset(x, wrong label)``, features taken from the prepared population."""
        rows = np.searchsorted(population_indices, self.indices)
        return TensorDataset(population_features[torch.from_numpy(rows)], self.labels)


def canary_inclusion(count: int, seed: int) -> np.ndarray:
    """Which of ``count`` canaries enter training: independent fair coins from ``seed``.

    Needs no data, so the number included (and with it the training-set size
    the privacy plan needs) is known before any data is loaded.
    """
    return np.random.default_rng(derived_seed(seed, Stream.CANARY_COINS)).random(count) < 0.5


def draw_canaries(split: Split, labels: torch.Tensor, num_classes: int, count: int, seed: int) -> Canaries:
    """Draw ``count`` distinct population records and give each a uniformly random wrong label.

    A wrong label makes a record an outlier the model can only fit by memorising
    it, the strongest membership signal a canary can carry without crafting inputs.
    Precondition: ``count <= len(split.population)``; the reference models of an
    audit must not train on these records (see ``population_without``).
    """
    included = canary_inclusion(count, seed)
    rng = np.random.default_rng(derived_seed(seed, Stream.CANARY_RECORDS))
    indices = np.sort(rng.choice(split.population, size=count, replace=False))
    shift = torch.from_numpy(rng.integers(1, num_classes, size=count))
    return Canaries(indices=indices, labels=(labels[torch.from_numpy(indices)] + shift) % num_classes, included=included)


def population_without(split: Split, canaries: Canaries | None) -> np.ndarray:
    """Positions within ``split.population`` of the records that are not canaries."""
    if canaries is None:
        return np.arange(len(split.population))
    return np.flatnonzero(~np.isin(split.population, canaries.indices))
