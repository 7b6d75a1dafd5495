"""Train one model on one dataset under the run's privacy settings: the unit every recipe and audit reuses.

Reference models for audits are trained by calling ``train_model`` with their
own data, never by a second copy of this loop; the one exception, the zoo's small
models trained K at once (``dptrain.training.stacked``), is tested to give the
models this loop gives, to float rounding.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from dptrain.config import Config, TrainConfig, recipe_hash
from dptrain.data import InputUnits, load, make_split, prepare
from dptrain.errors import UserError
from dptrain.models import build_model, ensure_dp_compatible
from dptrain.privacy import ModeChoice, PrivacyPlan, make_private, plan_privacy, unwrap
from dptrain.privacy.accounting import CURVE_ACCOUNTANT
from dptrain.seeds import Stream, derived_seed
from dptrain.tracking.tensorboard import TensorBoardLog
from dptrain.training import loop, ranks
from dptrain.training.adversarial import adversarial_examples
from dptrain.training.augmult import view_averaging
from dptrain.training.averaging import WeightAverage
from dptrain.training.checkpoint import Checkpoint
from dptrain.training.distributed import gather_updates, local_batch_size, parallel_mode
from dptrain.training.loop import EpochStats, evaluate, train_epoch
from dptrain.training.pretrain import freeze_for_finetuning, pretrain_config
from dptrain.training.threads import ROUNDS, ThreadCalibration, ThreadChoice, choose_threads

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A trained model (plain ``nn.Module``, Opacus wrappers removed) and what its training spent:
    ``train_seconds`` in optimizer steps, ``wall_seconds`` in the whole epoch loop (with per-epoch
    evaluation, accounting, TensorBoard and checkpoints), both summed over resumed runs."""

    model: nn.Module
    plan: PrivacyPlan
    epsilon: float | None
    steps: int
    train_seconds: float
    wall_seconds: float
    last_epoch: EpochStats | None
    replaced_modules: list[str]
    # The ledger's charged (noise_multiplier, sample_rate, steps) blocks; [] for the baseline.
    mechanisms: list[dict]
    threads: ThreadChoice
    # The grad-sample mode that clipped and, under auto, each candidate's seconds per step (None: baseline).
    grad_sample: ModeChoice | None = None


@dataclass
class CentralizedState:
    """What a centralized run's checkpoint holds beside the model: the optimizer (and the robust
    exchange's aggregator state), the learning-rate schedule, the privacy ledger (None for the
    baseline) and every rank's RNG states (torch's, sampling's, noise's), one entry per rank."""

    optimizer: dict
    scheduler: dict | None
    ledger: dict | None
    rng: list


@dataclass(frozen=True)
class PublicStart:
    """The public model's state dict and the population indices (into the dataset's canonical order) it
    was trained on."""

    state: dict
    population: np.ndarray


# One public model per pretraining recipe and process: the target and its reference models share it.
_STARTS: dict[str, PublicStart] = {}


def public_start(cfg: Config, input_shape: Sequence[int], num_classes: int) -> PublicStart | None:
    """The public model ``cfg.train.pretrain`` asks for, None for ``none``.

    ``population``: the dataset loaded and split by ``cfg.dataset`` (the split every run of this
    dataset config records), and the model trained non-privately on its population part by
    ``train_model`` under ``pretrain_config``. Deterministic on CPU for a config, and cached per
    process, so reference models start from the target's public model.
    """
    if cfg.train.pretrain == "none":
        return None
    derived = pretrain_config(cfg)
    key = f"{recipe_hash(derived)}:{tuple(input_shape)}:{num_classes}"
    if key not in _STARTS:
        data = load(cfg.dataset)
        split = make_split(data, cfg.dataset)
        population = prepare(data, split).population
        trained = train_model(derived, population, input_shape=input_shape, num_classes=num_classes)
        state = {name: value.detach().cpu().clone() for name, value in trained.model.state_dict().items()}
        _STARTS[key] = PublicStart(state=state, population=split.population)
    return _STARTS[key]


def resolve_device(name: str) -> torch.device:
    """``train.device``; ``cuda`` is the current CUDA device, which ``launch.process_group`` sets to
    the rank's own GPU (LOCAL_RANK) under nccl."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(cfg: TrainConfig, parameters) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def private_training(
    cfg: Config,
    model: nn.Module,
    records: TensorDataset,
    plan: PrivacyPlan,
    *,
    batch_size: int,
    sampling: torch.Generator,
    noise: torch.Generator,
    ledger=None,
):
    """``make_private`` for training ``model`` on ``records`` by ``cfg``'s recipe: its optimizer, its
    physical batches, and the clipping modes its loss allows (TRADES' two-pass loss has no per-example
    loss for ghost or book-keeping clipping, and under ``train.augmult`` a row's loss is one view's).
    One place for the run, its clients and the thread race."""
    return make_private(
        model=model,
        optimizer=make_optimizer(cfg.train, model.parameters()),
        dataset=records,
        plan=plan,
        cfg=cfg.privacy,
        batch_size=batch_size,
        max_physical_batch_size=cfg.train.max_physical_batch_size,
        sampling_generator=sampling,
        noise_generator=noise,
        ledger=ledger,
        per_example_loss=cfg.train.adversarial != "trades" and cfg.train.augmult == 1,
    )


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    """Per-epoch learning-rate schedule: constant, cosine to zero, or x0.1 at 1/2 and 3/4 of training."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.lr_schedule == "step":
        milestones = sorted({max(1, cfg.epochs // 2), max(1, 3 * cfg.epochs // 4)})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return None


def thread_choice(
    cfg: Config,
    model: nn.Module,
    records: TensorDataset,
    plan: PrivacyPlan,
    *,
    planned_steps: int,
    batch_size: int,
    device: torch.device,
    units: InputUnits | None,
) -> ThreadChoice:
    """Set the intra-op threads ``cfg.train.threads`` asks for training ``model`` on ``records`` under
    ``plan`` for ``planned_steps`` steps in all (``choose_threads``).

    ``auto`` races the counts on throwaway steps of a copy of ``model`` with its own optimizer, ledger
    and random streams (torch's global one restored after), so the run's model, budget and streams
    are untouched; each step is the run's own (same batch, clipping, noise and ``train.adversarial``).
    Uses no collective, so ranks may each choose their own."""

    def race(calibration: ThreadCalibration) -> None:
        throwaway = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):
            training = private_training(
                cfg, throwaway, records, plan, batch_size=batch_size,
                sampling=torch.Generator().manual_seed(0), noise=torch.Generator(device=device).manual_seed(0),
            )  # fmt: skip
            # Every epoch times at least one step, so these epochs are enough to finish the race. Through
            # ``loop`` rather than this module's ``train_epoch``: what hooks the run's epochs (a test
            # interrupting the run at its k-th) must not count the throwaway ones.
            for _ in range(ROUNDS * len(calibration.counts) + 1):
                if calibration.done:
                    break
                adversarial = adversarial_examples(cfg, units, 0, device)
                views = view_averaging(cfg, 0, 0)
                loop.train_epoch(training, device, adversarial, pace=calibration.paced, views=views)

    return choose_threads(cfg.train.threads, race, planned_steps)


def _rng_states(sampling: torch.Generator, noise: torch.Generator, data_parallel: bool) -> list[dict]:
    """The RNG state of every rank of a data-parallel run (collective), else of this process alone."""
    own = {"torch": torch.get_rng_state(), "sampling": sampling.get_state(), "noise": noise.get_state()}
    return ranks.all_gather_object(own) if data_parallel else [own]


def _restore_rng(states: list[dict], sampling: torch.Generator, noise: torch.Generator, data_parallel: bool) -> None:
    world = ranks.world_size() if data_parallel else 1
    if len(states) != world:
        raise UserError(
            f"train.resume: the checkpoint was written by {len(states)} process(es), this run has "
            f"{world}: resume with the launcher.nproc_per_node it was started with"
        )
    state = states[ranks.rank() if data_parallel else 0]
    torch.set_rng_state(state["torch"])
    sampling.set_state(state["sampling"])
    noise.set_state(state["noise"])


def train_model(
    cfg: Config,
    train_set: TensorDataset,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    plan: PrivacyPlan | None = None,
    eval_set: TensorDataset | None = None,
    tb: TensorBoardLog | None = None,
    run_dir: str | Path | None = None,
    checkpoint: Checkpoint | None = None,
    data_parallel: bool = False,
    units: InputUnits | None = None,
    accounted: bool = True,
) -> TrainedModel:
    """Train ``cfg.model`` on ``train_set`` with ``cfg.train`` and ``cfg.privacy``; return the model and its spend.

    With ``run_dir`` a checkpoint is written after every epoch (if
    ``cfg.train.checkpoint``); given a ``checkpoint``, training continues from
    it with the accountant and RNG state restored. The loop runs exactly ``plan.steps`` steps,
    whose epsilon the plan checked against the target before training, so the
    budget is never exceeded; the final epsilon is checked again as a guard.

    With ``data_parallel`` inside a torch.distributed job, every rank calls this
    together (see ``dptrain.training.distributed``): under ``dpddp`` on the whole
    ``train_set``, under ``robust`` on its own shard.

    ``units`` (the data's, ``dptrain.data.InputUnits``) is needed by ``train.adversarial=pgd``, which
    trains on adversarial examples of each batch (``dptrain.training.adversarial``).

    With ``train.pretrain=population`` the model starts from the public model (``public_start``,
    trained without privacy on the population by this function) and ``plan`` covers the fine-tuning on ``train_set``
    alone; ``train.finetune=last_layer`` trains only its output layer. With ``train.ema`` the model
    returned is the average of the iterates (``WeightAverage``); checkpoints hold the last iterate.

    ``accounted=False`` trains a model whose epsilon nobody reports (a reference model, at ``cfg``'s
    fixed noise multiplier): no accountant runs, only the step count is checked, and ``epsilon`` is None.
    """
    train = cfg.train
    mode = parallel_mode(cfg) if data_parallel else None
    rank = ranks.rank() if mode else 0
    device = resolve_device(train.device)
    batch_size = local_batch_size(cfg) if mode == "robust" else train.batch_size
    plan = plan or plan_privacy(
        cfg.privacy, members=len(train_set), batch_size=batch_size, epochs=train.epochs, accounted=accounted
    )
    # Before the model's seed: pretraining trains a model of its own.
    start = public_start(cfg, input_shape, num_classes)
    torch.manual_seed(derived_seed(train.seed, Stream.MODEL))
    model = build_model(cfg.model, input_shape, num_classes)
    if start is not None:
        model.load_state_dict(start.state)
        freeze_for_finetuning(model, train.finetune)
    replaced: list[str] = []
    if plan.private:
        model, replaced = ensure_dp_compatible(model)
    model.to(device)
    threads = thread_choice(
        cfg, model, train_set, plan, planned_steps=plan.steps, batch_size=batch_size, device=device, units=units
    )
    if mode == "dpddp":
        model = DifferentiallyPrivateDistributedDataParallel(model)
    # Each rank draws its own batches and noise: shared streams would correlate the
    # inclusion of records on different ranks, which Poisson sampling's analysis forbids.
    sampling = torch.Generator().manual_seed(derived_seed(train.seed, Stream.SAMPLING, rank))
    noise = torch.Generator(device=device).manual_seed(derived_seed(train.seed, Stream.NOISE, rank))
    training = private_training(cfg, model, train_set, plan, batch_size=batch_size, sampling=sampling, noise=noise)
    scheduler = make_scheduler(train, training.optimizer)
    average = None if train.ema is None else WeightAverage(unwrap(training.model), train.ema)
    if average is not None:
        average.follow(training.optimizer, unwrap(training.model))
    if mode == "robust":
        gather_updates(training, cfg)
    # Only checkpoints carry the hash, and hashing the config costs 0.06-0.2 s a model (OmegaConf).
    config_hash = recipe_hash(cfg) if run_dir is not None and train.checkpoint else None
    start_epoch, train_seconds, wall_seconds = 0, 0.0, 0.0
    if checkpoint is not None:
        state = checkpoint.state_as(CentralizedState)
        unwrap(training.model).load_state_dict(checkpoint.model)
        training.optimizer.load_state_dict(state.optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(state.scheduler)
        training.load_ledger_state(state.ledger)
        _restore_rng(state.rng, sampling, noise, data_parallel=mode is not None)
        start_epoch, train_seconds = checkpoint.completed, checkpoint.train_seconds
        wall_seconds = checkpoint.wall_seconds
        log.info("resuming after epoch %d of %d", start_epoch, train.epochs)

    stats = None
    bar = tqdm(
        range(start_epoch, train.epochs),
        desc="train",
        unit="epoch",
        initial=start_epoch,
        total=train.epochs,
        disable=not (train.progress and tb is not None),
    )
    loop_started = time.perf_counter() - wall_seconds
    for epoch in bar:
        started = time.perf_counter()
        lr = training.optimizer.param_groups[0]["lr"]
        # Seeded per epoch, so that a resumed run crafts what the uninterrupted one would.
        adversarial = adversarial_examples(cfg, units, derived_seed(train.seed, Stream.ADVERSARIAL, rank, epoch), device)
        stats = train_epoch(training, device, adversarial, views=view_averaging(cfg, rank, epoch))
        if scheduler is not None:
            scheduler.step()
        train_seconds += time.perf_counter() - started
        step = (epoch + 1) * plan.steps_per_epoch
        if tb is not None:
            # A model nobody reports an epsilon for (a run on a proxy) gets no epsilon curve either.
            epsilon = training.epsilon(CURVE_ACCOUNTANT) if accounted else None
            test_accuracy = evaluate(training.model, eval_set, device)[1] if eval_set is not None else None
            tb.scalars(
                step,
                {
                    "train/loss": stats.loss,
                    "train/accuracy": stats.accuracy,
                    "test/accuracy": test_accuracy,
                    "privacy/epsilon_rdp": epsilon,
                    "privacy/noise_multiplier": plan.noise_multiplier,
                    "train/lr": lr,
                },
            )
            # No epsilon here: the RDP curve runs above the reported (PRV) epsilon, so mid-run it could read
            # past the target that the run never exceeds; the summary prints the run's own.
            bar.set_postfix(loss=f"{stats.loss:.3f}", acc=f"{stats.accuracy:.3f}")
        if run_dir is not None and train.checkpoint:
            # Every rank of a data-parallel run gets here together: the RNG gather is collective.
            rng_states = _rng_states(sampling, noise, data_parallel=mode is not None)
        if run_dir is not None and train.checkpoint and ranks.is_main():
            state = CentralizedState(
                optimizer=training.optimizer.state_dict(),
                scheduler=None if scheduler is None else scheduler.state_dict(),
                ledger=training.ledger_state(),
                rng=rng_states,
            )
            Checkpoint.of(
                epoch + 1,
                config_hash,
                unwrap(training.model).state_dict(),
                state,
                train_seconds,
                time.perf_counter() - loop_started,
            ).save(run_dir)
    bar.close()
    wall_seconds = time.perf_counter() - loop_started

    epsilon = None
    if training.ledger is not None and accounted:
        epsilon = training.ledger.check_spent("training")
    elif training.ledger is not None:
        training.ledger.check_steps("training")
    if mode == "robust" and epsilon is not None:
        # Local noise: each worker's records are protected by that worker's own ledger.
        epsilon = max(ranks.all_gather_object(epsilon))
    model = training.standard_model()
    if average is not None:
        model.load_state_dict(average.average)
    return TrainedModel(
        model=model,
        plan=plan,
        epsilon=epsilon,
        steps=train.epochs * plan.steps_per_epoch,
        train_seconds=train_seconds,
        wall_seconds=wall_seconds,
        last_epoch=stats,
        replaced_modules=replaced,
        mechanisms=[] if training.ledger is None else training.ledger.mechanisms(),
        threads=threads,
        grad_sample=training.grad_sample,
    )
