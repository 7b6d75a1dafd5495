"""Data poisoning in the centralized recipe: ``attack=label_flip|backdoor`` with ``attack.byzantine=0``
poisons ``round(attack.poison_fraction * members)`` member records before training, the same
ones in every process and after a resume, and records their positions in ``poisoned.json``.

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
from torch.utils.data import TensorDataset

from dptrain.config import Config
from dptrain.robust import Attack, build_attack
from dptrain.seeds import Stream, derived_seed
from dptrain.tracking.atomic import write_json_atomic

POISONED = "poisoned.json"
POISONING_ATTACKS = ("label_flip", "backdoor")


def poisons_members(cfg: Config) -> bool:
    """Whether ``cfg`` is centralized data poisoning: a data-poisoning attack with no Byzantine
    client or worker (``attack.byzantine > 0`` keeps its federated / robust-parallel meaning)."""
    return cfg.federation.name == "none" and cfg.attack.name in POISONING_ATTACKS and cfg.attack.byzantine == 0


def poisoned_count(fraction: float, members: int) -> int:
    """Records poisoned: ``round(fraction * members)`` (half to even)."""
    return round(fraction * members)


def poisoned_positions(cfg: Config, members: int) -> np.ndarray:
    """Sorted positions among the ``members`` of the records to poison, drawn from ``train.seed``'s
    POISON stream: a function of the config and the member count, so every process and a resumed
    run poison the same records."""
    generator = torch.Generator().manual_seed(derived_seed(cfg.train.seed, Stream.POISON))
    chosen = torch.randperm(members, generator=generator)[: poisoned_count(cfg.attack.poison_fraction, members)]
    return np.sort(chosen.numpy())


def poisoning_attack(cfg: Config) -> Attack:
    """The attack whose ``poison`` rewrites every record it is given (the records are already chosen,
    so its own share, ``poison_fraction``, is 1) and whose ``trigger`` stamps test inputs."""
    every = OmegaConf.merge(cfg.attack, {"poison_fraction": 1.0})
    return build_attack(every, derived_seed(cfg.train.seed, Stream.POISON))


def poison_members(cfg: Config, members: TensorDataset, num_classes: int, positions: np.ndarray) -> TensorDataset:
    """``members`` with the records at ``positions`` poisoned (label flipped, or triggered and
    relabelled ``attack.target_label``); new tensors, the others unchanged."""
    inputs, labels = (tensor.clone() for tensor in members.tensors)
    if len(positions):
        index = torch.from_numpy(positions)
        inputs[index], labels[index] = poisoning_attack(cfg).poison(inputs[index], labels[index], num_classes)
    return TensorDataset(inputs, labels)


def record_poisoned(run_dir: Path, cfg: Config, positions: np.ndarray) -> Path:
    """Write ``poisoned.json`` atomically: the attack, its share and the member positions (not data)."""
    return write_json_atomic(
        run_dir / POISONED,
        {
            "attack": cfg.attack.name,
            "poison_fraction": cfg.attack.poison_fraction,
            "member_positions": positions.tolist(),
        },
    )
