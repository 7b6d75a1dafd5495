"""The Flower engine: the federated recipe as a Flower app (flwr 1.42 Message API) run under the
Simulation Engine.

The ServerApp runs ``federated.train_target`` itself: the same plan, Byzantine clients, attacks
(omniscient ones crafted at the server from the round's honest replies, as the builtin engine's
``byzantine_rows`` does), aggregator, DP-FedAvg noise, TensorBoard, checkpoints and artifacts. Only
the clients' local training moves: ``GridTraining`` sends each scheduled client the global model in
a ``train`` Message and the ClientApp (``client_app``) runs ``federated.client_round`` on the
partition its SuperNode holds (``node_config["partition-id"]``), data-poisoning Byzantine clients
poisoning their own records. Each local update draws from (seed, round, client) streams, so both
engines give the same updates and aggregates.

Sample-level DP: the client's ledger state travels with the message and back, so the client charges
its own accountant (and refuses a step beyond its plan) while the server keeps the copy that
``metrics.json`` and checkpoints need, exactly as in the builtin engine.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from dptrain.config import Config, recipe_hash
from dptrain.data import InputUnits, load, make_split, prepare
from dptrain.errors import UserError
from dptrain.tracking.tensorboard import TensorBoardLog
from dptrain.training import federated
from dptrain.training.checkpoint import Checkpoint
from dptrain.training.clients import Client, LocalUpdate
from dptrain.training.recipe import resolve_device
from dptrain.training.target import TargetRun

if TYPE_CHECKING:
    from flwr.app import Context

# How long the ServerApp waits for every client's SuperNode to connect.
NODE_TIMEOUT_S = 300.0


def _ledger_json(client: Client) -> str:
    return "" if client.ledger is None else json.dumps(client.ledger.state_dict())


class GridTraining:
    """``federated.LocalTraining`` over a Flower Grid: one ``train`` Message per scheduled client to the
    SuperNode holding its partition, the flat parameter delta and the client's ledger state back."""

    def __init__(self, grid, clients: int, timeout: float = NODE_TIMEOUT_S) -> None:
        self.grid, self.clients, self.timeout = grid, clients, timeout
        self._nodes: dict[int, int] | None = None

    def nodes(self) -> dict[int, int]:
        """Client id (the SuperNode's ``partition-id``) -> node id, asked once of every node."""
        if self._nodes is not None:
            return self._nodes
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        deadline = time.monotonic() + self.timeout
        while len(node_ids := sorted(self.grid.get_node_ids())) < self.clients:
            if time.monotonic() > deadline:
                raise UserError(
                    f"federation.engine=flower: {len(node_ids)} of federation.clients={self.clients} SuperNodes "
                    f"connected within {self.timeout:.0f} s: start one SuperNode per client"
                )
            time.sleep(0.05)
        queries = [
            Message(RecordDict({"config": ConfigRecord()}), message_type=MessageType.QUERY, dst_node_id=node)
            for node in node_ids
        ]
        nodes: dict[int, int] = {}
        for reply in self._send(queries, "partition query"):
            nodes[int(reply.content["config"]["partition-id"])] = reply.metadata.src_node_id
        if sorted(nodes) != list(range(self.clients)):
            raise UserError(
                f"federation.engine=flower: the SuperNodes hold partitions {sorted(nodes)}, not 0..{self.clients - 1}: "
                "give each SuperNode its own --node-config partition-id"
            )
        self._nodes = nodes
        return nodes

    def _send(self, messages: list, what: str) -> list:
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        failed = [reply for reply in replies if reply.has_error()]
        if failed:
            raise RuntimeError(f"Flower {what}: a ClientApp failed: {failed[0].error.reason}")
        if len(replies) != len(messages):
            raise RuntimeError(f"Flower {what}: {len(replies)} of {len(messages)} clients replied within {self.timeout:.0f} s")
        return replies

    def __call__(self, server: federated.FederatedServer, round_index: int, clients: list[int]) -> dict[int, LocalUpdate]:
        from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

        nodes = self.nodes()
        model = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in server.model.state_dict().items()})
        messages = [
            Message(
                RecordDict(
                    {
                        "global": model,
                        "config": ConfigRecord(
                            {"round": round_index, "client": i, "ledger": _ledger_json(server.clients[i])}
                        ),
                    }
                ),
                message_type=MessageType.TRAIN,
                dst_node_id=nodes[i],
            )
            for i in clients
        ]
        updates: dict[int, LocalUpdate] = {}
        for reply in self._send(messages, f"round {round_index + 1}"):
            config = reply.content["config"]
            client = server.clients[int(config["client"])]
            if client.ledger is not None:
                client.ledger.load_state_dict(json.loads(config["ledger"]))
            delta = torch.from_numpy(reply.content["update"]["delta"].numpy()).to(server.device)
            updates[client.id] = LocalUpdate(delta, float(reply.content["metrics"]["loss"]))
        return updates


@dataclass
class ClientSide:
    """What a ClientApp process holds for one config: the clients (data partitioned and poisoned as the
    server's), a model to load the global parameters into, the device and the data's units."""

    clients: list[Client]
    model: nn.Module
    device: torch.device
    units: InputUnits | None


_CLIENT_SIDES: dict[str, ClientSide] = {}


def client_side(cfg: Config) -> ClientSide:
    """The ``ClientSide`` of ``cfg``, built once per process: the split, partition, plan (each client
    calibrates its own noise) and Byzantine clients all follow from the config and train.seed."""
    key = recipe_hash(cfg)
    if key not in _CLIENT_SIDES:
        raw = load(cfg.dataset)
        data = prepare(raw, make_split(raw, cfg.dataset))
        plan = federated.federation_plan(cfg, len(data.members), data.members.tensors[1].numpy())
        _, clients, _ = federated.federation_clients(cfg, plan, data.members, data.num_classes)
        device = resolve_device(cfg.train.device)
        model, _ = federated.global_model(cfg, data.input_shape, data.num_classes, plan, device)
        _CLIENT_SIDES[key] = ClientSide(clients, model, device, data.units)
    return _CLIENT_SIDES[key]


def client_app(config_of: Callable[[Context], Config]):
    """The ClientApp of the recipe ``config_of(context)`` gives (the simulated run's config, or a
    deployed app's run config): ``query`` answers the SuperNode's partition id; ``train`` runs that
    client's ``federated.client_round`` from the global model and replies with the delta, the mean
    local loss, the client's epsilon so far (private plans) and its ledger state."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def partition(message, context):
        partition_id = int(context.node_config["partition-id"])
        return Message(RecordDict({"config": ConfigRecord({"partition-id": partition_id})}), reply_to=message)

    @app.train()
    def train(message, context):
        config = message.content["config"]
        client_id, partition_id = int(config["client"]), int(context.node_config["partition-id"])
        if client_id != partition_id:
            raise RuntimeError(f"asked to train client {client_id} on the SuperNode of partition {partition_id}")
        cfg = config_of(context)
        side = client_side(cfg)
        client = side.clients[client_id]
        if client.ledger is not None:
            client.ledger.load_state_dict(json.loads(config["ledger"]))
        side.model.load_state_dict(message.content["global"].to_torch_state_dict())
        update = federated.client_round(cfg, client, side.model, int(config["round"]), side.device, side.units)
        metrics = {"loss": update.loss}
        if client.ledger is not None:
            metrics["epsilon"] = client.ledger.epsilon()
        content = RecordDict(
            {
                "update": ArrayRecord(torch_state_dict={"delta": update.delta.cpu()}),
                "metrics": MetricRecord(metrics),
                "config": ConfigRecord({"client": client_id, "ledger": _ledger_json(client)}),
            }
        )
        return Message(content, reply_to=message)

    return app


@contextmanager
def _quiet_flower():
    """Flower logs every message round at INFO (and run_simulation's deprecation at WARNING): keep
    dptrain's console to its own progress and errors."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


_DEPLOYED_GRID: ContextVar = ContextVar("dptrain_flower_grid", default=None)


@contextmanager
def deployed_on(grid):
    """Within it, Flower runs of the recipe train their clients over ``grid`` (a deployed ServerApp's,
    ``dptrain.flower_app``) instead of starting the Simulation Engine."""
    token = _DEPLOYED_GRID.set(grid)
    try:
        yield
    finally:
        _DEPLOYED_GRID.reset(token)


def train_on_flower(
    cfg: Config, run_dir: Path, plan: federated.FederatedPlan, tb: TensorBoardLog, checkpoint: Checkpoint | None
) -> TargetRun:
    """``federated.train_target`` with the clients trained over the deployed app's grid (``deployed_on``)
    or, by default, under the Simulation Engine (``simulate``)."""
    grid = _DEPLOYED_GRID.get()
    if grid is None:
        return simulate(cfg, run_dir, plan, tb, checkpoint)
    training = GridTraining(grid, cfg.federation.clients)
    return federated.train_target(cfg, run_dir, plan, tb, checkpoint, local_training=training)


def simulate(
    cfg: Config, run_dir: Path, plan: federated.FederatedPlan, tb: TensorBoardLog, checkpoint: Checkpoint | None
) -> TargetRun:
    """``federated.train_target`` run by a Flower ServerApp, one SuperNode per client under the
    Simulation Engine (``federation.flower``: backend, each ClientApp's CPUs and GPUs)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    finished: list[TargetRun] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        training = GridTraining(grid, cfg.federation.clients)
        finished.append(federated.train_target(cfg, run_dir, plan, tb, checkpoint, local_training=training))

    flower = cfg.federation.flower
    backend_config = {
        "client_resources": {"num_cpus": flower.client_cpus, "num_gpus": flower.client_gpus},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False},
    }
    with _quiet_flower():
        run_simulation(
            server_app,
            client_app(lambda context: cfg),
            num_supernodes=cfg.federation.clients,
            backend_name=flower.backend,
            backend_config=backend_config,
        )
    if not finished:
        raise RuntimeError("the Flower ServerApp stopped before the federation finished")
    return finished[0]
