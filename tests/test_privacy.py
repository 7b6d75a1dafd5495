"""Privacy plumbing: calibration, accounting, and that every grad-sample mode clips the same gradient."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import full_batch_dp_training
from dptrain.config import ModelConfig, PrivacyConfig
from dptrain.models import build_model, ensure_dp_compatible
from dptrain.models.zoo import MODELS
from dptrain.privacy import calibrate_noise, epsilon_spent, plan_privacy
from dptrain.privacy.accounting import CALIBRATION_TOLERANCE


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("target", [0.5, 3.0, 8.0])
def test_calibrated_noise_spends_within_the_tolerance_below_the_target(accountant, target):
    account = dict(accountant=accountant, sample_rate=0.05, steps=400, delta=1e-5)
    noise = calibrate_noise(target_epsilon=target, **account)
    assert (1 - CALIBRATION_TOLERANCE) * target <= epsilon_spent(noise_multiplier=noise, **account) <= target


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    account = dict(accountant="rdp", sample_rate=0.1, delta=1e-5)
    assert epsilon_spent(noise_multiplier=1.0, steps=100, **account) < epsilon_spent(noise_multiplier=1.0, steps=200, **account)
    assert epsilon_spent(noise_multiplier=2.0, steps=100, **account) < epsilon_spent(noise_multiplier=1.0, steps=100, **account)


def test_plan_uses_opacus_poisson_sample_rate_and_step_count():
    plan = plan_privacy(PrivacyConfig(target_epsilon=3.0), members=575, batch_size=128, epochs=10)
    assert plan.steps_per_epoch == math.ceil(575 / 128) == 5
    assert plan.sample_rate == pytest.approx(1 / 5) and plan.steps == 50
    assert plan.planned_epsilon <= 3.0


def test_target_that_no_noise_can_meet_is_a_user_error():
    from dptrain.errors import UserError

    with pytest.raises(UserError, match="cannot be met"):
        plan_privacy(PrivacyConfig(target_epsilon=1e-9, accountant="rdp"), members=100, batch_size=100, epochs=1000)


def _one_noiseless_step(model_cfg: ModelConfig, mode: str, inputs, labels) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(model_cfg, inputs.shape[1:], 3)
    training = full_batch_dp_training(
        model, inputs, labels, noise=0.0, clip=0.1, lr=1.0, grad_sample_mode=mode, poisson_sampling=False
    )
    training.optimizer.zero_grad()
    training.loss_fn(training.model(inputs), labels).backward()
    training.optimizer.step()
    return [p.detach().clone() for p in training.standard_model().parameters()]


@pytest.mark.parametrize(
    "cfg",
    [ModelConfig(name="mlp", hidden=[8]), ModelConfig(name="cnn", channels=[4]),
     ModelConfig(name="cnn", channels=[2], pool_to=2, skip=True)],
    ids=["mlp", "cnn", "cnn_skip"],
)  # fmt: skip
def test_every_grad_sample_mode_takes_the_same_clipped_step(cfg):
    """With zero noise the update is the mean of per-example gradients clipped to C; all modes must agree."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    hooks, functorch, ghost = (_one_noiseless_step(cfg, mode, inputs, labels) for mode in ("hooks", "functorch", "ghost"))
    for a, b, c in zip(hooks, functorch, ghost):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_clipping_bounds_each_examples_contribution():
    """One example with a huge gradient moves the model no more than C * lr / batch."""
    torch.manual_seed(0)
    inputs = torch.zeros(4, 2)
    inputs[0] = 1e4
    labels = torch.tensor([0, 1, 0, 1])
    cfg = ModelConfig(name="logreg")
    before = [p.detach().clone() for p in build_model(cfg, (2,), 3).parameters()]
    after = _one_noiseless_step(cfg, "hooks", inputs.view(4, 2), labels)
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before)))
    assert step <= 0.1 * 4 / 4 + 1e-6


def test_zoo_models_are_dp_compatible_without_fixing():
    shapes = {"logreg": (64,), "mlp": (64,), "cnn": (3, 16, 16), "resnet": (3, 16, 16)}
    for name in MODELS:
        model = build_model(ModelConfig(name=name), shapes[name], 10)
        fixed, replaced = ensure_dp_compatible(model)
        assert fixed is model and replaced == [], name


def test_zero_head_starts_every_zoo_models_output_layer_at_zero_and_nothing_else():
    shapes = {"logreg": (64,), "mlp": (64,), "cnn": (3, 16, 16), "resnet": (3, 16, 16)}
    for name in MODELS:
        torch.manual_seed(0)
        plain = build_model(ModelConfig(name=name), shapes[name], 10)
        torch.manual_seed(0)
        zeroed = build_model(ModelConfig(name=name, zero_head=True), shapes[name], 10)
        # Every class equally likely on any input, and every other parameter as the seed draws it.
        logits = zeroed(torch.randn(2, *shapes[name]))
        assert torch.equal(logits, torch.zeros_like(logits)), name
        moved = [key for key, value in zeroed.state_dict().items() if not torch.equal(value, plain.state_dict()[key])]
        assert len(moved) == 2 and all(torch.count_nonzero(zeroed.state_dict()[key]) == 0 for key in moved), name


def test_a_model_that_needs_fixing_is_fixed_and_reported():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    fixed, replaced = ensure_dp_compatible(model)
    assert replaced == ["1: BatchNorm1d -> GroupNorm"]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in fixed.modules())
