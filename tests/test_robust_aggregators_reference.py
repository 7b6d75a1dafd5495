"""Mean, median, trimmed mean, Bulyan's window and Krum against independent references (NumPy, SciPy, a
brute-force Krum) on inputs that span several column blocks of ``reduce_sorted_columns``, with ties
and with non-finite rows; the block-wise sort's memory bound; Krum's single-threaded (n, n) work."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats

from dptrain.config import AggregatorConfig
from dptrain.robust import build_aggregator, krum_select, mean, median, trimmed_mean
from dptrain.robust.aggregators import mean_around_median
from dptrain.robust.primitives import _BLOCK_FLOATS, one_thread

# (n, f): odd and even n, f from 0 to the most n > 2f allows.
SIZES = [(1, 0), (2, 0), (7, 3), (10, 2), (50, 11)]


def updates_with_ties(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """(n, d) updates over three column blocks and a ragged fourth, values on a coarse grid so
    most columns hold repeated values (ties at the cut points of the trimmed mean and the median)."""
    d = 3 * (_BLOCK_FLOATS // n) + 17
    grid = torch.randint(-4, 5, (n, d), generator=torch.Generator().manual_seed(seed))
    return (grid * 0.25).to(dtype)


@pytest.mark.parametrize(("n", "f"), SIZES)
def test_mean_matches_numpy_in_float64(n, f):
    x = torch.randn(n, 1000, generator=torch.Generator().manual_seed(n))
    np.testing.assert_allclose(mean(x).double().numpy(), x.double().numpy().mean(axis=0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "f"), SIZES)
def test_median_matches_numpy_across_blocks_and_ties(n, f, dtype):
    x = updates_with_ties(n, dtype, seed=n)
    expected = np.median(x.double().numpy(), axis=0)
    # Grid values: both middle values and their half-sum are exact in float32 too.
    np.testing.assert_array_equal(median(x).double().numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "f"), SIZES)
def test_trimmed_mean_matches_scipy_across_blocks_and_ties(n, f, dtype):
    x = updates_with_ties(n, dtype, seed=100 + n)
    # scipy cuts int(proportion * n) per side; (f + 1/2) / n keeps that at f despite rounding of f / n.
    expected = stats.trim_mean(x.double().numpy(), (f + 0.5) / n, axis=0)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(trimmed_mean(x, f).double().numpy(), expected, rtol=0, atol=tolerance)


def test_trimmed_mean_keeps_honest_precision_beside_huge_outliers():
    # Summing the middle values, not subtracting the extremes from the total: with rows at +-1e30 a
    # total-minus-extremes form would lose every honest digit to cancellation.
    n, f, d = 9, 2, 3 * (_BLOCK_FLOATS // 9) + 5
    honest = torch.rand(n - 2 * f, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = torch.cat([honest, torch.full((f, d), 1e30, dtype=torch.float64), torch.full((f, d), -1e30, dtype=torch.float64)])
    x = x[torch.randperm(n, generator=torch.Generator().manual_seed(4))]
    np.testing.assert_allclose(trimmed_mean(x, f).numpy(), honest.mean(dim=0).numpy(), rtol=1e-14)


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_non_finite_rows_are_dropped_before_the_block_wise_sort(name):
    finite = updates_with_ties(11, torch.float32, seed=7)
    poisoned = torch.cat([finite[:3], torch.full_like(finite[:1], float("nan")), finite[3:]])
    poisoned[-1, 5] = float("inf")  # one inf entry poisons its whole row
    kept = torch.cat([finite[:3], finite[3:-1]]).double().numpy()
    cfg = OmegaConf.merge(OmegaConf.structured(AggregatorConfig), {"name": name})
    value = build_aggregator(cfg, f=2, seed=0)(poisoned).value.double().numpy()
    expected = np.median(kept, axis=0) if name == "median" else stats.trim_mean(kept, 2.5 / len(kept), axis=0)
    np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6)


def test_bulyan_window_over_selected_rows_matches_a_brute_force_reference():
    n, beta, d = 15, 4, 2 * (_BLOCK_FLOATS // 11) + 3
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rows = torch.tensor([14, 0, 3, 4, 5, 7, 8, 9, 10, 12, 13])
    chosen = x[rows].numpy()
    centre = np.median(chosen, axis=0)
    closest = np.argsort(np.abs(chosen - centre), axis=0, kind="stable")[:beta]
    expected = np.take_along_axis(chosen, closest, axis=0).mean(axis=0)
    np.testing.assert_allclose(mean_around_median(x, beta, rows).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_the_sorted_columns_are_never_copied_whole():
    # The former path sorted an (n, d) copy: 8 MB here. Blocks are 2**17 floats, 512 KB (two may be alive).
    x = torch.randn(50, 40_000, generator=torch.Generator().manual_seed(6))
    tracemalloc.start()
    try:
        median(x)
        trimmed_mean(x, 11)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.numel() * x.element_size() / 4


def brute_force_krum(x: np.ndarray, f: int) -> list[int]:
    """Blanchard et al.'s scores by explicit pairwise distances; ranks by (score, index)."""
    n = len(x)
    scores = []
    for i in range(n):
        distances = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(distances[: n - f - 2]))
    return sorted(range(n), key=lambda i: (scores[i], i))


def test_krum_scores_a_hand_case():
    # Points 0, 1, 2, 3 and 12 on a line, n = 5, f = 1: two nearest neighbours, squared distances.
    # Scores: 0 -> 1 + 4 = 5, 1 -> 1 + 1 = 2, 2 -> 1 + 1 = 2, 3 -> 1 + 4 = 5, 12 -> 81 + 100 = 181;
    # ties go to the lower index.
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [12.0]])
    assert krum_select(x, f=1, m=5).tolist() == [1, 2, 0, 3, 4]
    assert brute_force_krum(x.numpy(), 1) == [1, 2, 0, 3, 4]


@pytest.mark.parametrize("threads", [1, 2])
def test_krum_matches_a_brute_force_reference_and_restores_the_thread_count(threads):
    x = torch.randn(12, 30, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert krum_select(x, f=2, m=12).tolist() == brute_force_krum(x.numpy(), 2)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_one_thread_runs_single_threaded_and_restores_after_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError), one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
