"""The ``csv`` dataset: a user's table, read once per process into numpy columns and validated cell by cell."""

from __future__ import annotations

import csv
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from dptrain.data.dataset import DatasetInfo, LabeledData, SensitiveAttribute
from dptrain.errors import UserError

if TYPE_CHECKING:
    from dptrain.config import DatasetConfig

log = logging.getLogger(__name__)

# Rows turned into numpy columns at a time: the reader's Python strings never outnumber these.
CHUNK_ROWS = 16_384
# Files at least this large show a progress bar while they are read (on a terminal, with train.progress).
PROGRESS_BYTES = 8 * 2**20
# Models compute in float32: a larger magnitude would become inf there.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Classes and values shown in a message before "and N more".
SHOWN = 10


@dataclass(frozen=True)
class _ParsedColumn:
    """One column as read. ``numbers``: every cell as float64, NaN where it is not a finite number
    (``non_numeric`` such cells, the first at row ``first_non_numeric[0]``); ``codes`` index each
    cell's text in ``levels`` (first-seen order), or both are None when the column has more distinct
    values than the parse kept (``dataset.max_categories``; the target keeps all)."""

    name: str
    numbers: np.ndarray
    non_numeric: int
    first_non_numeric: Optional[tuple[int, str]]
    levels: Optional[tuple[str, ...]]
    codes: Optional[np.ndarray]


@dataclass(frozen=True)
class _ParsedTable:
    """A whole file: its header, each data row's line number in the file, and its columns by name."""

    header: tuple[str, ...]
    lines: np.ndarray
    columns: dict[str, _ParsedColumn]


@dataclass(frozen=True)
class _Feature:
    """One input column: numeric (``categories`` None, one input; ``values`` its numbers) or one-hot
    over sorted ``categories`` (``values`` each row's index into them)."""

    name: str
    categories: Optional[tuple[str, ...]]
    values: np.ndarray

    @property
    def width(self) -> int:
        return 1 if self.categories is None else len(self.categories)


@dataclass(frozen=True)
class _Table:
    features: list[_Feature]
    classes: tuple[str, ...]
    labels: np.ndarray

    @property
    def width(self) -> int:
        return sum(feature.width for feature in self.features)


class CsvDataset:
    """A CSV file with a header row; every column but ``dataset.target`` is an input feature.

    The target's sorted unique values become class indices 0..k-1; each class needs
    ``dataset.min_class_records`` records. A column whose cells are all finite numbers
    is numeric (standardized later); a column of mostly numbers with a few other cells
    is refused, naming the first of them. The other columns, those in
    ``dataset.categorical`` and ``dataset.sensitive`` are one-hot over their sorted
    values (numerically when all are numbers), at most ``dataset.max_categories`` of them.
    The file is parsed once per process (``_parsed``): ``describe`` during validation
    reads it, ``load`` reuses that parse.
    """

    name = "csv"

    def describe(self, cfg: DatasetConfig, progress: bool = False) -> DatasetInfo:
        """Return the table's shape after reading and validating every row (no tensors are built)."""
        table = _read_table(cfg, progress)
        return DatasetInfo(
            name=self.name,
            modality="tabular",
            input_shape=(table.width,),
            num_classes=len(table.classes),
            pool_size=len(table.labels),
            test_size=None,
            sensitive=cfg.sensitive,
        )

    def load(self, cfg: DatasetConfig, progress: bool = False) -> LabeledData:
        """Return the encoded table in file order, with the sensitive column's one-hot block as its attribute."""
        table = _read_table(cfg, progress)
        counts = np.bincount(table.labels, minlength=len(table.classes))
        log.info("dataset.target=%s: class counts %s", cfg.target, _listing(table.classes, counts))
        n = len(table.labels)
        features = np.zeros((n, table.width), dtype=np.float32)
        numeric: list[bool] = []
        sensitive = None
        offset = 0
        for feature in table.features:
            if feature.categories is None:
                features[:, offset] = feature.values
                numeric.append(True)
            else:
                features[np.arange(n), offset + feature.values] = 1.0
                numeric.extend([False] * feature.width)
                if feature.name == cfg.sensitive:
                    sensitive = SensitiveAttribute(
                        name=feature.name,
                        columns=list(range(offset, offset + feature.width)),
                        values=torch.eye(feature.width),
                        value_names=list(feature.categories),
                        codes=torch.from_numpy(feature.values),
                    )
            offset += feature.width
        return LabeledData(
            name=self.name,
            features=torch.from_numpy(features),
            labels=torch.from_numpy(table.labels),
            num_classes=len(table.classes),
            input_shape=(table.width,),
            numeric_mask=torch.tensor(numeric, dtype=torch.bool),
            sensitive=sensitive,
        )

    def data_files(self, cfg: DatasetConfig) -> tuple[Path, ...]:
        """The CSV file ``dataset.path``."""
        return (Path(cfg.path).expanduser().resolve(),)


def _read_table(cfg: DatasetConfig, progress: bool) -> _Table:
    """Return the typed table, or raise a one-line UserError naming the config key or the bad cell."""
    if not cfg.path:
        raise UserError("dataset=csv needs dataset.path=<file.csv>: the path is not set")
    for key in ("max_categories", "min_class_records"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"dataset.{key}={value} must be a positive integer")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"dataset.path={cfg.path} does not exist ({path.resolve()}); point it at a CSV file")
    if not path.is_file():
        raise UserError(f"dataset.path={cfg.path} is not a file; point it at a CSV file")
    # The header alone is enough to check the column names: a 50 MB file is not read for a typo.
    _check_columns(cfg, _read_header(path, cfg.path))
    table = _parsed(path, cfg.path, cfg.target, cfg.max_categories, progress)
    lines = table.lines

    target = table.columns[cfg.target]
    classes = _ordered(target.levels)
    ranks = {level: rank for rank, level in enumerate(classes)}
    labels = np.array([ranks[level] for level in target.levels], dtype=np.int64)[target.codes]
    if len(classes) < 2:
        raise UserError(
            f"dataset.target={cfg.target} has the single value {classes[0]!r} in {cfg.path}; "
            "a classifier needs at least 2 classes"
        )
    _check_class_sizes(cfg, classes, labels, lines)

    forced = {name: "listed in dataset.categorical" for name in cfg.categorical}
    if cfg.sensitive is not None:
        forced[cfg.sensitive] = "dataset.sensitive"
    features = [
        _feature(table.columns[name], forced.get(name), lines, cfg)
        for name in table.header
        if name != cfg.target
    ]
    return _Table(features=features, classes=classes, labels=labels)


def _check_columns(cfg: DatasetConfig, header: list[str]) -> None:
    """The configured target, sensitive and categorical columns exist and play one role each."""
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


def _check_class_sizes(cfg: DatasetConfig, classes: tuple[str, ...], labels: np.ndarray, lines: np.ndarray) -> None:
    """Refuse classes with fewer than ``dataset.min_class_records`` records: most often a stray label
    (``1.0`` among ``0`` / ``1``) that would silently become a class of its own."""
    counts = np.bincount(labels, minlength=len(classes))
    rare = np.flatnonzero(counts < cfg.min_class_records)
    if not rare.size:
        return
    first = int(np.flatnonzero(labels == rare[0])[0])
    by_number: dict[float, int] = {}
    for number in filter(math.isfinite, map(_number, classes)):
        by_number[number] = by_number.get(number, 0) + 1
    twins = [classes[index] for index in rare if by_number.get(_number(classes[index]), 0) > 1]
    hint = f" ({twins[0]!r} is the number of another class: write each label one way)" if twins else ""
    raise UserError(
        f"dataset.target={cfg.target} has {rare.size} class(es) with fewer than dataset.min_class_records="
        f"{cfg.min_class_records} records, the first {classes[rare[0]]!r} at row {first + 1} (line {lines[first]})"
        f"{hint}; class counts: {_listing(classes, counts)}; fix or drop those rows, or lower dataset.min_class_records"
    )


def _feature(column: _ParsedColumn, forced: Optional[str], lines: np.ndarray, cfg: DatasetConfig) -> _Feature:
    """Type one feature column: numeric when every cell is a number (and none is forced categorical),
    refused when most cells are numbers but some are not, else one-hot over its sorted values."""
    n = len(column.numbers)
    if forced is None and column.non_numeric == 0:
        too_large = np.flatnonzero(np.abs(column.numbers) > FLOAT32_MAX)
        if too_large.size:
            row = int(too_large[0])
            raise UserError(
                f"dataset.path={cfg.path}: row {row + 1} (line {lines[row]}) has {column.numbers[row]:g} in numeric "
                f"column {column.name}, beyond float32's range (±{FLOAT32_MAX:.4g}) that models compute in; "
                "rescale that column or drop the row"
            )
        return _Feature(name=column.name, categories=None, values=column.numbers)
    if forced is None and 2 * column.non_numeric < n:
        row, cell = column.first_non_numeric
        raise UserError(
            f"dataset.path={cfg.path}: row {row + 1} (line {lines[row]}) has {cell!r} in numeric column {column.name}"
            f" ({n - column.non_numeric} of its {n} cells are numbers{_decimal_comma_hint(cell)}); fix or drop that "
            f"row (dptrain does not impute), or list {column.name} in dataset.categorical to one-hot encode it"
        )
    if column.levels is None:
        if forced == "dataset.sensitive":
            fix = "or name a categorical column as dataset.sensitive"
        elif forced is not None:
            fix = f"or remove {column.name} from dataset.categorical to use it as a number"
        else:
            row, cell = column.first_non_numeric
            fix = (
                f"or, if it holds numbers, fix its other cells (the first: {cell!r} at row {row + 1}, "
                f"line {lines[row]})"
            )
        why = f"{forced}, " if forced is not None else ""
        raise UserError(
            f"dataset.path={cfg.path}: column {column.name} ({why}one-hot encoded) has more than "
            f"dataset.max_categories={cfg.max_categories} distinct values; raise dataset.max_categories {fix}"
        )
    categories = _ordered(column.levels)
    ranks = {level: rank for rank, level in enumerate(categories)}
    codes = np.array([ranks[level] for level in column.levels], dtype=np.int64)[column.codes]
    return _Feature(name=column.name, categories=categories, values=codes)


def _decimal_comma_hint(cell: str) -> str:
    return f"; a decimal comma? write {cell.replace(',', '.')}" if re.fullmatch(r"[+-]?\d+,\d+", cell) else ""


def _listing(values: tuple[str, ...], counts: np.ndarray) -> str:
    """``'a' 12, 'b' 3``, the first SHOWN values, then how many more."""
    shown = ", ".join(f"{value!r} {count}" for value, count in zip(values[:SHOWN], counts[:SHOWN]))
    return shown + (f" and {len(values) - SHOWN} more" if len(values) > SHOWN else "")


def _read_header(path: Path, shown: str) -> list[str]:
    with _file_errors(shown):
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _header(csv.reader(handle), shown)


def _header(reader, shown: str) -> list[str]:
    header = [name.strip() for name in next(reader, [])]
    if not header:
        raise UserError(f"dataset.path={shown} is empty; a CSV needs a header row and data rows")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise UserError(f"dataset.path={shown}: column {duplicates[0]} appears twice in the header; rename one")
    return header


@contextmanager
def _file_errors(shown: str) -> Iterator[None]:
    """Turn the reader's decoding and CSV-syntax errors into one-line UserErrors naming the file."""
    try:
        yield
    except UnicodeDecodeError as error:
        raise UserError(f"dataset.path={shown} is not UTF-8 text ({error.reason}); re-save it as UTF-8 CSV") from error
    except csv.Error as error:
        raise UserError(f"dataset.path={shown} is not valid CSV ({error}); fix the file") from error


# The last table parsed in this process, keyed as in ``_parsed``: one entry, so a sweep over
# several files holds one of them at a time.
_cache: dict[tuple, _ParsedTable] = {}


def _parsed(path: Path, shown: str, target: str, max_categories: int, progress: bool) -> _ParsedTable:
    """Return the table in ``path``, parsed once per process: cached by the file's resolved path,
    size and modification time and the keys that shape the parse (the target, whose values are all
    kept, and ``max_categories``, beyond which a column's values are not). A rewritten file is read again."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, target, max_categories)
    if key not in _cache:
        table = _parse(path, shown, target, max_categories, progress and stat.st_size >= PROGRESS_BYTES)
        _cache.clear()
        _cache[key] = table
    return _cache[key]


def _parse(path: Path, shown: str, target: str, max_categories: int, progress: bool) -> _ParsedTable:
    """Read every non-blank row (cells stripped), CHUNK_ROWS at a time, into per-column numpy arrays."""
    bar = tqdm(
        total=path.stat().st_size,
        unit="B",
        unit_scale=True,
        desc=f"reading {path.name}",
        leave=False,
        # None: shown on a terminal only.
        disable=None if progress else True,
    )
    with _file_errors(shown), bar, path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = _header(reader, shown)
        columns = [_ColumnReader(name, None if name == target else max_categories) for name in header]
        lines: list[np.ndarray] = []
        rows, row_lines, start = [], [], 0
        for row in reader:
            cells = list(map(str.strip, row))
            if not any(cells):
                continue
            if len(cells) != len(header):
                raise UserError(
                    f"dataset.path={shown}: line {reader.line_num} has {len(cells)} fields "
                    f"but the header has {len(header)}; fix that row"
                )
            rows.append(cells)
            row_lines.append(reader.line_num)
            if len(rows) == CHUNK_ROWS:
                lines.append(_add_rows(columns, rows, np.array(row_lines), start, shown))
                rows, row_lines, start = [], [], start + len(rows)
                bar.update(handle.buffer.tell() - bar.n)
        if rows:
            lines.append(_add_rows(columns, rows, np.array(row_lines), start, shown))
    if not lines:
        raise UserError(f"dataset.path={shown} has a header but no data rows")
    return _ParsedTable(
        header=tuple(header),
        lines=np.concatenate(lines),
        columns={column.name: column.finish() for column in columns},
    )


def _add_rows(
    columns: list[_ColumnReader], rows: list[list[str]], lines: np.ndarray, start: int, shown: str
) -> np.ndarray:
    """Append a chunk of rows, data rows ``start``, ``start + 1``, ..., to the columns; return their
    line numbers. An empty cell is refused, the first in file order named."""
    by_column = list(zip(*rows))
    empty = [(cells.index(""), position) for position, cells in enumerate(by_column) if "" in cells]
    if empty:
        row, position = min(empty)
        raise UserError(
            f"dataset.path={shown}: row {start + row + 1} (line {lines[row]}) has an empty {columns[position].name} "
            "cell; fill or drop that row (dptrain does not impute)"
        )
    for column, cells in zip(columns, by_column):
        column.add(cells, start)
    return lines


class _ColumnReader:
    """Builds a ``_ParsedColumn`` chunk by chunk; ``max_levels`` None keeps every distinct value."""

    def __init__(self, name: str, max_levels: Optional[int]):
        self.name = name
        self.max_levels = max_levels
        self.numbers: list[np.ndarray] = []
        self.non_numeric = 0
        self.first_non_numeric: Optional[tuple[int, str]] = None
        self.lookup: Optional[dict[str, int]] = {}
        self.codes: list[np.ndarray] = []
        self.level_numbers: list[float] = []

    def add(self, cells: tuple[str, ...], start: int) -> None:
        numbers = None
        if self.lookup is not None:
            lookup = self.lookup
            # New values in first-seen order (dict.fromkeys keeps it).
            new_levels = [level for level in dict.fromkeys(cells) if level not in lookup]
            if self.max_levels is not None and len(lookup) + len(new_levels) > self.max_levels:
                # Too many values to one-hot: only the numbers can still matter.
                self.lookup, self.codes = None, []
            else:
                lookup.update(zip(new_levels, range(len(lookup), len(lookup) + len(new_levels))))
                codes = np.fromiter(map(lookup.__getitem__, cells), np.int32, len(cells))
                self.codes.append(codes)
                self.level_numbers.extend(map(_number, new_levels))
                # Each distinct value is parsed once, not once per cell.
                numbers = np.asarray(self.level_numbers)[codes]
        if numbers is None:
            numbers = _numbers(cells)
        bad = np.flatnonzero(~np.isfinite(numbers))
        if bad.size:
            numbers[bad] = np.nan
            if self.first_non_numeric is None:
                self.first_non_numeric = (start + int(bad[0]), cells[bad[0]])
            self.non_numeric += bad.size
        self.numbers.append(numbers)

    def finish(self) -> _ParsedColumn:
        kept = self.lookup is not None
        return _ParsedColumn(
            name=self.name,
            numbers=np.concatenate(self.numbers),
            non_numeric=self.non_numeric,
            first_non_numeric=self.first_non_numeric,
            levels=tuple(self.lookup) if kept else None,
            codes=np.concatenate(self.codes) if kept else None,
        )


def _number(cell: str) -> float:
    """The cell as a float (Python's syntax), NaN when it is not one."""
    try:
        return float(cell)
    except ValueError:
        return math.nan


def _numbers(cells: tuple[str, ...]) -> np.ndarray:
    """The cells as float64, NaN where a cell is not a number (numpy's parse first: it is much faster)."""
    try:
        return np.array(cells, dtype=np.float64)
    except ValueError:
        return np.array([_number(cell) for cell in cells], dtype=np.float64)


def _ordered(values: tuple[str, ...]) -> tuple[str, ...]:
    """Return the values sorted numerically when all are finite numbers (so "10" follows "9"), else as text."""
    numbers = [_number(value) for value in values]
    if all(math.isfinite(number) for number in numbers):
        return tuple(value for _, value in sorted(zip(numbers, values)))
    return tuple(sorted(values))
