"""The federated recipe (``federation=fedavg``): FedAvg over the members partitioned among clients,
some of them Byzantine, a robust aggregator at the server, and sample-level (local DP-SGD) or
user-level (DP-FedAvg) privacy.

Each round the scheduled clients train from the global model through the shared step loop
(``clients.local_update``), Byzantine clients replace or poison their updates (``dptrain.robust``
attacks), the server aggregates the (n, d) stack of flat deltas and applies
``global += server_lr * aggregate``. Audits run on the final global model with the honest clients'
records as members; their reference models are federations too, trained by the same round loop
(``train_federation``) over their own records (``dptrain.audit.reference``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from dptrain.config import Config, recipe_hash
from dptrain.data import (
    InputUnits,
    SplitData,
    SplitSizes,
    audited_split,
    describe,
    load,
    make_split,
    split_sizes,
    subset,
)
from dptrain.errors import UserError
from dptrain.models import build_model, ensure_dp_compatible
from dptrain.privacy import PrivacyPlan
from dptrain.privacy.accounting import CURVE_ACCOUNTANT
from dptrain.privacy.ledger import PrivacyLedger
from dptrain.privacy.plan import plan_mechanism
from dptrain.robust import (
    Attack,
    alie_z,
    build_aggregator,
    build_attack,
    byzantine_rows,
    static_clipping,
    tolerated_byzantine,
)
from dptrain.seeds import Stream, derived_seed
from dptrain.tracking.artifacts import read_metrics, save_model, write_metrics
from dptrain.tracking.tensorboard import TensorBoardLog
from dptrain.training.adversarial import adversarial_examples
from dptrain.training.checkpoint import Checkpoint
from dptrain.training.clients import (
    Client,
    LocalUpdate,
    byzantine_clients,
    clients_per_round,
    local_plans,
    local_update,
    participation,
    partition_members,
)
from dptrain.training.loop import evaluate, predict
from dptrain.training.metrics import FederationMetrics, RunMetrics
from dptrain.training.recipe import resolve_device, thread_choice
from dptrain.training.target import (
    TargetRun,
    independent_epsilon,
    load_data,
    reference_base,
    run_metrics,
    trained_model,
)
from dptrain.training.threads import ThreadChoice

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class FederatedPlan:
    """The plan of a federated run, fixed before training from the seed alone (and, for a Dirichlet
    partition, the members' labels): the federation and the guarantee it reports.

    ``guarantee`` is the reported privacy plan. ``dp_level=user``: the server's DP-FedAvg mechanism,
    one subsampled Gaussian step per round (``steps = rounds``, ``sample_rate`` = q,
    ``steps_per_epoch = 1``). ``dp_level=sample``: the local plan of ``reported_client``, the honest
    client whose planned epsilon is largest (the most local steps for a non-private run).
    ``participation[r, i]`` says whether client i trains in round r; ``client_plans[i]`` is its
    local plan (None if it never trains).
    """

    guarantee: PrivacyPlan
    dp_level: str
    byzantine: tuple[int, ...]
    reported_client: int | None
    client_sizes: tuple[int, ...] = field(repr=False)
    participation: np.ndarray = field(repr=False)
    client_plans: tuple[PrivacyPlan | None, ...] = field(repr=False)

    @property
    def private(self) -> bool:
        return self.guarantee.private


def _server_plan(cfg: Config) -> PrivacyPlan:
    """DP-FedAvg's plan (McMahan, Ramage, Talwar, Zhang, ICLR 2018): ``rounds`` steps of the
    Gaussian mechanism on Poisson-sampled clients at q = clients_per_round / clients.

    With a target the noise multiplier is calibrated so the rounds spend at most
    ``privacy.target_epsilon``; an explicit one must stay within a target set beside it.
    """
    rounds = cfg.federation.rounds
    q = clients_per_round(cfg) / cfg.federation.clients
    return plan_mechanism(
        cfg.privacy,
        sample_rate=q,
        steps=rounds,
        steps_per_epoch=1,
        schedule=f"federation.rounds={rounds} at client sampling rate {q:.4g}",
        length_key="federation.rounds",
    )


def member_labels(cfg: Config) -> np.ndarray:
    data = load(cfg.dataset)
    return data.labels[torch.from_numpy(make_split(data, cfg.dataset).members)].numpy()


def plan(cfg: Config, sizes: SplitSizes) -> FederatedPlan:
    """The run's federation (partition sizes, Byzantine clients, participation schedule) and privacy
    plan, fixed before training (``federation_plan`` over the members).

    A Dirichlet partition needs the members' labels, the one thing read from the data here.
    """
    labels = member_labels(cfg) if cfg.federation.partition == "dirichlet" else None
    return federation_plan(cfg, sizes.members, labels)


def federation_plan(cfg: Config, members: int, labels: np.ndarray | None) -> FederatedPlan:
    """The federation of ``cfg`` over ``members`` records (``labels``: theirs, needed by a Dirichlet
    partition) and its privacy plan, drawn from train.seed alone.

    ``dp_level=sample``: every client's noise is calibrated (``local_plans``) so that all the rounds
    the schedule gives it spend at most ``privacy.target_epsilon``; the guarantee is per record of
    an honest client, against the server and whatever aggregator follows. ``dp_level=user``: see
    ``_server_plan``; the guarantee is per client.
    """
    client_sizes = [len(part) for part in partition_members(cfg, members, labels)]
    schedule = participation(cfg)
    byzantine = byzantine_clients(cfg)
    plans = local_plans(cfg, client_sizes, schedule.sum(axis=0))
    server = _server_plan(cfg) if cfg.federation.dp_level == "user" else None
    if server is not None:
        reported, base = None, server
    else:
        # Not empty: every round holds attack.byzantine < clients_per_round Byzantine clients.
        honest = [i for i, p in enumerate(plans) if p is not None and i not in byzantine]
        key = (lambda i: plans[i].planned_epsilon) if plans[honest[0]].private else (lambda i: plans[i].steps)
        reported = max(honest, key=key)
        base = plans[reported]
    return FederatedPlan(
        guarantee=base,
        dp_level=cfg.federation.dp_level,
        byzantine=tuple(int(i) for i in byzantine),
        reported_client=reported,
        client_sizes=tuple(client_sizes),
        participation=schedule,
        client_plans=tuple(plans),
    )


def resumed_step(plan: FederatedPlan, checkpoint: Checkpoint) -> int:
    """The first TensorBoard step after ``checkpoint`` (steps count rounds)."""
    return checkpoint.completed + 1


def dp_fedavg(
    updates: Tensor, expected_clients: float, clip: float | None, noise_multiplier: float, generator: torch.Generator
) -> Tensor:
    """DP-FedAvg's server step: ``(sum_i clip_C(x_i)) / m + N(0, (sigma C / m)^2 I)``.

    McMahan et al. 2018, Algorithm 1 with the fixed-denominator estimator: dividing by the expected
    number m = qN of clients, not by the number sampled, makes one client's contribution at most
    C / m, so each round is a Gaussian mechanism of noise multiplier sigma on Poisson-sampled
    clients. Every update is clipped here, Byzantine ones included. ``clip=None`` (a non-private
    run) gives the plain fixed-denominator mean. Precondition: clients were Poisson-sampled at q.
    """
    if clip is None:
        return updates.sum(dim=0) / expected_clients
    # A Poisson-sampled round may hold no client: the sum is then zero and only noise is released.
    clipped = static_clipping(updates, clip) if len(updates) else updates
    noise = torch.randn(updates.shape[1], generator=generator, device=generator.device, dtype=updates.dtype)
    return (clipped.sum(dim=0) + noise.to(updates.device) * noise_multiplier * clip) / expected_clients


def backdoor_success_rate(model: nn.Module, test: TensorDataset, attack: Attack, target_label: int, device) -> float:
    """Share of triggered test inputs whose true label is not ``target_label`` that the model
    classifies as ``target_label`` (Bagdasaryan et al. 2020's backdoor accuracy)."""
    inputs, labels = test.tensors
    keep = labels != target_label
    logits, _ = predict(model, TensorDataset(attack.trigger(inputs[keep]), labels[keep]), device)
    return (logits.argmax(dim=1) == target_label).float().mean().item()


def _nominal_attack_config(cfg: Config):
    """The attack config with ALIE's z fixed from the nominal round (clients_per_round, attack.byzantine).

    Baruch et al. derive z from the n and f the attacker plans for; a sampled round's own counts
    vary and, under Poisson sampling, may leave f > n / 2 where z is undefined.
    """
    if cfg.attack.name != "alie" or cfg.attack.z is not None:
        return cfg.attack
    return OmegaConf.merge(cfg.attack, {"z": alie_z(clients_per_round(cfg), cfg.attack.byzantine)})


def client_round(
    cfg: Config, client: Client, global_model: nn.Module, round_index: int, device, units: InputUnits | None
) -> LocalUpdate:
    """Client ``client``'s update in round ``round_index`` (``local_update`` from ``global_model``).

    Its batch sampling, DP noise and ``train.adversarial`` examples draw from streams seeded by
    (train.seed, round, client) alone, so the update is the same whichever process or machine
    computes it, in whatever order (the builtin and the Flower engine agree), and a resumed run
    draws what the uninterrupted one would.
    """
    seed = cfg.train.seed
    sampling = torch.Generator().manual_seed(derived_seed(seed, Stream.SAMPLING, round_index, client.id))
    noise = torch.Generator(device=device).manual_seed(derived_seed(seed, Stream.NOISE, round_index, client.id))
    adversarial = adversarial_examples(
        cfg, units, derived_seed(seed, Stream.ADVERSARIAL, round_index, client.id), device
    )
    return local_update(cfg, client, global_model, sampling, noise, device, adversarial)


# How a server gets the round's local updates: ``(server, round_index, client ids) -> {id: update}``.
LocalTraining = Callable[["FederatedServer", int, list[int]], dict[int, LocalUpdate]]


def train_in_process(server: FederatedServer, round_index: int, clients: list[int]) -> dict[int, LocalUpdate]:
    """The builtin engine: each client's ``client_round`` in this process, one after another."""
    return {
        i: client_round(server.cfg, server.clients[i], server.model, round_index, server.device, server.units)
        for i in clients
    }


@dataclass(frozen=True)
class RoundRecord:
    """What one round did: who trained, how large the updates were, whom a selecting rule kept."""

    sampled: np.ndarray
    byzantine: np.ndarray
    client_loss: float | None
    honest_norm: float | None
    byzantine_norm: float | None
    aggregate_norm: float
    selected: np.ndarray | None
    aggregation_seconds: float


def _mean_norm(updates: Tensor) -> float | None:
    return torch.linalg.vector_norm(updates, dim=1).mean().item() if len(updates) else None


@dataclass
class FederatedState:
    """What a federated run's checkpoint holds beside the global model: the aggregator's state (centered
    clipping's centre, bucketing's generator), the ledgers (the DP-FedAvg server's, or each private
    client's; None for the baseline) and the server's RNG states."""

    aggregator: dict
    ledgers: dict | None
    rng: dict


class FederatedServer:
    """The server of FedAvg under Byzantine clients: the global model, the aggregator, the
    DP-FedAvg ledger (user level), and the random generators whose state a checkpoint must carry."""

    def __init__(
        self,
        cfg: Config,
        plan: FederatedPlan,
        clients: list[Client],
        model: nn.Module,
        device,
        units: InputUnits | None,
        local_training: LocalTraining | None = None,
    ) -> None:
        self.cfg, self.plan, self.clients, self.model, self.device = cfg, plan, clients, model, device
        self.units = units
        self.local_training: LocalTraining = local_training or train_in_process
        seed = cfg.train.seed
        f = tolerated_byzantine(cfg.aggregator, cfg.attack)
        self.aggregator = build_aggregator(cfg.aggregator, f, derived_seed(seed, Stream.AGGREGATOR))
        self.attack_cfg = _nominal_attack_config(cfg)
        # The DP-FedAvg server's noise; clients draw from their own per-round streams (``client_round``).
        self.noise = torch.Generator(device=device).manual_seed(derived_seed(seed, Stream.NOISE))
        self.user_level = plan.dp_level == "user"
        self.ledger = PrivacyLedger.for_plan(plan.guarantee) if self.user_level and plan.private else None
        self.config_hash = recipe_hash(cfg)

    def attack(self, round_index: int) -> Attack:
        # A fresh attack per round, seeded by the round: a resumed run draws what the uninterrupted
        # one would without checkpointing the attack's generator.
        seed = derived_seed(self.cfg.train.seed, Stream.ATTACK, round_index)
        return build_attack(self.attack_cfg, seed, self.cfg.federation.server_lr)

    def run_round(self, round_index: int) -> RoundRecord:
        """Train the round's clients, craft the Byzantine updates, aggregate, and step the global model."""
        sampled = np.flatnonzero(self.plan.participation[round_index])
        honest = [int(i) for i in sampled if not self.clients[i].byzantine]
        byzantine = [int(i) for i in sampled if self.clients[i].byzantine]
        attack = self.attack(round_index)
        trained = honest if attack.omniscient else sorted(honest + byzantine)
        local = self.local_training(self, round_index, trained)
        dimension = sum(p.numel() for p in self.model.parameters())
        empty = torch.zeros(0, dimension, device=self.device)
        honest_updates = torch.stack([local[i].delta for i in honest]) if honest else empty
        own = torch.stack([local[i].delta for i in byzantine]) if byzantine and not attack.omniscient else None
        crafted = byzantine_rows(attack, honest_updates, own, len(sampled))
        rows = np.array(honest + byzantine, dtype=np.int64)
        order = np.argsort(rows)
        updates = torch.cat([honest_updates, crafted])[torch.from_numpy(order).to(self.device)]
        started = time.perf_counter()
        aggregate, selected = self._aggregate(updates)
        seconds = time.perf_counter() - started
        with torch.no_grad():
            step = parameters_to_vector(self.model.parameters()) + self.cfg.federation.server_lr * aggregate
            vector_to_parameters(step, self.model.parameters())
        losses = [local[i].loss for i in honest]
        return RoundRecord(
            sampled=sampled,
            byzantine=np.array(byzantine, dtype=np.int64),
            client_loss=float(np.mean(losses)) if losses else None,
            honest_norm=_mean_norm(honest_updates),
            byzantine_norm=_mean_norm(crafted),
            aggregate_norm=torch.linalg.vector_norm(aggregate).item(),
            selected=None if selected is None else rows[order][selected.cpu().numpy()],
            aggregation_seconds=seconds,
        )

    def _aggregate(self, updates: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.user_level:
            return self.aggregator(updates)
        if self.ledger is not None:
            self.ledger.charge(self.plan.guarantee.noise_multiplier, self.plan.guarantee.sample_rate)
        server = self.plan.guarantee
        return (
            dp_fedavg(updates, clients_per_round(self.cfg), server.max_grad_norm, server.noise_multiplier, self.noise),
            None,
        )

    def client_epsilons(self) -> list[float | None]:
        """Each client's epsilon so far (sample level; None for a client without a private plan)."""
        return [None if c.ledger is None else c.ledger.epsilon() for c in self.clients]

    def epsilon(self, accountant: str | None = None) -> float | None:
        """The reported epsilon so far: the DP-FedAvg ledger's, or the largest honest client's (by the
        plan's accountant, or the named one for the per-round curve)."""
        if not self.plan.private:
            return None
        if self.ledger is not None:
            return self.ledger.epsilon(accountant)
        honest = (c.ledger.epsilon(accountant) for c in self.clients if c.ledger is not None and not c.byzantine)
        return max(honest, default=0.0)

    def check_spent(self) -> float | None:
        """The final epsilon, after every ledger that backs the guarantee (the server's, or each honest
        client's) checked that it charged exactly its planned steps within the target."""
        if not self.plan.private:
            return None
        if self.ledger is not None:
            return self.ledger.check_spent("DP-FedAvg server")
        honest = [c for c in self.clients if c.ledger is not None and not c.byzantine]
        return max((c.ledger.check_spent(f"federated client {c.id}") for c in honest), default=0.0)

    def checkpoint(self, rounds_done: int, train_seconds: float, wall_seconds: float) -> Checkpoint:
        """The checkpoint after ``rounds_done`` rounds: the global model and the ``FederatedState``."""
        if self.ledger is not None:
            ledgers = {"server": self.ledger.state_dict()}
        elif self.plan.private:
            ledgers = {"clients": {c.id: c.ledger.state_dict() for c in self.clients if c.ledger is not None}}
        else:
            ledgers = None
        state = FederatedState(
            aggregator=self.aggregator.state_dict(),
            ledgers=ledgers,
            rng={"torch": torch.get_rng_state(), "noise": self.noise.get_state()},
        )
        return Checkpoint.of(rounds_done, self.config_hash, self.model.state_dict(), state, train_seconds, wall_seconds)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``: nothing spent before it is forgotten or charged again."""
        state = checkpoint.state_as(FederatedState)
        expected = {"server"} if self.ledger is not None else {"clients"} if self.plan.private else None
        found = None if state.ledgers is None else set(state.ledgers)
        if found != expected:
            raise UserError(
                "train.resume: the checkpoint's privacy accounting differs from this run's; "
                "resume with the config the run was started with"
            )
        self.model.load_state_dict(checkpoint.model)
        self.aggregator.load_state_dict(state.aggregator)
        if self.ledger is not None:
            self.ledger.load_state_dict(state.ledgers["server"])
        elif self.plan.private:
            for client_id, ledger in state.ledgers["clients"].items():
                self.clients[client_id].ledger.load_state_dict(ledger)
        torch.set_rng_state(state.rng["torch"])
        self.noise.set_state(state.rng["noise"])


def build_clients(
    members: TensorDataset, num_classes: int, parts: list[np.ndarray], plan: FederatedPlan, attack: Attack
) -> list[Client]:
    """The clients' datasets; a data-poisoning ``attack`` (label flip, backdoor) rewrites the Byzantine ones."""
    clients = []
    for i, part in enumerate(parts):
        inputs, labels = subset(members, part).tensors
        byzantine = i in plan.byzantine
        if byzantine and attack.poison is not None:
            inputs, labels = attack.poison(inputs, labels, num_classes)
        clients.append(Client(i, TensorDataset(inputs, labels), byzantine, plan.client_plans[i]))
    return clients


def client_partition(cfg: Config, members: TensorDataset, plan: FederatedPlan) -> list[np.ndarray]:
    parts = partition_members(cfg, len(members), members.tensors[1].numpy())
    if tuple(len(part) for part in parts) != plan.client_sizes:
        raise RuntimeError("the clients' partition differs from the one the privacy plan was made for")
    return parts


def honest_trained(parts: list[np.ndarray], plan: FederatedPlan) -> np.ndarray:
    """Sorted positions of the records of the honest clients that train in at least one round.

    Byzantine clients' records are the attacker's own: the guarantee does not cover them. A client
    the schedule never picks never touches the model: its records are no members.
    """
    trained = plan.participation.any(axis=0)
    honest = [part for i, part in enumerate(parts) if trained[i] and i not in plan.byzantine]
    return np.sort(np.concatenate(honest)) if honest else np.zeros(0, dtype=np.int64)


def audited_data(cfg: Config, data: SplitData, parts: list[np.ndarray], plan: FederatedPlan) -> SplitData:
    """The split the audit sees: the ``honest_trained`` members and as many non-members, with the
    same label histogram (``audited_split``, seeded by audit.seed)."""
    return audited_split(data, honest_trained(parts, plan), derived_seed(cfg.audit.seed, Stream.AUDIT))


def planned_federation(cfg: Config, labels: np.ndarray) -> tuple[FederatedPlan, np.ndarray]:
    """The plan of a federation of ``cfg`` over records with ``labels`` (in training-set order) and
    the positions its ``honest_trained`` clients will hold.

    Both are fixed before any record is chosen: the partition depends on the labels alone, the
    Byzantine clients and the schedule on train.seed, which is how a reference federation knows
    which of its positions reach its model honestly.
    """
    federation = federation_plan(cfg, len(labels), labels)
    return federation, honest_trained(partition_members(cfg, len(labels), labels), federation)


def federation_clients(
    cfg: Config, plan: FederatedPlan, members: TensorDataset, num_classes: int
) -> tuple[list[np.ndarray], list[Client], Attack]:
    """The partition of ``members``, the clients holding it (Byzantine ones' data poisoned), and the
    poisoning clients' attack, all drawn from train.seed."""
    parts = client_partition(cfg, members, plan)
    poisoning = build_attack(cfg.attack, derived_seed(cfg.train.seed, Stream.POISON), cfg.federation.server_lr)
    return parts, build_clients(members, num_classes, parts, plan, poisoning), poisoning


def global_model(cfg: Config, input_shape, num_classes: int, plan: FederatedPlan, device) -> tuple[nn.Module, list[str]]:
    """The initial global model (seeded by train.seed) and the modules made DP-compatible for it."""
    torch.manual_seed(derived_seed(cfg.train.seed, Stream.MODEL))
    model = build_model(cfg.model, input_shape, num_classes)
    replaced: list[str] = []
    if plan.private and plan.dp_level == "sample":
        model, replaced = ensure_dp_compatible(model)
    return model.to(device), replaced


def _log_round(tb: TensorBoardLog, step: int, record: RoundRecord, values: dict) -> None:
    scalars = {
        "fed/client_loss": record.client_loss,
        "fed/update_norm/honest": record.honest_norm,
        "fed/update_norm/byzantine": record.byzantine_norm,
        "fed/aggregate_norm": record.aggregate_norm,
        "fed/aggregation_seconds": record.aggregation_seconds,
        "fed/clients": len(record.sampled),
        **values,
    }
    if record.selected is not None:
        tb.text(
            "fed/selected",
            f"round {step}: selected clients {record.selected.tolist()} of {record.sampled.tolist()}; "
            f"Byzantine this round: {record.byzantine.tolist()}",
            step,
        )
    tb.scalars(step, scalars)


def _byzantine_fraction(record: RoundRecord) -> float | None:
    if record.selected is None or not len(record.selected):
        return None
    return float(np.isin(record.selected, record.byzantine).mean())


@dataclass
class Federation:
    """A finished federation: its server (global model, accountants), partition and round statistics."""

    server: FederatedServer
    parts: list[np.ndarray]
    replaced_modules: list[str]
    backdoor: Attack | None
    train_seconds: float
    wall_seconds: float
    aggregation_seconds: float
    byzantine_fractions: list[float]
    threads: ThreadChoice


def train_federation(
    cfg: Config,
    plan: FederatedPlan,
    members: TensorDataset,
    *,
    input_shape,
    num_classes: int,
    device: torch.device,
    test: TensorDataset | None = None,
    tb: TensorBoardLog | None = None,
    run_dir: Path | None = None,
    checkpoint: Checkpoint | None = None,
    units: InputUnits | None = None,
    local_training: LocalTraining | None = None,
) -> Federation:
    """Run ``federation.rounds`` rounds of FedAvg under ``plan`` with ``members`` partitioned over the
    clients: the one round loop the target and its reference models share.

    With ``tb`` every round is logged (``test`` accuracy and loss, and the backdoor's success on
    it); with ``run_dir`` and ``train.checkpoint`` a checkpoint is written after every round; with a
    ``checkpoint`` the run continues after its last round with the accountants restored, so the
    final parameters and epsilon are the uninterrupted run's. Each accountant charges exactly the
    planned steps within the target, checked again at the end. ``units`` (the data's) is needed by
    ``train.adversarial``, under which each client trains on adversarial examples of its own records.
    ``local_training`` gets the round's local updates (default: ``train_in_process``).
    """
    parts, clients, poisoning = federation_clients(cfg, plan, members, num_classes)
    model, replaced = global_model(cfg, input_shape, num_classes, plan, device)
    # Timed on the first client that trains: every local step is one of the same model at the same batch size.
    trainers = [client for client in clients if client.plan is not None]
    threads = thread_choice(
        cfg, model, trainers[0].data, trainers[0].plan,
        planned_steps=sum(client.plan.steps for client in trainers), batch_size=cfg.train.batch_size,
        device=device, units=units,
    )  # fmt: skip
    server = FederatedServer(cfg, plan, clients, model, device, units, local_training)
    # The poisoning clients' own attack, for its trigger.
    backdoor = poisoning if poisoning.trigger is not None else None
    start, train_seconds, wall_seconds = 0, 0.0, 0.0
    if checkpoint is not None:
        server.restore(checkpoint)
        start, train_seconds, wall_seconds = checkpoint.completed, checkpoint.train_seconds, checkpoint.wall_seconds
        log.info("resuming after round %d of %d", start, cfg.federation.rounds)

    fractions, aggregation_seconds = [], 0.0
    rounds = cfg.federation.rounds
    bar = tqdm(
        range(start, rounds), desc="rounds", unit="round", initial=start, total=rounds, disable=not cfg.train.progress
    )
    loop_started = time.perf_counter() - wall_seconds
    for round_index in bar:
        started = time.perf_counter()
        record = server.run_round(round_index)
        train_seconds += time.perf_counter() - started
        aggregation_seconds += record.aggregation_seconds
        fraction = _byzantine_fraction(record)
        if fraction is not None:
            fractions.append(fraction)
        if tb is not None:
            test_loss, test_accuracy = evaluate(server.model, test, device)
            epsilon = server.epsilon(CURVE_ACCOUNTANT)
            values = {
                "fed/test_accuracy": test_accuracy,
                "fed/test_loss": test_loss,
                "fed/byzantine_selected_fraction": fraction,
                "privacy/epsilon_rdp": epsilon,
            }
            if backdoor is not None:
                values["fed/backdoor_success_rate"] = backdoor_success_rate(
                    server.model, test, backdoor, cfg.attack.target_label, device
                )
            _log_round(tb, round_index + 1, record, values)
            bar.set_postfix(acc=f"{test_accuracy:.3f}")  # no epsilon: see train_model's bar
        if run_dir is not None and cfg.train.checkpoint:
            server.checkpoint(round_index + 1, train_seconds, time.perf_counter() - loop_started).save(run_dir)
    bar.close()
    server.check_spent()
    wall_seconds = time.perf_counter() - loop_started
    return Federation(
        server, parts, replaced, backdoor, train_seconds, wall_seconds, aggregation_seconds, fractions, threads
    )


def train_target(
    cfg: Config,
    run_dir: Path,
    plan: FederatedPlan,
    tb: TensorBoardLog,
    checkpoint: Checkpoint | None,
    local_training: LocalTraining | None = None,
) -> TargetRun:
    """Load the data, train the federation (``train_federation``, its clients trained by
    ``local_training``) and write ``split.json``, ``model.pt`` and ``metrics.json``; a checkpoint is
    written after every round.

    ``epsilon`` is the largest honest client's (sample level) or the server's (user level), and
    never exceeds the target. The audit sees the honest, trained clients' records (``audited_data``).
    """
    data, _, fingerprint = load_data(cfg, run_dir, reuse_split=checkpoint is not None)
    device = resolve_device(cfg.train.device)
    federation = train_federation(
        cfg,
        plan,
        data.members,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        device=device,
        test=data.test,
        tb=tb,
        run_dir=run_dir,
        checkpoint=checkpoint,
        units=data.units,
        local_training=local_training,
    )
    server = federation.server
    epsilon = server.epsilon()
    audited = audited_data(cfg, data, federation.parts, plan)
    epsilon_pld = independent_epsilon(cfg, epsilon, _reported_mechanisms(plan), plan.guarantee.delta)
    metrics = run_metrics(
        server.model,
        plan.guarantee,
        epsilon,
        epsilon_pld,
        data,
        audited,
        device,
        train_seconds=federation.train_seconds,
        wall_seconds=federation.wall_seconds,
        replaced_modules=federation.replaced_modules,
        threads=federation.threads,
        federation=_federation_metrics(cfg, plan, federation, data.test, device),
    )
    save_model(run_dir, server.model.state_dict())
    write_metrics(run_dir, metrics.to_dict())
    return TargetRun(server.model, audited, plan, plan.guarantee, epsilon, None, metrics, device, fingerprint)


def _client_mechanisms(plan: FederatedPlan) -> list[dict | None]:
    """Each honest client's local DP-SGD mechanism (None for Byzantine clients and those never scheduled):
    at sample level a record is protected by its own client's, so the run's Renyi-DP curve is their
    pointwise maximum (``dptrain report --select`` reads them)."""
    return [
        None
        if local is None or client in plan.byzantine
        else {"noise_multiplier": local.noise_multiplier, "sample_rate": local.sample_rate, "steps": local.steps}
        for client, local in enumerate(plan.client_plans)
    ]


def _federation_metrics(
    cfg: Config, plan: FederatedPlan, federation: Federation, test: TensorDataset, device
) -> FederationMetrics:
    """A federated run's own metrics: the federation, its attack and rule, whose guarantee is reported,
    (sample level) every client's spend and mechanism, the honest members, and what the attack achieved."""
    sample_level = plan.private and plan.dp_level == "sample"
    server, backdoor, fractions = federation.server, federation.backdoor, federation.byzantine_fractions
    return FederationMetrics(
        rounds=cfg.federation.rounds,
        clients=cfg.federation.clients,
        clients_per_round=clients_per_round(cfg),
        local_epochs=cfg.federation.local_epochs,
        partition=cfg.federation.partition,
        dp_level=plan.dp_level,
        aggregator=cfg.aggregator.name,
        pre=list(cfg.aggregator.pre),
        attack=cfg.attack.name,
        byzantine=len(plan.byzantine),
        byzantine_clients=list(plan.byzantine),
        reported_client=plan.reported_client,
        client_epsilons=server.client_epsilons() if sample_level else None,
        client_mechanisms=_client_mechanisms(plan) if sample_level else None,
        client_sizes=list(plan.client_sizes),
        honest_members=len(honest_trained(federation.parts, plan)),
        aggregation_seconds=federation.aggregation_seconds,
        byzantine_selected_fraction=float(np.mean(fractions)) if fractions else None,
        backdoor_success_rate=None
        if backdoor is None
        else backdoor_success_rate(server.model, test, backdoor, cfg.attack.target_label, device),
    )


def _reported_mechanisms(plan: FederatedPlan) -> list[list[dict]]:
    """The mechanisms behind the reported epsilon: the DP-FedAvg server's rounds (user level), or each
    honest client's local DP-SGD (sample level, the largest epsilon is reported)."""
    if plan.dp_level == "user":
        server = plan.guarantee
        return [[{"noise_multiplier": server.noise_multiplier, "sample_rate": server.sample_rate, "steps": server.steps}]]
    return [[m] for m in _client_mechanisms(plan) if m is not None]


def load_target(cfg: Config, run_dir: Path) -> TargetRun:
    """A finished federated run's global model, its audited split (honest clients' records as
    members) and its plan, rebuilt from the config and the recorded split."""
    metrics = RunMetrics.from_dict(read_metrics(run_dir))
    data, _, fingerprint = load_data(cfg, run_dir, reuse_split=True)
    federated_plan = plan(cfg, split_sizes(describe(cfg.dataset), cfg.dataset))
    device = resolve_device(cfg.train.device)
    audited = audited_data(cfg, data, client_partition(cfg, data.members, federated_plan), federated_plan)
    model = trained_model(cfg, run_dir, data, device)
    return TargetRun(
        model, audited, federated_plan, federated_plan.guarantee, metrics.epsilon, None, metrics, device, fingerprint
    )


def reference_config(cfg: Config, plan: FederatedPlan, seed: int) -> Config:
    """The target's federation for a reference model, with another seed: the same clients, rounds,
    clients per round, local epochs, partition rule, dp_level, aggregator, attack and privacy config;
    at user level the server's noise is the target's (it depends on no record), at sample level each
    client's local plan is calibrated as the target's clients' were, for the records it holds."""
    derived = reference_base(cfg, seed)
    if plan.private and plan.dp_level == "user":
        derived.privacy.noise_multiplier = plan.guarantee.noise_multiplier
        derived.privacy.target_epsilon = None
    return derived


def train_reference(
    cfg: Config, plan: FederatedPlan, records: TensorDataset, *, input_shape, num_classes: int, device: torch.device
) -> nn.Module:
    """A reference model: ``train_federation`` under ``plan`` with ``records`` as the federation's members."""
    return train_federation(cfg, plan, records, input_shape=input_shape, num_classes=num_classes, device=device).server.model
