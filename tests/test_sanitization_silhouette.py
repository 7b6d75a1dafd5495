"""Activation clustering's silhouette criterion (Chen et al. 2018, "determining which cluster is
poisoned"): a class that 2-means splits into two well-separated clusters is flagged, a class that is
one blob with a small sub-style is not, though both pass the relative-size rule; the score is the
silhouette computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dptrain.errors import UserError
from dptrain.poisoning import activation_clustering
from dptrain.training.sanitization import SANITIZED, record_sanitized
from dptrain.validation import validate

SILHOUETTE = ("defense.sanitize=activation_clustering", "defense.cluster_rule=silhouette")


def test_the_silhouette_rule_flags_two_separated_clusters_and_spares_a_blob_with_a_sub_style():
    features = torch.randn(200, 20, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(200) // 100
    # Class 0: 10 records (90-99) shifted 6 standard deviations along every feature, two clusters
    # (silhouette 0.81). Class 1: one blob whose last 20 records (180-199) are shifted 4 standard
    # deviations along one feature, a sub-style that 2-means splits off as 21 records (silhouette 0.26).
    features[90:100] += 6.0
    features[180:200, 0] += 4.0
    by_size = activation_clustering(features, labels, threshold=0.35, seed=0)
    assert set(range(90, 100)) < set(by_size.tolist()) and (by_size >= 100).sum() == 21
    by_silhouette = activation_clustering(features, labels, threshold=0.35, seed=0, silhouette_threshold=0.31)
    assert by_silhouette.tolist() == list(range(90, 100))


def test_the_silhouette_is_the_hand_computed_mean_over_records():
    # Clusters {0, 2, 4} and {20, 22}: each record's 1 - (mean distance within) / (mean distance to the
    # other cluster) is 18/21, 17/19, 14/17, 16/18, 18/20, mean 0.87286.
    features = torch.tensor([[0.0], [2.0], [4.0], [20.0], [22.0]])
    labels = torch.zeros(5, dtype=torch.long)
    silhouette = (18 / 21 + 17 / 19 + 14 / 17 + 16 / 18 + 18 / 20) / 5
    kwargs = dict(threshold=0.45, seed=0)
    assert activation_clustering(features, labels, **kwargs, silhouette_threshold=silhouette - 1e-6).tolist() == [3, 4]
    assert activation_clustering(features, labels, **kwargs, silhouette_threshold=silhouette + 1e-6).size == 0


def test_a_class_of_equal_records_has_no_silhouette_and_is_kept():
    features, labels = torch.ones(6, 3), torch.zeros(6, dtype=torch.long)
    with pytest.warns(Warning):  # sklearn: fewer distinct points than clusters
        assert activation_clustering(features, labels, threshold=0.35, seed=0, silhouette_threshold=-0.5).size == 0


def test_sanitized_json_records_the_cluster_rule_and_its_threshold(tiny_config, tmp_path):
    cfg = tiny_config(*SILHOUETTE, "defense.silhouette_threshold=0.4")
    record_sanitized(tmp_path, cfg, np.array([2, 5]))
    recorded = json.loads((tmp_path / SANITIZED).read_text())
    assert recorded["cluster_rule"] == "silhouette" and recorded["silhouette_threshold"] == 0.4
    assert recorded["member_positions"] == [2, 5]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ("defense.sanitize=activation_clustering", "model=mlp", "privacy.target_epsilon=inf", "defense.silhouette_threshold=0.2"),
            "defense.silhouette_threshold=0.2 is not read by defense.sanitize=activation_clustering with "
            "defense.cluster_rule=size: leave it at 0.31",
        ),
        (
            ("defense.sanitize=spectral_signatures", "model=mlp", "privacy.target_epsilon=inf", "defense.cluster_rule=silhouette"),
            "defense.cluster_rule=silhouette is not read by defense.sanitize=spectral_signatures",
        ),
        ((*SILHOUETTE[:1], "defense.cluster_rule=ica"), "defense.cluster_rule=ica is unknown: choose one of size, silhouette"),
        ((*SILHOUETTE, "defense.silhouette_threshold=1.5"), "defense.silhouette_threshold=1.5 must be"),
    ],
)
def test_meaningless_cluster_rules_are_refused_in_one_line(tiny_config, overrides, message):
    with pytest.raises(UserError) as error:
        validate(tiny_config(*overrides))
    assert message in str(error.value) and "\n" not in str(error.value)
