"""The step loop every recipe shares: one epoch of (private) training, and evaluation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dptrain.privacy import PrivateTraining, unwrap

EVAL_BATCH_SIZE = 1024


class Views(Protocol):
    """Several augmented views per example, averaged before clipping (``dptrain.training.augmult``)."""

    def expand(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def average(self, model: nn.Module) -> None: ...


class AdversarialObjective(Protocol):
    """A training objective on adversarial inputs (``dptrain.training.adversarial``)."""

    def loss(
        self, model: nn.Module, loss_fn: Callable, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class EpochStats:
    """Mean training loss and accuracy over the examples the epoch's batches held (over their views, which
    ``examples`` then counts, under ``train.augmult``)."""

    loss: float
    accuracy: float
    examples: int


def train_epoch(
    training: PrivateTraining,
    device: torch.device,
    adversarial: AdversarialObjective | None = None,
    pace: Callable[[Iterable], Iterable] | None = None,
    views: Views | None = None,
) -> EpochStats:
    """Run one epoch of ``training``'s loader; the optimizer clips and noises when the plan is private.
    With ``adversarial`` (``dptrain.training.adversarial``) each batch's loss and logits are
    ``adversarial.loss(model, loss_fn, inputs, labels)``: the loss on adversarial inputs (``pgd``; the
    accuracy is then on them) or TRADES' (the accuracy on the clean inputs). ``pace`` wraps the batches
    (``ThreadCalibration.paced``: it times each step and may end the epoch early). With ``views``
    (``train.augmult``) each batch is replaced by its examples' views, whose per-example gradients are
    averaged over each example's views before the optimizer clips them.

    Poisson sampling can draw an empty batch; it still goes through the
    optimizer, because skipping it would make whether an update happened
    depend on the data (Opacus adds noise to a zero gradient then).
    """
    model, optimizer = training.model, training.optimizer
    model.train()
    loss_sum, correct, examples = 0.0, 0, 0
    with warnings.catch_warnings(), training.batches() as batches:
        # Opacus' backward hooks on the input layer fire although inputs need no gradient; harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for inputs, labels in batches if pace is None else pace(batches):
            inputs, labels = inputs.to(device), labels.to(device)
            if views is not None:
                inputs, labels = views.expand(inputs, labels)
            optimizer.zero_grad(set_to_none=True)
            if adversarial is None:
                logits = model(inputs)
                loss = training.loss_fn(logits, labels)
            else:
                loss, logits = adversarial.loss(model, training.loss_fn, inputs, labels)
            loss.backward()
            if views is not None:
                views.average(model)
            optimizer.step()
            if len(labels):
                loss_sum += loss.item() * len(labels)
                correct += (logits.argmax(dim=1) == labels).sum().item()
                examples += len(labels)
    return EpochStats(loss_sum / max(examples, 1), correct / max(examples, 1), examples)


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of ``model`` on every example of ``dataset``, in order, on the CPU."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    if isinstance(dataset, TensorDataset):
        # Slices of the tensors: a DataLoader would index and re-stack every record.
        batches = zip(*(tensor.split(EVAL_BATCH_SIZE) for tensor in dataset.tensors))
    else:
        batches = DataLoader(dataset, batch_size=EVAL_BATCH_SIZE)
    with torch.no_grad():
        for inputs, targets in batches:
            logits.append(model(inputs.to(device)).cpu())
            labels.append(targets)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, dataset: Dataset, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``dataset``."""
    logits, labels = predict(model, dataset, device)
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return loss, accuracy
