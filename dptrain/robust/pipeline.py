"""The aggregator a config names: rules and pre-aggregators registered by name (what
``aggregator=...`` and ``aggregator.pre=[...]`` select), composed by ``build_aggregator``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from dptrain.config import AggregatorConfig, AttackConfig
from dptrain.errors import UserError
from dptrain.robust.aggregators import (
    CenteredClipping,
    bulyan_selection,
    check_bulyan,
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
from dptrain.robust.preaggregators import (
    bucketing_matrix,
    check_bucket_size,
    check_clip_threshold,
    check_nnm,
    nnm,
    static_clipping,
)
from dptrain.robust.primitives import require, require_f, require_honest_majority


class Aggregation(NamedTuple):
    """One round's result: the aggregate (d,) and, for selecting rules (krum, multi_krum, bulyan),
    the indices of the clients whose updates were selected (all members of a selected bucket
    after bucketing), else None."""

    value: Tensor
    selected: Tensor | None


# A rule maps the (n, d) pre-aggregated updates and the f it must tolerate to (aggregate,
# selected rows or None).
Rule = Callable[[Tensor, int], "tuple[Tensor, Tensor | None]"]


def _unselective(aggregate: Callable[[Tensor, int], Tensor]) -> Rule:
    return lambda updates, f: (aggregate(updates, f), None)


def _multi_krum_rule(cfg: AggregatorConfig) -> Rule:
    require(cfg.m is None or cfg.m >= 1, f"multi_krum needs m >= 1 or null, got m={cfg.m}")
    return lambda updates, f: multi_krum_selection(updates, f, cfg.m)


def _check_multi_krum(n: int, f: int, cfg: AggregatorConfig) -> None:
    check_krum(n, f, "multi_krum")
    require(
        cfg.m is None or cfg.m <= n,
        f"multi_krum averages aggregator.m={cfg.m} of the {n} updates it receives: lower aggregator.m or set it null",
    )


def _geometric_median_rule(cfg: AggregatorConfig) -> Rule:
    check_geometric_median(cfg.nu, cfg.tol, cfg.max_iter)
    return _unselective(lambda x, f: geometric_median(x, nu=cfg.nu, tol=cfg.tol, max_iter=cfg.max_iter))


class _CenteredClippingRule:
    """Centered clipping as a rule, forwarding its state."""

    def __init__(self, cfg: AggregatorConfig) -> None:
        self.clipping = CenteredClipping(cfg.tau, cfg.iterations)

    def __call__(self, updates: Tensor, f: int) -> tuple[Tensor, None]:
        return self.clipping(updates), None

    def state_dict(self) -> dict[str, Any]:
        return self.clipping.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipping.load_state_dict(state)


def _any_n(rule: str) -> Callable[[int, int, AggregatorConfig], None]:
    return lambda n, f, cfg: require(n >= 1, f"{rule} needs at least one update, got n={n}")


def _honest_majority(rule: str) -> Callable[[int, int, AggregatorConfig], None]:
    return lambda n, f, cfg: require_honest_majority(n, f, rule)


def _on_n_f(check: Callable[[int, int], None]) -> Callable[[int, int, AggregatorConfig], None]:
    return lambda n, f, cfg: check(n, f)


@dataclass(frozen=True)
class RuleSpec:
    # cfg -> the rule, raising a one-line UserError on out-of-range parameters.
    make: Callable[[AggregatorConfig], Rule]
    # (n, f, cfg) -> None, raising the rule's one-line UserError.
    check: Callable[[int, int, AggregatorConfig], None]


# Every rule but the mean claims robustness to f, so needs at least n > 2f; the mean claims none and
# runs under any f (to show what an attack does to an unprotected server).
AGGREGATORS: dict[str, RuleSpec] = {
    "mean": RuleSpec(lambda cfg: _unselective(lambda x, f: mean(x)), _any_n("mean")),
    "median": RuleSpec(lambda cfg: _unselective(lambda x, f: median(x)), _honest_majority("median")),
    "trimmed_mean": RuleSpec(lambda cfg: _unselective(trimmed_mean), _on_n_f(check_trimmed_mean)),
    "krum": RuleSpec(lambda cfg: krum_selection, _on_n_f(check_krum)),
    "multi_krum": RuleSpec(_multi_krum_rule, _check_multi_krum),
    "geometric_median": RuleSpec(_geometric_median_rule, _honest_majority("geometric_median")),
    "bulyan": RuleSpec(lambda cfg: bulyan_selection, _on_n_f(check_bulyan)),
    "centered_clipping": RuleSpec(_CenteredClippingRule, _honest_majority("centered_clipping")),
}


@dataclass(frozen=True)
class PreSpec:
    # (updates, cfg, f, generator) -> (mixed updates, (n', n) bool membership of outputs in inputs,
    # or None where output row i stands for input row i).
    apply: Callable[[Tensor, AggregatorConfig, int, torch.Generator], "tuple[Tensor, Tensor | None]"]
    # (n, cfg) -> number of rows out.
    rows_out: Callable[[int, AggregatorConfig], int]
    # (n, f) -> None, raising a one-line UserError.
    check: Callable[[int, int], None]
    # cfg -> None, raising a one-line UserError on out-of-range parameters.
    validate: Callable[[AggregatorConfig], None]


def _bucketing_step(
    updates: Tensor, cfg: AggregatorConfig, f: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    mixing = bucketing_matrix(updates.shape[0], cfg.bucket_size, generator, updates.dtype, updates.device)
    return mixing @ updates, mixing > 0


def _no_condition(*args: Any) -> None:
    return None


PRE_AGGREGATORS: dict[str, PreSpec] = {
    # NNM's row i is client i's update mixed with its neighbours: it stands for client i.
    "nnm": PreSpec(lambda x, cfg, f, g: (nnm(x, f), None), lambda n, cfg: n, check_nnm, _no_condition),
    "bucketing": PreSpec(
        _bucketing_step,
        lambda n, cfg: math.ceil(n / cfg.bucket_size),
        _no_condition,
        lambda cfg: check_bucket_size(cfg.bucket_size),
    ),
    "clipping": PreSpec(
        lambda x, cfg, f, g: (static_clipping(x, cfg.clip_threshold), None),
        lambda n, cfg: n,
        _no_condition,
        lambda cfg: check_clip_threshold(cfg.clip_threshold),
    ),
}


class AggregationFailed(UserError):
    """A round's (or step's) updates cannot be aggregated soundly: too few finite ones are left for the
    rule's precondition. Raised mid-training, after the last complete checkpoint; printed as one line."""


def _choose(kind: str, name: str, choices: dict[str, Any]) -> None:
    require(name in choices, f"unknown {kind} {name!r}; choose one of: {', '.join(choices)}")


class RobustAggregator:
    """The pre-aggregators of ``cfg.pre`` in order, then the rule ``cfg.name``: (n, d) -> (d,).

    Holds the state a run must checkpoint: the bucketing generator and centered clipping's centre.
    """

    def __init__(self, cfg: AggregatorConfig, f: int, seed: int) -> None:
        self.name = cfg.name
        self.pre = list(cfg.pre)
        self.f = f
        self._cfg = cfg
        self._spec = AGGREGATORS[cfg.name]
        self._rule = self._spec.make(cfg)
        self._generator = torch.Generator().manual_seed(seed)

    def check(self, n: int) -> None:
        """Raise the one-line UserError this pipeline would raise on n updates; call it before training.

        Bucketing leaves ceil(n / bucket_size) inputs for what follows, with the same f.
        """
        for name in self.pre:
            PRE_AGGREGATORS[name].check(n, self.f)
            n = PRE_AGGREGATORS[name].rows_out(n, self._cfg)
        self._spec.check(n, self.f, self._cfg)

    def aggregate(self, updates: Tensor) -> Aggregation:
        """The aggregate of the (n, d) updates and, for selecting rules, the selected clients.

        Rows with a non-finite entry are dropped first: one of them would turn any weighted
        combination into NaN. A dropped row may be an honest client that diverged as well as a
        Byzantine one, so f stays as it is: the n' rows left may still hold f Byzantine ones, and
        the preconditions are checked again for (n', f). Where they fail, no rule can aggregate
        the round soundly and ``AggregationFailed`` says so (a Byzantine client sending NaN can
        thus stop a run whose n leaves no slack over the precondition, rather than silently
        weaken it).
        """
        # A row's sum is non-finite when an entry is (or when its entries overflow float range):
        # one read of the updates, no (n, d) mask.
        kept = torch.isfinite(updates.sum(dim=1)).nonzero().flatten()
        if len(kept) < len(updates):
            self._check_after_dropping(len(updates), len(kept))
            updates = updates.index_select(0, kept)
        membership: Tensor | None = None
        for name in self.pre:
            updates, step = PRE_AGGREGATORS[name].apply(updates, self._cfg, self.f, self._generator)
            if step is not None:
                membership = step if membership is None else (step.to(torch.float32) @ membership.to(torch.float32)) > 0
        value, selected = self._rule(updates, self.f)
        if selected is not None and membership is not None:
            selected = membership[selected].any(dim=0).nonzero().flatten()
        if selected is not None:
            selected = kept[selected.to(kept.device)]
        return Aggregation(value, selected)

    def _check_after_dropping(self, n: int, kept: int) -> None:
        try:
            self.check(kept)
        except UserError as error:
            raise AggregationFailed(
                f"{n - kept} of {n} updates had non-finite entries (NaN or inf) and were dropped, leaving "
                f"{kept} for f={self.f}: {error}; if honest updates diverged, lower train.lr"
            ) from None

    def __call__(self, updates: Tensor) -> Tensor:
        return self.aggregate(updates).value

    def state_dict(self) -> dict[str, Any]:
        rule_state = self._rule.state_dict() if isinstance(self._rule, _CenteredClippingRule) else {}
        return {"name": self.name, "rule": rule_state, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"name", "rule", "generator"}:
            raise ValueError(f"aggregator state must have keys generator, name, rule; got {sorted(state)}")
        if state["name"] != self.name:
            raise ValueError(f"aggregator state is for {state['name']!r}, this aggregator is {self.name!r}")
        if isinstance(self._rule, _CenteredClippingRule):
            self._rule.load_state_dict(state["rule"])
        self._generator.set_state(state["generator"])


def tolerated_byzantine(aggregator: AggregatorConfig, attack: AttackConfig) -> int:
    """The f a rule must tolerate: ``aggregator.f``, by default the ``attack.byzantine`` attackers set up."""
    return attack.byzantine if aggregator.f is None else aggregator.f


def build_aggregator(cfg: AggregatorConfig, f: int, seed: int) -> RobustAggregator:
    """The aggregator ``cfg`` names, tolerating f Byzantine updates; bucketing draws from ``seed``.

    Unknown names and out-of-range parameters raise a one-line UserError here; conditions on the
    number of updates are checked by ``RobustAggregator.check(n)`` and on every call.
    """
    _choose("aggregator", cfg.name, AGGREGATORS)
    for name in cfg.pre:
        _choose("pre-aggregator", name, PRE_AGGREGATORS)
        PRE_AGGREGATORS[name].validate(cfg)
    require_f(f, cfg.name)
    return RobustAggregator(cfg, f, seed)
