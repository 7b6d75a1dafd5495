"""``RobustStrategy``: dptrain's robust aggregation (``dptrain.robust``: any rule, pre-aggregators, f,
stateful rules such as centered clipping) as a strategy for a plain Flower ServerApp (flwr 1.42)."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from dptrain.config import AggregatorConfig
from dptrain.robust import build_aggregator


class RobustStrategy(FedAvg):
    """FedAvg's round lifecycle (node sampling, messages, evaluation) with dptrain's robust aggregation:
    ``RobustStrategy(rule="krum", f=4, pre=["nnm"])``.

    Each round the replies' models are read as updates ``x_i = local_i - global`` (an (n, d) stack,
    in the order of ``ArrayRecord`` keys of the global model), aggregated by
    ``build_aggregator(AggregatorConfig(rule, f, pre, **params))``, and the new global model is
    ``global + server_lr * aggregate``. Aggregating updates rather than models keeps stateful rules
    right: centered clipping's centre is a momentum of updates (Karimireddy et al. 2021).

    Unlike Flower's FedAvg, Krum and FedTrimmedAvg, replies are never weighted by the example count a
    client reports: a Byzantine client would inflate it. The rule's precondition (e.g. Krum's
    n > 2f + 2) is checked on every round's n and a round that breaks it raises a one-line
    ``UserError``. The aggregator's state (``aggregator.state_dict()``) is the caller's to checkpoint.
    """

    def __init__(
        self,
        rule: str = "mean",
        f: int = 0,
        pre: Sequence[str] = (),
        *,
        server_lr: float = 1.0,
        seed: int = 0,
        rule_params: dict[str, Any] | None = None,
        **fedavg: Any,
    ) -> None:
        super().__init__(**fedavg)
        config = AggregatorConfig(name=rule, f=f, pre=list(pre), **(rule_params or {}))
        self.aggregator = build_aggregator(config, f, seed)
        self.server_lr = server_lr
        self._global: dict[str, torch.Tensor] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages; the global model they carry is kept, the reference of this round's updates."""
        self._global = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The robust aggregate of the valid replies' updates, and how many updates it saw and kept."""
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid or self._global is None:
            return None, None
        names = list(self._global)
        base = torch.cat([self._global[name].flatten().double() for name in names])
        rows = []
        for reply in valid:
            local = reply.content[self.arrayrecord_key].to_torch_state_dict()
            if list(local) != names or any(local[n].shape != self._global[n].shape for n in names):
                raise ValueError(
                    f"round {server_round}: node {reply.metadata.src_node_id} replied with arrays "
                    f"{list(local)} that do not match the global model's"
                )
            rows.append(torch.cat([local[name].flatten().double() for name in names]) - base)
        aggregation = self.aggregator(torch.stack(rows))
        step = base + self.server_lr * aggregation.value
        model, offset = {}, 0
        for name in names:
            reference = self._global[name]
            model[name] = step[offset : offset + reference.numel()].reshape(reference.shape).to(reference.dtype)
            offset += reference.numel()
        metrics = {"updates": len(rows)}
        if aggregation.selected is not None:
            metrics["selected"] = int(np.asarray(aggregation.selected.cpu()).size)
        return ArrayRecord(torch_state_dict=model), MetricRecord(metrics)
