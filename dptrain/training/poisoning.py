"""Data poisoning in the centralized recipe: ``attack=label_flip|backdoor`` with ``attack.byzantine=0``
poisons ``attack.poison_count`` or ``round(attack.poison_fraction * members)`` member records (a
targeted label flip, ``attack.source_label`` set, only records of that class) before training, the
same ones in every process and after a resume, and records their positions in ``poisoned.json``.

The data-level attacks are the federated Byzantine clients' (``Attack.poison``, ``dptrain.robust``)
applied to the chosen records; the backdoor's success is ``federated.backdoor_success_rate``.

Privacy: DP-SGD's (epsilon, delta), accounted as without poisoning, covers every record of the
training set it was given, the poisoned ones included: poisoning is the attacker's change to that set,
not a step of the mechanism. Audits measure the members left clean (``centralized.audited_data``),
the records trained on exactly as the audit holds them, beside as many label-stratified non-members.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from dptrain.config import AttackConfig, Config
from dptrain.errors import UserError
from dptrain.robust import Attack, build_attack
from dptrain.seeds import Stream, derived_seed
from dptrain.training.loop import predict
from dptrain.tracking.atomic import write_json_atomic

POISONED = "poisoned.json"
POISONING_ATTACKS = ("label_flip", "backdoor")


def poisons_members(cfg: Config) -> bool:
    """Whether ``cfg`` is centralized data poisoning: a data-poisoning attack with no Byzantine
    client or worker (``attack.byzantine > 0`` keeps its federated / robust-parallel meaning)."""
    return cfg.federation.name == "none" and cfg.attack.name in POISONING_ATTACKS and cfg.attack.byzantine == 0


def poisoned_count(attack: AttackConfig, members: int) -> int:
    """Records poisoned: ``attack.poison_count``, else ``round(attack.poison_fraction * members)``
    (half to even). Precondition (``validate``): exactly one of the two is set."""
    return attack.poison_count if attack.poison_count is not None else round(attack.poison_fraction * members)


def targets_class(attack: AttackConfig) -> bool:
    """Whether the attack poisons one class only: a label flip of ``source_label`` to ``target_label``."""
    return attack.name == "label_flip" and attack.source_label is not None


def poisoned_positions(cfg: Config, labels: Tensor) -> np.ndarray:
    """Sorted positions among the members (their ``labels``) of the records to poison, drawn from
    ``train.seed``'s POISON stream among all members, or for a targeted label flip among those of
    ``attack.source_label``: a function of the config and the members, so every process and a
    resumed run poison the same records.

    Raises ``UserError`` when a targeted flip asks for more records than the source class has.
    """
    candidates = torch.arange(len(labels))
    if targets_class(cfg.attack):
        candidates = candidates[labels == cfg.attack.source_label]
    count = poisoned_count(cfg.attack, len(labels))
    if count > len(candidates):
        raise UserError(
            f"attack.source_label={cfg.attack.source_label} has {len(candidates)} of the {len(labels)} members, "
            f"fewer than the {count} to poison: lower attack.poison_count or attack.poison_fraction"
        )
    generator = torch.Generator().manual_seed(derived_seed(cfg.train.seed, Stream.POISON))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
    return np.sort(chosen.numpy())


def poisoning_attack(cfg: Config) -> Attack:
    """The attack whose ``poison`` rewrites every record it is given (the records are already chosen,
    so its own share, ``poison_fraction``, is 1) and whose ``trigger`` stamps test inputs."""
    every = OmegaConf.merge(cfg.attack, {"poison_fraction": 1.0})
    return build_attack(every, derived_seed(cfg.train.seed, Stream.POISON))


def poison_members(cfg: Config, members: TensorDataset, num_classes: int, positions: np.ndarray) -> TensorDataset:
    """``members`` with the records at ``positions`` poisoned (label flipped, targeted or not, or
    triggered and relabelled ``attack.target_label``); new tensors, the others unchanged."""
    inputs, labels = (tensor.clone() for tensor in members.tensors)
    if len(positions):
        index = torch.from_numpy(positions)
        inputs[index], labels[index] = poisoning_attack(cfg).poison(inputs[index], labels[index], num_classes)
    return TensorDataset(inputs, labels)


def poisoned_class_accuracy(model: nn.Module, test: TensorDataset, source: int, device: torch.device) -> float:
    """Accuracy on the test records of class ``source``: what a targeted label flip sets out to
    lower (Tolpegin et al. 2020's source-class recall)."""
    inputs, labels = test.tensors
    keep = labels == source
    logits, kept = predict(model, TensorDataset(inputs[keep], labels[keep]), device)
    return (logits.argmax(dim=1) == kept).float().mean().item()


def record_poisoned(run_dir: Path, cfg: Config, positions: np.ndarray) -> Path:
    """Write ``poisoned.json`` atomically: the attack, its share and the member positions (not data)."""
    return write_json_atomic(
        run_dir / POISONED,
        {
            "attack": cfg.attack.name,
            "poison_fraction": cfg.attack.poison_fraction,
            "poison_count": cfg.attack.poison_count,
            "source_label": cfg.attack.source_label,
            "member_positions": positions.tolist(),
        },
    )
