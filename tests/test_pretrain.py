"""Public pretraining (``train.pretrain=population``): the pretraining reads the population split and
never a member, the reported epsilon is the private fine-tuning's alone (recomputed here with
dp-accounting), metrics.json says which data were public and which private, and last-layer
fine-tuning moves the output layer only."""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.pld import PLDAccountant

from conftest import TINY, interrupt_at_epoch, make_config, same_weights
from dptrain import pipeline
from dptrain.errors import UserError
from dptrain.privacy import PrivacyPlan
from dptrain.training import pretrain, recipe
from dptrain.training.centralized import reference_config
from dptrain.validation import validate

# Fixed noise (no target), so that charging the pretraining too would show in epsilon, not in the noise;
# the run's own PLD cross-check is off because the test computes it.
PRETRAINED = (*TINY, "train.epochs=1", "train.pretrain=population", "train.pretrain_epochs=1",
              "privacy.target_epsilon=null", "privacy.noise_multiplier=1.5", "privacy.pld_check=false")  # fmt: skip


def _pld(noise: float, rate: float, steps: int, delta: float) -> float:
    """dp-accounting's PLD epsilon of the Poisson-subsampled Gaussian, written out here."""
    accountant = PLDAccountant(value_discretization_interval=1e-4)
    step = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, steps))
    return accountant.get_epsilon(delta)


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """One tiny run of a small cnn fine-tuning its last layer after pretraining, with the records of
    every ``train_model`` call through the module (the pretraining's; the target's own call is bound
    in the centralized recipe) captured."""
    run_dir = tmp_path_factory.mktemp("pretrained")
    calls = []
    original = recipe.train_model

    def spy(cfg, train_set, **kwargs):
        calls.append((cfg.privacy.target_epsilon, train_set.tensors[0].clone()))
        return original(cfg, train_set, **kwargs)

    recipe._STARTS.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "train_model", spy)
        cfg = make_config(*PRETRAINED, "train.finetune=last_layer", "model=cnn", "model.channels=[4]")
        pipeline.train(cfg, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    split = json.loads((run_dir / "split.json").read_text())
    return cfg, run_dir, metrics, split, calls


def test_pretraining_trains_on_the_population_records_and_no_member(pretrained_run):
    from dptrain.data import load, prepare
    from dptrain.data.splits import Split

    cfg, run_dir, _, split, calls = pretrained_run
    assert len(calls) == 1, "the pretraining calls train_model once, non-privately"
    assert calls[0][0] == float("inf")
    assert not set(split["population"]) & set(split["members"])
    data = load(cfg.dataset)
    prepared = prepare(data, Split.load(run_dir / "split.json"))
    assert torch.equal(calls[0][1], prepared.population.tensors[0])
    # No pretraining record is a member's input.
    members = {row.numpy().tobytes() for row in prepared.members.tensors[0]}
    assert not any(row.numpy().tobytes() in members for row in calls[0][1])
    start = recipe._STARTS[next(iter(recipe._STARTS))]
    np.testing.assert_array_equal(start.population, split["population"])


def test_epsilon_is_the_private_fine_tunings_alone(pretrained_run):
    cfg, _, metrics, split, _ = pretrained_run
    members = len(split["members"])
    steps_per_epoch = -(-members // cfg.train.batch_size)
    assert metrics["steps"] == cfg.train.epochs * steps_per_epoch, "pretraining steps are not DP-SGD steps"
    assert metrics["sample_rate"] == pytest.approx(1 / steps_per_epoch)
    fine_tuning = _pld(1.5, 1 / steps_per_epoch, cfg.train.epochs * steps_per_epoch, 1e-5)
    assert metrics["epsilon"] == pytest.approx(fine_tuning, rel=0.01)


def test_metrics_json_states_the_public_and_the_private_data(pretrained_run):
    _, _, metrics, split, _ = pretrained_run
    assert metrics["pretrain"] == {
        "public": "population",
        "public_records": len(split["population"]),
        "public_epochs": 1,
        "private": "members",
        "private_records": len(split["members"]),
        "finetune": "last_layer",
        "epsilon_covers": "fine-tuning on the private records only; the public data are assumed public",
    }


def test_the_run_summary_states_that_the_population_is_assumed_public(pretrained_run):
    from dptrain.training.metrics import RunMetrics
    from dptrain.views.summary import format_summary

    _, run_dir, metrics, split, _ = pretrained_run
    line = next(line for line in format_summary(RunMetrics.from_dict(metrics), None, run_dir).splitlines()
                if line.startswith("pretraining"))  # fmt: skip
    assert "population" in line and "ASSUMED PUBLIC" in line and "not covered by epsilon" in line
    assert f"{len(split['members'])} private records is what epsilon covers" in line


def test_last_layer_fine_tuning_moves_the_output_layer_alone(pretrained_run):
    _, run_dir, _, _, _ = pretrained_run
    trained = torch.load(run_dir / "model.pt", weights_only=True)
    public = next(iter(recipe._STARTS.values())).state
    # The cnn's one 2-D weight is its output layer's (convolutions' are 4-D, GroupNorm's 1-D).
    (head,) = [name.rsplit(".", 1)[0] for name in public if public[name].dim() == 2]
    for name in public:
        moved = not torch.equal(trained[name], public[name])
        assert moved == name.startswith(head + "."), name


def test_reference_models_start_from_the_targets_public_model():
    cfg = make_config(*PRETRAINED, "train.seed=4")
    plan = PrivacyPlan(private=True, accountant="prv", delta=1e-5, target_epsilon=None, noise_multiplier=1.5,
                       max_grad_norm=1.0, sample_rate=0.2, steps_per_epoch=5, steps=10,
                       planned_epsilon=None)  # fmt: skip
    reference = reference_config(cfg, plan, seed=99)
    assert reference.train.seed == 99
    target_start, reference_start = pretrain.pretrain_config(cfg), pretrain.pretrain_config(reference)
    assert reference_start.train.seed == target_start.train.seed == 4


@pytest.mark.slow
def test_a_resumed_fine_tuning_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    overrides = (*PRETRAINED, "train.epochs=3", "train.finetune=last_layer", "model=cnn", "model.channels=[4]")
    pipeline.train(make_config(*overrides), tmp_path / "a")
    interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(make_config(*overrides), tmp_path / "b")
    monkeypatch.undo()
    recipe._STARTS.clear()
    pipeline.train(make_config(*overrides, f"train.resume={tmp_path / 'b'}"), tmp_path / "b")
    assert same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("train.pretrain=imagenet",), "train.pretrain=imagenet is unknown"),
        (("train.finetune=last_layer",), "set train.pretrain=population"),
        (("train.pretrain=population", "federation=fedavg"), "centralized recipe in one process"),
    ],
)
def test_settings_pretraining_cannot_run_soundly_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(make_config(*TINY, *overrides))
