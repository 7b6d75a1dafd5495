"""Augmentation multiplicity (``train.augmult``): one DP-SGD step computed by hand (views averaged, then
clipped), the translations checked pixel by pixel, epsilon and the ledger those of one view, the same
weights from the same seed, and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import TINY, full_batch_dp_training, interrupted_and_resumed, make_config
from dptrain.errors import UserError
from dptrain.training.augmult import ViewAveraging, check_augmult, random_translation
from dptrain.training.loop import train_epoch
from dptrain.training.recipe import train_model
from dptrain.validation import validate


def _clipped(gradient: torch.Tensor, clip: float) -> torch.Tensor:
    return gradient * min(1.0, clip / gradient.norm().item())


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_a_step_clips_the_mean_of_each_examples_view_gradients(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    inputs, labels = torch.randn(2, 1, 2, 2), torch.tensor([0, 2])
    views = torch.randn(6, 1, 2, 2)  # example 0's three views, then example 1's
    clip, lr = 0.1, 0.5
    start = [p.detach().clone() for p in model.parameters()]

    def view_gradient(row: int) -> torch.Tensor:
        logits = torch.func.functional_call(model, dict(zip(("1.weight", "1.bias"), weights)), (views[row:row + 1],))
        loss = nn.functional.cross_entropy(logits, labels[row // 3 : row // 3 + 1])
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, weights)])

    weights = [p.clone().requires_grad_(True) for p in start]
    per_view = torch.stack([view_gradient(row) for row in range(6)]).reshape(2, 3, -1)
    expected_step = torch.stack([_clipped(g, clip) for g in per_view.mean(dim=1)]).sum(0) / 2
    # The two mistakes the test tells apart: clipping each view, and averaging clipped gradients.
    per_view_clipped = torch.stack([_clipped(g, clip) for g in per_view.flatten(0, 1)]).sum(0) / 2 / 3
    assert (expected_step - per_view_clipped).norm() > 0.1 * expected_step.norm()

    training = full_batch_dp_training(model, inputs, labels, noise=0.0, clip=clip, lr=lr, grad_sample_mode=mode)
    seen = []

    def fixed_views(repeated: torch.Tensor) -> torch.Tensor:
        seen.append(repeated)
        return views

    train_epoch(training, torch.device("cpu"), views=ViewAveraging(3, fixed_views))
    torch.testing.assert_close(seen[0], inputs.repeat_interleave(3, dim=0))
    got = torch.cat([(s - p.detach()).flatten() for s, p in zip(start, training.standard_model().parameters())])
    torch.testing.assert_close(got / lr, expected_step, rtol=1e-5, atol=1e-7)


def _moved(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` (C, H, W) with pixel (r, c) moved to (r - dy, c - dx), zeros moving in."""
    moved = torch.zeros_like(image)
    height, width = image.shape[1:]
    moved[:, max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)] = image[
        :, max(0, dy) : height - max(0, -dy), max(0, dx) : width - max(0, -dx)
    ]
    return moved


@pytest.mark.parametrize("flip", [False, True])
def test_views_are_the_image_moved_by_at_most_the_shift_and_flipped_only_if_asked(flip):
    image = torch.arange(1.0, 10.0).reshape(1, 3, 3)
    candidates = {(dy, dx, False): _moved(image, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    if flip:
        candidates.update({(dy, dx, True): m.flip(-1) for (dy, dx, _), m in list(candidates.items())})
    views = random_translation(1, flip, torch.Generator().manual_seed(0))(image.expand(400, 1, 3, 3))
    found = set()
    for view in views:
        matches = [key for key, candidate in candidates.items() if torch.equal(view, candidate)]
        assert len(matches) == 1
        found.add(matches[0])
    assert found == set(candidates)


def _digits(cfg):
    from dptrain.data import load, make_split, prepare

    data = load(cfg.dataset)
    return prepare(data, make_split(data, cfg.dataset))


def test_views_leave_epsilon_and_the_ledger_alone_and_the_seed_fixes_the_weights():
    # logreg on digits' 8x8 images at a fixed noise (no calibration); one thread: train.threads=auto would
    # time throwaway steps.
    overrides = (*TINY, "train.epochs=1", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0",
                 "train.threads=1", "model=logreg")  # fmt: skip
    one = make_config(*overrides)
    four = copy.deepcopy(one)
    four.train.augmult = 4
    unmoved = copy.deepcopy(four)
    unmoved.train.augment_shift = 0
    data = _digits(one)
    shape = dict(input_shape=data.input_shape, num_classes=data.num_classes)
    plain = train_model(one, data.members, **shape)
    first, again, same_views = (train_model(cfg, data.members, **shape) for cfg in (four, four, unmoved))
    assert first.epsilon == plain.epsilon and first.steps == plain.steps
    assert first.mechanisms == plain.mechanisms and first.plan == plain.plan
    assert first.grad_sample.mode in ("hooks", "functorch")
    for a, b, p, s in zip(*(run.model.parameters() for run in (first, again, plain, same_views))):
        assert torch.equal(a, b)
        assert not torch.equal(a, p)
        # Four identical views average to the one view's gradient: clipping each would take 4 times the step.
        torch.testing.assert_close(s, p)


@pytest.fixture(scope="module")
def augmult_config():
    return make_config(*TINY, "train.augmult=2")


@pytest.mark.parametrize(
    "settings, modality, world, message",
    [
        ({}, "table", 1, "is a table"),
        ({"privacy.grad_sample_mode": "ghost"}, "image", 1, "clips each view"),
        ({"privacy.grad_sample_mode": "bk"}, "image", 1, "clips each view"),
        ({"federation.name": "fedavg"}, "image", 1, "use federation=none"),
        ({}, "image", 2, "one process"),
        ({"train.adversarial": "pgd"}, "image", 1, "adversarial training"),
        ({"train.augment_shift": 8}, "image", 1, "use at most 7"),
        ({"audit.whitebox.enabled": True}, "image", 1, "implementation audit"),
    ],
)
def test_augmult_it_cannot_do_soundly_is_refused(augmult_config, settings, modality, world, message):
    cfg = copy.deepcopy(augmult_config)
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value)
    with pytest.raises(UserError, match=message):
        check_augmult(cfg, modality, (1, 8, 8), world)


def test_validation_refuses_augmult_below_one_and_with_ghost_clipping(augmult_config):
    cfg = copy.deepcopy(augmult_config)
    cfg.privacy.grad_sample_mode = "ghost"
    with pytest.raises(UserError, match="clips each view"):
        validate(cfg)
    cfg.train.augmult = 0
    with pytest.raises(UserError, match="train.augmult=0"):
        validate(cfg)


@pytest.mark.slow
def test_a_resumed_run_draws_the_views_the_uninterrupted_one_drew(tiny_config, tmp_path, monkeypatch):
    overrides = ("train.epochs=3", "train.augmult=2", "train.threads=1")
    assert interrupted_and_resumed(tiny_config, overrides, tmp_path, monkeypatch, epoch=3)
