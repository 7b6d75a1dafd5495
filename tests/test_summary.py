"""The printed run summary says what each number measures: which records, which seconds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import interrupt_at_epoch
from dptrain import pipeline
from dptrain.views.summary import format_summary
from dptrain.training.checkpoint import Checkpoint
from dptrain.training.metrics import CentralizedMetrics, FederationMetrics, RunMetrics

CENTRALIZED = RunMetrics(
    test_accuracy=0.9,
    train_accuracy=0.95,
    test_loss=0.3,
    train_loss=0.2,
    epsilon=None,
    delta=None,
    target_epsilon=None,
    noise_multiplier=0.0,
    sample_rate=0.2,
    steps=75,
    accountant=None,
    max_grad_norm=None,
    private=False,
    members=575,
    non_members=575,
    population=288,
    test_size=359,
    train_seconds=1.21,
    wall_seconds=2.04,
    centralized=CentralizedMetrics(epochs=15, canaries_included=0),
)

FEDERATED = dataclasses.replace(
    CENTRALIZED,
    centralized=None,
    federation=FederationMetrics(
        rounds=8,
        clients=10,
        clients_per_round=10,
        local_epochs=1,
        partition="iid",
        dp_level="sample",
        aggregator="median",
        pre=[],
        attack="sign_flip",
        byzantine=2,
        byzantine_clients=[3, 7],
        reported_client=None,
        client_epsilons=None,
        client_mechanisms=None,
        client_sizes=[57] * 10,
        honest_members=461,
        aggregation_seconds=0.01,
        byzantine_selected_fraction=None,
    ),
)


def _lines(metrics: RunMetrics) -> list[str]:
    return format_summary(metrics, None, "outputs/run").splitlines()


def test_summary_names_the_records_and_both_training_times():
    lines = _lines(CENTRALIZED)
    assert lines[0] == "test accuracy  0.9000   (train 0.9500 on 575 member records)"
    assert lines[1] == (
        "training       1.2 s in optimizer steps, 2.0 s wall incl. per-epoch evaluation, accounting, TensorBoard,"
        " checkpoints"
    )


def test_summary_names_the_clipping_method_and_the_timings_auto_chose_it_by():
    timed = dataclasses.replace(
        CENTRALIZED, grad_sample_mode="bk", grad_sample_seconds={"hooks": 0.0049, "ghost": 0.0011, "bk": 0.0008}
    )
    assert "clipping       bk (auto, ms per step: bk 0.8, ghost 1.1, hooks 4.9)" in format_summary(timed, None, "out")
    chosen = dataclasses.replace(CENTRALIZED, grad_sample_mode="hooks", grad_sample_seconds={})
    assert "clipping       hooks\n" in format_summary(chosen, None, "out")
    assert "clipping       " not in format_summary(CENTRALIZED, None, "out")


def test_federated_summary_says_which_member_records_are_audited():
    lines = _lines(FEDERATED)
    assert lines[0] == "test accuracy  0.9000   (train 0.9500 on 461 audited member records)"
    assert lines[1].startswith("training       1.2 s in rounds (local training and aggregation), 2.0 s wall incl.")
    federation = next(line for line in lines if line.startswith("federation"))
    assert federation.endswith("575 member records, 461 of them on honest clients that trained (audited)")


def test_wall_seconds_cover_the_steps_and_add_up_over_a_resume(tiny_config, tmp_path, monkeypatch):
    overrides = ("train.epochs=3",)
    interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(tiny_config(*overrides), tmp_path)
    monkeypatch.undo()
    path = tmp_path / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    assert 0 < saved["train_seconds"] <= saved["wall_seconds"]
    # As if the first epoch had taken 100 s of steps in 1000 s of wall time: the resumed run adds to both.
    saved.update(train_seconds=100.0, wall_seconds=1000.0)
    Checkpoint(**saved).save(tmp_path)
    metrics, _ = pipeline.train(tiny_config(*overrides, f"train.resume={tmp_path}"), tmp_path)
    assert 100 < metrics.train_seconds < 1000 < metrics.wall_seconds < 1100


def test_federated_metrics_have_the_wall_seconds_of_the_rounds(tiny_config, tmp_path):
    metrics, _ = pipeline.train(
        tiny_config("federation=fedavg", "federation.clients=4", "federation.rounds=2", "train.batch_size=32",
                    "privacy.target_epsilon=inf"),
        tmp_path,
    )  # fmt: skip
    assert 0 < metrics.train_seconds <= metrics.wall_seconds
