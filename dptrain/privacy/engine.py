"""Wrap model, optimizer and data for training under a privacy plan (Opacus), or leave them plain for the baseline."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

import torch
from opacus import PrivacyEngine
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from dptrain.config import PrivacyConfig
from dptrain.errors import UserError
from dptrain.privacy.accounting import accountant_warnings_silenced
from dptrain.privacy.plan import PrivacyPlan


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Opacus' GradSampleModule and DPDDP wrappers (or the module itself)."""
    model = getattr(model, "_module", model)
    return model.module if isinstance(model, DifferentiallyPrivateDistributedDataParallel) else model


@dataclass
class PrivateTraining:
    """The objects a training loop uses; private or not, the loop is the same.

    ``model`` computes per-example gradients and ``optimizer`` clips and noises
    them when the plan is private; ``loss_fn(logits, labels)`` returns a loss
    whose ``backward()`` does the right thing for the grad-sample mode (ghost
    clipping needs two passes, which Opacus packs into its loss object).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    loss_fn: Callable
    plan: PrivacyPlan
    engine: PrivacyEngine | None
    max_physical_batch_size: int | None

    def batches(self) -> ContextManager[Iterable]:
        """The logical batches of one epoch, split into physical ones of at most ``max_physical_batch_size``.

        Opacus' BatchMemoryManager only steps the optimizer at the end of each
        logical batch, so the accountant still sees one step per logical batch.
        """
        if self.engine is None or self.max_physical_batch_size is None:
            return contextlib.nullcontext(self.loader)
        return BatchMemoryManager(
            data_loader=self.loader,
            max_physical_batch_size=self.max_physical_batch_size,
            optimizer=self.optimizer,
        )

    def epsilon(self) -> float | None:
        """Epsilon spent so far at the plan's delta (None for the non-private baseline)."""
        if self.engine is None:
            return None
        if len(self.engine.accountant) == 0:
            return 0.0
        with accountant_warnings_silenced():
            return float(self.engine.get_epsilon(self.plan.delta))

    def accounted_steps(self) -> int:
        """Steps the accountant has charged (0 for the baseline, which has none)."""
        return 0 if self.engine is None else sum(steps for _, _, steps in self.engine.accountant.history)

    def standard_model(self) -> nn.Module:
        """The trained ``nn.Module`` with Opacus' hooks, per-example gradient buffers and DPDDP wrapper removed."""
        return unwrap(self.model.to_standard_module() if self.engine is not None else self.model)

    def accountant_state(self) -> dict | None:
        return None if self.engine is None else self.engine.accountant.state_dict()

    def load_accountant_state(self, state: dict | None) -> None:
        """Restore the accountant so a resumed run keeps counting from where it stopped."""
        if (state is None) != (self.engine is None):
            raise UserError(
                "train.resume: the checkpoint's privacy setting (private or not) differs from this run's; "
                "resume with the config the run was started with"
            )
        if self.engine is not None:
            self.engine.accountant.load_state_dict(state)


def _per_layer_norms(model: nn.Module, max_grad_norm: float) -> list[float]:
    # Splitting C evenly as C / sqrt(L) keeps the norm of the whole clipped
    # gradient within C, so the sensitivity the accountant assumes still holds.
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [max_grad_norm / math.sqrt(len(trainable))] * len(trainable)


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
) -> PrivateTraining:
    """Return the training objects for ``plan``: Opacus-wrapped when private, plain when not.

    Every epoch takes ``plan.steps_per_epoch`` steps and, under Poisson sampling,
    samples each record at ``plan.sample_rate`` whatever ``len(dataset)``: the
    ranks of a robust-parallel run step together though the canaries they hold
    make their datasets differ by a few records, and the subsampled Gaussian's
    accounting depends on (q, sigma, steps) only. Precondition: ``len(dataset)``
    is at least the record count the plan was made for (and equals it without
    Poisson sampling, checked here: the accountant's sample rate would be wrong).
    """
    loss_fn = nn.CrossEntropyLoss()
    if not plan.private:
        # At most steps_per_epoch * batch_size distinct records per epoch: exactly the plan's steps.
        records = min(len(dataset), plan.steps_per_epoch * batch_size)
        sampler = RandomSampler(dataset, num_samples=records, generator=sampling_generator)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=sampling_generator)
        return PrivateTraining(model, optimizer, loader, loss_fn, plan, None, None)
    if cfg.poisson_sampling:
        # Opacus' Poisson loader samples at rate 1 / len(loader): a loader of the plan's steps.
        steps = BatchSampler(range(plan.steps_per_epoch), batch_size=1, drop_last=False)
        loader = DataLoader(dataset, batch_sampler=steps, generator=sampling_generator)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, generator=sampling_generator)
    if not math.isclose(1.0 / len(loader), plan.sample_rate):
        raise RuntimeError(
            f"privacy plan was made for sample rate {plan.sample_rate}, the data gives {1.0 / len(loader)}"
        )
    with accountant_warnings_silenced(), warnings.catch_warnings():
        # dptrain does not offer torchcsprng's secure mode; the README says so.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=plan.accountant)
    max_grad_norm = (
        _per_layer_norms(model, plan.max_grad_norm) if cfg.clipping == "per_layer" else plan.max_grad_norm
    )
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=loss_fn,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=cfg.poisson_sampling,
        clipping=cfg.clipping,
        noise_generator=noise_generator,
        grad_sample_mode=cfg.grad_sample_mode,
    )
    if cfg.grad_sample_mode == "ghost":
        private_model, private_optimizer, loss_fn, private_loader = wrapped
    else:
        private_model, private_optimizer, private_loader = wrapped
    return PrivateTraining(
        private_model, private_optimizer, private_loader, loss_fn, plan, engine, max_physical_batch_size
    )
