"""The records every dataset source returns: its cheap description and its loaded tensors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from dptrain.config import DatasetConfig


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, known without loading it: enough to validate a config.

    ``pool_size`` counts the examples members, non-members and population are
    drawn from; ``test_size`` is the size of an official held-out test set, or
    None when the test set is carved from the pool.
    """

    name: str
    modality: str
    input_shape: tuple[int, ...]
    num_classes: int
    pool_size: int
    test_size: Optional[int]
    sensitive: Optional[str]


@dataclass(eq=False)
class SensitiveAttribute:
    """A sensitive attribute that is also a model input.

    An attribute-inference attacker writes ``values[j]`` into the flattened
    feature columns ``columns`` to ask the model "what if this record's value were
    ``value_names[j]``"; ``codes[i]`` is the index of record ``i``'s true value.
    These columns are never standardized, so the encodings stay valid after
    :func:`dptrain.data.prepare`.
    """

    name: str
    columns: list[int]
    values: torch.Tensor
    value_names: list[str]
    codes: torch.Tensor


def data_fingerprint(name: str, features: torch.Tensor, labels: torch.Tensor) -> str:
    """Return the sha256 hex digest of the dataset name, the float32 features and the int64 labels."""
    digest = hashlib.sha256(name.encode("utf-8"))
    digest.update(np.ascontiguousarray(features.numpy()).tobytes())
    digest.update(np.ascontiguousarray(labels.numpy()).tobytes())
    return digest.hexdigest()


@dataclass(eq=False)
class InputUnits:
    """How a feature tensor relates to the data's own units: one entry per input feature (shaped like one
    input). A change of one data unit moves feature i by ``scale[i]`` (0: a feature an input attack may
    not move, e.g. a one-hot or sensitive column); its valid values are ``[low[i], high[i]]`` (infinite
    where the data have no bound). Data units are pixels in [0, 1] for images and standard deviations
    for standardized tables; evasion budgets are stated in them (``dptrain.audit.evasion``)."""

    scale: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor


@dataclass(eq=False)
class LabeledData:
    """A whole dataset in its canonical order (vision: official train, then official test).

    ``numeric_mask`` flags the flattened feature columns that :func:`prepare`
    standardizes (None: images already normalized with published constants);
    ``official_test`` holds the canonical indices of an official test set, or
    None. ``units`` relates the loaded features to pixels in [0, 1] (images; None for tables, whose
    units are standard deviations once standardized). ``fingerprint`` is computed here, so it always matches the tensors.
    """

    name: str
    features: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    numeric_mask: Optional[torch.Tensor] = None
    sensitive: Optional[SensitiveAttribute] = None
    official_test: Optional[np.ndarray] = None
    units: Optional[InputUnits] = None
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.features.dtype != torch.float32 or tuple(self.features.shape) != (n, *self.input_shape):
            raise ValueError(
                f"{self.name}: features must be float32 of shape {(n, *self.input_shape)}, "
                f"got {self.features.dtype} {tuple(self.features.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"{self.name}: labels must be a 1-d int64 tensor")
        self.fingerprint = data_fingerprint(self.name, self.features, self.labels)

    def __len__(self) -> int:
        return len(self.labels)


class DatasetSource(Protocol):
    """One named dataset: a cheap description and a loader that agree on shapes and classes."""

    name: str

    def describe(self, cfg: DatasetConfig, progress: bool = False) -> DatasetInfo:
        """Return the dataset's description without loading its arrays or downloading; ``progress``
        allows a progress bar while a source reads a large file."""

    def load(self, cfg: DatasetConfig, progress: bool = False) -> LabeledData:
        """Return the whole dataset in canonical order."""

    def data_files(self, cfg: DatasetConfig) -> tuple[Path, ...]:
        """The files ``load`` reads the data from, resolved; () for data embedded in a package or generated
        from the config, which only the data fingerprint (:func:`data_fingerprint`) identifies."""
