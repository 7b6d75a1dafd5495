"""Specifications of dptrain.data: loaders, splits, population-only preprocessing, client partitions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dptrain.config import DatasetConfig
from dptrain.data import (
    DATASETS,
    Split,
    SplitSizes,
    describe,
    dirichlet_partition,
    iid_partition,
    load,
    make_split,
    prepare,
    split_sizes,
)
from dptrain.errors import UserError


def _assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def _assert_matches_description(cfg: DatasetConfig) -> None:
    info = describe(cfg)
    data = load(cfg)
    assert tuple(data.features.shape) == (info.pool_size + (info.test_size or 0), *info.input_shape)
    assert data.features.dtype == torch.float32 and data.labels.dtype == torch.int64
    assert data.num_classes == info.num_classes
    assert set(data.labels.tolist()) == set(range(info.num_classes))
    assert (data.sensitive.name if data.sensitive else None) == info.sensitive


# --- embedded and synthetic datasets ---------------------------------------------------------------


def test_digits_are_8x8_single_channel_images_in_unit_range_all_numeric():
    cfg = DatasetConfig(name="digits")
    _assert_matches_description(cfg)
    data = load(cfg)
    assert describe(cfg).modality == "image"
    assert data.input_shape == (1, 8, 8) and len(data) == 1797
    assert data.features.min() == 0.0 and data.features.max() == 1.0
    assert data.numeric_mask.shape == (64,) and bool(data.numeric_mask.all())
    assert data.official_test is None


def test_breast_cancer_is_a_30_feature_binary_table():
    cfg = DatasetConfig(name="breast_cancer")
    _assert_matches_description(cfg)
    info = describe(cfg)
    assert (info.modality, info.input_shape, info.num_classes, info.pool_size) == ("tabular", (30,), 2, 569)


def test_synthetic_matches_its_description_and_a_seed_names_one_table():
    cfg = DatasetConfig(name="synthetic", n_samples=500, n_features=6, n_classes=3)
    _assert_matches_description(cfg)
    assert describe(cfg).input_shape == (7,)
    assert load(cfg).fingerprint == load(cfg).fingerprint
    assert load(dataclasses.replace(cfg, seed=1)).fingerprint != load(cfg).fingerprint


def test_synthetic_group_is_an_unstandardized_input_column_correlated_with_the_label():
    data = load(DatasetConfig(name="synthetic", n_samples=4000, sensitive_correlation=0.8))
    group = data.sensitive
    assert group.name == "group" and group.value_names == ["0", "1"]
    column = group.columns[0]
    assert torch.equal(data.features[:, column], group.codes.float())
    assert torch.equal(group.values[group.codes], data.features[:, group.columns])
    assert not bool(data.numeric_mask[column])
    agreement = (group.codes == data.labels % 2).float().mean().item()
    assert agreement == pytest.approx(0.8, abs=0.03)


def test_synthetic_defaults_are_learnable_and_the_model_reads_the_group():
    from sklearn.linear_model import LogisticRegression

    data = load(DatasetConfig(name="synthetic"))
    x, y = data.features.numpy(), data.labels.numpy()
    model = LogisticRegression(max_iter=1000).fit(x[:3000], y[:3000])
    assert 0.78 <= model.score(x[3000:], y[3000:]) <= 0.95
    flipped = x[3000:].copy()
    column = data.sensitive.columns[0]
    flipped[:, column] = 1.0 - flipped[:, column]
    changed = (model.predict(flipped) != model.predict(x[3000:])).mean()
    assert changed > 0.1


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(UserError) as error:
        describe(DatasetConfig(name="imagenet"))
    _assert_one_line(error, "dataset=imagenet", *DATASETS)


# --- csv ----------------------------------------------------------------------------------------------


def _write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


CSV_TEXT = """age, city, grade, sex, income
30, paris, 9, f, high
41, lyon, 10, m, low
25, paris, 2, m, low
38, nice, 9, f, high
"""


def test_csv_encodes_numeric_columns_raw_and_the_rest_one_hot_over_sorted_values(tmp_path):
    path = _write_csv(tmp_path / "people.csv", CSV_TEXT)
    cfg = DatasetConfig(
        name="csv", path=path, target="income", sensitive="sex", categorical=["grade"], min_class_records=2
    )
    _assert_matches_description(cfg)
    data = load(cfg)
    # age | city: lyon nice paris | grade: 2 9 10 (numeric order) | sex: f m
    assert data.input_shape == (1 + 3 + 3 + 2,)
    assert data.features[1].tolist() == [41, 1, 0, 0, 0, 0, 1, 0, 1]
    assert data.features[2].tolist() == [25, 0, 0, 1, 1, 0, 0, 0, 1]
    assert data.numeric_mask.tolist() == [True] + [False] * 8
    assert data.labels.tolist() == [0, 1, 1, 0]  # classes sorted: high=0, low=1
    sex = data.sensitive
    assert (sex.name, sex.columns, sex.value_names) == ("sex", [7, 8], ["f", "m"])
    assert sex.codes.tolist() == [0, 1, 1, 0]
    assert torch.equal(sex.values, torch.eye(2))


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"path": None}, ["dataset.path", "not set"]),
        ({"path": "missing.csv"}, ["dataset.path=missing.csv", "does not exist"]),
        ({"path": "."}, ["dataset.path=.", "not a file"]),
        ({"target": None}, ["dataset.target", "age, city, grade, sex, income"]),
        ({"target": "salary"}, ["dataset.target=salary", "age, city, grade, sex, income"]),
        ({"sensitive": "gender"}, ["dataset.sensitive=gender", "columns: age"]),
        ({"categorical": ["zip"]}, ["dataset.categorical", "zip", "columns: age"]),
    ],
)
def test_csv_config_errors_name_the_key_and_the_fix(tmp_path, monkeypatch, overrides, fragments):
    monkeypatch.chdir(tmp_path)
    path = _write_csv(tmp_path / "people.csv", CSV_TEXT)
    cfg = dataclasses.replace(DatasetConfig(name="csv", path=path, target="income"), **overrides)
    with pytest.raises(UserError) as error:
        describe(cfg)
    _assert_one_line(error, *fragments)


def test_csv_empty_cell_names_the_row_and_column(tmp_path):
    path = _write_csv(tmp_path / "gap.csv", "a,b,y\n1,2,0\n3,,1\n")
    with pytest.raises(UserError) as error:
        load(DatasetConfig(name="csv", path=path, target="y"))
    _assert_one_line(error, "row 2", "line 3", "empty b cell")


def test_csv_ragged_row_names_its_line(tmp_path):
    path = _write_csv(tmp_path / "ragged.csv", "a,b,y\n1,2,0\n3,1\n")
    with pytest.raises(UserError) as error:
        describe(DatasetConfig(name="csv", path=path, target="y"))
    _assert_one_line(error, "line 3", "2 fields", "header has 3")


def _numeric_table(path: Path, rows: int = 40, **replace: str) -> str:
    """Columns x (distinct floats), k (0..4) and a balanced label y; ``replace`` maps "column:row" (1-based)
    to a cell's text."""
    lines = ["x,k,y"]
    for row in range(1, rows + 1):
        cells = {"x": f"{row * 0.37:.2f}", "k": str(row % 5), "y": str(row % 2)}
        for where, text in replace.items():
            column, at = where.split(":")
            if int(at) == row:
                cells[column] = text
        lines.append(",".join(cells.values()))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("cell", "fragments"),
    [
        ("abc", ["row 7 (line 8)", "'abc' in numeric column x", "39 of its 40 cells are numbers", "dataset.categorical"]),
        ('"1,5"', ["row 7 (line 8)", "'1,5' in numeric column x", "a decimal comma? write 1.5"]),
        ("nan", ["row 7 (line 8)", "'nan' in numeric column x"]),
    ],
)
def test_csv_a_bad_cell_in_a_numeric_column_is_an_error_naming_it_not_hundreds_of_one_hot_columns(
    tmp_path, cell, fragments
):
    path = _numeric_table(tmp_path / "junk.csv", **{"x:7": cell})
    with pytest.raises(UserError) as error:
        describe(DatasetConfig(name="csv", path=path, target="y"))
    _assert_one_line(error, f"dataset.path={path}", *fragments)


def test_csv_rows_read_in_chunks_give_the_same_table_and_name_bad_cells_by_their_own_row(tmp_path, monkeypatch):
    from dptrain.data import csv_table

    path = _numeric_table(tmp_path / "table.csv")
    whole = load(DatasetConfig(name="csv", path=path, target="y"))
    monkeypatch.setattr(csv_table, "CHUNK_ROWS", 3)
    monkeypatch.setattr(csv_table, "_cache", {})
    chunked = load(DatasetConfig(name="csv", path=path, target="y"))
    assert torch.equal(chunked.features, whole.features) and torch.equal(chunked.labels, whole.labels)
    junk = _numeric_table(tmp_path / "junk.csv", **{"x:3": "12.0.1", "x:32": "abc"})
    with pytest.raises(UserError) as error:
        describe(DatasetConfig(name="csv", path=junk, target="y"))
    _assert_one_line(error, "row 3 (line 4)", "'12.0.1'", "38 of its 40 cells")
    empty = _numeric_table(tmp_path / "empty.csv", **{"k:20": "", "x:21": ""})
    with pytest.raises(UserError) as error:
        describe(DatasetConfig(name="csv", path=empty, target="y"))
    _assert_one_line(error, "row 20 (line 21)", "empty k cell")


def test_csv_text_column_with_more_values_than_max_categories_is_refused_with_the_fixes(tmp_path):
    rows = "".join(f"id{i},{i % 2}\n" for i in range(60))
    path = _write_csv(tmp_path / "ids.csv", "customer,y\n" + rows)
    with pytest.raises(UserError) as error:
        describe(DatasetConfig(name="csv", path=path, target="y"))
    _assert_one_line(error, "column customer", "more than dataset.max_categories=50", "raise dataset.max_categories")
    assert describe(DatasetConfig(name="csv", path=path, target="y", max_categories=60)).input_shape == (60,)


def test_csv_categorical_or_sensitive_column_over_the_limit_is_refused_with_its_fix(tmp_path):
    path = _numeric_table(tmp_path / "table.csv")
    cfg = DatasetConfig(name="csv", path=path, target="y", categorical=["x"], max_categories=30)
    with pytest.raises(UserError) as error:
        describe(cfg)
    _assert_one_line(
        error, "column x (listed in dataset.categorical", "dataset.max_categories=30", "remove x from dataset.categorical"
    )
    with pytest.raises(UserError) as error:
        describe(dataclasses.replace(cfg, categorical=[], sensitive="x"))
    _assert_one_line(error, "column x (dataset.sensitive", "name a categorical column as dataset.sensitive")
    # k has 5 values: within the limit, one-hot over 0..4 next to x.
    assert describe(dataclasses.replace(cfg, categorical=["k"])).input_shape == (1 + 5,)


@pytest.mark.parametrize("key", ["max_categories", "min_class_records"])
def test_csv_limits_must_be_positive(tmp_path, key):
    path = _numeric_table(tmp_path / "table.csv")
    with pytest.raises(UserError) as error:
        describe(DatasetConfig(name="csv", path=path, target="y", **{key: 0}))
    _assert_one_line(error, f"dataset.{key}=0 must be a positive integer")


def test_csv_stray_target_value_is_refused_listing_the_class_counts(tmp_path):
    path = _numeric_table(tmp_path / "labels.csv", **{"y:9": "1.0"})
    with pytest.raises(UserError) as error:
        describe(DatasetConfig(name="csv", path=path, target="y"))
    _assert_one_line(
        error,
        "dataset.target=y has 1 class(es) with fewer than dataset.min_class_records=10 records",
        "the first '1.0' at row 9 (line 10)",
        "'1.0' is the number of another class",
        "class counts: '0' 20, '1' 19, '1.0' 1",
        "lower dataset.min_class_records",
    )
    assert describe(DatasetConfig(name="csv", path=path, target="y", min_class_records=1)).num_classes == 3


def test_csv_load_logs_the_class_counts(tmp_path, caplog):
    path = _numeric_table(tmp_path / "table.csv")
    with caplog.at_level("INFO", logger="dptrain.data.csv_table"):
        load(DatasetConfig(name="csv", path=path, target="y"))
    assert "dataset.target=y: class counts '0' 20, '1' 20" in caplog.text


def test_csv_value_beyond_float32_range_is_refused_naming_row_and_column(tmp_path):
    path = _numeric_table(tmp_path / "huge.csv", **{"x:5": "1e308"})
    with pytest.raises(UserError) as error:
        describe(DatasetConfig(name="csv", path=path, target="y"))
    _assert_one_line(error, "row 5 (line 6)", "1e+308 in numeric column x", "beyond float32's range")


def test_csv_is_parsed_once_per_process_until_the_file_changes(tmp_path, monkeypatch):
    from dptrain.data import csv_table

    readers = []
    real_reader = csv_table.csv.reader

    def counted(handle, *args, **kwargs):
        reader = real_reader(handle, *args, **kwargs)
        readers.append(reader)
        return reader

    monkeypatch.setattr(csv_table.csv, "reader", counted)
    path = _numeric_table(tmp_path / "table.csv")
    cfg = DatasetConfig(name="csv", path=path, target="y")
    describe(cfg)
    load(cfg)
    # A reader that went past the header read the rows: exactly one did.
    assert sum(reader.line_num > 1 for reader in readers) == 1
    _numeric_table(tmp_path / "table.csv", rows=50)
    assert len(load(cfg)) == 50
    assert sum(reader.line_num > 1 for reader in readers) == 2


def test_csv_unicode_column_names_work_through_compose_with_quoted_overrides(tmp_path, tiny_config):
    path = _write_csv(
        tmp_path / "people.csv",
        "größe,ville é,état\n" + "".join(f"{150 + i},{'paris' if i % 3 else 'nîmes'},{i % 2}\n" for i in range(40)),
    )
    # The quotes are Hydra's (its unquoted values are ASCII); in a shell, protect them: "dataset.target='état'".
    cfg = tiny_config("dataset=csv", f"dataset.path={path}", "dataset.target='état'", "dataset.sensitive='ville é'")
    data = load(cfg.dataset)
    assert data.input_shape == (3,) and data.sensitive.value_names == ["nîmes", "paris"]
    assert data.features[0].tolist() == [150, 1, 0]


# --- torchvision datasets, on tiny files in each dataset's own format -----------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (the MNIST format): magic 0x0000 08 <ndim>, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist_like(raw: Path, train: int, test: int) -> tuple[np.ndarray, np.ndarray]:
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(train + test, 28, 28), dtype=np.uint8)
    labels = np.arange(train + test, dtype=np.uint8) % 10
    for prefix, rows in (("train", slice(0, train)), ("t10k", slice(train, None))):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[rows])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[rows])
    return images, labels


@pytest.mark.parametrize(
    ("name", "folder", "mean", "std"),
    [("mnist", "MNIST", 0.1307, 0.3081), ("fashion_mnist", "FashionMNIST", 0.2860, 0.3530)],
)
def test_mnist_like_loads_official_train_then_test_normalized_with_published_constants(
    tmp_path, name, folder, mean, std
):
    pytest.importorskip("torchvision")
    images, labels = _write_mnist_like(tmp_path / folder / "raw", train=12, test=5)
    cfg = DatasetConfig(name=name, root=str(tmp_path))
    assert describe(cfg).input_shape == (1, 28, 28)
    data = load(cfg)
    assert data.features.shape == (17, 1, 28, 28)
    assert data.labels.tolist() == labels.tolist()
    expected = (torch.from_numpy(images).float() / 255 - mean) / std
    torch.testing.assert_close(data.features[:, 0], expected)
    assert data.official_test.tolist() == list(range(12, 17))
    assert data.numeric_mask is None
    split = make_split(data, dataclasses.replace(cfg, population_fraction=0.25))
    assert split.test.tolist() == list(range(12, 17))
    assert split.sizes == SplitSizes(members=4, non_members=4, population=3, test=5)


def test_cifar10_loads_pickled_batches_channel_first(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    # Each image is constant per channel (R=0, G=255, B=label*20) in CIFAR's row
    # layout (1024 red, then 1024 green, then 1024 blue bytes), so a wrong
    # channel order shows up in the values.
    def batch(labels: list[int]) -> dict:
        rows = [np.concatenate([np.zeros(1024), np.full(1024, 255), np.full(1024, 20 * y)]) for y in labels]
        return {"data": np.array(rows, dtype=np.uint8), "labels": labels}

    batches = {f"data_batch_{i}": batch([i, (i + 5) % 10]) for i in range(1, 6)}
    batches["test_batch"] = batch([0, 3, 6])
    batches["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)]}
    for file_name, content in batches.items():
        (folder / file_name).write_bytes(pickle.dumps(content))

    # torchvision checks every CIFAR file against the md5 of the real release,
    # which stand-in files cannot match. Pointing the class's checksum table at
    # the stand-ins' own md5 keeps that integrity check running (monkeypatch
    # restores the table after the test) without touching dptrain's code path.
    def md5(file_name: str) -> str:
        return hashlib.md5((folder / file_name).read_bytes()).hexdigest()

    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cifar, "train_list", [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(cifar, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": md5("batches.meta")})

    data = load(DatasetConfig(name="cifar10", root=str(tmp_path)))
    assert data.features.shape == (13, 3, 32, 32)
    assert data.labels.tolist() == [1, 6, 2, 7, 3, 8, 4, 9, 5, 0, 0, 3, 6]
    assert data.official_test.tolist() == [10, 11, 12]
    pixel = data.features[12, :, 5, 7]
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    torch.testing.assert_close(pixel, (torch.tensor([0.0, 255.0, 120.0]) / 255 - mean) / std)


@pytest.mark.parametrize(
    ("name", "folder"),
    [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"), ("cifar10", "cifar-10-batches-py")],
)
def test_missing_vision_files_say_where_they_were_searched_and_how_to_fix_it(tmp_path, name, folder):
    cfg = DatasetConfig(name=name, root=str(tmp_path), download=False)
    for call in (describe, load):
        with pytest.raises(UserError) as error:
            call(cfg)
        searched = str(tmp_path.resolve() / folder)
        _assert_one_line(error, f"dataset={name}", searched, "dataset.root=", "dataset.download=true")


def test_vision_dataset_without_torchvision_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    for call in (describe, load):
        with pytest.raises(UserError) as error:
            call(DatasetConfig(name="mnist"))
        _assert_one_line(error, "dataset=mnist needs torchvision", "pip install 'dptrain[vision]'")


# --- splits -------------------------------------------------------------------------------------------


def test_split_sizes_carve_test_then_population_then_equal_members_and_non_members():
    info = describe(DatasetConfig(name="digits"))
    # 1797: test round(0.2*1797)=359, population round(0.25*1438)=360, members (1438-360)//2=539
    cfg = DatasetConfig(name="digits", test_fraction=0.2, population_fraction=0.25)
    assert split_sizes(info, cfg) == SplitSizes(members=539, non_members=539, population=360, test=359)
    capped = dataclasses.replace(cfg, max_members=100)
    assert split_sizes(info, capped) == SplitSizes(members=100, non_members=100, population=360, test=359)


def test_split_sizes_with_an_official_test_set_draw_everything_else_from_the_pool():
    with_official = dataclasses.replace(describe(DatasetConfig(name="digits")), pool_size=60000, test_size=10000)
    assert split_sizes(with_official, DatasetConfig(population_fraction=0.2)) == SplitSizes(24000, 24000, 12000, 10000)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"test_fraction": 0.0}, "dataset.test_fraction=0.0"),
        ({"population_fraction": 1.0}, "dataset.population_fraction=1.0"),
        ({"max_members": 1}, "dataset.max_members=1"),
        ({"name": "synthetic", "n_samples": 5}, "dataset=synthetic has 5 records"),
    ],
)
def test_split_sizes_reject_bad_fractions_and_too_small_datasets(overrides, fragment):
    cfg = dataclasses.replace(DatasetConfig(name="digits"), **overrides)
    with pytest.raises(UserError) as error:
        split_sizes(describe(cfg), cfg)
    _assert_one_line(error, fragment)


@pytest.fixture(scope="module")
def synthetic_data():
    return load(DatasetConfig(name="synthetic", n_samples=600, n_features=4))


def test_split_parts_are_disjoint_sized_as_promised_and_sorted(synthetic_data):
    cfg = DatasetConfig(name="synthetic", n_samples=600, n_features=4)
    split = make_split(synthetic_data, cfg)
    assert split.sizes == split_sizes(describe(cfg), cfg)
    parts = [split.members, split.non_members, split.population, split.test]
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything)
    assert all(part.dtype == np.int64 and np.all(np.diff(part) > 0) for part in parts)
    assert (split.dataset, split.fingerprint) == ("synthetic", synthetic_data.fingerprint)


def test_split_is_determined_by_the_seed(synthetic_data):
    cfg = DatasetConfig(name="synthetic", n_samples=600, n_features=4)
    first, again = make_split(synthetic_data, cfg), make_split(synthetic_data, cfg)
    other = make_split(synthetic_data, dataclasses.replace(cfg, seed=1))
    assert np.array_equal(first.members, again.members) and np.array_equal(first.test, again.test)
    assert not np.array_equal(first.members, other.members)


def test_split_round_trips_through_json_and_refuses_other_data(tmp_path, synthetic_data):
    split = make_split(synthetic_data, DatasetConfig(name="synthetic", seed=3))
    path = split.save(tmp_path / "run" / "split.json")
    assert json.loads(path.read_text())["seed"] == 3
    restored = Split.load(path, expected_fingerprint=synthetic_data.fingerprint)
    for part in ("members", "non_members", "population", "test"):
        assert np.array_equal(getattr(restored, part), getattr(split, part))
    assert (restored.seed, restored.dataset, restored.fingerprint) == (3, "synthetic", split.fingerprint)
    with pytest.raises(UserError) as error:
        Split.load(path, expected_fingerprint="0" * 64)
    _assert_one_line(error, str(path), split.fingerprint[:16], "0" * 16)


def test_split_load_rejects_overlapping_parts(tmp_path, synthetic_data):
    record = json.loads(make_split(synthetic_data, DatasetConfig()).save(tmp_path / "split.json").read_text())
    record["non_members"].append(record["members"][0])
    (tmp_path / "split.json").write_text(json.dumps(record))
    with pytest.raises(UserError) as error:
        Split.load(tmp_path / "split.json")
    _assert_one_line(error, "share records")


# --- preprocessing ------------------------------------------------------------------------------------


def test_prepare_standardizes_with_population_statistics_only(synthetic_data):
    cfg = DatasetConfig(name="synthetic", n_samples=600, n_features=4)
    split = make_split(synthetic_data, cfg)
    # Column 0 is 0 outside the population and 0, 1, 2, ... on it; column 1 is
    # constant. Member statistics would map members' column 0 to 0, pooled
    # statistics to another value: only population statistics give -mean/std.
    features = synthetic_data.features.clone()
    features[:, 0] = 0.0
    features[torch.from_numpy(split.population), 0] = torch.arange(len(split.population), dtype=torch.float32)
    features[:, 1] = 3.0
    data = dataclasses.replace(synthetic_data, features=features)
    resplit = make_split(data, cfg)
    assert np.array_equal(resplit.population, split.population)
    prepared = prepare(data, resplit)
    ranks = np.arange(len(split.population), dtype=np.float64)
    expected = float(-ranks.mean() / ranks.std())
    members_x = prepared.members.tensors[0]
    torch.testing.assert_close(members_x[:, 0], torch.full((len(split.members),), expected))
    assert torch.equal(members_x[:, 1], torch.zeros(len(split.members)))
    population_x = prepared.population.tensors[0]
    assert population_x[:, 2].mean().abs() < 1e-5 and (population_x[:, 2].std(unbiased=False) - 1).abs() < 1e-4


def test_prepare_keeps_the_sensitive_columns_and_labels_as_loaded(synthetic_data):
    split = make_split(synthetic_data, DatasetConfig())
    prepared = prepare(synthetic_data, split)
    column = synthetic_data.sensitive.columns[0]
    members_x, members_y = prepared.members.tensors
    rows = torch.from_numpy(split.members)
    assert torch.equal(members_x[:, column], synthetic_data.sensitive.codes[rows].float())
    assert torch.equal(members_y, synthetic_data.labels[rows])
    assert len(prepared.test) == len(split.test) and prepared.input_shape == synthetic_data.input_shape


def test_prepare_refuses_a_split_made_for_other_data(synthetic_data):
    other = load(DatasetConfig(name="synthetic", n_samples=600, n_features=4, seed=9))
    with pytest.raises(UserError) as error:
        prepare(other, make_split(synthetic_data, DatasetConfig()))
    _assert_one_line(error, "fingerprint")


# --- client partitions --------------------------------------------------------------------------------


def _covers_exactly_once(parts: list[np.ndarray], n: int) -> bool:
    covered = np.sort(np.concatenate(parts))
    return all(part.dtype == np.int64 for part in parts) and np.array_equal(covered, np.arange(n))


def test_iid_partition_covers_every_record_once_in_balanced_parts():
    parts = iid_partition(103, clients=10, seed=0)
    assert _covers_exactly_once(parts, 103)
    assert {len(part) for part in parts} == {10, 11}
    assert not np.array_equal(parts[0], iid_partition(103, clients=10, seed=1)[0])


def _label_mixes(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> np.ndarray:
    return np.array([np.bincount(labels[part], minlength=classes) / len(part) for part in parts])


def test_dirichlet_partition_small_alpha_skews_labels_large_alpha_is_near_uniform():
    labels = np.arange(5000) % 10
    skewed = dirichlet_partition(labels, clients=10, alpha=0.05, seed=0)
    uniform = dirichlet_partition(labels, clients=10, alpha=1000.0, seed=0)
    for parts in (skewed, uniform):
        assert _covers_exactly_once(parts, 5000) and min(len(part) for part in parts) >= 1
    assert _label_mixes(labels, skewed, 10).max(axis=1).mean() > 0.5
    assert np.abs(_label_mixes(labels, uniform, 10) - 0.1).max() < 0.05


def test_dirichlet_partition_is_seeded_and_honours_min_size():
    labels = torch.arange(300) % 3
    parts = dirichlet_partition(labels, clients=6, alpha=0.3, seed=4, min_size=10)
    assert min(len(part) for part in parts) >= 10
    again = dirichlet_partition(labels, clients=6, alpha=0.3, seed=4, min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: iid_partition(10, clients=0, seed=0), "federation.clients=0"),
        (lambda: iid_partition(10, clients=11, seed=0), "federation.clients=11"),
        (lambda: dirichlet_partition(np.zeros(10), clients=11, alpha=1.0, seed=0), "federation.clients=11"),
        (lambda: dirichlet_partition(np.zeros(10), clients=2, alpha=0.0, seed=0), "federation.alpha=0.0"),
    ],
)
def test_partitions_reject_impossible_requests(call, fragment):
    with pytest.raises(UserError) as error:
        call()
    _assert_one_line(error, fragment)
