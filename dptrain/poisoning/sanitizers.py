"""Detectors of poisoned records, each a function of representations and labels alone (the recipe that
feeds them, and what their removal does to the DP guarantee, is ``dptrain.training.sanitization``'s):

- ``spectral_signatures`` (Tran, Li & Madry 2018, "Spectral Signatures in Backdoor Attacks");
- ``activation_clustering`` (Chen et al. 2018, "Detecting Backdoor Attacks on Deep Neural Networks by
  Activation Clustering"), with the relative-size criterion and optionally the silhouette criterion;
- ``knn_label_consistency`` (Peri et al. 2020, "Deep k-NN Defense Against Clean-Label Data Poisoning
  Attacks");

and ``detection``, the precision and recall of a removal against the known poisoned records.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

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
    # scikit-learn is imported where a sanitizer runs: every run imports this module (the attacks
    # poison with it), and sklearn's clustering costs 0.3-0.7 s of a default job's start.
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

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
    from sklearn.metrics import silhouette_score  # imported where it runs, as in two_means

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
    from sklearn.neighbors import NearestNeighbors  # imported where it runs, as in two_means

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


def detection(removed: np.ndarray, poisoned: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of ``removed`` as a detector of the ``poisoned`` positions; precision is 0
    when nothing was removed, recall 1 when nothing was poisoned."""
    hits = len(np.intersect1d(removed, poisoned))
    precision = hits / len(removed) if len(removed) else 0.0
    recall = hits / len(poisoned) if len(poisoned) else 1.0
    return precision, recall
