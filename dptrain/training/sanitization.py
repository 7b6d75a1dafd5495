"""Data sanitization before training: ``defense.sanitize`` removes suspected poison from the members
and ``sanitized.json`` records which.

Three detectors, on one representation of the records (``defense.representation``); the first two
run per class (the label as trained on, poisoned or not):

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
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors
from torch.utils.data import TensorDataset

from dptrain.config import Config
from dptrain.data import InputUnits
from dptrain.seeds import Stream, derived_seed
from dptrain.tracking.atomic import write_json_atomic
from dptrain.training.recipe import resolve_device, train_model
from dptrain.training.representations import penultimate

log = logging.getLogger(__name__)

SANITIZED = "sanitized.json"
SANITIZERS = ("none", "spectral_signatures", "activation_clustering", "knn_label_consistency")
REPRESENTATIONS = ("penultimate", "input")
CLUSTER_RULES = ("size", "silhouette")
# Chen et al. 2018 reduce each class's activations to 10 independent components; we take the top 10
# principal components instead (deterministic, no ICA convergence to tune).
CLUSTERING_DIMENSIONS = 10


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


def two_means(features: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reduced rows, cluster of each row): the rows projected on their top ``CLUSTERING_DIMENSIONS``
    principal components, then 2-means (k-means++, 10 starts, ``seed``) on the projections."""
    dimensions = min(CLUSTERING_DIMENSIONS, *features.shape)
    reduced = PCA(n_components=dimensions, svd_solver="full").fit_transform(features)
    return reduced, KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)


def smaller_cluster(assignment: np.ndarray) -> np.ndarray:
    """Positions of the smaller of the two clusters in a 2-means ``assignment``; the first cluster's
    when both are the same size."""
    smaller = int(np.bincount(assignment, minlength=2).argmin())
    return np.flatnonzero(assignment == smaller)


def activation_clustering(
    features: torch.Tensor, labels: torch.Tensor, threshold: float, seed: int, silhouette_threshold: float | None = None
) -> np.ndarray:
    """Sorted positions of the records removed (Chen et al. 2018, section "determining which cluster
    is poisoned"): in each class of at least 3 records, the ``smaller_cluster`` of the ``two_means``
    of its flattened ``features`` when it holds less than ``threshold`` of the class (relative size)
    and, unless ``silhouette_threshold`` is None, the class's silhouette score (sklearn's, on the
    reduced rows and 2-means labels) exceeds ``silhouette_threshold``; any other class is taken to
    be clean. A class whose rows are all equal has no silhouette and is kept."""
    flat = features.reshape(len(features), -1).double().numpy()
    labels = labels.numpy()
    removed = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 3:
            continue
        reduced, assignment = two_means(flat[members], seed)
        suspects = smaller_cluster(assignment)
        silhouette = silhouette_score(reduced, assignment) if len(np.unique(assignment)) == 2 else float("nan")
        # Both criteria per class in the run's log: what a threshold is chosen from.
        log.info(
            "activation clustering, class %s: smaller cluster %d of %d (%.3f), silhouette %.3f",
            label, len(suspects), len(members), len(suspects) / len(members), silhouette,
        )
        if len(suspects) >= threshold * len(members):
            continue
        # A NaN silhouette (equal rows, one cluster) compares False: kept.
        if silhouette_threshold is not None and not silhouette > silhouette_threshold:
            continue
        removed.append(members[suspects])
    return np.sort(np.concatenate(removed)) if removed else np.zeros(0, dtype=np.int64)


def knn_label_consistency(features: torch.Tensor, labels: torch.Tensor, neighbours: int) -> np.ndarray:
    """Sorted positions of the records removed (Peri et al. 2020, section 3): each record whose label
    is not a plurality label of its ``neighbours`` nearest other records (Euclidean distance between
    the flattened ``features``; a record tied for the plurality is kept). Its own row is left out of
    the vote by position, so duplicates of it still vote. Precondition: ``neighbours < len(labels)``."""
    flat = features.reshape(len(features), -1).double().numpy()
    labels = labels.numpy()
    # One neighbour more than asked, then the record itself dropped wherever the search put it.
    _, found = NearestNeighbors(n_neighbors=neighbours + 1).fit(flat).kneighbors(flat)
    removed = []
    for position, row in enumerate(found):
        voters = row[row != position][:neighbours]
        votes = np.bincount(labels[voters], minlength=labels.max() + 1)
        if votes[labels[position]] < votes.max():
            removed.append(position)
    return np.array(removed, dtype=np.int64)


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


def detection(removed: np.ndarray, poisoned: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of ``removed`` as a detector of the ``poisoned`` positions; precision is 0
    when nothing was removed, recall 1 when nothing was poisoned."""
    hits = len(np.intersect1d(removed, poisoned))
    precision = hits / len(removed) if len(removed) else 0.0
    recall = hits / len(poisoned) if len(poisoned) else 1.0
    return precision, recall


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
