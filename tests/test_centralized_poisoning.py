"""Data poisoning in the centralized recipe: which members are poisoned and how, where that is
recorded, the backdoor's success rate, resume, the audit's members, and the refused combinations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import TensorDataset

from conftest import interrupt_at_epoch, same_weights
from dptrain import pipeline
from dptrain.errors import UserError
from dptrain.models import build_model
from dptrain.poisoning import stamp_trigger
from dptrain.training import centralized
from dptrain.training.distributed import parallel_mode
from dptrain.training.metrics import RunMetrics
from dptrain.training.poisoning import POISONED, poisoned_class_accuracy, poisoned_positions
from dptrain.training.target import load_data
from dptrain.validation import validate
from dptrain.views.summary import format_summary

BASELINE = ("privacy.target_epsilon=inf",)


def _recorded(run_dir) -> list[int]:
    return json.loads((run_dir / POISONED).read_text())["member_positions"]


def test_the_poisoned_count_is_the_share_of_members_and_their_positions_are_recorded(tiny_config, tmp_path):
    overrides = ("attack=label_flip", "attack.poison_fraction=0.2", *BASELINE)
    metrics = pipeline.train(tiny_config(*overrides), tmp_path)[0]
    # digits' 575 members (test_training's split): 0.2 * 575 = 115 exactly.
    assert metrics.members == 575 and metrics.centralized.poisoned == 115
    recorded = _recorded(tmp_path)
    assert len(recorded) == len(set(recorded)) == 115 and recorded == sorted(recorded)
    assert 0 <= recorded[0] and recorded[-1] < 575
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["poisoned"] == 115 and "backdoor_success_rate" not in on_disk
    assert RunMetrics.from_dict(on_disk) == metrics
    # Another seed poisons other members.
    assert recorded != poisoned_positions(tiny_config(*overrides, "train.seed=1"), torch.zeros(575)).tolist()


def test_label_flip_changes_exactly_the_poisoned_labels(tiny_config, tmp_path):
    cfg = tiny_config("attack=label_flip", "attack.poison_fraction=0.1", *BASELINE)
    data, _, _ = load_data(cfg, tmp_path, reuse_split=False)
    positions = poisoned_positions(cfg, data.members.tensors[1])
    inputs, labels = data.members.tensors
    trained_inputs, trained_labels = centralized.training_set(cfg, data, None, positions).tensors
    assert torch.equal(trained_inputs, inputs)
    changed = np.flatnonzero((trained_labels != labels).numpy())
    assert changed.tolist() == positions.tolist() and len(positions) == round(0.1 * 575)
    assert torch.equal(trained_labels[positions], 9 - labels[positions])
    # The data the audit sees keeps the clean labels.
    assert torch.equal(data.members.tensors[1], labels)


def test_the_audit_measures_the_members_left_clean_beside_as_many_stratified_non_members(tiny_config, tmp_path):
    cfg = tiny_config("attack=backdoor", "attack.poison_fraction=0.2", *BASELINE)
    data, _, _ = load_data(cfg, tmp_path, reuse_split=False)
    poisoned = set(poisoned_positions(cfg, data.members.tensors[1]).tolist())
    audited = centralized.audited_data(cfg, data, 1, centralized.MemberEdits.of(cfg, data))
    members = set(audited.split.members.tolist())
    clean = set(data.split.members[sorted(set(range(575)) - poisoned)].tolist())
    assert members <= clean and len(members) == len(audited.non_members) > 0.9 * len(clean)
    assert not members & set(data.split.members[sorted(poisoned)].tolist())
    histogram = [np.bincount(part.tensors[1].numpy(), minlength=10) for part in (audited.members, audited.non_members)]
    assert np.array_equal(*histogram)


def test_backdoor_triggers_and_relabels_exactly_the_poisoned_inputs(tiny_config, tmp_path):
    cfg = tiny_config("attack=backdoor", "attack.poison_fraction=0.1", "attack.target_label=3", *BASELINE)
    data, _, _ = load_data(cfg, tmp_path, reuse_split=False)
    positions = poisoned_positions(cfg, data.members.tensors[1])
    inputs, labels = data.members.tensors
    trained_inputs, trained_labels = centralized.training_set(cfg, data, None, positions).tensors
    clean = np.setdiff1d(np.arange(len(labels)), positions)
    assert torch.equal(trained_inputs[clean], inputs[clean]) and torch.equal(trained_labels[clean], labels[clean])
    assert (trained_labels[positions] == 3).all()
    # digits are (1, 8, 8): the bottom-right 3 x 3 pixels set to 1, the rest untouched.
    assert (trained_inputs[positions][..., 5:, 5:] == 1.0).all()
    assert torch.equal(trained_inputs[positions][..., :5, :], inputs[positions][..., :5, :])


def test_targeted_label_flip_relabels_only_source_class_records(tiny_config, tmp_path):
    cfg = tiny_config("attack=label_flip", "attack.source_label=1", "attack.target_label=7", "attack.poison_count=30")
    data, _, _ = load_data(cfg, tmp_path, reuse_split=False)
    inputs, labels = data.members.tensors
    positions = poisoned_positions(cfg, labels)
    assert len(positions) == 30 and (labels[positions] == 1).all()
    trained_inputs, trained_labels = centralized.training_set(cfg, data, None, positions).tensors
    assert torch.equal(trained_inputs, inputs)
    assert np.flatnonzero((trained_labels != labels).numpy()).tolist() == positions.tolist()
    assert (trained_labels[positions] == 7).all()
    # The untouched records of class 1 keep their label: poison 30 of them, not the class.
    assert (labels == 1).sum() > 30 and ((trained_labels == 1) & (labels == 1)).sum() == (labels == 1).sum() - 30


def test_targeted_label_flip_asking_for_more_records_than_the_class_has_is_refused(tiny_config, tmp_path):
    cfg = tiny_config("attack=label_flip", "attack.source_label=1", "attack.target_label=7", "attack.poison_count=200")
    data, _, _ = load_data(cfg, tmp_path, reuse_split=False)
    with pytest.raises(UserError, match=r"attack.source_label=1 has \d+ of the 575 members, fewer than the 200"):
        poisoned_positions(cfg, data.members.tensors[1])


class ConstantClassifier(torch.nn.Module):
    """Predicts ``label`` for every input."""

    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, inputs):
        return torch.nn.functional.one_hot(torch.full((len(inputs),), self.label), 10).float()


def test_poisoned_class_accuracy_is_measured_on_the_source_class_only():
    labels = torch.tensor([1, 1, 1, 2, 2, 3])
    test = TensorDataset(torch.zeros(6, 4), labels)
    device = torch.device("cpu")
    # Always 1: every record of class 1 right (overall accuracy would be 0.5), none of class 2.
    assert poisoned_class_accuracy(ConstantClassifier(1), test, 1, device) == 1.0
    assert poisoned_class_accuracy(ConstantClassifier(1), test, 2, device) == 0.0


def test_a_targeted_flip_records_the_source_class_accuracy_and_its_count(tiny_config, tmp_path):
    cfg = tiny_config("attack=label_flip", "attack.source_label=1", "attack.target_label=7", "attack.poison_count=40",
                      *BASELINE)  # fmt: skip
    metrics = pipeline.train(cfg, tmp_path)[0]
    model = build_model(cfg.model, (1, 8, 8), 10)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    inputs, labels = centralized.load_target(cfg, tmp_path).data.test.tensors
    with torch.no_grad():
        predicted = model(inputs[labels == 1]).argmax(dim=1)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["poisoned"] == 40 and "backdoor_success_rate" not in on_disk
    assert on_disk["poisoned_class_accuracy"] == pytest.approx((predicted == 1).float().mean().item())
    assert metrics.centralized.poisoned_class_accuracy == on_disk["poisoned_class_accuracy"]
    assert json.loads((tmp_path / POISONED).read_text())["poison_count"] == 40
    summary = format_summary(metrics, None, tmp_path)
    assert f"source-class test accuracy {on_disk['poisoned_class_accuracy']:.4f}" in summary


@pytest.mark.parametrize("fraction, succeeds", [("0.3", True), ("0.0", False)])
def test_backdoor_success_rate_is_high_when_poisoned_and_near_zero_without(tiny_config, tmp_path, fraction, succeeds):
    cfg = tiny_config("attack=backdoor", f"attack.poison_fraction={fraction}", "train.epochs=5", *BASELINE)
    metrics = pipeline.train(cfg, tmp_path)[0]
    rate = metrics.centralized.backdoor_success_rate
    # Recomputed from model.pt: triggered test inputs whose label is not the target, classified as it.
    model = build_model(cfg.model, (1, 8, 8), 10)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    inputs, labels = centralized.load_target(cfg, tmp_path).data.test.tensors
    others = labels != 0
    with torch.no_grad():
        predicted = model(stamp_trigger(inputs[others], 3, 1.0)).argmax(dim=1)
    assert rate == pytest.approx((predicted == 0).float().mean().item())
    assert json.loads((tmp_path / "metrics.json").read_text())["backdoor_success_rate"] == pytest.approx(rate)
    assert (rate > 0.5) if succeeds else (rate < 0.05)
    record = EventAccumulator(str(tmp_path / "tb" / "hparams"))
    record.Reload()
    assert record.Scalars("trial/backdoor_success_rate")[-1].value == pytest.approx(rate)
    assert metrics.test_accuracy > 0.7
    summary = format_summary(metrics, None, tmp_path)
    assert f"backdoor       attack success rate {rate:.4f}" in summary
    assert ("poisoning      172 of 575 member records poisoned" in summary) == succeeds
    # Train accuracy and the audit are on the 403 members left clean.
    assert (f"on {575 - 172} clean audited member records" in summary) == succeeds
    assert metrics.audited_members == (575 - 172 if succeeds else 575)


def test_a_resumed_run_poisons_the_same_records(tiny_config, tmp_path, monkeypatch):
    overrides = ("attack=label_flip", "attack.poison_fraction=0.2", "train.epochs=3", *BASELINE)
    pipeline.train(tiny_config(*overrides), tmp_path / "a")
    interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(tiny_config(*overrides), tmp_path / "b")
    interrupted = _recorded(tmp_path / "b")
    monkeypatch.undo()
    pipeline.train(tiny_config(*overrides, f"train.resume={tmp_path / 'b'}"), tmp_path / "b")
    assert _recorded(tmp_path / "b") == interrupted == _recorded(tmp_path / "a")
    assert same_weights(tmp_path / "a", tmp_path / "b")


def test_poisoning_keeps_dpddp_and_robust_parallelism_keeps_its_attackers(tiny_config):
    poisoned = tiny_config("attack=backdoor", "attack.poison_fraction=0.05")
    assert parallel_mode(poisoned, world=2) == "dpddp"
    byzantine = tiny_config("attack=backdoor", "attack.byzantine=1")
    assert parallel_mode(byzantine, world=3) == "robust"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("attack=backdoor", "attack.poison_fraction=1.0"), "attack.poison_fraction=1.0 is the share of the 575 members"),
        (("attack=backdoor", "attack.poison_fraction=0.05", "attack.trigger_size=9"), "attack.trigger_size=9 does not fit"),
        (("attack=backdoor", "attack.poison_fraction=0.05", "attack.target_label=10"), "attack.target_label=10 is not one"),
        (("attack=label_flip", "attack.poison_fraction=0.0"), "attack.poison_fraction=0.0 poisons 0 of the 575 members"),
        (("attack=label_flip", "attack.poison_fraction=0.0005"), "attack.poison_fraction=0.0005 poisons 0 of the 575 members"),
        (
            ("attack=backdoor", "attack.poison_fraction=0.05", "attack.poison_count=29"),
            "attack.poison_fraction=<share> or attack.poison_count=<records>, exactly one of the two (both given)",
        ),
        (("attack=backdoor",), "exactly one of the two (neither given)"),
        (("attack=backdoor", "attack.poison_count=575"), "attack.poison_count=575 must be below the 575 members"),
        (("attack=backdoor", "attack.poison_count=-1"), "attack.poison_count=-1"),
        (("attack=label_flip", "attack.poison_count=0"), "attack.poison_count=0 poisons 0 of the 575 members"),
        (
            ("attack=backdoor", "attack.poison_count=5", "attack.source_label=1"),
            "attack.source_label=1 is the targeted label flip's source class: use attack=label_flip",
        ),
        (
            ("attack=label_flip", "attack.poison_count=5", "attack.source_label=3", "attack.target_label=3"),
            "attack.source_label=3 equals attack.target_label",
        ),
        (
            ("attack=label_flip", "attack.poison_count=5", "attack.source_label=10"),
            "attack.source_label=10 is not one of dataset=digits's 10 classes",
        ),
        (
            ("federation=fedavg", "attack=backdoor", "attack.byzantine=1", "attack.poison_count=5"),
            "attack.poison_count=5 counts poisoned members of centralized poisoning",
        ),
        (("attack=alie",), "attack=alie with attack.byzantine=0 attacks nothing"),
        (("attack=alie", "attack.byzantine=1"), "need several clients or workers"),
        (("attack=label_flip", "attack.byzantine=1"), "need several clients or workers"),
        (
            ("federation=fedavg", "attack=label_flip", "attack.poison_fraction=0.1"),
            "attack=label_flip with attack.byzantine=0 attacks nothing: set attack.byzantine=<count>",
        ),
    ],
)
def test_meaningless_poisoning_is_refused_in_one_line(tiny_config, overrides, message):
    with pytest.raises(UserError) as error:
        validate(tiny_config(*overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_backdoor_at_zero_share_is_a_measured_baseline(tiny_config):
    validate(tiny_config("attack=backdoor", "attack.poison_fraction=0.0"))
    validate(tiny_config("attack=backdoor", "attack.poison_count=0"))
    validate(tiny_config("attack=label_flip", "attack.source_label=1", "attack.target_label=7", "attack.poison_count=0"))
