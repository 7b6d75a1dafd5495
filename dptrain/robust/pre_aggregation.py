"""Pre-aggregators as objects with one call signature, and the registry ``aggregator.pre=[...]`` selects.

Each is built from its parameters (and the f the rule after it tolerates), checks them in its
constructor and its condition on n in ``check(n)`` (one-line ``UserError``s), says how many rows
it leaves (``rows_out``), and is called as ``step(updates) -> PreAggregation``. The math lives in
the pure functions of ``preaggregators``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple, Self

import torch
from torch import Tensor

from dptrain.config import AggregatorConfig
from dptrain.robust.preaggregators import (
    bucketing_matrix,
    check_bucket_size,
    check_clip_threshold,
    check_nnm,
    nnm,
    static_clipping,
)
from dptrain.errors import require
from dptrain.robust.primitives import check_updates, require_f, require_state, state_error


class PreAggregation(NamedTuple):
    """The (n', d) updates a pre-aggregator leaves and ``members``, the (n', n) bool membership of
    each output row in the input rows, or None where output row i stands for input row i."""

    updates: Tensor
    members: Tensor | None


class PreAggregator(ABC):
    """A map from (n, d) updates to (n', d) updates run before a rule: ``step(updates) -> PreAggregation``.

    ``check(n)`` raises a one-line ``UserError`` unless it can run on n updates; every call checks
    it. Stateless unless it says otherwise (``state_dict`` is then empty).
    """

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: AggregatorConfig, f: int, generator: torch.Generator) -> Self:
        """The pre-aggregator with the parameters of ``cfg``, before a rule tolerating f; random draws
        come from ``generator``."""

    def check(self, n: int) -> None:
        return None

    def rows_out(self, n: int) -> int:
        """The number of rows it leaves of n."""
        return n

    def __call__(self, updates: Tensor) -> PreAggregation:
        self.check(check_updates(updates, self.name))
        return self.apply(updates)

    @abstractmethod
    def apply(self, updates: Tensor) -> PreAggregation:
        """The pre-aggregator applied to (n, d) updates whose n passed ``check``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        require_state(self.name, state, ())


class NNM(PreAggregator):
    """Nearest-neighbour mixing (``preaggregators.nnm``, Allouah et al. 2023). Row i is client i's
    update mixed with its neighbours: it stands for client i. Precondition n > 2f."""

    name = "nnm"

    def __init__(self, f: int) -> None:
        require_f(f, self.name)
        self.f = f

    @classmethod
    def from_config(cls, cfg: AggregatorConfig, f: int, generator: torch.Generator) -> Self:
        return cls(f)

    def check(self, n: int) -> None:
        check_nnm(n, self.f)

    def apply(self, updates: Tensor) -> PreAggregation:
        return PreAggregation(nnm(updates, self.f), None)


class Bucketing(PreAggregator):
    """The means of ceil(n / s) random buckets of s updates (``preaggregators.bucketing``,
    Karimireddy et al. 2022), drawn from ``generator``. Precondition s >= 1.

    Stateful: ``state_dict`` / ``load_state_dict`` carry the generator across a checkpoint, so a
    resumed run draws the buckets the uninterrupted one would.
    """

    name = "bucketing"

    def __init__(self, bucket_size: int, generator: torch.Generator) -> None:
        check_bucket_size(bucket_size)
        self.bucket_size = bucket_size
        self.generator = generator

    @classmethod
    def from_config(cls, cfg: AggregatorConfig, f: int, generator: torch.Generator) -> Self:
        return cls(cfg.bucket_size, generator)

    def rows_out(self, n: int) -> int:
        return math.ceil(n / self.bucket_size)

    def apply(self, updates: Tensor) -> PreAggregation:
        mixing = bucketing_matrix(updates.shape[0], self.bucket_size, self.generator, updates.dtype, updates.device)
        return PreAggregation(mixing @ updates, mixing > 0)

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        require_state(self.name, state, ("generator",))
        generator = state["generator"]
        expected = self.generator.get_state()
        valid = isinstance(generator, Tensor) and (generator.dtype, generator.shape) == (expected.dtype, expected.shape)
        require(valid, state_error(self.name, f"'generator' must be a CPU generator's state, {expected.numel()} bytes"))
        self.generator.set_state(generator)


class StaticClipping(PreAggregator):
    """Each update clipped to norm ``threshold`` (``preaggregators.static_clipping``). Precondition
    threshold > 0."""

    name = "clipping"

    def __init__(self, threshold: float) -> None:
        check_clip_threshold(threshold)
        self.threshold = threshold

    @classmethod
    def from_config(cls, cfg: AggregatorConfig, f: int, generator: torch.Generator) -> Self:
        return cls(cfg.clip_threshold)

    def apply(self, updates: Tensor) -> PreAggregation:
        return PreAggregation(static_clipping(updates, self.threshold), None)


# What ``aggregator.pre=[<name>, ...]`` builds, in the order the unknown-name message lists them.
PRE_AGGREGATORS: dict[str, type[PreAggregator]] = {step.name: step for step in (NNM, Bucketing, StaticClipping)}
