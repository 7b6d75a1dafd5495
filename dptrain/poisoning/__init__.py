"""Data poisoning and its defences, below the recipes that use them: the attacks on records (label flips,
backdoor triggers) and the detectors that sanitization runs on representations of the members."""

from dptrain.poisoning.data import backdoor, label_flip, stamp_trigger, targeted_label_flip
from dptrain.poisoning.sanitizers import (
    activation_clustering,
    detection,
    knn_label_consistency,
    smaller_cluster,
    spectral_scores,
    spectral_signatures,
    two_means,
)

__all__ = [
    "activation_clustering",
    "backdoor",
    "detection",
    "knn_label_consistency",
    "label_flip",
    "smaller_cluster",
    "spectral_scores",
    "spectral_signatures",
    "stamp_trigger",
    "targeted_label_flip",
    "two_means",
]
