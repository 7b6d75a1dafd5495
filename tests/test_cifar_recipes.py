"""The CIFAR-10 recipes (``experiment=cifar10_wrn``, ``experiment=cifar10_scatternet_cnn``) compose with known
keys and pass validation on a machine without the data or a GPU (``dataset.download=true`` skips the file
check; validation never downloads), and their schedules are the papers' step counts on dptrain's split."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import make_config
from dptrain.validation import validate
from dptrain.validation.keys import check_known_keys


# Validation checks that torchvision is installed without importing it (seconds); so does this test.
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="CIFAR-10 needs dptrain[vision]")
@pytest.mark.parametrize(
    "experiment, epsilon, members_per_step, steps",
    [
        # 20000 members (CIFAR-10's 50000 training images less population, halved for non-members):
        # batch 4096 -> ceil(20000 / 4096) = 5 steps per epoch, 175 epochs = De et al.'s 875 steps.
        ("cifar10_wrn", 8, 5, 875),
        # batch 8192 -> 3 steps per epoch, Tramer & Boneh's 60 epochs.
        ("cifar10_scatternet_cnn", 3, 3, 180),
    ],
)
def test_the_cifar10_recipes_compose_and_validate_without_the_data(
    tmp_path, experiment, epsilon, members_per_step, steps
):
    if experiment == "cifar10_scatternet_cnn" and importlib.util.find_spec("kymatio") is None:
        pytest.skip("ScatterNet+CNN needs dptrain[scattering]")
    cfg = make_config(
        f"experiment={experiment}", f"privacy.target_epsilon={epsilon}", "audit=none", "dataset.download=true",
        f"dataset.root={tmp_path / 'data'}",
    )  # fmt: skip
    check_known_keys(cfg)
    _, sizes = validate(cfg)
    assert cfg.dataset.name == "cifar10" and sizes.members == 20000
    assert -(-sizes.members // cfg.train.batch_size) == members_per_step
    assert members_per_step * cfg.train.epochs == steps
    assert not (tmp_path / "data").exists()
    if experiment == "cifar10_wrn":  # De et al.'s 16 views: crops after 4-pixel padding, and flips
        assert (cfg.train.augmult, cfg.train.augment_shift, cfg.train.augment_flip) == (16, 4, True)
    else:  # Tramer & Boneh's CNN on the scattering features
        assert cfg.model.features == "scattering" and list(cfg.model.channels) == [64, 64]
