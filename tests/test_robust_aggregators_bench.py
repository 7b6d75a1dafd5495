"""scripts/bench_aggregators.py: peers get their native inputs, each case times the floor and every
implementation interleaved in a rotating order, and a library that runs out of memory reads "oom"."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_aggregators.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_aggregators", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_each_library_gets_its_native_input_as_its_own_copy(bench):
    updates = torch.arange(6.0).reshape(3, 2)
    byzfl = bench._inputs("byzfl", updates)
    flower = bench._inputs("flower", updates)
    ours = bench._inputs("dptrain", updates)
    # ByzFL's NumPy path, not its torch path; Flower's list of ([layer], example count) per client.
    assert isinstance(byzfl, np.ndarray) and np.array_equal(byzfl, updates.numpy())
    assert [count for _, count in flower] == [1, 1, 1]
    assert all(isinstance(layers[0], np.ndarray) for layers, _ in flower)
    assert isinstance(ours, torch.Tensor)
    byzfl[0, 0] = flower[1][0][0][0] = ours[2, 0] = -1.0
    assert torch.equal(updates, torch.arange(6.0).reshape(3, 2))


def test_the_floor_is_the_gram_matrix_for_distance_rules_and_one_sum_otherwise(bench):
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(bench._floor("krum", x)(), x @ x.T)
    assert torch.allclose(bench._floor("trimmed_mean", x)(), x.sum(dim=0))


def test_a_case_interleaves_the_floor_and_the_implementations_in_a_rotating_order(bench, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(bench, "_floor", lambda rule, updates: lambda: calls.append("floor"))
    monkeypatch.setattr(bench, "_dptrain", lambda rule, n, f: lambda x: calls.append("dptrain"))
    monkeypatch.setattr(bench, "_byzfl", lambda rule, n, f: lambda x: calls.append("byzfl"))

    def out_of_memory(rule, n, f):
        def aggregate(x):
            raise MemoryError

        return aggregate

    monkeypatch.setattr(bench, "_flower", out_of_memory)
    results = bench.run_case("median", 3, 4, 0, ["dptrain", "byzfl", "flower"], repeats=3, threads=None)
    assert results["flower"] == "oom"
    assert {name: type(value) for name, value in results.items() if name != "flower"} == {
        "floor": float, "dptrain": float, "byzfl": float
    }
    first_calls = ["floor", "dptrain", "byzfl"]
    rounds = [["floor", "dptrain", "byzfl"], ["dptrain", "byzfl", "floor"], ["byzfl", "floor", "dptrain"]]
    assert calls == first_calls + [name for round_ in rounds for name in round_]
