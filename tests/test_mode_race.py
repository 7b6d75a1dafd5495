"""privacy.grad_sample_mode=auto: the race among the modes that can run leaves the run as the picked mode's."""

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain import pipeline
from dptrain.config import ModelConfig, PrivacyConfig
from dptrain.models import build_model
from dptrain.privacy import PrivacyPlan, make_private
from dptrain.privacy.mode_race import MIN_STEPS_TO_RACE, candidate_modes
from dptrain.training.loop import train_epoch
from conftest import same_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _private_epoch(mode: str, planned_steps: int = MIN_STEPS_TO_RACE):
    """A digits-shaped logistic regression after the first private epoch (4 Poisson steps) of a run of
    ``planned_steps`` (long enough for ``auto`` to race by default) under ``mode``."""
    data = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(64, 1, 8, 8, generator=data), torch.randint(0, 10, (64,), generator=data))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="logreg"), (1, 8, 8), 10)
    plan = PrivacyPlan(
        private=True, accountant="prv", delta=1e-5, target_epsilon=None, noise_multiplier=1.0,
        max_grad_norm=1.0, sample_rate=0.25, steps_per_epoch=4, steps=planned_steps, planned_epsilon=None,
    )  # fmt: skip
    training = make_private(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), dataset=dataset,
        plan=plan, cfg=PrivacyConfig(grad_sample_mode=mode), batch_size=16, max_physical_batch_size=None,
        sampling_generator=torch.Generator().manual_seed(1), noise_generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    train_epoch(training, torch.device("cpu"))
    return training


def test_auto_takes_the_steps_of_the_mode_it_picked():
    auto = _private_epoch("auto")
    assert set(auto.grad_sample.seconds) == {"hooks", "functorch", "ghost", "bk"}
    picked = _private_epoch(auto.grad_sample.mode)
    assert picked.grad_sample.seconds == {} and auto.ledger.steps() == picked.ledger.steps() == 4
    for a, b in zip(auto.standard_model().parameters(), picked.standard_model().parameters()):
        assert torch.equal(a, b)


def test_a_run_too_short_to_pay_for_a_race_takes_the_benchmarks_fastest_mode_untimed():
    auto = _private_epoch("auto", planned_steps=MIN_STEPS_TO_RACE - 1)
    assert auto.grad_sample.mode == "bk" and auto.grad_sample.seconds == {}
    picked = _private_epoch("bk", planned_steps=MIN_STEPS_TO_RACE - 1)
    for a, b in zip(auto.standard_model().parameters(), picked.standard_model().parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_a_run_with_auto_trains_the_weights_of_the_mode_it_picked(tiny_config, tmp_path):
    # 15 epochs of 5 steps: long enough to race.
    auto = pipeline.train(tiny_config("train.epochs=15"), tmp_path / "auto")[0]
    assert set(auto.grad_sample_seconds) == {"hooks", "functorch", "ghost", "bk"}
    assert auto.grad_sample_mode == min(auto.grad_sample_seconds, key=auto.grad_sample_seconds.get)
    recorded = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert recorded["grad_sample_mode"] == auto.grad_sample_mode
    picked = pipeline.train(
        tiny_config("train.epochs=15", f"privacy.grad_sample_mode={auto.grad_sample_mode}"), tmp_path / "picked"
    )[0]
    assert picked.grad_sample_seconds == {}
    assert same_weights(tmp_path / "auto", tmp_path / "picked")


def test_the_race_leaves_weights_optimizer_state_rng_streams_and_ledger_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # Momentum buffers: the state a race on the real optimizer would change.
    model(torch.randn(2, 5)).sum().backward()
    optimizer.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    sampling, noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    dataset = TensorDataset(torch.randn(16, 5), torch.randint(0, 3, (16,)))
    before = (torch.get_rng_state(), sampling.get_state(), noise.get_state())
    plan = PrivacyPlan(
        private=True, accountant="prv", delta=1e-5, target_epsilon=None, noise_multiplier=1.0,
        max_grad_norm=1.0, sample_rate=0.25, steps_per_epoch=4, steps=MIN_STEPS_TO_RACE, planned_epsilon=None,
    )  # fmt: skip
    training = make_private(
        model=model, optimizer=optimizer, dataset=dataset,
        plan=plan, cfg=PrivacyConfig(grad_sample_mode="auto"), batch_size=4, max_physical_batch_size=None,
        sampling_generator=sampling, noise_generator=noise,
    )  # fmt: skip
    assert len(training.grad_sample.seconds) == 4
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(m, optimizer.state[p]["momentum_buffer"]) for m, p in zip(momentum, model.parameters()))
    after = (torch.get_rng_state(), sampling.get_state(), noise.get_state())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert training.ledger.steps() == 0


def test_modes_that_cannot_run_the_configuration_are_left_out_of_the_race():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    assert candidate_modes(PrivacyConfig(), model, per_example_loss=True) == ("hooks", "functorch", "ghost", "bk")
    assert candidate_modes(PrivacyConfig(clipping="per_layer"), model, per_example_loss=True) == ("hooks", "functorch")
    # TRADES' loss is not a per-example loss of one forward pass.
    assert candidate_modes(PrivacyConfig(), model, per_example_loss=False) == ("hooks", "functorch")
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2, 2))
    assert candidate_modes(PrivacyConfig(), grouped, per_example_loss=True) == ("hooks", "functorch", "ghost")
