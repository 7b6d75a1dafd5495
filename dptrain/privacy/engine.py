"""Wrap model, optimizer and data for training under a privacy plan (Opacus), or leave them plain for the baseline."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Iterator

import torch
from opacus import PrivacyEngine
from opacus.data_loader import wrap_collate_with_empty
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from torch.utils.data._utils.collate import default_collate

from dptrain.config import PrivacyConfig
from dptrain.errors import UserError
from dptrain.privacy.accounting import accountant_warnings_silenced
from dptrain.privacy.bookkeeping import make_bookkeeping_private
from dptrain.privacy.ledger import PrivacyLedger
from dptrain.privacy.mode_race import ModeChoice, candidate_modes, race_modes
from dptrain.privacy.plan import PrivacyPlan


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Opacus' GradSampleModule and DPDDP wrappers (or the module itself)."""
    model = getattr(model, "_module", model)
    return model.module if isinstance(model, DifferentiallyPrivateDistributedDataParallel) else model


class PoissonBatches(Sampler):
    """``steps`` batches per epoch, each holding every record independently with probability ``sample_rate``:
    the sampling the subsampled Gaussian's accounting assumes.

    Two departures from Opacus' samplers, both for soundness: the number of steps is the plan's,
    where Opacus takes ``int(1 / q)``, which rounds 1 / (1 / k) down to k - 1 for many k (93, 99, 105,
    ...), so the accountant and the plan disagree; and under DPDDP (``world > 1``) rank r samples
    records r, r + world, ... and yields every batch, empty ones included, where Opacus' distributed
    sampler skips a rank's empty batch and the ranks then all-reduce gradients of different steps.
    In one process the draws are Opacus' (one ``torch.rand(records)`` per step from ``generator``).
    """

    def __init__(
        self, records: int, sample_rate: float, steps: int, generator: torch.Generator, rank: int = 0, world: int = 1
    ) -> None:
        self.positions = torch.arange(rank, records, world)
        self.sample_rate = sample_rate
        self.steps = steps
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            drawn = torch.rand(len(self.positions), generator=self.generator) < self.sample_rate
            yield self.positions[drawn].tolist()


def poisson_loader(
    dataset: Dataset, plan: PrivacyPlan, generator: torch.Generator, rank: int = 0, world: int = 1
) -> DataLoader:
    """The data loader of a private plan: ``PoissonBatches`` at the plan's sample rate and steps per
    epoch, with Opacus' collate that turns an empty draw into a zero-length batch."""
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=default_collate,
        sample_empty_shapes=[(0, *getattr(x, "shape", ())) for x in first],
        dtypes=[getattr(x, "dtype", type(x)) for x in first],
    )
    sampler = PoissonBatches(len(dataset), plan.sample_rate, plan.steps_per_epoch, generator, rank, world)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=generator)


def baseline_loader(dataset: Dataset, plan: PrivacyPlan, batch_size: int, generator: torch.Generator) -> DataLoader:
    """The data loader of the non-private baseline: ``plan.steps_per_epoch`` shuffled batches of
    ``batch_size`` distinct records (the last one shorter when the records run out)."""
    # At most steps_per_epoch * batch_size distinct records per epoch: exactly the plan's steps.
    records = min(len(dataset), plan.steps_per_epoch * batch_size)
    sampler = RandomSampler(dataset, num_samples=records, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator)


@dataclass
class PrivateTraining:
    """The objects a training loop uses; private or not, the loop is the same.

    ``model`` computes per-example gradients and ``optimizer`` clips and noises
    them when the plan is private; ``loss_fn(logits, labels)`` returns a loss
    whose ``backward()`` does the right thing for the grad-sample mode (ghost
    clipping needs two passes, which Opacus packs into its loss object).
    ``ledger`` charges one step per optimizer step (None for the baseline).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    loss_fn: Callable
    plan: PrivacyPlan
    ledger: PrivacyLedger | None
    max_physical_batch_size: int | None
    # The grad-sample mode that ran and, under ``auto``, each candidate's seconds per step (None: baseline).
    grad_sample: ModeChoice | None = None

    def batches(self) -> ContextManager[Iterable]:
        """The logical batches of one epoch, split into physical ones of at most ``max_physical_batch_size``.

        Opacus' BatchMemoryManager only steps the optimizer at the end of each
        logical batch, so the ledger still charges one step per logical batch.
        """
        if self.ledger is None or self.max_physical_batch_size is None:
            return contextlib.nullcontext(self.loader)
        return BatchMemoryManager(
            data_loader=self.loader,
            max_physical_batch_size=self.max_physical_batch_size,
            optimizer=self.optimizer,
        )

    def epsilon(self, accountant: str | None = None) -> float | None:
        """Epsilon spent so far at the plan's delta, by the plan's accountant or the named one (None for
        the non-private baseline)."""
        return None if self.ledger is None else self.ledger.epsilon(accountant)

    def standard_model(self) -> nn.Module:
        """The trained ``nn.Module`` with Opacus' hooks, per-example gradient buffers and DPDDP wrapper removed."""
        return unwrap(self.model.to_standard_module() if self.ledger is not None else self.model)

    def ledger_state(self) -> dict | None:
        return None if self.ledger is None else self.ledger.state_dict()

    def load_ledger_state(self, state: dict | None) -> None:
        """Restore the ledger so a resumed run keeps counting from where it stopped."""
        if (state is None) != (self.ledger is None):
            raise UserError(
                "train.resume: the checkpoint's privacy setting (private or not) differs from this run's; "
                "resume with the config the run was started with"
            )
        if self.ledger is not None:
            self.ledger.load_state_dict(state)


def _per_layer_norms(model: nn.Module, max_grad_norm: float) -> list[float]:
    # Splitting C evenly as C / sqrt(L) keeps the norm of the whole clipped
    # gradient within C, so the sensitivity the accountant assumes still holds.
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [max_grad_norm / math.sqrt(len(trainable))] * len(trainable)


def _fixed_mode(cfg: PrivacyConfig, distributed: bool) -> ModeChoice | None:
    """The mode ``cfg`` names, or under ``auto`` the one a data-parallel (DPDDP) run takes without a race
    (ranks timing on their own could pick different modes): None when the modes are to be raced."""
    if cfg.grad_sample_mode != "auto":
        return ModeChoice(cfg.grad_sample_mode, {})
    if distributed:
        return ModeChoice("hooks" if cfg.clipping == "per_layer" else "ghost", {})
    return None


def make_private(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    plan: PrivacyPlan,
    cfg: PrivacyConfig,
    batch_size: int,
    max_physical_batch_size: int | None,
    sampling_generator: torch.Generator,
    noise_generator: torch.Generator,
    ledger: PrivacyLedger | None = None,
    per_example_loss: bool = True,
) -> PrivateTraining:
    """Return the training objects for ``plan``: Opacus-wrapped when private, plain when not.

    Private: ``plan.steps_per_epoch`` Poisson-sampled batches per epoch at ``plan.sample_rate``
    (``poisson_loader``; a model wrapped in DPDDP gets this rank's share of every batch), per-example
    clipping at ``plan.max_grad_norm`` (split evenly over parameters for per-layer clipping) and
    Gaussian noise of ``plan.noise_multiplier`` times it, charged to a fresh ``PrivacyLedger`` at
    every optimizer step. The sample rate and steps are the plan's whatever ``len(dataset)`` is:
    the subsampled Gaussian's guarantee per record depends only on them (so the ranks of a robust-parallel
    run step together though the canaries they hold make their datasets differ by a few records). The
    baseline takes ``plan.steps_per_epoch`` shuffled batches of ``batch_size`` distinct records.
    A ``ledger`` given (a federated client's, which composes over the rounds it trains in) is charged
    instead of a fresh one. ``grad_sample_mode=auto`` races the modes that can run (``mode_race``);
    ``per_example_loss=False`` (TRADES' own two-pass loss) leaves out ghost and book-keeping clipping,
    which need ``loss_fn``'s per-example losses.
    """
    criterion = nn.CrossEntropyLoss()
    if not plan.private:
        loader = baseline_loader(dataset, plan, batch_size, sampling_generator)
        return PrivateTraining(model, optimizer, loader, criterion, plan, None, None)
    distributed = isinstance(model, DifferentiallyPrivateDistributedDataParallel)
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    loader = poisson_loader(dataset, plan, sampling_generator, rank, world)
    max_grad_norm = (
        _per_layer_norms(model, plan.max_grad_norm) if cfg.clipping == "per_layer" else plan.max_grad_norm
    )

    def wrap(mode: str, module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, generator):
        with accountant_warnings_silenced(), warnings.catch_warnings():
            # dptrain does not offer torchcsprng's secure mode; the README says so.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=plan.accountant)
        if mode == "bk":
            return make_bookkeeping_private(
                engine, module, optimizer, criterion, loader, plan.noise_multiplier, max_grad_norm, generator
            )
        wrapped = engine.make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=max_grad_norm,
            # The loader above already samples as the plan says; Opacus' own Poisson loader would not.
            poisson_sampling=False,
            clipping=cfg.clipping,
            noise_generator=generator,
            grad_sample_mode=mode,
        )
        if wrapped[-1] is not loader:
            raise RuntimeError("Opacus replaced the plan's data loader")
        # Ghost clipping's loss packs its two backward passes; the other modes keep the plain loss.
        return wrapped[:2] + ((wrapped[2],) if mode == "ghost" else (criterion,))

    choice = _fixed_mode(cfg, distributed)
    if choice is None:
        record = dataset[0]
        # The race's batches are the size of a logical batch on average (of a physical one if smaller).
        batch = max(1, round(plan.sample_rate * len(dataset)))
        choice = race_modes(
            plan.steps,
            candidate_modes(cfg, model, per_example_loss),
            model,
            optimizer,
            record,
            min(batch, max_physical_batch_size or batch),
            lambda mode, *objects: wrap(mode, *objects, torch.Generator(device=noise_generator.device)),
            next(model.parameters()).device,
        )
    private_model, private_optimizer, loss_fn = wrap(choice.mode, model, optimizer, loader, noise_generator)
    # What Opacus does for its own Poisson loader: a step must follow every backward pass.
    private_model.forbid_grad_accumulation()
    if len(loader) != plan.steps_per_epoch:
        raise RuntimeError(f"the private loader takes {len(loader)} steps per epoch, the plan {plan.steps_per_epoch}")
    # The ledger replaces the accountant Opacus attached: one charge per step, at the plan's rate.
    ledger = PrivacyLedger.for_plan(plan) if ledger is None else ledger
    private_optimizer.attach_step_hook(ledger.optimizer_hook(plan.sample_rate))
    return PrivateTraining(
        private_model, private_optimizer, loader, loss_fn, plan, ledger, max_physical_batch_size, choice
    )
