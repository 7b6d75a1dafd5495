"""Adversarial training (``train.adversarial=pgd``) composed with DP-SGD: the private step on crafted
examples is the hand-computed DP-SGD step on them, crafting stays in budget and leaves no per-sample
gradients behind, the reported epsilon is the plan's, federated clients craft from their own records,
and bad settings are refused in one line (TRADES: tests/test_trades.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    full_batch_dp_training,
    hand_dp_step,
    interrupted_and_resumed,
    interrupt_at_round,
    make_config,
    same_weights,
)
from dptrain import pipeline
from dptrain.adversarial import pgd
from dptrain.config import ModelConfig
from dptrain.data import InputUnits
from dptrain.errors import UserError
from dptrain.models import build_model
from dptrain.training import federated
from dptrain.training.adversarial import AdversarialExamples, Trades
from dptrain.training.loop import train_epoch
from dptrain.validation import validate

EPS = 0.3
CRAFTERS = {"pgd": AdversarialExamples, "trades": Trades}
# Pixels in [0, 1] standardized with mean 0.5 and std 0.25, as image datasets' units are.
PIXELS = InputUnits(scale=torch.full((3,), 4.0), low=torch.full((3,), -2.0), high=torch.full((3,), 2.0))


def _pixels(generator: torch.Generator, n: int) -> torch.Tensor:
    return (torch.rand(n, 3, generator=generator, dtype=torch.float64) - 0.5) * 4


def _private(model, inputs, labels, noise_seed: int, mode: str = "hooks"):
    return full_batch_dp_training(
        model, inputs, labels, noise=0.7, clip=1.0, lr=0.5, noise_seed=noise_seed, grad_sample_mode=mode
    )


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_a_dp_step_on_adversarial_examples_equals_the_hand_computed_step_on_them(mode):
    generator = torch.Generator().manual_seed(3)
    inputs = _pixels(generator, 6)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="logreg"), (3,), 2).double()
    weight, bias = (p.detach().clone() for p in model.parameters())
    plain = build_model(ModelConfig(name="logreg"), (3,), 2).double()
    plain.load_state_dict(model.state_dict())
    # The crafting, independently: PGD on a plain copy of the model, from the same seed.
    expected_inputs = pgd(
        plain.eval(), inputs, labels, PIXELS, EPS, "linf", 4, 1, torch.Generator().manual_seed(5),
        clean_start=False, until_fooled=False,
    )
    training = _private(model, inputs, labels, noise_seed=11, mode=mode)
    crafted = []

    class Recorded(AdversarialExamples):
        def __call__(self, model, x, y):
            crafted.append(super().__call__(model, x, y))
            return crafted[-1]

    train_epoch(training, torch.device("cpu"), Recorded(PIXELS, EPS, 4, torch.Generator().manual_seed(5)))
    assert len(crafted) == 1
    assert torch.equal(crafted[0], expected_inputs)
    assert not torch.allclose(crafted[0], inputs)
    expected = hand_dp_step(weight, bias, crafted[0], labels, 1.0, False, 0.7, torch.Generator().manual_seed(11), 0.5)
    for got, want in zip(training.standard_model().parameters(), expected):
        assert torch.allclose(got.detach(), want, rtol=1e-5, atol=1e-7)


def test_crafted_inputs_stay_within_the_budget_and_the_valid_range_and_raise_the_loss():
    generator = torch.Generator().manual_seed(0)
    inputs = _pixels(generator, 64).float()
    labels = torch.randint(0, 3, (64,), generator=generator)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp"), (3,), 3)
    crafted = AdversarialExamples(PIXELS, 0.1, 7, torch.Generator().manual_seed(1))(model, inputs, labels)
    moved = (crafted - inputs) / PIXELS.scale
    assert moved.abs().max() <= 0.1 + 1e-6
    assert moved.abs().max() > 0.05
    assert ((crafted >= PIXELS.low) & (crafted <= PIXELS.high)).all()
    assert model.training
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(crafted), labels) > loss(model(inputs), labels)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_crafting_leaves_no_per_sample_gradient_on_the_parameters(mode):
    generator = torch.Generator().manual_seed(0)
    inputs = _pixels(generator, 8)
    labels = torch.randint(0, 2, (8,), generator=generator)
    torch.manual_seed(0)
    training = _private(build_model(ModelConfig(name="mlp"), (3,), 2).double(), inputs, labels, noise_seed=0, mode=mode)
    AdversarialExamples(PIXELS, EPS, 3, torch.Generator().manual_seed(1))(training.model, inputs, labels)
    for parameter in training.model.parameters():
        assert getattr(parameter, "grad_sample", None) is None
        assert parameter.grad is None
    assert training.model.hooks_enabled


def test_adversarial_training_reports_the_epsilon_of_the_same_plan_without_it(tmp_path):
    common = ("train.epochs=1", "train.progress=false", "audit=none", "privacy.target_epsilon=3")
    plain = pipeline.train(make_config(*common), tmp_path / "plain")[0]
    robust = pipeline.train(
        make_config(*common, "train.adversarial=pgd", "train.adversarial_steps=2"), tmp_path / "robust"
    )[0]
    assert robust.epsilon == plain.epsilon
    assert robust.steps == plain.steps
    assert robust.noise_multiplier == plain.noise_multiplier
    assert robust.test_accuracy != plain.test_accuracy


def test_a_resumed_adversarial_run_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    overrides = ("train.epochs=3", "train.progress=false", "audit=none", "train.adversarial=pgd", "train.adversarial_steps=2")
    assert interrupted_and_resumed(make_config, overrides, tmp_path, monkeypatch, epoch=2)


@pytest.mark.parametrize("mode", [pytest.param("pgd", marks=pytest.mark.slow), "trades"])
def test_federated_clients_train_on_adversarial_examples_of_their_own_records_at_the_same_epsilon(
    tmp_path, monkeypatch, mode
):
    common = ("dataset=synthetic", "dataset.n_samples=400", "federation=fedavg", "federation.clients=2",
              "federation.rounds=1", "train.progress=false", "audit=none", "privacy.target_epsilon=null",
              "privacy.noise_multiplier=1.0", "privacy.accountant=rdp", "privacy.grad_sample_mode=hooks",
              "train.adversarial_steps=2", "train.threads=1")  # fmt: skip
    plain = pipeline.train(make_config(*common), tmp_path / "plain")[0]
    real_update, real_craft = federated.local_update, CRAFTERS[mode].__call__
    training, crafted = [], []

    def update(cfg, client, *args):
        training.append(client)
        return real_update(cfg, client, *args)

    def craft(self, model, inputs, labels):
        crafted.append((training[-1], inputs))
        return real_craft(self, model, inputs, labels)

    monkeypatch.setattr(federated, "local_update", update)
    monkeypatch.setattr(CRAFTERS[mode], "__call__", craft)
    robust = pipeline.train(make_config(*common, f"train.adversarial={mode}"), tmp_path / "robust")[0]
    assert {client.id for client, _ in crafted} == {0, 1}
    for client, inputs in crafted:
        own = client.data.tensors[0]
        assert (inputs[:, None] == own[None]).flatten(2).all(dim=2).any(dim=1).all()
    assert robust.epsilon == plain.epsilon
    assert robust.federation.client_epsilons == plain.federation.client_epsilons
    trained = [torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("plain", "robust")]
    assert not all(torch.equal(trained[0][key], trained[1][key]) for key in trained[0])


@pytest.mark.slow
def test_a_resumed_federated_trades_run_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    overrides = ("dataset=synthetic", "dataset.n_samples=400", "federation=fedavg", "federation.clients=2",
                 "federation.rounds=3", "train.progress=false", "audit=none", "privacy.target_epsilon=null",
                 "privacy.noise_multiplier=1.0", "privacy.accountant=rdp", "privacy.grad_sample_mode=hooks",
                 "train.adversarial=trades", "train.adversarial_steps=2")  # fmt: skip
    pipeline.train(make_config(*overrides), tmp_path / "a")
    interrupt_at_round(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(make_config(*overrides), tmp_path / "b")
    monkeypatch.undo()
    pipeline.train(make_config(*overrides, f"train.resume={tmp_path / 'b'}"), tmp_path / "b")
    assert same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize(
    "overrides",
    [
        # No per-example clipping happens, so ghost mode never meets TRADES' two passes.
        ["train.adversarial=trades", "privacy.target_epsilon=inf"],
        ["train.adversarial=trades", "federation=fedavg", "federation.dp_level=user"],
        ["train.adversarial=trades", "privacy.grad_sample_mode=hooks", "privacy.clipping=per_layer"],
        ["train.adversarial=pgd", "federation=fedavg"],
    ],
)
def test_adversarial_settings_that_run_soundly_are_accepted(overrides):
    validate(make_config("audit=none", *overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.adversarial=fgsm"], "train.adversarial=fgsm is unknown"),
        (["train.adversarial=pgd", "train.adversarial_eps=0"], "train.adversarial_eps=0"),
        (["train.adversarial=pgd", "train.adversarial_eps=inf"], "train.adversarial_eps=inf"),
        (["train.adversarial=pgd", "train.adversarial_steps=0"], "train.adversarial_steps=0"),
        (["train.adversarial=pgd", "audit=standard"], "reference models"),
        (["train.adversarial=trades", "train.trades_beta=0"], "train.trades_beta=0"),
        (["train.adversarial=trades", "privacy.grad_sample_mode=ghost"], "privacy.grad_sample_mode=ghost"),
        (["train.adversarial=trades", "privacy.grad_sample_mode=bk"], "grad_sample_mode=bk: bk clipping takes"),
        (["train.adversarial=trades", "federation=fedavg", "privacy.grad_sample_mode=ghost"], "privacy.grad_sample_mode=ghost"),
    ],
)
def test_bad_adversarial_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as error:
        validate(make_config("audit=none", *overrides))
    assert "\n" not in str(error.value)
