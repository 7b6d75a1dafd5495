"""The ``synthetic`` table: Gaussian classes plus a binary sensitive attribute that is also an input."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dptrain.data.dataset import DatasetInfo, LabeledData, SensitiveAttribute
from dptrain.errors import UserError

if TYPE_CHECKING:
    from dptrain.config import DatasetConfig

SENSITIVE_NAME = "group"
# Mean pairwise distance between class means, in units of the unit noise: with
# the defaults (2 classes, 10 features, correlation 0.8) a logistic regression
# reaches about 0.85 test accuracy, far from chance and far from perfect.
CLASS_SEPARATION = 1.5
# How far group 1 sits from group 0 along the first half of the features. The
# shift makes the group a confounder: the best classifier has to read the group
# column to undo it, so attribute inference has a signal to find.
GROUP_SHIFT = 0.25


class SyntheticDataset:
    """``cfg.n_samples`` rows of ``cfg.n_features`` Gaussian features and one 0/1 group column (last).

    Labels are uniform over ``cfg.n_classes``; the group equals ``label % 2``
    with probability ``cfg.sensitive_correlation``. Everything is drawn from
    ``np.random.default_rng(cfg.seed)``, so a seed names one table.
    """

    name = "synthetic"

    def describe(self, cfg: DatasetConfig, progress: bool = False) -> DatasetInfo:
        """Return the table's shape from the config, after checking its fields."""
        _check(cfg)
        return DatasetInfo(
            name=self.name,
            modality="tabular",
            input_shape=(cfg.n_features + 1,),
            num_classes=cfg.n_classes,
            pool_size=cfg.n_samples,
            test_size=None,
            sensitive=SENSITIVE_NAME,
        )

    def data_files(self, cfg: DatasetConfig) -> tuple[Path, ...]:
        """None: the table is generated from the config, identified by the data fingerprint."""
        return ()

    def load(self, cfg: DatasetConfig, progress: bool = False) -> LabeledData:
        """Return the generated table; the group column is flagged non-numeric so it is never standardized."""
        _check(cfg)
        n, d, k = cfg.n_samples, cfg.n_features, cfg.n_classes
        rng = np.random.default_rng(cfg.seed)
        means = rng.normal(size=(k, d))
        means -= means.mean(axis=0)
        gaps = np.linalg.norm(means[:, None, :] - means[None, :, :], axis=-1)[np.triu_indices(k, 1)]
        means *= CLASS_SEPARATION / gaps.mean()
        labels = rng.integers(0, k, size=n)
        group = np.where(rng.random(n) < cfg.sensitive_correlation, labels % 2, 1 - labels % 2)
        shift = np.zeros(d)
        shift[: (d + 1) // 2] = GROUP_SHIFT
        gaussian = means[labels] + group[:, None] * shift + rng.normal(size=(n, d))
        features = np.column_stack([gaussian, group]).astype(np.float32)
        numeric_mask = torch.ones(d + 1, dtype=torch.bool)
        numeric_mask[d] = False
        return LabeledData(
            name=self.name,
            features=torch.from_numpy(features),
            labels=torch.from_numpy(labels.astype(np.int64)),
            num_classes=k,
            input_shape=(d + 1,),
            numeric_mask=numeric_mask,
            sensitive=SensitiveAttribute(
                name=SENSITIVE_NAME,
                columns=[d],
                values=torch.tensor([[0.0], [1.0]]),
                value_names=["0", "1"],
                codes=torch.from_numpy(group.astype(np.int64)),
            ),
        )


def _check(cfg: DatasetConfig) -> None:
    if cfg.n_features < 1:
        raise UserError(f"dataset.n_features={cfg.n_features} must be at least 1")
    if cfg.n_classes < 2:
        raise UserError(f"dataset.n_classes={cfg.n_classes} must be at least 2")
    if cfg.n_samples < 1:
        raise UserError(f"dataset.n_samples={cfg.n_samples} must be positive")
    if not 0.0 <= cfg.sensitive_correlation <= 1.0:
        raise UserError(f"dataset.sensitive_correlation={cfg.sensitive_correlation} must be in [0, 1]")


SYNTHETIC = SyntheticDataset()
