"""Dataset sources by the name ``dataset.name`` selects, and the two calls every stage uses on them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dptrain.data.csv_table import CsvDataset
from dptrain.data.dataset import DatasetInfo, DatasetSource, LabeledData
from dptrain.data.synthetic import SYNTHETIC
from dptrain.data.tabular import BREAST_CANCER, DIGITS
from dptrain.data.vision import CIFAR10, FASHION_MNIST, MNIST
from dptrain.errors import UserError

if TYPE_CHECKING:
    from dptrain.config import DatasetConfig

DATASETS: dict[str, DatasetSource] = {
    source.name: source
    for source in (DIGITS, BREAST_CANCER, SYNTHETIC, CsvDataset(), MNIST, FASHION_MNIST, CIFAR10)
}


def get_source(name: str) -> DatasetSource:
    """Return the source registered as ``name``, or raise a UserError listing the choices."""
    if name not in DATASETS:
        raise UserError(f"dataset={name} is not a dataset; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def describe(cfg: DatasetConfig, progress: bool = False) -> DatasetInfo:
    """Return the dataset's description; cheap (no big arrays, no download), so config validation can call it.

    A user's CSV file is read and checked here, once per process (``load`` reuses the parse),
    with a progress bar for a large file when ``progress`` and on a terminal.
    """
    return get_source(cfg.name).describe(cfg, progress)


def data_files(cfg: DatasetConfig) -> tuple[Path, ...]:
    """The files the dataset is read from (``DatasetSource.data_files``): () for embedded or generated data."""
    return get_source(cfg.name).data_files(cfg)


def load(cfg: DatasetConfig, progress: bool = False) -> LabeledData:
    """Return the whole dataset in its canonical order (downloading only when ``dataset.download`` is true)."""
    return get_source(cfg.name).load(cfg, progress)
