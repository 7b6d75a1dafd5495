"""The ``csv`` dataset: a user's table, parsed with the csv module and validated cell by cell."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from dptrain.data.dataset import DatasetInfo, LabeledData, SensitiveAttribute
from dptrain.errors import UserError

if TYPE_CHECKING:
    from dptrain.config import DatasetConfig


@dataclass(frozen=True)
class _Column:
    """One feature column: numeric (``categories`` None, one input) or one-hot over sorted ``categories``."""

    name: str
    position: int
    categories: Optional[tuple[str, ...]]

    @property
    def width(self) -> int:
        return 1 if self.categories is None else len(self.categories)


@dataclass(frozen=True)
class _Table:
    rows: list[list[str]]
    columns: list[_Column]
    target_position: int
    classes: tuple[str, ...]

    @property
    def width(self) -> int:
        return sum(column.width for column in self.columns)


class CsvDataset:
    """A CSV file with a header row; every column but ``dataset.target`` is an input feature.

    The target's sorted unique values become class indices 0..k-1. Columns whose
    every cell is a finite number are numeric (standardized later); the others,
    those in ``dataset.categorical`` and ``dataset.sensitive`` are one-hot over
    their sorted values. Values sort numerically when all of them are numbers.
    """

    name = "csv"

    def describe(self, cfg: DatasetConfig) -> DatasetInfo:
        """Return the table's shape after reading and validating every row (no tensors are built)."""
        table = _read_table(cfg)
        return DatasetInfo(
            name=self.name,
            modality="tabular",
            input_shape=(table.width,),
            num_classes=len(table.classes),
            pool_size=len(table.rows),
            test_size=None,
            sensitive=cfg.sensitive,
        )

    def load(self, cfg: DatasetConfig) -> LabeledData:
        """Return the encoded table in file order, with the sensitive column's one-hot block as its attribute."""
        table = _read_table(cfg)
        blocks: list[np.ndarray] = []
        numeric: list[bool] = []
        sensitive = None
        offset = 0
        for column in table.columns:
            cells = [row[column.position] for row in table.rows]
            if column.categories is None:
                blocks.append(np.array([float(cell) for cell in cells])[:, None])
                numeric.append(True)
            else:
                lookup = {value: code for code, value in enumerate(column.categories)}
                codes = np.array([lookup[cell] for cell in cells], dtype=np.int64)
                blocks.append(np.eye(column.width)[codes])
                numeric.extend([False] * column.width)
                if column.name == cfg.sensitive:
                    sensitive = SensitiveAttribute(
                        name=column.name,
                        columns=list(range(offset, offset + column.width)),
                        values=torch.eye(column.width),
                        value_names=list(column.categories),
                        codes=torch.from_numpy(codes),
                    )
            offset += column.width
        class_index = {value: index for index, value in enumerate(table.classes)}
        labels = [class_index[row[table.target_position]] for row in table.rows]
        return LabeledData(
            name=self.name,
            features=torch.from_numpy(np.concatenate(blocks, axis=1).astype(np.float32)),
            labels=torch.tensor(labels, dtype=torch.int64),
            num_classes=len(table.classes),
            input_shape=(table.width,),
            numeric_mask=torch.tensor(numeric, dtype=torch.bool),
            sensitive=sensitive,
        )


def _read_table(cfg: DatasetConfig) -> _Table:
    """Return the parsed table, or raise a one-line UserError naming the config key or the bad cell."""
    if not cfg.path:
        raise UserError("dataset=csv needs dataset.path=<file.csv>: the path is not set")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"dataset.path={cfg.path} does not exist ({path.resolve()}); point it at a CSV file")
    if not path.is_file():
        raise UserError(f"dataset.path={cfg.path} is not a file; point it at a CSV file")
    header, rows, lines = _read_rows(path, cfg.path)
    listing = ", ".join(header)
    if not cfg.target:
        raise UserError(f"dataset=csv needs dataset.target=<label column>; columns of {cfg.path}: {listing}")
    if cfg.target not in header:
        raise UserError(f"dataset.target={cfg.target} is not a column of {cfg.path}; columns: {listing}")
    if cfg.sensitive is not None and cfg.sensitive not in header:
        raise UserError(f"dataset.sensitive={cfg.sensitive} is not a column of {cfg.path}; columns: {listing}")
    if cfg.sensitive == cfg.target:
        raise UserError(f"dataset.sensitive={cfg.sensitive} is the target column; name another column or unset it")
    for name in cfg.categorical:
        if name not in header:
            raise UserError(f"dataset.categorical entry {name} is not a column of {cfg.path}; columns: {listing}")
    if cfg.target in cfg.categorical:
        raise UserError(
            f"dataset.categorical lists the target {cfg.target}; the target always becomes class indices, remove it"
        )

    target_position = header.index(cfg.target)
    classes = _ordered({row[target_position] for row in rows})
    if len(classes) < 2:
        raise UserError(
            f"dataset.target={cfg.target} has the single value {classes[0]!r} in {cfg.path}; "
            "a classifier needs at least 2 classes"
        )
    forced = set(cfg.categorical) | ({cfg.sensitive} if cfg.sensitive is not None else set())
    columns = [
        _typed_column(name, position, rows, lines, forced_categorical=name in forced, path=cfg.path)
        for position, name in enumerate(header)
        if position != target_position
    ]
    return _Table(rows=rows, columns=columns, target_position=target_position, classes=classes)


def _read_rows(path: Path, shown: str) -> tuple[list[str], list[list[str]], list[int]]:
    """Return the header, the non-blank rows (cells stripped) and each row's line number in the file."""
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise UserError(f"dataset.path={shown} is empty; a CSV needs a header row and data rows")
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise UserError(
                        f"dataset.path={shown}: line {reader.line_num} has {len(row)} fields "
                        f"but the header has {len(header)}; fix that row"
                    )
                rows.append([cell.strip() for cell in row])
                lines.append(reader.line_num)
    except UnicodeDecodeError as error:
        raise UserError(f"dataset.path={shown} is not UTF-8 text ({error.reason}); re-save it as UTF-8 CSV") from error
    except csv.Error as error:
        raise UserError(f"dataset.path={shown} is not valid CSV ({error}); fix the file") from error
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise UserError(f"dataset.path={shown}: column {duplicates[0]} appears twice in the header; rename one")
    if not rows:
        raise UserError(f"dataset.path={shown} has a header but no data rows")
    for index, (row, line) in enumerate(zip(rows, lines)):
        for name, cell in zip(header, row):
            if not cell:
                raise UserError(
                    f"dataset.path={shown}: row {index + 1} (line {line}) has an empty {name} cell; "
                    "fill or drop that row (dptrain does not impute)"
                )
    return header, rows, lines


def _typed_column(
    name: str, position: int, rows: list[list[str]], lines: list[int], forced_categorical: bool, path: str
) -> _Column:
    """Return the column as numeric when every cell is a finite number, otherwise one-hot."""
    cells = [row[position] for row in rows]
    numbers = None if forced_categorical else _numbers(cells)
    if numbers is None:
        return _Column(name=name, position=position, categories=_ordered(set(cells)))
    for index, (number, line) in enumerate(zip(numbers, lines)):
        if not math.isfinite(number):
            raise UserError(
                f"dataset.path={path}: row {index + 1} (line {line}) has {cells[index]!r} in numeric column {name}; "
                "fill or drop that row (dptrain does not impute)"
            )
    return _Column(name=name, position=position, categories=None)


def _numbers(cells: list[str]) -> Optional[list[float]]:
    """Return every cell as a float, or None as soon as one is not a number."""
    try:
        return [float(cell) for cell in cells]
    except ValueError:
        return None


def _ordered(values: set[str]) -> tuple[str, ...]:
    """Return the values sorted numerically when all are finite numbers (so "10" follows "9"), else as text."""
    numbers = _numbers(list(values))
    if numbers is not None and all(math.isfinite(number) for number in numbers):
        return tuple(sorted(values, key=lambda value: (float(value), value)))
    return tuple(sorted(values))
