"""``privacy.grad_sample_mode=auto``: the per-example clipping method timed on the run's own model and
batch shape, the fastest chosen.

Every mode computes the same clipped, noised sum (up to float rounding), so the choice changes speed,
never the mechanism. The race runs on copies of the model and optimizer, on random inputs of the
records' shape, with its own noise generator and a throwaway accountant, inside ``fork_rng``: the
private data, the privacy ledger, the model's weights, the optimizer's state and every RNG stream are
untouched, so a run with ``auto`` is the run with the mode it picked.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain.config import PrivacyConfig
from dptrain.privacy.bookkeeping import unsupported_layers

# One warm-up step per mode (allocators, kernels), then ROUNDS timed steps each, interleaved. A mode
# whose warm-up step took over OUTPACED times the fastest one's is out before the timed rounds: explicit
# per-example gradients of a wide MLP run 30-80x slower than ghost clipping, and would make the race
# cost seconds (measured in docs/benchmarks.md).
WARMUP_STEPS, ROUNDS, OUTPACED = 1, 3, 4.0
# A race of the four modes takes up to RACE_STEPS steps; a run planned for fewer than 4 times that many
# would spend over a quarter of its training on it, so it takes the benchmarks' order instead: book-keeping
# clipping was the fastest mode for every model of docs/benchmarks.md, ghost clipping never more than
# 1.6x hooks where hooks won, hooks faster than functorch everywhere.
RACE_STEPS = 4 * (WARMUP_STEPS + ROUNDS)
MIN_STEPS_TO_RACE = 4 * RACE_STEPS
PREFERENCE = ("bk", "ghost", "hooks", "functorch")


@dataclass(frozen=True)
class ModeChoice:
    """The mode picked and each candidate's median seconds per step (a mode outpaced in the warm-up: its
    warm-up step's); empty when there was no race."""

    mode: str
    seconds: dict[str, float]


# (model's structure, batch shape, candidates, device, threads) -> choice: one race per process per
# workload, so federated clients and reference models with the target's shape do not race again.
_CHOICES: dict[tuple, ModeChoice] = {}


def candidate_modes(cfg: PrivacyConfig, model: nn.Module, per_example_loss: bool) -> tuple[str, ...]:
    """The modes that can clip ``model`` as ``cfg`` asks: per-layer clipping needs per-example gradients
    (hooks, functorch); ghost and book-keeping clipping need the loss of each example (not TRADES'
    two-pass loss), book-keeping clipping layers it supports (``bookkeeping.unsupported_layers``)."""
    if cfg.clipping == "per_layer" or not per_example_loss:
        return ("hooks", "functorch")
    return ("hooks", "functorch", "ghost") + (() if unsupported_layers(model) else ("bk",))


def race_modes(
    planned_steps: int,
    modes: Sequence[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    record: Sequence[torch.Tensor],
    batch_size: int,
    wrap: Callable,
    device: torch.device,
) -> ModeChoice:
    """For a run of ``planned_steps``, the fastest of ``modes`` for one DP-SGD step of ``model`` on
    ``batch_size`` random records shaped like ``record`` (inputs, label), each mode wrapped by
    ``wrap(mode, model, optimizer, loader)`` ->
    (model, optimizer, loss_fn). Modes are timed round-robin (each round in a rotated order) so a load
    change cannot favour one; the median of ``ROUNDS`` steps decides, among the modes whose warm-up
    step was within ``OUTPACED`` times the fastest (the others are recorded with their warm-up time).
    One candidate, or a run shorter than ``MIN_STEPS_TO_RACE``, is not timed: the first of ``modes``
    in ``PREFERENCE`` runs."""
    if len(modes) == 1 or planned_steps < MIN_STEPS_TO_RACE:
        return ModeChoice(min(modes, key=PREFERENCE.index), {})
    key = (repr(model), tuple(record[0].shape), record[0].dtype, batch_size, tuple(modes), str(device),
           torch.get_num_threads())  # fmt: skip
    if key not in _CHOICES:
        _CHOICES[key] = _race(modes, model, optimizer, record, batch_size, wrap, device)
    return _CHOICES[key]


def _race(modes, model, optimizer, record, batch_size, wrap, device) -> ModeChoice:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Using a non-full backward hook")
        # Random records of the private ones' shape and dtype (integer inputs, e.g. token ids: zeros).
        generator = torch.Generator().manual_seed(0)
        inputs, labels = record
        shape = (batch_size, *inputs.shape)
        if inputs.is_floating_point():
            inputs = torch.randn(shape, generator=generator).to(inputs.dtype)
        else:
            inputs = torch.zeros(shape, dtype=inputs.dtype)
        with torch.no_grad():
            classes = copy.deepcopy(model)(inputs[:1].to(device)).shape[-1]
        labels = torch.randint(0, classes, (batch_size, *labels.shape), generator=generator).to(labels.dtype)
        loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch_size)
        steppers = {}
        for mode in modes:
            copied = copy.deepcopy(model)
            # The optimizer's kind and hyper-parameters on the copy, with fresh state.
            fresh = type(optimizer)(copied.parameters(), **optimizer.defaults)
            steppers[mode] = _stepper(*wrap(mode, copied, fresh, loader), inputs.to(device), labels.to(device), device)
        warmup = {mode: min(steppers[mode]() for _ in range(WARMUP_STEPS)) for mode in modes}
        racing = [mode for mode in modes if warmup[mode] <= OUTPACED * min(warmup.values())]
        seconds: dict[str, list[float]] = {mode: [] for mode in racing}
        for round_index in range(ROUNDS):
            shift = round_index % len(racing)
            for mode in racing[shift:] + racing[:shift]:
                seconds[mode].append(steppers[mode]())
    medians = {mode: statistics.median(seconds[mode]) if mode in seconds else warmup[mode] for mode in modes}
    return ModeChoice(min(seconds, key=medians.get), medians)


def _stepper(model, optimizer, loss_fn, inputs, labels, device) -> Callable[[], float]:
    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), labels).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    return step
