"""Reference models imitate the target's noise without running the accountant their epsilon would need."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from dptrain.privacy import accounting, plan_privacy
from dptrain.training import centralized
from dptrain.training.recipe import train_model


def test_reference_models_run_no_accountant_and_train_as_an_accounted_run(tiny_config, monkeypatch):
    # Full batches (q = 1), where RDP has a closed form: the accounted run below stays cheap.
    cfg = tiny_config(
        "privacy.accountant=rdp", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.3", "train.batch_size=128"
    )
    target = plan_privacy(cfg.privacy, members=100, batch_size=cfg.train.batch_size, epochs=cfg.train.epochs)
    derived = centralized.reference_config(cfg, target, seed=7)
    generator = torch.Generator().manual_seed(0)
    records = TensorDataset(torch.rand(90, 64, generator=generator), torch.randint(0, 10, (90,), generator=generator))
    accounted = train_model(derived, records, input_shape=(64,), num_classes=10)
    assert accounted.epsilon > 0 and accounted.plan.noise_multiplier == target.noise_multiplier == 1.3

    def refuse(*_, **__):
        raise AssertionError("a reference model ran the accountant")

    accounting.composed_epsilon.cache_clear()
    monkeypatch.setattr(accounting, "create_accountant", refuse)
    monkeypatch.setattr(accounting, "get_noise_multiplier", refuse)
    reference = centralized.train_reference(
        derived, target, records, input_shape=(64,), num_classes=10, device=torch.device("cpu")
    )
    expected = accounted.model.state_dict()
    assert reference.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in reference.state_dict().items())


def test_an_unaccounted_plan_needs_the_fixed_noise_it_imitates(tiny_config):
    cfg = tiny_config("privacy.target_epsilon=3")
    with pytest.raises(ValueError, match="explicit noise_multiplier"):
        plan_privacy(cfg.privacy, members=100, batch_size=10, epochs=1, accounted=False)
