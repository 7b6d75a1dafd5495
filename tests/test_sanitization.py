"""Data sanitization (``defense.sanitize=spectral_signatures``): it finds planted outliers with a known
answer, removes the records it flags from training and the audit, records them and its precision and
recall, and is refused where it is unsound (private runs) or meaningless."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dptrain import pipeline
from dptrain.errors import UserError
from dptrain.training import centralized
from dptrain.training.poisoning import POISONED
from dptrain.poisoning import detection, spectral_scores, spectral_signatures
from dptrain.training.sanitization import SANITIZED
from dptrain.training.target import load_data
from dptrain.validation import validate

BACKDOOR = ("attack=backdoor", "attack.poison_fraction=0.05", "privacy.target_epsilon=inf")
SANITIZE = ("defense.sanitize=spectral_signatures", "defense.representation=input")


def test_spectral_signatures_remove_exactly_the_records_shifted_along_one_direction():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 20, generator=generator)
    labels = torch.arange(400) // 200
    # Class 1 holds 10 planted records shifted 8 standard deviations along one feature.
    planted = torch.randperm(200, generator=generator)[:10] + 200
    features[planted, 3] += 8.0
    removed = spectral_signatures(features.reshape(400, 4, 5), labels, remove_fraction=10 / 200)
    # round(0.05 * 200) = 10 records from each class; in class 1 exactly the planted ones (recall 1).
    assert len(removed) == 20 and (removed < 200).sum() == 10
    assert sorted(removed[removed >= 200].tolist()) == sorted(planted.tolist())
    assert detection(removed, planted.numpy()) == (0.5, 1.0)


def test_spectral_scores_are_the_squared_projections_on_numpys_top_singular_vector():
    rows = np.random.default_rng(1).normal(size=(50, 6)) * [5, 1, 1, 1, 1, 1]
    centred = rows - rows.mean(axis=0)
    top = np.linalg.svd(centred)[2][0]
    np.testing.assert_allclose(spectral_scores(torch.from_numpy(rows)).numpy(), (centred @ top) ** 2, rtol=1e-9)


def test_detection_counts_hits_by_hand():
    assert detection(np.array([1, 2, 3, 4]), np.array([2, 4, 9])) == (0.5, 2 / 3)
    assert detection(np.zeros(0, dtype=np.int64), np.array([1])) == (0.0, 0.0)


def test_a_sanitized_backdoor_run_records_what_it_removed_and_trains_without_it(tiny_config, tmp_path):
    cfg = tiny_config(*BACKDOOR, *SANITIZE)
    metrics = pipeline.train(cfg, tmp_path)[0].centralized
    removed = np.array(json.loads((tmp_path / SANITIZED).read_text())["member_positions"])
    poisoned = np.array(json.loads((tmp_path / POISONED).read_text())["member_positions"])
    # 0.1 of each digits class of the 575 members; precision and recall against poisoned.json by hand.
    assert len(removed) == metrics.sanitized and 50 <= metrics.sanitized <= 65
    hits = len(set(removed.tolist()) & set(poisoned.tolist()))
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["sanitized"] == len(removed)
    assert on_disk["sanitize_precision"] == pytest.approx(hits / len(removed))
    assert on_disk["sanitize_recall"] == pytest.approx(hits / len(poisoned))
    # The training set shrinks by the count and holds none of the removed records.
    data, _, _ = load_data(cfg, tmp_path, reuse_split=True)
    trained = centralized.training_set(cfg, data, None, poisoned, removed)
    assert len(trained) == 575 - len(removed)
    kept = np.setdiff1d(np.arange(575), removed)
    assert torch.equal(trained.tensors[0], centralized.training_set(cfg, data, None, poisoned).tensors[0][kept])
    # Nor does the audit count a removed record as a member.
    audited = set(centralized.audited_data(cfg, data, 1, centralized.MemberEdits.of(cfg, data)).split.members.tolist())
    assert not audited & set(data.split.members[removed].tolist())


def test_sanitization_is_off_by_default(tiny_config, tmp_path):
    metrics = pipeline.train(tiny_config(*BACKDOOR), tmp_path)[0].centralized
    assert metrics.sanitized == 0 and not (tmp_path / SANITIZED).exists()
    assert "sanitize_precision" not in json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("privacy.target_epsilon=3", *SANITIZE), "defense.sanitize=spectral_signatures needs a non-private run"),
        (("defense.sanitize=loss_filter",), "defense.sanitize=loss_filter is unknown"),
        ((*BACKDOOR, *SANITIZE, "defense.remove_fraction=0.5"), "defense.remove_fraction=0.5 must be"),
        ((*BACKDOOR, *SANITIZE, "defense.remove_fraction=0"), "defense.remove_fraction=0.0 must be"),
        (
            ("federation=fedavg", "privacy.target_epsilon=inf", *SANITIZE),
            "sanitizes a centralized run's members: use federation=none",
        ),
    ],
)
def test_unsound_or_meaningless_sanitization_is_refused_in_one_line(tiny_config, overrides, message):
    with pytest.raises(UserError) as error:
        validate(tiny_config(*overrides))
    assert message in str(error.value) and "\n" not in str(error.value)
