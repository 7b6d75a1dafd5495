"""Parameter averaging (``train.ema``): the exponential moving average computed by hand, the run returning
the average of exactly the iterates DP-SGD took, epsilon unchanged (post-processing), and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from conftest import TINY, make_config
from dptrain.errors import UserError
from dptrain.training.averaging import WeightAverage
from dptrain.training.recipe import train_model
from dptrain.validation import validate

# Fixed noise: no calibration to a target, which would only slow the test.
# One thread set: train.threads=auto would time throwaway optimizer steps, which the hooks below would see.
FIXED_NOISE = (*TINY, "train.epochs=1", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0", "train.threads=1")


def test_weight_average_is_the_exponential_moving_average_by_hand():
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.bias.fill_(0.0)
    average = WeightAverage(model, decay=0.5)
    for weight in (4.0, 8.0):
        with torch.no_grad():
            model.weight.fill_(weight)
        average.update(model)
    # 0.5 * (0.5 * 2 + 0.5 * 4) + 0.5 * 8 = 5.5
    assert average.average["weight"].item() == pytest.approx(5.5)
    assert average.average["bias"].item() == 0.0


def _digits(cfg):
    from dptrain.data import load, make_split, prepare

    data = load(cfg.dataset)
    return prepare(data, make_split(data, cfg.dataset))


def test_the_run_returns_the_average_of_its_own_iterates_at_the_same_epsilon():
    decay = 0.8
    plain_cfg = make_config(*FIXED_NOISE)
    data = _digits(plain_cfg)
    iterates = []

    def before(optimizer, *_):
        if not iterates:
            iterates.append([p.detach().clone() for group in optimizer.param_groups for p in group["params"]])

    def after(optimizer, *_):
        iterates.append([p.detach().clone() for group in optimizer.param_groups for p in group["params"]])

    hooks = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
    try:
        plain = train_model(plain_cfg, data.members, input_shape=data.input_shape, num_classes=data.num_classes)
    finally:
        for hook in hooks:
            hook.remove()
    averaged_cfg = make_config(*FIXED_NOISE, f"train.ema={decay}")
    averaged = train_model(averaged_cfg, data.members, input_shape=data.input_shape, num_classes=data.num_classes)
    assert len(iterates) == plain.steps + 1
    expected = iterates[0]
    for step in iterates[1:]:
        expected = [decay * e + (1 - decay) * s for e, s in zip(expected, step)]
    for got, want in zip(averaged.model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    # The last iterates are the same run's: averaging changes what is returned, not the training or its spend.
    for got, want in zip(plain.model.parameters(), iterates[-1]):
        torch.testing.assert_close(got.detach(), want)
    assert averaged.epsilon == plain.epsilon and averaged.steps == plain.steps


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("train.ema=0.9", "federation=fedavg"), "use federation=none"),
        (("train.ema=1.0",), "train.ema"),
    ],
)
def test_averaging_it_cannot_do_soundly_is_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(make_config(*TINY, *overrides))
