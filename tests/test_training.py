"""The centralized recipe end to end: results schema, budget, baseline, resume, TensorBoard."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import interrupt_at_epoch, same_weights
from dptrain.data import Split
from dptrain.errors import UserError
from dptrain.models import build_model
from dptrain.privacy import epsilon_spent, make_private, plan_privacy
from dptrain.tracking.artifacts import METRICS_KEYS
from dptrain.training.metrics import RunMetrics
from dptrain import pipeline


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One tiny private run shared by the schema tests (epsilon 3, the default accountant)."""
    from conftest import make_config, TINY

    run_dir = tmp_path_factory.mktemp("run")
    cfg = make_config(*TINY)
    return cfg, run_dir, pipeline.train(cfg, run_dir)[0]


def test_metrics_json_has_the_results_schema(default_run):
    _, run_dir, metrics = default_run
    on_disk = _metrics(run_dir)
    assert on_disk == metrics.to_dict()
    assert set(METRICS_KEYS) <= set(on_disk)
    assert on_disk["accountant"] == "prv" and on_disk["delta"] == 1e-5 and on_disk["target_epsilon"] == 3.0


# metrics.json's layout (docs/guide/outputs.md): a renamed or dropped field breaks readers of old runs.
CENTRALIZED_METRICS = {
    "test_accuracy", "train_accuracy", "test_loss", "train_loss", "epsilon", "delta", "target_epsilon",
    "noise_multiplier", "sample_rate", "steps", "accountant", "max_grad_norm", "private", "epsilon_pld", "members",
    "audited_members", "non_members", "population", "test_size", "train_seconds", "wall_seconds",
    "replaced_modules", "threads", "threads_calibration", "grad_sample_mode", "grad_sample_seconds", "epochs",
    "canaries_included", "world_size",
    "parallel_mode", "poisoned", "sanitized",
}  # fmt: skip


def test_metrics_json_has_exactly_the_documented_fields_and_reads_back_as_the_same_metrics(default_run):
    _, run_dir, metrics = default_run
    on_disk = _metrics(run_dir)
    assert set(on_disk) == CENTRALIZED_METRICS
    assert RunMetrics.from_dict(on_disk) == metrics and metrics.federation is None


def test_metrics_json_records_the_threads_auto_chose_and_its_race(default_run):
    on_disk = _metrics(default_run[1])
    race = on_disk["threads_calibration"]
    # The tiny run is far too short to race more threads (WORTH_RACING_SECONDS): one timed step at one
    # thread decides, on any machine; on one core nothing is raced.
    assert on_disk["threads"] == 1
    if race is not None:
        steps = race["step_seconds"]
        assert len(steps.pop("1")) == 1 and all(timed == [] for timed in steps.values()) and race["seconds"] > 0


def test_a_run_written_before_the_newer_metrics_fields_is_audited_again(tiny_config, tmp_path):
    cfg = tiny_config("audit=none")
    pipeline.train(cfg, tmp_path)
    newer = (
        "epsilon_pld", "audited_members", "wall_seconds", "replaced_modules", "threads", "threads_calibration",
        "parallel_mode", "sanitized", "grad_sample_mode", "grad_sample_seconds",
    )  # fmt: skip
    older = {key: value for key, value in _metrics(tmp_path).items() if key not in newer}
    (tmp_path / "metrics.json").write_text(json.dumps(older))
    read = RunMetrics.from_dict(older)
    assert read.epsilon_pld is None and read.centralized.world_size == 1 and read.centralized.parallel_mode is None
    report = pipeline.audit(cfg, tmp_path, tiny_config("audit=fast").audit)
    assert report.mia["loss"].n_members == read.members


def test_epsilon_is_within_ninety_to_hundred_percent_of_the_target(default_run):
    metrics = _metrics(default_run[1])
    assert 0.9 * metrics["target_epsilon"] <= metrics["epsilon"] <= metrics["target_epsilon"]


def test_epsilon_recomputes_from_its_own_metrics(default_run):
    metrics = _metrics(default_run[1])
    recomputed = epsilon_spent(
        accountant=metrics["accountant"],
        noise_multiplier=metrics["noise_multiplier"],
        sample_rate=metrics["sample_rate"],
        steps=metrics["steps"],
        delta=metrics["delta"],
    )
    assert recomputed == pytest.approx(metrics["epsilon"], rel=0.01)


def test_model_pt_loads_weights_only_into_a_fresh_model(default_run):
    cfg, run_dir, metrics = default_run
    state = torch.load(run_dir / "model.pt", weights_only=True)
    model = build_model(cfg.model, (1, 8, 8), 10)
    model.load_state_dict(state)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_manifest_records_versions_hashes_seeds_and_times(default_run):
    manifest = json.loads((default_run[1] / "manifest.json").read_text())
    for key in ("versions", "git_commit", "config_hash", "data_fingerprint", "seeds", "started_at", "finished_at"):
        assert key in manifest
    assert manifest["versions"]["opacus"].startswith("1.6") and manifest["world_size"] == 1
    assert manifest["started_at"] < manifest["finished_at"]


def test_split_is_recorded_disjoint_and_matches_the_member_count(default_run):
    _, run_dir, metrics = default_run
    split = Split.load(run_dir / "split.json")
    parts = [split.members, split.non_members, split.population, split.test]
    assert sum(len(p) for p in parts) == len(np.unique(np.concatenate(parts)))
    assert len(split.members) == len(split.non_members) == metrics.members


def test_tensorboard_has_the_training_tags_and_an_hparams_record(default_run):
    metrics = default_run[2]
    events = EventAccumulator(str(default_run[1] / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/accuracy", "test/accuracy", "privacy/epsilon_rdp", "privacy/noise_multiplier", "train/lr"}
    assert expected <= scalars
    record = EventAccumulator(str(default_run[1] / "tb" / "hparams"))
    record.Reload()
    assert "trial/accuracy/test" in record.Tags()["scalars"]
    assert "_hparams_/session_start_info" in record.PluginTagToContent("hparams")
    # The per-epoch curve is RDP's (cheap); the reported epsilon stays the run's accountant's.
    epsilons = [e.value for e in events.Scalars("privacy/epsilon_rdp")]
    rdp = epsilon_spent(accountant="rdp", noise_multiplier=metrics.noise_multiplier, sample_rate=metrics.sample_rate,
                        steps=metrics.steps, delta=metrics.delta)  # fmt: skip
    assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(rdp, rel=1e-6)
    assert metrics.accountant == "prv" and metrics.epsilon < rdp


def test_non_private_baseline_uses_no_noise_and_no_clipping(tiny_config, tmp_path):
    metrics = pipeline.train(tiny_config("privacy.target_epsilon=inf"), tmp_path)[0]
    assert metrics.private is False and metrics.epsilon is None
    assert metrics.noise_multiplier == 0.0 and metrics.max_grad_norm is None


def test_baseline_training_objects_are_plain_torch(tiny_config):
    cfg = tiny_config("privacy=none")
    plan = plan_privacy(cfg.privacy, members=100, batch_size=10, epochs=1)
    model = build_model(cfg.model, (4,), 2)
    data = torch.utils.data.TensorDataset(torch.randn(100, 4), torch.randint(0, 2, (100,)))
    training = make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dataset=data,
        plan=plan,
        cfg=cfg.privacy,
        batch_size=10,
        max_physical_batch_size=None,
        sampling_generator=torch.Generator(),
        noise_generator=torch.Generator(),
    )
    assert training.ledger is None and type(training.optimizer) is torch.optim.SGD and training.model is model


def test_epsilon_never_exceeds_the_target_for_each_accountant(tiny_config, tmp_path):
    for accountant in ("prv", "rdp"):
        metrics = pipeline.train(tiny_config(f"privacy.accountant={accountant}", "privacy.target_epsilon=1"), tmp_path / accountant)[0]
        assert 0.9 <= metrics.epsilon <= 1.0, accountant


def test_physical_batches_charge_the_same_steps_and_epsilon(tiny_config, tmp_path):
    whole = pipeline.train(tiny_config(), tmp_path / "whole")[0]
    split = pipeline.train(tiny_config("train.max_physical_batch_size=32"), tmp_path / "split")[0]
    assert split.steps == whole.steps and split.epsilon == pytest.approx(whole.epsilon)
    assert split.test_accuracy > 0.5


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_each_grad_sample_mode_trains_the_cnn(tiny_config, tmp_path, mode):
    metrics = pipeline.train(tiny_config("model=cnn", f"privacy.grad_sample_mode={mode}", "train.lr=0.5"), tmp_path)[0]
    assert metrics.epsilon <= 3.0 and metrics.test_accuracy > 0.3


def test_resume_after_an_interruption_matches_the_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    overrides = ("train.epochs=4",)
    uninterrupted = pipeline.train(tiny_config(*overrides), tmp_path / "a")[0]

    interrupt_at_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(tiny_config(*overrides), tmp_path / "b")
    assert not (tmp_path / "b" / "metrics.json").exists()
    monkeypatch.undo()

    resumed = pipeline.train(tiny_config(*overrides, f"train.resume={tmp_path / 'b'}"), tmp_path / "b")[0]
    assert resumed.steps == uninterrupted.steps
    assert resumed.epsilon == pytest.approx(uninterrupted.epsilon, rel=1e-9)
    assert same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize(
    "change",
    # Another learning rate; another world size (1 process wrote the checkpoint); the non-private baseline
    # resuming a private run's checkpoint (its spent budget would be forgotten).
    ["train.lr=0.1", "launcher.nproc_per_node=2", "privacy.target_epsilon=inf"],
)
def test_resume_with_a_different_recipe_is_refused_before_training(tiny_config, tmp_path, change):
    pipeline.train(tiny_config(), tmp_path)
    written = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match="different config"):
        pipeline.train(tiny_config(change, f"train.resume={tmp_path}"), tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == written


def test_per_layer_clipping_trains_within_the_budget(tiny_config, tmp_path):
    metrics = pipeline.train(
        tiny_config("privacy.clipping=per_layer", "privacy.grad_sample_mode=hooks", "train.epochs=4"), tmp_path
    )[0]
    assert 0.99 * 3.0 <= metrics.epsilon <= 3.0 and metrics.test_accuracy > 0.5


def test_adam_with_a_cosine_schedule_logs_a_decaying_learning_rate(tiny_config, tmp_path):
    pipeline.train(tiny_config("train.optimizer=adam", "train.lr=0.01", "train.lr_schedule=cosine", "train.epochs=4"), tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    rates = [e.value for e in events.Scalars("train/lr")]
    assert rates[0] == pytest.approx(0.01) and all(a > b for a, b in zip(rates, rates[1:]))


def test_a_checkpoint_is_read_only_as_the_state_of_the_recipe_that_wrote_it():
    from dptrain.training.checkpoint import Checkpoint
    from dptrain.training.federated import FederatedState
    from dptrain.training.recipe import CentralizedState

    federated = Checkpoint.of(3, "hash", {}, FederatedState(aggregator={}, ledgers=None, rng={}), 1.0, 2.0)
    assert federated.state_as(FederatedState) == FederatedState(aggregator={}, ledgers=None, rng={})
    with pytest.raises(UserError, match="holds FederatedState state, not CentralizedState"):
        federated.state_as(CentralizedState)
    federated.state["extra"] = 1
    with pytest.raises(UserError, match="not FederatedState"):
        federated.state_as(FederatedState)
