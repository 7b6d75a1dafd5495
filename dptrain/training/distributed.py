"""Data parallelism over torch.distributed ranks: Opacus' DPDDP for DP-SGD with a mean, and robust
aggregation of all-gathered worker gradients when an aggregator or an attack is configured.

Two modes, chosen by ``parallel_mode``:

- ``dpddp``: DP-SGD with one global Poisson sample split over the ranks (Opacus'
  ``DifferentiallyPrivateDistributedDataParallel`` and distributed sampler); noise is added
  once, on rank 0, so the run is the single-process mechanism and spends the same epsilon.
- ``robust``: each rank trains on its own shard and, when private, clips and noises its own
  batch gradient (local DP: the guarantee holds for each worker's records whatever the others
  send); the gradients are all-gathered as flat buffers and every rank applies the same
  deterministic robust aggregator, so the parameters stay identical. Byzantine ranks are
  simulated by replacing their rows of the gathered stack with the configured attack. The
  audit's members are the honest ranks' shards (``honest_positions``); canaries train on
  honest ranks only (``canary_ranks``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dptrain.privacy.plan import is_private
from dptrain.robust import build_aggregator, build_attack, byzantine_rows, tolerated_byzantine
from dptrain.training import ranks
from dptrain.seeds import Stream, derived_seed


def parallel_mode(cfg, world: int | None = None) -> str | None:
    """``None`` in one process; ``dpddp`` for private training with the mean; ``robust`` otherwise.

    ``world`` defaults to the process group's size (config validation passes the planned one).
    The non-private baseline also takes the gathered path: without noise, Opacus' DPDDP has
    nothing to add, and the gathered mean is plain data parallelism.
    """
    world = ranks.world_size() if world is None else world
    if world == 1:
        return None
    # No Byzantine worker: attack=none, or centralized data poisoning (``training.poisoning``), which
    # poisons the members before any process takes its records.
    plain_mean = cfg.aggregator.name == "mean" and not cfg.aggregator.pre and cfg.attack.byzantine == 0
    return "dpddp" if is_private(cfg.privacy) and plain_mean else "robust"


def local_batch_size(cfg) -> int:
    """A rank's share of the logical batch in ``robust`` mode (validation keeps it >= 1)."""
    return cfg.train.batch_size // ranks.world_size()


def byzantine_ranks(count: int, world: int, seed: int) -> list[int]:
    """The ``count`` ranks that play Byzantine, drawn from the run ``seed``'s Byzantine stream (the
    same on every rank)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, Stream.BYZANTINE))
    return sorted(torch.randperm(world, generator=generator)[:count].tolist())


def shard_size(records: int, world: int) -> int:
    """Records per rank: equal shards, so every rank plans the same number of steps per epoch
    (each step is a collective); the ``records % world`` left over are not trained on."""
    return records // world


def shard_positions(records: int, rank: int, world: int) -> np.ndarray:
    """Positions of rank ``rank``'s ``shard_size`` records: every ``world``-th one, starting at ``rank``."""
    return np.arange(rank, records, world)[: shard_size(records, world)]


def honest_positions(records: int, world: int, byzantine: list[int]) -> np.ndarray:
    """Sorted positions of the records whose honest gradients reach the model: the honest ranks' shards.

    A Byzantine rank's shard is the attacker's (its gradient row is replaced, or its records
    poisoned) and the ``records % world`` left over train on no rank: neither is a member of the
    audit. Depends on the config alone, so every rank and ``dptrain audit`` derive the same set.
    """
    honest = [shard_positions(records, rank, world) for rank in range(world) if rank not in byzantine]
    return np.sort(np.concatenate(honest))


def canary_ranks(count: int, world: int, byzantine: list[int]) -> np.ndarray:
    """The rank that trains canary i when its coin says "in": the honest ranks in turn, by index.

    The one-run bound (Steinke, Nasr & Jagielski 2023) needs each canary's inclusion to be a fair
    coin that adds or removes exactly that canary: the slot depends on the index alone, never on
    the coins, and no canary is left to an attacker's rank, so none has to be dropped.
    """
    honest = np.array([rank for rank in range(world) if rank not in byzantine], dtype=np.int64)
    return honest[np.arange(count) % len(honest)]


class GatheredAggregation:
    """Wraps an optimizer: ``step()`` first replaces every rank's gradient by the robust aggregate
    of all ranks' gradients, then steps the wrapped optimizer.

    Wrapped as Opacus' ``original_optimizer`` the exchange happens after the local clipping and
    noise; around a plain optimizer it is (robust) data parallelism without privacy. Every
    rank computes the same aggregate from the same gathered stack, so parameters never drift.
    The attack is drawn afresh each step from (``seed``, step) and ``state_dict`` carries the
    aggregator's state and the step count, so a resumed run continues as the uninterrupted one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, aggregator, attack_cfg, seed: int, byzantine: list[int]):
        self.optimizer = optimizer
        self.aggregator = aggregator
        self.attack_cfg = attack_cfg
        self.seed = seed
        self.byzantine = byzantine
        self.steps = 0

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)

    def _gathered(self, flat: Tensor) -> Tensor:
        world = ranks.world_size()
        rows = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(rows, flat)
        stack = torch.stack(rows)
        if self.byzantine:
            attack = build_attack(self.attack_cfg, derived_seed(self.seed, Stream.ATTACK, self.steps))
            honest = [r for r in range(world) if r not in self.byzantine]
            stack[self.byzantine] = byzantine_rows(attack, stack[honest], stack[self.byzantine], world).to(stack.dtype)
        return stack

    def step(self, closure=None):
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        aggregate = self.aggregator(self._gathered(flat)).value
        self.steps += 1
        offset = 0
        for p in params:
            p.grad = aggregate[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return self.optimizer.step(closure)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "aggregator": self.aggregator.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.aggregator.load_state_dict(state["aggregator"])
        self.steps = state["steps"]


def gather_updates(training, cfg) -> None:
    """Make ``training``'s optimizer exchange gradients across ranks and step on their robust aggregate.

    Private: the exchange wraps Opacus' inner optimizer, so it sees the locally
    clipped and noised gradient. The aggregator tolerates ``aggregator.f``
    (default ``attack.byzantine``) Byzantine rows, and every rank seeds it,
    the attack and the choice of Byzantine ranks alike (independent streams of ``train.seed``).
    """
    world, seed = ranks.world_size(), cfg.train.seed
    exchange = dict(
        aggregator=build_aggregator(
            cfg.aggregator, tolerated_byzantine(cfg.aggregator, cfg.attack), derived_seed(seed, Stream.AGGREGATOR)
        ),
        attack_cfg=cfg.attack,
        seed=seed,
        byzantine=byzantine_ranks(cfg.attack.byzantine, world, seed),
    )
    if training.ledger is None:
        training.optimizer = GatheredAggregation(training.optimizer, **exchange)
    else:
        training.optimizer.original_optimizer = GatheredAggregation(training.optimizer.original_optimizer, **exchange)
