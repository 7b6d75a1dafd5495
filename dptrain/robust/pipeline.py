"""The aggregator a config names: the pre-aggregators of ``aggregator.pre`` then the rule of
``aggregator=...``, looked up in their registries and composed by ``build_aggregator``."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from dptrain.config import AggregatorConfig, AttackConfig
from dptrain.errors import UserError, require
from dptrain.robust.pre_aggregation import PRE_AGGREGATORS, PreAggregator
from dptrain.robust.primitives import check_updates, require_state, state_error
from dptrain.robust.rules import AGGREGATORS, Aggregation, AggregationRule


class AggregationFailed(UserError):
    """A round's (or step's) updates cannot be aggregated soundly: too few finite ones are left for the
    rule's precondition. Raised mid-training, after the last complete checkpoint; printed as one line."""


def _choose(kind: str, name: str, choices: dict[str, Any]) -> None:
    require(name in choices, f"unknown {kind} {name!r}; choose one of: {', '.join(choices)}")


class RobustAggregator:
    """The pre-aggregators in order, then the rule: ``aggregator(updates) -> Aggregation``, as a rule.

    Holds the state a run must checkpoint: its parts' (the bucketing generator, centered clipping's
    centre). f is the rule's: bucketing leaves fewer rows for what follows, with the same f.
    """

    def __init__(self, rule: AggregationRule, pre: Sequence[PreAggregator] = ()) -> None:
        self.rule = rule
        self.pre = list(pre)
        self.name = rule.name
        self.f = rule.f

    def check(self, n: int) -> None:
        """Raise the one-line UserError this pipeline would raise on n updates; call it before training."""
        for step in self.pre:
            step.check(n)
            n = step.rows_out(n)
        self.rule.check(n)

    def __call__(self, updates: Tensor) -> Aggregation:
        """The aggregate of the (n, d) updates and, for selecting rules, the selected rows of ``updates``
        (all members of a selected bucket after bucketing).

        Rows with a non-finite entry are dropped first: one of them would turn any weighted
        combination into NaN. A dropped row may be an honest client that diverged as well as a
        Byzantine one, so f stays as it is: the n' rows left may still hold f Byzantine ones, and
        the preconditions are checked again for (n', f). Where they fail, no rule can aggregate
        the round soundly and ``AggregationFailed`` says so (a Byzantine client sending NaN can
        thus stop a run whose n leaves no slack over the precondition, rather than silently
        weaken it).
        """
        check_updates(updates, self.name)
        # A row's sum is non-finite when an entry is (or when its entries overflow float range):
        # one read of the updates, no (n, d) mask.
        kept = torch.isfinite(updates.sum(dim=1)).nonzero().flatten()
        if len(kept) < len(updates):
            self._check_after_dropping(len(updates), len(kept))
            updates = updates.index_select(0, kept)
        membership: Tensor | None = None
        for step in self.pre:
            updates, members = step(updates)
            if members is not None:
                membership = members if membership is None else (members.float() @ membership.float()) > 0
        value, selected = self.rule(updates)
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

    def state_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self._names(),
            "pre": [step.state_dict() for step in self.pre],
            "rule": self.rule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` wrote; the state of another pipeline is refused in one line."""
        require_state("aggregator", state, ("pipeline", "pre", "rule"))
        names = self._names()
        require(state["pipeline"] == names, state_error("aggregator", f"is for {state['pipeline']}, not {names}"))
        require(
            isinstance(state["pre"], list) and len(state["pre"]) == len(self.pre),
            state_error("aggregator", f"must hold one pre-aggregator state for each of {names[:-1]}"),
        )
        for step, step_state in zip(self.pre, state["pre"]):
            step.load_state_dict(step_state)
        self.rule.load_state_dict(state["rule"])

    def _names(self) -> list[str]:
        """The pre-aggregators' names in order, then the rule's."""
        return [step.name for step in self.pre] + [self.name]


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
    rule = AGGREGATORS[cfg.name].from_config(cfg, f)
    # One generator for every random pre-aggregator: their draws interleave in pipeline order.
    generator = torch.Generator().manual_seed(seed)
    return RobustAggregator(rule, [PRE_AGGREGATORS[name].from_config(cfg, f, generator) for name in cfg.pre])
