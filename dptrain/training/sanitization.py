"""Data sanitization before training: ``defense.sanitize`` removes suspected poison from the members
and ``sanitized.json`` records which.

Three detectors (``dptrain.poisoning``'s), on one representation of the records
(``defense.representation``); the first two run per class (the label as trained on, poisoned or not):

- ``spectral_signatures`` (Tran, Li & Madry 2018, "Spectral Signatures in Backdoor Attacks"): the
  ``defense.remove_fraction`` of each class with the largest squared projection on the class's top
  singular vector.
- ``activation_clustering`` (Chen et al. 2018, "Detecting Backdoor Attacks on Deep Neural Networks by
  Activation Clustering"): 2-means on the representations reduced to 10 dimensions, the smaller
  cluster removed when it holds less than ``defense.cluster_threshold`` of its class
  (``defense.cluster_rule=size``, the paper's relative-size criterion) and, with
  ``defense.cluster_rule=silhouette``, only when the class's silhouette score also exceeds
  ``defense.silhouette_threshold`` (the paper's silhouette criterion: a poisoned class splits cleanly
  in two, a clean class with sub-styles does not). How many it removes is the data's call, not a
  share.
- ``knn_label_consistency`` (Peri et al. 2020, "Deep k-NN Defense Against Clean-Label Data Poisoning
  Attacks"): each record whose label is not the plurality label of its ``defense.neighbours`` nearest
  other records. It catches records labelled against their neighbourhood (label flipping, clean-label
  feature collisions), not a backdoor, whose triggered records are each other's neighbours.

``penultimate`` representations follow both papers' two phases: a preliminary model is trained on
the members as poisoned with the run's own recipe (non-private: sanitization runs only without DP),
each member's input to its output layer is read (``dptrain.training.representations``), and the
real model is then trained from scratch on the records kept. ``input`` representations are the
flattened input features, with no model trained: the only sensible choice for a logistic regression,
whose penultimate representation *is* its input (validation says so rather than train for nothing).
Either way the removed records are a function of the config and the members, trained and clustered
under seeds derived from ``train.seed``.

Privacy: the rule reads every member to decide which to drop, so one record changes which others are
trained on, a step DP-SGD's accountant does not cover; validation refuses it in private runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dptrain.config import Config
from dptrain.data import InputUnits
from dptrain.poisoning import activation_clustering, knn_label_consistency, spectral_signatures
from dptrain.seeds import Stream, derived_seed
from dptrain.tracking.atomic import write_json_atomic
from dptrain.training.recipe import resolve_device, train_model
from dptrain.training.representations import penultimate

log = logging.getLogger(__name__)

SANITIZED = "sanitized.json"
SANITIZERS = ("none", "spectral_signatures", "activation_clustering", "knn_label_consistency")
REPRESENTATIONS = ("penultimate", "input")
CLUSTER_RULES = ("size", "silhouette")


def representations(
    cfg: Config, members: TensorDataset, *, input_shape: Sequence[int], num_classes: int, units: InputUnits | None
) -> torch.Tensor:
    """Each member's ``defense.representation``: its flattened input, or the penultimate-layer
    representation of a preliminary model trained on ``members`` with the run's recipe."""
    inputs = members.tensors[0]
    if cfg.defense.representation == "input":
        return inputs.flatten(start_dim=1)
    # Said before its progress bar, which would otherwise read as the run's own training.
    log.info("defense.sanitize=%s: training a preliminary model on the %d members", cfg.defense.sanitize, len(members))
    preliminary = train_model(cfg, members, input_shape=input_shape, num_classes=num_classes, units=units).model
    return penultimate(preliminary, members, resolve_device(cfg.train.device))


def sanitized_positions(
    cfg: Config, members: TensorDataset, *, input_shape: Sequence[int], num_classes: int, units: InputUnits | None
) -> np.ndarray | None:
    """The member positions ``defense.sanitize`` removes from ``members`` (as trained on, poisoned
    ones included), or None when sanitization is off."""
    defense = cfg.defense
    if defense.sanitize == "none":
        return None
    features = representations(cfg, members, input_shape=input_shape, num_classes=num_classes, units=units)
    labels = members.tensors[1]
    if defense.sanitize == "spectral_signatures":
        return spectral_signatures(features, labels, defense.remove_fraction)
    if defense.sanitize == "knn_label_consistency":
        return knn_label_consistency(features, labels, defense.neighbours)
    silhouette_threshold = defense.silhouette_threshold if defense.cluster_rule == "silhouette" else None
    seed = derived_seed(cfg.train.seed, Stream.SANITIZE)
    return activation_clustering(features, labels, defense.cluster_threshold, seed, silhouette_threshold)


def record_sanitized(run_dir: Path, cfg: Config, positions: np.ndarray) -> Path:
    """Write ``sanitized.json`` atomically: the method, its representation and parameters, and the
    removed member positions."""
    defense = cfg.defense
    if defense.sanitize == "spectral_signatures":
        parameter = {"remove_fraction": defense.remove_fraction}
    elif defense.sanitize == "knn_label_consistency":
        parameter = {"neighbours": defense.neighbours}
    else:
        parameter = {"cluster_threshold": defense.cluster_threshold, "cluster_rule": defense.cluster_rule}
        if defense.cluster_rule == "silhouette":
            parameter["silhouette_threshold"] = defense.silhouette_threshold
    return write_json_atomic(
        run_dir / SANITIZED,
        {
            "sanitize": defense.sanitize,
            "representation": defense.representation,
            **parameter,
            "member_positions": positions.tolist(),
        },
    )


def recorded_sanitized(run_dir: Path) -> np.ndarray:
    """The removed member positions ``record_sanitized`` wrote in ``run_dir``: a resumed or re-audited
    run reads them back instead of training the preliminary model again."""
    return np.array(json.loads((run_dir / SANITIZED).read_text())["member_positions"], dtype=np.int64)
