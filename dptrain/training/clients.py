"""Federated clients: the partition of the members over clients, which clients are Byzantine, the
participation schedule, each client's local privacy plan, and one client's local training."""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import TensorDataset

from dptrain.config import Config, PrivacyConfig
from dptrain.data import dirichlet_partition, iid_partition
from dptrain.errors import UserError
from dptrain.privacy import PrivacyPlan, plan_privacy
from dptrain.privacy.ledger import PrivacyLedger
from dptrain.training.loop import AdversarialObjective, train_epoch
from dptrain.training.recipe import private_training
from dptrain.seeds import Stream, derived_seed


def clients_per_round(cfg: Config) -> int:
    """The clients a round holds (dp_level=user: in expectation); null means all of them."""
    federation = cfg.federation
    return federation.clients if federation.clients_per_round is None else federation.clients_per_round


def byzantine_clients(cfg: Config) -> np.ndarray:
    """The sorted ids of the ``attack.byzantine`` Byzantine clients, drawn uniformly from train.seed."""
    rng = np.random.default_rng(derived_seed(cfg.train.seed, Stream.BYZANTINE))
    return np.sort(rng.choice(cfg.federation.clients, size=cfg.attack.byzantine, replace=False))


def participation(cfg: Config) -> np.ndarray:
    """(rounds, clients) bools, True where a client trains in a round; drawn from train.seed before training.

    ``dp_level=user``: each client joins each round independently with probability
    q = clients_per_round / clients, the Poisson sampling DP-FedAvg's accounting assumes
    (McMahan et al. 2018). Otherwise exactly clients_per_round clients, uniformly without
    replacement, so robust rules always see the n their precondition was checked for. The schedule
    depends on no record, so a client's accountant only needs the rounds it trains in.
    """
    federation = cfg.federation
    rng = np.random.default_rng(derived_seed(cfg.train.seed, Stream.SCHEDULE))
    per_round = clients_per_round(cfg)
    if federation.dp_level == "user":
        return rng.random((federation.rounds, federation.clients)) < per_round / federation.clients
    schedule = np.zeros((federation.rounds, federation.clients), dtype=bool)
    for round_schedule in schedule:
        round_schedule[rng.choice(federation.clients, size=per_round, replace=False)] = True
    return schedule


def partition_members(cfg: Config, members: int, labels: np.ndarray | None) -> list[np.ndarray]:
    """Positions into the member split, one sorted array per client, seeded by train.seed.

    ``iid`` needs only the member count; ``dirichlet`` (Hsu et al. 2019) needs the members' labels.
    """
    federation = cfg.federation
    seed = derived_seed(cfg.train.seed, Stream.PARTITION)
    if federation.partition == "iid":
        return iid_partition(members, federation.clients, seed)
    return dirichlet_partition(labels, federation.clients, federation.alpha, seed)


def _privacy_key(cfg: PrivacyConfig) -> tuple:
    return tuple(sorted(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True).items()))


# Calibrating one client's noise takes 1 to 5 s under the PRV or RDP accountant. A plan depends on
# the client's record count only through its batches per epoch, ceil(n / batch_size), so clients
# that agree on it and on their epochs share one calibration, here and across the cells of a sweep
# (scripts/robust_matrix.py).
@functools.lru_cache(maxsize=None)
def _cached_plan(privacy: tuple, batches: int, batch_size: int, epochs: int) -> PrivacyPlan:
    return plan_privacy(
        PrivacyConfig(**dict(privacy)),
        members=batches * batch_size,
        batch_size=batch_size,
        epochs=epochs,
        length_key="federation.rounds or federation.local_epochs",
    )


def local_plans(cfg: Config, sizes: list[int], rounds_in: np.ndarray) -> list[PrivacyPlan | None]:
    """Each client's plan for its local training (None for a client that never trains).

    ``plan_privacy`` for client i's n_i records over its ``rounds_in[i] * local_epochs`` epochs:
    under ``dp_level=sample`` and a private config, its noise is calibrated so that all its planned
    participation spends at most ``privacy.target_epsilon``. Under ``dp_level=user`` local training
    is non-private (DP-FedAvg privatizes at the server).
    """
    local_epochs, batch_size = cfg.federation.local_epochs, cfg.train.batch_size
    local_privacy = cfg.privacy
    if cfg.federation.dp_level == "user":
        local_privacy = PrivacyConfig(name="none", target_epsilon=None)
    privacy = _privacy_key(local_privacy)
    plans: list[PrivacyPlan | None] = []
    for client, (size, rounds) in enumerate(zip(sizes, rounds_in)):
        if rounds == 0:
            plans.append(None)
            continue
        try:
            batches = math.ceil(size / batch_size)
            plans.append(_cached_plan(privacy, batches, batch_size, int(rounds) * local_epochs))
        except UserError as error:
            raise UserError(f"federated client {client} ({size} records, {rounds} rounds): {error}") from None
    return plans


@dataclass
class Client:
    """One client: its records (poisoned for a data-poisoning Byzantine client), its local plan, and
    its privacy ledger (private plans only), charged in every round it trains in so its spend composes
    over its participation."""

    id: int
    data: TensorDataset
    byzantine: bool
    plan: PrivacyPlan | None
    ledger: PrivacyLedger | None = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = PrivacyLedger.for_plan(self.plan) if self.plan is not None and self.plan.private else None


@dataclass(frozen=True)
class LocalUpdate:
    """What a client sends: the flat delta ``local - global`` of the model's parameters."""

    delta: Tensor
    loss: float


def local_update(
    cfg: Config,
    client: Client,
    global_model: nn.Module,
    sampling: torch.Generator,
    noise: torch.Generator,
    device: torch.device,
    adversarial: AdversarialObjective | None = None,
) -> LocalUpdate:
    """Train a copy of ``global_model`` for ``federation.local_epochs`` epochs on the client's records
    with ``train.*`` and the client's plan, through the shared step loop (``private_training``,
    ``train_epoch``); return the parameter delta.

    Under a private plan the client runs DP-SGD (Abadi et al. 2016) and its ledger charges exactly
    the steps taken. With ``adversarial`` (``dptrain.training.adversarial``) every local step trains on
    adversarial examples of the client's own records, crafted by the client from its current local model.
    Precondition: the client trains in this round of the schedule its plan was made for.
    """
    model = copy.deepcopy(global_model)
    training = private_training(
        cfg, model, client.data, client.plan, batch_size=cfg.train.batch_size, sampling=sampling, noise=noise,
        ledger=client.ledger,
    )  # fmt: skip
    losses = [train_epoch(training, device, adversarial).loss for _ in range(cfg.federation.local_epochs)]
    with torch.no_grad():
        delta = parameters_to_vector(model.parameters()) - parameters_to_vector(global_model.parameters())
    return LocalUpdate(delta, float(np.mean(losses)))
