"""The compiled sorting network behind the median and the trimmed mean: exact order statistics on every
0-1 input (the 0-1 principle: a comparator network that sorts every 0-1 input sorts every input), up to
n = 16 one by one and for n = 33 and 50 as every count of ones per sorted run, the references beyond one
power of two, column ranges split across threads, and the fallback to sorting where no C compiler works."""

from __future__ import annotations

import itertools
import logging
import shutil

import numpy as np
import pytest
import torch
from scipy import stats

from dptrain.robust import median, trimmed_mean
from dptrain.robust import sorting_network
from dptrain.robust.sorting_network import mean_of_ranks, odd_even_merge_sort, rank_mean_network

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the network")


def all_zero_one_columns(n: int) -> torch.Tensor:
    """(n, 2^n) float64: every 0-1 vector of length n as a column."""
    return torch.tensor(list(itertools.product((0.0, 1.0), repeat=n)), dtype=torch.float64).T.contiguous()


def every_count_per_run(n: int, run: int) -> torch.Tensor:
    """(n, k) float64 0-1 columns, one per way to put ones in the aligned runs of ``run`` wires (the
    last run shorter): after the compiled code sorts each run, these are all the 0-1 inputs there are."""
    sizes = [min(run, n - start) for start in range(0, n, run)]
    counts = np.indices([size + 1 for size in sizes]).reshape(len(sizes), -1)
    runs = [np.arange(size)[:, None] >= size - ones[None, :] for size, ones in zip(sizes, counts)]
    return torch.from_numpy(np.concatenate(runs).astype(np.float64))


def ranges_of(n: int) -> list[tuple[int, int]]:
    """The median's ranks and every trimmed mean's, f = 0 to the most n > 2f allows."""
    return sorted({((n - 1) // 2, n // 2 + 1)} | {(f, n - f) for f in range((n + 1) // 2)})


def apply(comparators: list[tuple[int, int]], columns: np.ndarray) -> np.ndarray:
    columns = columns.copy()
    for a, b in comparators:
        columns[[a, b]] = np.minimum(columns[a], columns[b]), np.maximum(columns[a], columns[b])
    return columns


@pytest.mark.parametrize("n", range(1, 13))
def test_the_unpruned_network_sorts_every_zero_one_input(n):
    columns = all_zero_one_columns(n).numpy()
    np.testing.assert_array_equal(apply(odd_even_merge_sort(n), columns), np.sort(columns, axis=0))


@pytest.mark.parametrize("n", range(1, 13))
def test_the_network_from_sorted_runs_merges_every_zero_one_input(n):
    runs = every_count_per_run(n, 4).numpy()
    np.testing.assert_array_equal(apply(odd_even_merge_sort(n, sorted_runs=4), runs), np.sort(runs, axis=0))


@pytest.mark.parametrize("n", [*range(1, 13), 16])
def test_the_compiled_network_selects_the_exact_ranks_of_every_zero_one_input(n):
    # Up to 16 wires the compiled code sorts one run in registers; by the 0-1 principle the ranks
    # [lo, hi) it averages are then right on every input, not only on these.
    columns = all_zero_one_columns(n)
    ordered = np.sort(columns.numpy(), axis=0)
    for lo, hi in ranges_of(n) if n <= 12 else [(7, 9), (0, 16), (3, 13), (7, 8)]:
        np.testing.assert_array_equal(mean_of_ranks(columns, lo, hi).numpy(), ordered[lo:hi].mean(axis=0))


@pytest.mark.parametrize("n", [33, 50])
def test_the_compiled_pruned_merges_select_the_exact_ranks_of_every_zero_one_input(n):
    # Runs of 16 are sorted first (exhaustively checked above), so a 0-1 input reaches the pruned merge
    # network as a count of ones per run: every such count covers every 0-1 input of n wires.
    columns = every_count_per_run(n, 16)
    ordered = np.sort(columns.numpy(), axis=0)
    for lo, hi in [((n - 1) // 2, n // 2 + 1), (0, n), ((n - 3) // 4, n - (n - 3) // 4), (n // 2 - 1, n - n // 2 + 1)]:
        np.testing.assert_array_equal(mean_of_ranks(columns, lo, hi).numpy(), ordered[lo:hi].mean(axis=0))


def test_pruning_and_the_sorted_runs_leave_a_third_of_batchers_comparators_for_n_50():
    first, _ = rank_mean_network(50, 11, 39)
    assert len(odd_even_merge_sort(50)) == 403
    assert len(odd_even_merge_sort(50, sorted_runs=16)) == 403 - 3 * 63 - 1
    assert first.size == 144


@pytest.mark.parametrize(("n", "f"), [(64, 15), (65, 16), (100, 24)])
def test_median_and_trimmed_mean_match_the_references_past_a_power_of_two(n, f):
    # Large adversarial magnitudes beside small honest ones: the kept values are summed, not the total
    # minus the extremes, so the honest digits survive.
    x = torch.randn(n, 333, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    x[:f] *= 1e30
    reference = x.numpy()
    np.testing.assert_array_equal(median(x).numpy(), np.median(reference, axis=0))
    expected = stats.trim_mean(reference, (f + 0.5) / n, axis=0)
    np.testing.assert_allclose(trimmed_mean(x, f).numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(trimmed_mean(x.float(), f).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_columns_split_across_threads_cover_every_column_once():
    n, d = 9, 2 * 2**14 + 77
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert len(sorting_network._spans(d, 3, 128)) == 2
        split = median(x)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(split.numpy(), np.median(x.numpy(), axis=0))


def test_without_a_compiler_the_rules_sort_instead_and_say_so_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    sorting_network._library.cache_clear()
    x = torch.randn(7, 500, generator=torch.Generator().manual_seed(1))
    try:
        with caplog.at_level(logging.WARNING, logger=sorting_network.__name__):
            assert mean_of_ranks(x, 3, 4) is None
            np.testing.assert_array_equal(median(x).numpy(), np.median(x.numpy(), axis=0))
            np.testing.assert_allclose(trimmed_mean(x, 2).numpy(), stats.trim_mean(x.numpy(), 2.5 / 7, axis=0), atol=1e-6)
    finally:
        sorting_network._library.cache_clear()
    assert [record.message.split(":")[0] for record in caplog.records] == ["median and trimmed mean fall back to sorting (slower)"]


@pytest.mark.slow
def test_the_library_is_built_once_into_the_cache_directory(monkeypatch, tmp_path):
    # Slow: a fresh build, about 1 s of compiler time on a quiet machine.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    sorting_network._library.cache_clear()
    try:
        assert sorting_network._library() is not None
        built = list((tmp_path / "dptrain").iterdir())
        sorting_network._library.cache_clear()
        assert sorting_network._library() is not None
    finally:
        sorting_network._library.cache_clear()
    assert [path.suffix for path in built] == [".so"]
    assert list((tmp_path / "dptrain").iterdir()) == built
