"""The datasets embedded in scikit-learn: ``digits`` (8x8 images) and ``breast_cancer`` (30 features)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from dptrain.data.dataset import DatasetInfo, InputUnits, LabeledData

if TYPE_CHECKING:
    from dptrain.config import DatasetConfig


@dataclass(frozen=True)
class SklearnDataset:
    """A dataset shipped inside scikit-learn, so it needs no download.

    Every feature column is numeric and gets standardized by
    :func:`dptrain.data.prepare`; ``scale`` only brings raw values to a unit range, which for
    ``pixels`` (images) is [0, 1].
    """

    name: str
    modality: str
    input_shape: tuple[int, ...]
    num_classes: int
    size: int
    loader: str
    scale: float = 1.0
    pixels: bool = False

    def describe(self, cfg: DatasetConfig, progress: bool = False) -> DatasetInfo:
        """Return the published constants; nothing is read."""
        return DatasetInfo(
            name=self.name,
            modality=self.modality,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            pool_size=self.size,
            test_size=None,
            sensitive=None,
        )

    def load(self, cfg: DatasetConfig, progress: bool = False) -> LabeledData:
        """Return the features (divided by ``scale``, shaped ``input_shape``) and labels, in scikit-learn's order."""
        import sklearn.datasets

        load_bunch: Callable = getattr(sklearn.datasets, self.loader)
        bunch = load_bunch()
        features = torch.as_tensor(bunch.data, dtype=torch.float32) / self.scale
        width = features.shape[1]
        one = torch.ones(self.input_shape)
        return LabeledData(
            name=self.name,
            features=features.reshape(-1, *self.input_shape).contiguous(),
            labels=torch.as_tensor(bunch.target, dtype=torch.int64),
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            numeric_mask=torch.ones(width, dtype=torch.bool),
            units=InputUnits(scale=one, low=0 * one, high=one) if self.pixels else None,
        )

    def data_files(self, cfg: DatasetConfig) -> tuple[Path, ...]:
        """None: the data ship inside scikit-learn, identified by the data fingerprint."""
        return ()


# Digits are 8x8 images with 17 grey levels (0..16); shaping them (1, 8, 8)
# lets a CNN use them while an MLP or logistic regression flattens them.
DIGITS = SklearnDataset(
    name="digits",
    modality="image",
    input_shape=(1, 8, 8),
    num_classes=10,
    size=1797,
    loader="load_digits",
    scale=16.0,
    pixels=True,
)

BREAST_CANCER = SklearnDataset(
    name="breast_cancer",
    modality="tabular",
    input_shape=(30,),
    num_classes=2,
    size=569,
    loader="load_breast_cancer",
)
