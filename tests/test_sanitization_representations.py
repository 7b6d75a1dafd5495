"""Representation-based sanitization: activation clustering (Chen et al. 2018) finds planted clusters
with a known answer, the penultimate representation is the hidden activation computed by hand, a
sanitized run trains a preliminary model, removes what the detector flags on its representations and
trains on the rest, and the settings that make no sense are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch import nn
from torch.utils.data import TensorDataset

from conftest import interrupt_at_epoch, same_weights
from dptrain import pipeline
from dptrain.errors import UserError
from dptrain.models import build_model
from dptrain.seeds import Stream, derived_seed
from dptrain.training import centralized, recipe
from dptrain.training.poisoning import poison_members
from dptrain.training.recipe import train_model
from dptrain.training.representations import has_hidden_layer, output_layer, penultimate
from dptrain.poisoning import activation_clustering, smaller_cluster, two_means
from dptrain.training.sanitization import SANITIZED
from dptrain.training.target import load_data
from dptrain.validation import validate

BACKDOOR = ("attack=backdoor", "attack.poison_fraction=0.05", "privacy.target_epsilon=inf")
CLUSTERING = ("defense.sanitize=activation_clustering",)


def test_activation_clustering_removes_a_small_shifted_cluster_and_nothing_from_a_clean_class():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 20, generator=generator)
    labels = torch.arange(200) // 100
    # Class 0: 90 records around the origin and 10 (positions 90-99) shifted 6 standard deviations
    # along every feature; class 1 is one Gaussian, which 2-means splits near half and half.
    features[90:100] += 6.0
    removed = activation_clustering(features, labels, threshold=0.35, seed=0)
    assert removed.tolist() == list(range(90, 100))


def test_a_cluster_as_large_as_the_threshold_is_kept():
    features = torch.cat([torch.zeros(13, 3), torch.full((7, 3), 5.0)]) + torch.randn(20, 3, generator=torch.Generator().manual_seed(1)) * 0.1
    labels = torch.zeros(20, dtype=torch.long)
    # The shifted cluster holds 7 of 20 = 0.35: removed below a threshold of 0.36, kept at 0.35.
    assert activation_clustering(features, labels, threshold=0.36, seed=0).tolist() == list(range(13, 20))
    assert activation_clustering(features, labels, threshold=0.35, seed=0).size == 0


def test_smaller_cluster_of_a_hand_case():
    points = np.array([[0.0], [0.1], [10.0], [0.2], [10.1]])
    assert smaller_cluster(two_means(points, seed=0)[1]).tolist() == [2, 4]


def test_smaller_cluster_matches_sklearn_kmeans_on_the_top_ten_principal_components():
    rng = np.random.default_rng(2)
    rows = np.concatenate([rng.normal(size=(70, 30)), rng.normal(size=(30, 30)) + 1.5])
    # Independent reduction: the top 10 principal components from numpy's SVD.
    centred = rows - rows.mean(axis=0)
    reduced = centred @ np.linalg.svd(centred, full_matrices=False)[2][:10].T
    assignment = KMeans(n_clusters=2, n_init=10, random_state=0).fit_predict(reduced)
    expected = np.flatnonzero(assignment == np.bincount(assignment).argmin())
    assert smaller_cluster(two_means(rows, seed=0)[1]).tolist() == expected.tolist()


def test_the_penultimate_representation_is_the_hidden_activation_by_hand(tiny_config):
    model = build_model(tiny_config("model=mlp", "model.hidden=[2]", "model.activation=relu").model, (3,), 2)
    hidden, head = model[1], model[3]
    with torch.no_grad():
        hidden.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.5, 0.5, 2.0]]))
        hidden.bias.copy_(torch.tensor([0.0, -1.0]))
    inputs = torch.tensor([[1.0, 2.0, 3.0], [2.0, 0.0, -1.0]])
    # relu(W x + b): row 1: relu(-1) = 0, relu(0.5 + 1 + 6 - 1) = 6.5; row 2: relu(2) = 2, relu(1 - 0 - 2 - 1) = 0.
    assert head is output_layer(model)
    representation = penultimate(model, TensorDataset(inputs, torch.zeros(2)), torch.device("cpu"))
    assert torch.equal(representation, torch.tensor([[0.0, 6.5], [2.0, 0.0]]))


def test_logistic_regression_has_no_hidden_layer_and_a_convolutional_tail_no_output_layer(tiny_config):
    assert not has_hidden_layer(build_model(tiny_config("model=logreg").model, (1, 8, 8), 10))
    assert has_hidden_layer(build_model(tiny_config("model=cnn").model, (1, 8, 8), 10))
    assert output_layer(nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1))) is None


def test_a_sanitized_run_removes_what_clustering_flags_in_a_preliminary_models_representation(tiny_config, tmp_path):
    cfg = tiny_config(*BACKDOOR, *CLUSTERING, "model=mlp", "model.hidden=[16]", "train.epochs=1", "dataset.max_members=300")
    metrics = pipeline.train(cfg, tmp_path)[0].centralized
    recorded = json.loads((tmp_path / SANITIZED).read_text())
    removed = np.array(recorded["member_positions"])
    assert recorded["representation"] == "penultimate" and recorded["cluster_threshold"] == 0.35
    assert len(removed) == metrics.sanitized > 0
    # Phase one, independently: a model trained on the members as poisoned, then clustering on the
    # input of its output layer, flags the same records.
    data, _, _ = load_data(cfg, tmp_path, reuse_split=True)
    edits = centralized.MemberEdits.of(cfg, data, recorded=tmp_path)
    members = poison_members(cfg, data.members, data.num_classes, edits.poisoned)
    preliminary = train_model(cfg, members, input_shape=data.input_shape, num_classes=data.num_classes).model
    features = penultimate(preliminary, members, torch.device("cpu"))
    assert features.shape == (300, 16)
    seed = derived_seed(cfg.train.seed, Stream.SANITIZE)
    assert activation_clustering(features, members.tensors[1], 0.35, seed).tolist() == removed.tolist()
    # Phase two trains on the rest.
    trained = centralized.training_set(cfg, data, None, edits.poisoned, edits.sanitized)
    assert len(trained) == 300 - len(removed)


def test_a_resume_or_re_audit_reads_the_removed_records_back_instead_of_deriving_them(tiny_config, tmp_path):
    cfg = tiny_config(*BACKDOOR, *CLUSTERING, "model=mlp")
    data, _, _ = load_data(cfg, tmp_path, reuse_split=False)
    # Positions no detector would produce from these members: only read back from the file can they appear.
    (tmp_path / SANITIZED).write_text(json.dumps({"member_positions": [3, 1, 4]}))
    assert centralized.MemberEdits.of(cfg, data, recorded=tmp_path).sanitized.tolist() == [3, 1, 4]


@pytest.mark.slow
def test_a_resumed_sanitized_run_removes_the_same_records_without_a_second_preliminary_model(
    tiny_config, tmp_path, monkeypatch
):
    overrides = (*BACKDOOR, *CLUSTERING, "model=mlp", "model.hidden=[16]", "train.epochs=3", "dataset.max_members=300")
    pipeline.train(tiny_config(*overrides), tmp_path / "a")
    # The preliminary model's 3 epochs come first: the 5th epoch trained is the real model's 2nd.
    interrupt_at_epoch(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(tiny_config(*overrides), tmp_path / "b")
    monkeypatch.undo()
    epochs = []
    real = recipe.train_epoch
    monkeypatch.setattr(recipe, "train_epoch", lambda *args, **kwargs: epochs.append(1) or real(*args, **kwargs))
    pipeline.train(tiny_config(*overrides, f"train.resume={tmp_path / 'b'}"), tmp_path / "b")
    # Epochs 2 and 3 of the real model only, and the model and removed records of the uninterrupted run.
    assert len(epochs) == 2
    removed = [json.loads((tmp_path / run / SANITIZED).read_text())["member_positions"] for run in ("a", "b")]
    assert removed[0] == removed[1] and removed[0]
    assert same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            (*CLUSTERING, "privacy.target_epsilon=inf"),
            "defense.representation=penultimate: model=logreg has no hidden layer, so its penultimate representation "
            "is the input itself: use defense.representation=input",
        ),
        (
            (*CLUSTERING, "privacy.target_epsilon=inf", "model=mlp", "defense.remove_fraction=0.2"),
            "defense.remove_fraction=0.2 is not read by defense.sanitize=activation_clustering",
        ),
        (
            ("defense.sanitize=spectral_signatures", "privacy.target_epsilon=inf", "model=mlp", "defense.cluster_threshold=0.3"),
            "defense.cluster_threshold=0.3 is not read by defense.sanitize=spectral_signatures",
        ),
        ((*CLUSTERING, "defense.representation=logits"), "defense.representation=logits is unknown"),
        ((*CLUSTERING, "privacy.target_epsilon=3", "model=mlp"), "defense.sanitize=activation_clustering needs a non-private run"),
        ((*CLUSTERING, "defense.cluster_threshold=0.6"), "defense.cluster_threshold=0.6 must be"),
    ],
)
def test_meaningless_representation_sanitization_is_refused_in_one_line(tiny_config, overrides, message):
    with pytest.raises(UserError) as error:
        validate(tiny_config(*overrides))
    assert message in str(error.value) and "\n" not in str(error.value)
