"""Aggregation rules as objects with one call signature, and the registry ``aggregator=...`` selects.

Each rule is built from its parameters and the f it tolerates, checks them in its constructor and
its precondition on n in ``check(n)`` (one-line ``UserError``s), and is called as
``rule(updates) -> Aggregation``. The math lives in the pure functions of ``aggregators``, which
the rules call; a rule only adds its parameters and, for centered clipping, its state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple, Self

from torch import Tensor

from dptrain.config import AggregatorConfig
from dptrain.errors import require
from dptrain.robust.aggregators import (
    bulyan_selection,
    centered_clipping,
    check_bulyan,
    check_centered_clipping,
    check_geometric_median,
    check_krum,
    check_trimmed_mean,
    geometric_median,
    krum_selection,
    mean,
    median,
    multi_krum_selection,
    trimmed_mean,
)
from dptrain.robust.primitives import (
    check_updates,
    require_f,
    require_honest_majority,
    require_state,
    state_error,
)


class Aggregation(NamedTuple):
    """One round's result: the aggregate (d,) and, for selecting rules (krum, multi_krum, bulyan),
    the indices of the rows whose updates were selected, else None."""

    value: Tensor
    selected: Tensor | None


class AggregationRule(ABC):
    """A robust aggregation rule tolerating f Byzantine updates: ``rule(updates) -> Aggregation``.

    ``check(n)`` raises the rule's one-line ``UserError`` unless it can aggregate n updates with f
    of them Byzantine; every call checks it. Every rule but the mean claims robustness to f, so
    needs at least n > 2f. Stateless unless it says otherwise (``state_dict`` is then empty).
    """

    name: ClassVar[str]

    def __init__(self, f: int) -> None:
        require_f(f, self.name)
        self.f = f

    @classmethod
    def from_config(cls, cfg: AggregatorConfig, f: int) -> Self:
        """The rule with the parameters of ``cfg`` (an ``aggregator`` config group), tolerating f."""
        return cls(f)

    def check(self, n: int) -> None:
        require_honest_majority(n, self.f, self.name)

    def __call__(self, updates: Tensor) -> Aggregation:
        self.check(check_updates(updates, self.name))
        return self.aggregate(updates)

    @abstractmethod
    def aggregate(self, updates: Tensor) -> Aggregation:
        """The rule applied to (n, d) updates whose n passed ``check``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        require_state(self.name, state, ())


class Mean(AggregationRule):
    """The unweighted mean (``aggregators.mean``); claims no robustness, so runs under any f."""

    name = "mean"

    def check(self, n: int) -> None:
        require(n >= 1, f"mean needs at least one update, got n={n}")

    def aggregate(self, updates: Tensor) -> Aggregation:
        return Aggregation(mean(updates), None)


class Median(AggregationRule):
    """The coordinate-wise median (``aggregators.median``, Yin et al. 2018). Precondition n > 2f."""

    name = "median"

    def aggregate(self, updates: Tensor) -> Aggregation:
        return Aggregation(median(updates), None)


class TrimmedMean(AggregationRule):
    """The coordinate-wise mean without the f largest and f smallest values (``aggregators.trimmed_mean``,
    Yin et al. 2018). Precondition n > 2f."""

    name = "trimmed_mean"

    def check(self, n: int) -> None:
        check_trimmed_mean(n, self.f)

    def aggregate(self, updates: Tensor) -> Aggregation:
        return Aggregation(trimmed_mean(updates, self.f), None)


class Krum(AggregationRule):
    """The update with the lowest Krum score, and its index (``aggregators.krum_select``, Blanchard
    et al. 2017). Precondition n > 2f + 2."""

    name = "krum"

    def check(self, n: int) -> None:
        check_krum(n, self.f, self.name)

    def aggregate(self, updates: Tensor) -> Aggregation:
        return Aggregation(*krum_selection(updates, self.f))


class MultiKrum(AggregationRule):
    """The mean of the m best Krum-scored updates (``m=None``: n - f), and their indices
    (``aggregators.multi_krum``, Blanchard et al. 2017). Preconditions n > 2f + 2 and m <= n."""

    name = "multi_krum"

    def __init__(self, f: int, m: int | None = None) -> None:
        super().__init__(f)
        require(m is None or m >= 1, f"multi_krum needs m >= 1 or null, got m={m}")
        self.m = m

    @classmethod
    def from_config(cls, cfg: AggregatorConfig, f: int) -> Self:
        return cls(f, cfg.m)

    def check(self, n: int) -> None:
        check_krum(n, self.f, self.name)
        require(
            self.m is None or self.m <= n,
            f"multi_krum averages aggregator.m={self.m} of the {n} updates it receives: "
            "lower aggregator.m or set it null",
        )

    def aggregate(self, updates: Tensor) -> Aggregation:
        return Aggregation(*multi_krum_selection(updates, self.f, self.m))


class GeometricMedian(AggregationRule):
    """The smoothed Weiszfeld geometric median (``aggregators.geometric_median``, Pillutla et al.
    2022). Preconditions n > 2f, nu > 0, tol >= 0, max_iter >= 1."""

    name = "geometric_median"

    def __init__(self, f: int, nu: float = 1e-6, tol: float = 1e-6, max_iter: int = 100) -> None:
        super().__init__(f)
        check_geometric_median(nu, tol, max_iter)
        self.nu, self.tol, self.max_iter = nu, tol, max_iter

    @classmethod
    def from_config(cls, cfg: AggregatorConfig, f: int) -> Self:
        return cls(f, cfg.nu, cfg.tol, cfg.max_iter)

    def aggregate(self, updates: Tensor) -> Aggregation:
        return Aggregation(geometric_median(updates, self.nu, self.tol, self.max_iter), None)


class Bulyan(AggregationRule):
    """Repeated Krum, then the mean around the coordinate-wise median, and the indices Krum selected
    (``aggregators.bulyan``, El Mhamdi et al. 2018). Precondition n >= 4f + 3."""

    name = "bulyan"

    def check(self, n: int) -> None:
        check_bulyan(n, self.f)

    def aggregate(self, updates: Tensor) -> Aggregation:
        return Aggregation(*bulyan_selection(updates, self.f))


class CenteredClipping(AggregationRule):
    """Centered clipping around the previous call's aggregate, zero at first
    (``aggregators.centered_clipping``, Karimireddy et al. 2021). Preconditions n > 2f, tau > 0,
    iterations >= 1.

    The one stateful rule: ``state_dict`` / ``load_state_dict`` carry the centre across a
    checkpoint, so a resumed run clips around the same point.
    """

    name = "centered_clipping"

    def __init__(self, f: int, tau: float, iterations: int = 1) -> None:
        super().__init__(f)
        check_centered_clipping(tau, iterations)
        self.tau, self.iterations = tau, iterations
        self.centre: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: AggregatorConfig, f: int) -> Self:
        return cls(f, cfg.tau, cfg.iterations)

    def aggregate(self, updates: Tensor) -> Aggregation:
        centre = self.centre if self.centre is not None else updates.new_zeros(updates.shape[1])
        self.centre = centered_clipping(updates, centre, self.tau, self.iterations)
        return Aggregation(self.centre.clone(), None)

    def state_dict(self) -> dict[str, Tensor | None]:
        return {"centre": None if self.centre is None else self.centre.clone()}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        require_state(self.name, state, ("centre",))
        centre = state["centre"]
        require(
            centre is None or (isinstance(centre, Tensor) and centre.ndim == 1 and centre.is_floating_point()),
            state_error(self.name, "'centre' must be None or a 1-D floating tensor"),
        )
        self.centre = None if centre is None else centre.clone()


# What ``aggregator=<name>`` builds, in the order the unknown-name message lists them.
AGGREGATORS: dict[str, type[AggregationRule]] = {
    rule.name: rule for rule in (Mean, Median, TrimmedMean, Krum, MultiKrum, GeometricMedian, Bulyan, CenteredClipping)
}
