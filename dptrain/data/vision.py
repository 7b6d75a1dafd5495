"""The torchvision image datasets (``mnist``, ``fashion_mnist``, ``cifar10``), read from their on-disk formats.

torchvision is imported only inside functions: it is an optional extra
(``dptrain[vision]``), and describing a dataset must not pay for importing it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dptrain.data.dataset import DatasetInfo, InputUnits, LabeledData
from dptrain.errors import UserError

if TYPE_CHECKING:
    from dptrain.config import DatasetConfig


@dataclass(frozen=True)
class TorchvisionDataset:
    """An image dataset with an official train / test split, loaded through ``torchvision.datasets``.

    Pixels are scaled to [0, 1], then normalized per channel with the dataset's
    published mean and std, so no statistic is computed from the data itself.
    """

    name: str
    torchvision_class: str
    folder: str
    files: tuple[str, ...]
    input_shape: tuple[int, int, int]
    train_size: int
    test_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 10

    def describe(self, cfg: DatasetConfig, progress: bool = False) -> DatasetInfo:
        """Return the published sizes after checking torchvision is installed and, without download, the files exist."""
        if importlib.util.find_spec("torchvision") is None:
            raise UserError(self._needs_torchvision())
        self._check_files(cfg)
        return DatasetInfo(
            name=self.name,
            modality="image",
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            pool_size=self.train_size,
            test_size=self.test_size,
            sensitive=None,
        )

    def load(self, cfg: DatasetConfig, progress: bool = False) -> LabeledData:
        """Return the official train images followed by the official test images, normalized, as NCHW float32."""
        try:
            import torchvision.datasets
        except ImportError as error:
            raise UserError(self._needs_torchvision()) from error
        self._check_files(cfg)
        dataset_class = getattr(torchvision.datasets, self.torchvision_class)
        root = Path(cfg.root).expanduser()
        try:
            train, test = (dataset_class(root, train=flag, download=cfg.download) for flag in (True, False))
        except (RuntimeError, OSError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(
                f"dataset={self.name}: torchvision could not read {self._directory(cfg)} ({reason}); "
                f"fix dataset.root={cfg.root} or delete the folder and set dataset.download=true"
            ) from error
        images = torch.cat([self._normalized(train.data), self._normalized(test.data)])
        labels = torch.cat([torch.as_tensor(np.asarray(part.targets), dtype=torch.int64) for part in (train, test)])
        return LabeledData(
            name=self.name,
            features=images,
            labels=labels,
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            official_test=np.arange(len(train.data), len(labels), dtype=np.int64),
            units=self._units(),
        )

    def data_files(self, cfg: DatasetConfig) -> tuple[Path, ...]:
        """The dataset's files below ``dataset.root`` that torchvision reads."""
        return tuple(self._directory(cfg) / name for name in self.files)

    def _units(self) -> InputUnits:
        """Pixels in [0, 1] as the normalized features see them: one pixel unit is 1 / std."""
        mean = torch.tensor(self.mean).view(-1, 1, 1).expand(self.input_shape)
        std = torch.tensor(self.std).view(-1, 1, 1).expand(self.input_shape)
        return InputUnits(scale=1 / std, low=(0 - mean) / std, high=(1 - mean) / std)

    def _normalized(self, data: Any) -> torch.Tensor:
        """Return uint8 images (N, H, W) or (N, H, W, C) as normalized float32 (N, C, H, W)."""
        pixels = torch.as_tensor(np.asarray(data))
        pixels = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return ((pixels.float() / 255.0 - mean) / std).contiguous()

    def _directory(self, cfg: DatasetConfig) -> Path:
        return Path(cfg.root).expanduser().resolve() / self.folder

    def _check_files(self, cfg: DatasetConfig) -> None:
        """Raise a UserError naming the searched directory when a file is missing and download is off."""
        if cfg.download:
            return
        directory = self._directory(cfg)
        missing = [name for name in self.files if not (directory / name).is_file()]
        if missing:
            top = Path(self.folder).parts[0]
            raise UserError(
                f"dataset={self.name}: {missing[0]} not found in {directory}; set dataset.root=<folder that holds "
                f"{top}/> or dataset.download=true"
            )

    def _needs_torchvision(self) -> str:
        return f"dataset={self.name} needs torchvision: pip install 'dptrain[vision]'"


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Published per-channel statistics of each official training set: constants,
# so normalization reads nothing from the records a run protects.
MNIST = TorchvisionDataset(
    name="mnist",
    torchvision_class="MNIST",
    folder="MNIST/raw",
    files=_MNIST_FILES,
    input_shape=(1, 28, 28),
    train_size=60000,
    test_size=10000,
    mean=(0.1307,),
    std=(0.3081,),
)

FASHION_MNIST = TorchvisionDataset(
    name="fashion_mnist",
    torchvision_class="FashionMNIST",
    folder="FashionMNIST/raw",
    files=_MNIST_FILES,
    input_shape=(1, 28, 28),
    train_size=60000,
    test_size=10000,
    mean=(0.2860,),
    std=(0.3530,),
)

CIFAR10 = TorchvisionDataset(
    name="cifar10",
    torchvision_class="CIFAR10",
    folder="cifar-10-batches-py",
    files=tuple(f"data_batch_{index}" for index in range(1, 6)) + ("test_batch", "batches.meta"),
    input_shape=(3, 32, 32),
    train_size=50000,
    test_size=10000,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
