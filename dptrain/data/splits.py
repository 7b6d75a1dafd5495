"""Seeded, disjoint members / non-members / population / test splits, and their record in a run directory.

Members train the target model; non-members are an equally large held-out set
from the same pool (the membership audit's negatives); the population is a
third disjoint set for preprocessing statistics and audit reference models;
test measures utility (the official test set when the dataset has one).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from dptrain.data.dataset import DatasetInfo, LabeledData
from dptrain.errors import UserError
from dptrain.tracking.atomic import write_json_atomic

if TYPE_CHECKING:
    from dptrain.config import DatasetConfig

PARTS = ("members", "non_members", "population", "test")


@dataclass(frozen=True)
class SplitSizes:
    """How many records each part of a split holds; ``members == non_members`` always."""

    members: int
    non_members: int
    population: int
    test: int


def split_sizes(info: DatasetInfo, cfg: DatasetConfig) -> SplitSizes:
    """Return the sizes :func:`make_split` will draw for this dataset, or raise a UserError naming the key to change.

    test is the official test set, else ``round(test_fraction * pool)``;
    population is ``round(population_fraction * (pool - carved test))``; members
    and non-members each get half of the rest, at most ``max_members``.
    """
    return _sizes(info.name, info.pool_size, info.test_size, cfg)


def _sizes(name: str, pool: int, official_test: Optional[int], cfg: DatasetConfig) -> SplitSizes:
    for key in ("test_fraction", "population_fraction"):
        value = getattr(cfg, key)
        if not 0.0 < value < 1.0:
            raise UserError(f"dataset.{key}={value} must be strictly between 0 and 1")
    if cfg.max_members is not None and cfg.max_members < 2:
        raise UserError(f"dataset.max_members={cfg.max_members} must be at least 2 (or null for no cap)")
    test = official_test if official_test is not None else round(cfg.test_fraction * pool)
    remaining = pool if official_test is not None else pool - test
    population = round(cfg.population_fraction * remaining)
    members = (remaining - population) // 2
    if cfg.max_members is not None:
        members = min(members, cfg.max_members)
    if test < 1 or population < 1 or members < 2:
        raise UserError(
            f"dataset={name} has {pool} records in its pool, which leaves {test} test, {population} population "
            f"and {members} members; at least 1, 1 and 2 are needed: use a larger dataset or change "
            "dataset.test_fraction / dataset.population_fraction"
        )
    return SplitSizes(members=members, non_members=members, population=population, test=test)


@dataclass(eq=False)
class Split:
    """Indices into a dataset's canonical order, one sorted int64 array per part, pairwise disjoint.

    ``fingerprint`` is the :class:`LabeledData` fingerprint the indices refer
    to, so a later audit can refuse data that changed since the run.
    """

    members: np.ndarray
    non_members: np.ndarray
    population: np.ndarray
    test: np.ndarray
    seed: int
    dataset: str
    fingerprint: str

    @property
    def sizes(self) -> SplitSizes:
        return SplitSizes(**{part: len(getattr(self, part)) for part in PARTS})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the split as strict JSON, atomically; return the path written."""
        record: dict[str, Any] = {"dataset": self.dataset, "seed": self.seed, "fingerprint": self.fingerprint}
        record.update({part: getattr(self, part).tolist() for part in PARTS})
        return write_json_atomic(path, record)

    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: Optional[str] = None) -> Split:
        """Return the split saved at ``path``, or raise a UserError when it is unreadable, malformed,
        overlapping, or was made for other data than ``expected_fingerprint``.
        """
        path = Path(path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise UserError(f"split file {path} does not exist; point run_dir at a finished run") from error
        except (OSError, ValueError) as error:
            raise UserError(f"split file {path} is not readable JSON ({error}); restore it from the run") from error
        if not isinstance(record, dict):
            raise UserError(f"split file {path} is not a dptrain split (expected a JSON object)")
        for key, kind in (("dataset", str), ("seed", int), ("fingerprint", str)):
            if not isinstance(record.get(key), kind):
                raise UserError(
                    f"split file {path} is not a dptrain split: {key!r} is missing or not a {kind.__name__}"
                )
        parts = {}
        for part in PARTS:
            values = record.get(part)
            if not isinstance(values, list) or not all(isinstance(v, int) and v >= 0 for v in values):
                raise UserError(f"split file {path} is not a dptrain split: {part!r} must be a list of indices")
            parts[part] = np.array(sorted(values), dtype=np.int64)
        split = cls(**parts, seed=record["seed"], dataset=record["dataset"], fingerprint=record["fingerprint"])
        counted = sum(len(indices) for indices in parts.values())
        if len(np.unique(np.concatenate(list(parts.values())))) != counted:
            raise UserError(f"split file {path} is corrupt: its parts share records; restore it from the run")
        if expected_fingerprint is not None and split.fingerprint != expected_fingerprint:
            raise UserError(
                f"split file {path} was made for {split.dataset} data with fingerprint {split.fingerprint[:16]}, "
                f"but the data loaded now has {expected_fingerprint[:16]}; load the same dataset files and "
                "dataset.* settings the run used"
            )
        return split


def make_split(data: LabeledData, cfg: DatasetConfig) -> Split:
    """Return a split of ``data`` drawn with ``np.random.default_rng(cfg.seed)``.

    Guarantees: the four parts are pairwise disjoint, members and non-members
    have the same size, sizes follow :func:`split_sizes`, the official test set
    (when present) is the test part and is never drawn from, and the same seed
    and data give the same split.
    """
    official = data.official_test
    pool = np.arange(len(data), dtype=np.int64)
    if official is not None:
        pool = np.setdiff1d(pool, official)
    sizes = _sizes(data.name, len(pool), None if official is None else len(official), cfg)
    order = np.random.default_rng(cfg.seed).permutation(pool)
    if official is None:
        test, order = order[: sizes.test], order[sizes.test :]
    else:
        test = official
    population = order[: sizes.population]
    members = order[sizes.population : sizes.population + sizes.members]
    non_members = order[sizes.population + sizes.members : sizes.population + 2 * sizes.members]
    return Split(
        members=np.sort(members),
        non_members=np.sort(non_members),
        population=np.sort(population),
        test=np.sort(np.asarray(test, dtype=np.int64)),
        seed=cfg.seed,
        dataset=data.name,
        fingerprint=data.fingerprint,
    )
