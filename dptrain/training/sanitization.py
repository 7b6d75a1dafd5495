"""Data sanitization before training: ``defense.sanitize=spectral_signatures`` removes the member
records whose input features lie furthest along their class's top singular direction (Tran, Li &
Madry 2018, "Spectral Signatures in Backdoor Attacks"), and ``sanitized.json`` records which.

Representations are the input features, flattened: what a logistic regression sees, computed
without training anything, so the removed records are a function of the config and the (possibly
poisoned) members alone and every process, resume and re-audit derives the same ones.

Privacy: the rule reads every member to decide which to drop, so one record changes which others are
trained on, a step DP-SGD's accountant does not cover; validation refuses it in private runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dptrain.config import Config
from dptrain.tracking.atomic import write_json_atomic

SANITIZED = "sanitized.json"
SANITIZERS = ("none", "spectral_signatures")


def spectral_scores(features: torch.Tensor) -> torch.Tensor:
    """Each row's outlier score within its group (Tran et al. 2018, Algorithm 1): the squared
    projection of the centred row on the top right singular vector of the centred matrix."""
    centred = features.double() - features.double().mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]) ** 2


def spectral_signatures(features: torch.Tensor, labels: torch.Tensor, remove_fraction: float) -> np.ndarray:
    """Sorted positions of the records removed: in each class, the ``round(remove_fraction * size)``
    highest ``spectral_scores`` of that class's flattened ``features`` (ties to the earlier record)."""
    flat = features.reshape(len(features), -1)
    removed = []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        count = round(remove_fraction * len(members))
        if count == 0:
            continue
        scores = spectral_scores(flat[members])
        # A stable descending sort, so equal scores keep the records' order on every platform.
        order = torch.sort(scores, descending=True, stable=True).indices
        removed.append(members[order[:count]])
    return np.sort(torch.cat(removed).numpy()) if removed else np.zeros(0, dtype=np.int64)


def sanitized_positions(cfg: Config, members: TensorDataset) -> np.ndarray | None:
    """The member positions ``defense.sanitize`` removes from ``members`` (as trained on, poisoned
    ones included), or None when sanitization is off."""
    if cfg.defense.sanitize == "none":
        return None
    inputs, labels = members.tensors
    return spectral_signatures(inputs, labels, cfg.defense.remove_fraction)


def detection(removed: np.ndarray, poisoned: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of ``removed`` as a detector of the ``poisoned`` positions; precision is 0
    when nothing was removed, recall 1 when nothing was poisoned."""
    hits = len(np.intersect1d(removed, poisoned))
    precision = hits / len(removed) if len(removed) else 0.0
    recall = hits / len(poisoned) if len(poisoned) else 1.0
    return precision, recall


def record_sanitized(run_dir: Path, cfg: Config, positions: np.ndarray) -> Path:
    """Write ``sanitized.json`` atomically: the method, its share and the removed member positions."""
    return write_json_atomic(
        run_dir / SANITIZED,
        {
            "sanitize": cfg.defense.sanitize,
            "remove_fraction": cfg.defense.remove_fraction,
            "member_positions": positions.tolist(),
        },
    )
