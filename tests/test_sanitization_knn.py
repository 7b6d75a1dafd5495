"""k-NN label consistency (``defense.sanitize=knn_label_consistency``, Peri et al. 2020): on records with a
known answer it removes exactly those labelled against their neighbourhood, breaks ties towards keeping,
leaves a record out of its own vote, and refuses settings it would not read or could not run."""

from __future__ import annotations

import pytest
import torch

from dptrain.errors import UserError
from dptrain.poisoning import knn_label_consistency
from dptrain.validation import validate


def test_records_labelled_against_their_cluster_are_removed_and_nothing_else():
    generator = torch.Generator().manual_seed(0)
    # Two tight, far-apart clusters of 40 records, labelled by cluster; 4 records of the first flipped.
    features = torch.cat([torch.randn(40, 5, generator=generator), 20 + torch.randn(40, 5, generator=generator)])
    labels = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(40, dtype=torch.long)])
    flipped = [3, 11, 17, 30]
    labels[flipped] = 1
    assert knn_label_consistency(features, labels, neighbours=10).tolist() == flipped


def test_the_vote_is_the_hand_computed_one_with_ties_kept_and_self_left_out():
    # Points on a line, 2 neighbours each. Record 0 (at 0, label 1): neighbours 1 and 2, labels 0 and 0:
    # removed. Record 1 (at 1, label 0): neighbours 0 and 2 (labels 1, 0): a tie, kept. Record 2 (at 2,
    # label 0): neighbours 1 and 3 (0, 1): a tie, kept. Record 3 (at 3, label 1): neighbours 2 and 4
    # (0, 0): removed. Record 4 (at 4, label 0): neighbours 3 and 2 (1, 0): a tie, kept.
    features = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.1]])
    labels = torch.tensor([1, 0, 0, 1, 0])
    assert knn_label_consistency(features, labels, neighbours=2).tolist() == [0, 3]
    # With itself in its vote, record 0 would tie 1 : 1 with k = 2 and be kept: a duplicate row is not itself.
    duplicated = torch.tensor([[0.0], [0.0], [5.0], [5.5]])
    assert knn_label_consistency(duplicated, torch.tensor([1, 0, 0, 0]), neighbours=1).tolist() == [0, 1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("defense.neighbours=5",), "defense.neighbours=5 is not read by defense.sanitize=activation_clustering"),
        (
            ("defense.sanitize=knn_label_consistency", "defense.remove_fraction=0.2"),
            "defense.remove_fraction=0.2 is not read by defense.sanitize=knn_label_consistency",
        ),
        (("defense.sanitize=knn_label_consistency", "defense.neighbours=0"), "defense.neighbours=0 must be"),
        (
            ("defense.sanitize=knn_label_consistency", "defense.neighbours=100000"),
            "defense.neighbours=100000 needs more than 100000 members to vote among",
        ),
    ],
)
def test_meaningless_knn_settings_are_refused_in_one_line(tiny_config, overrides, message):
    base = ("defense.sanitize=activation_clustering", "model=mlp", "privacy.target_epsilon=inf")
    with pytest.raises(UserError) as error:
        validate(tiny_config(*base, *overrides))
    assert message in str(error.value) and "\n" not in str(error.value)
