"""TRADES adversarial training (``train.adversarial=trades``, Zhang et al. 2019) composed with DP-SGD: the
private step is the hand-computed one on each example's whole TRADES loss (one clipped gradient per
example, not one per forward pass), crafting ascends the KL term within the budget, and the reported
epsilon is the plan's."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from conftest import full_batch_dp_training, make_config
from dptrain import pipeline
from dptrain.adversarial import trades_pgd
from dptrain.config import ModelConfig
from dptrain.data import InputUnits
from dptrain.models import build_model
from dptrain.training.adversarial import Trades
from dptrain.training.loop import train_epoch

EPS, STEPS, BETA, LR, NOISE = 0.3, 4, 6.0, 0.5, 0.7
# Pixels in [0, 1] standardized with mean 0.5 and std 0.25, as image datasets' units are.
PIXELS = InputUnits(scale=torch.full((3,), 4.0), low=torch.full((3,), -2.0), high=torch.full((3,), 2.0))


def _pixels(generator: torch.Generator, n: int) -> torch.Tensor:
    return (torch.rand(n, 3, generator=generator, dtype=torch.float64) - 0.5) * 4


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="mlp", hidden=[5]), (3,), 2).double()


def _private_trades_step(model, inputs, labels, clip: float, noise: float, mode: str, clipping: str):
    """One private TRADES step through dptrain's loop; returns the adversarial inputs it trained on."""
    training = full_batch_dp_training(
        model, inputs, labels, noise=noise, clip=clip, lr=LR, noise_seed=11, grad_sample_mode=mode, clipping=clipping
    )
    crafted = []

    class Recorded(Trades):
        def __call__(self, model, x, y):
            crafted.append(super().__call__(model, x, y))
            return crafted[-1]

    train_epoch(training, torch.device("cpu"), Recorded(PIXELS, EPS, STEPS, BETA, torch.Generator().manual_seed(5)))
    assert len(crafted) == 1
    return training.standard_model(), crafted[0]


def _hand_trades_step(model, inputs, adversarial, labels, clip: float, noise: float, per_layer: bool):
    """DP-SGD (Abadi et al. 2016) on TRADES' loss by hand: each example's gradient of CE(f(x), y) +
    beta * KL(f(x) || f(x_adv)) by torch.func, clipped as a whole to ``clip`` (per layer: each parameter
    to clip / sqrt(L)), summed, plus N(0, (noise * clip)^2) per parameter in order, over the batch size."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params, x, x_adv, y):
        logits = functional_call(model, params, (x[None],))
        adv_logits = functional_call(model, params, (x_adv[None],))
        kl = (F.softmax(logits, 1) * (F.log_softmax(logits, 1) - F.log_softmax(adv_logits, 1))).sum()
        return F.cross_entropy(logits, y[None]) + BETA * kl

    per_example = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, inputs, adversarial, labels)
    names = list(params)
    if per_layer:
        factors = {n: (clip / len(names) ** 0.5 / per_example[n].flatten(1).norm(dim=1)).clamp(max=1) for n in names}
    else:
        norms = torch.stack([per_example[n].flatten(1).norm(dim=1) for n in names]).norm(dim=0)
        factors = {n: (clip / norms).clamp(max=1) for n in names}
    generator = torch.Generator().manual_seed(11)
    stepped = []
    for n in names:
        clipped = (per_example[n] * factors[n].view(-1, *[1] * (per_example[n].dim() - 1))).sum(0)
        noised = clipped + torch.normal(0.0, noise * clip, size=clipped.shape, generator=generator)
        stepped.append(params[n] - LR * noised / len(labels))
    return stepped


@pytest.mark.parametrize("mode, clipping", [("hooks", "flat"), ("functorch", "flat"), ("hooks", "per_layer")])
def test_a_dp_trades_step_equals_the_hand_computed_step_on_each_examples_whole_loss(mode, clipping):
    inputs = _pixels(torch.Generator().manual_seed(3), 6)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    model = _mlp()
    plain = _mlp()
    # The crafting, independently of the loop: TRADES' PGD on a plain copy, from the same seed.
    expected_adversarial = trades_pgd(plain.eval(), inputs, PIXELS, EPS, STEPS, torch.Generator().manual_seed(5))
    trained, adversarial = _private_trades_step(model, inputs, labels, 1.0, NOISE, mode, clipping)
    assert torch.equal(adversarial, expected_adversarial)
    expected = _hand_trades_step(plain.train(), inputs, adversarial, labels, 1.0, NOISE, clipping == "per_layer")
    # Opacus divides C by the norm plus 1e-6, hence the tolerance.
    for got, want in zip(trained.parameters(), expected):
        assert torch.allclose(got.detach(), want, rtol=1e-5, atol=1e-7)


def test_one_example_moves_the_parameters_by_exactly_lr_times_the_clipping_norm():
    # Without noise one example's step is lr * C along its clipped gradient. Clipping its clean and
    # adversarial passes as two rows would move them by up to 2 * lr * C: sensitivity 2C.
    inputs, labels = _pixels(torch.Generator().manual_seed(3), 1), torch.tensor([1])
    model = _mlp()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    clip = 1e-4
    trained, _ = _private_trades_step(model, inputs, labels, clip, 0.0, "hooks", "flat")
    after = torch.cat([p.detach().flatten() for p in trained.parameters()])
    assert torch.isclose((after - before).norm(), torch.tensor(LR * clip, dtype=after.dtype), rtol=1e-4)


def test_trades_crafting_stays_in_budget_and_valid_range_and_raises_the_divergence():
    generator = torch.Generator().manual_seed(0)
    inputs = _pixels(generator, 64).float()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp"), (3,), 3).eval()
    crafted = trades_pgd(model, inputs, PIXELS, 0.1, 7, torch.Generator().manual_seed(1))
    moved = (crafted - inputs) / PIXELS.scale
    assert moved.abs().max() <= 0.1 + 1e-6
    assert moved.abs().max() > 0.05
    assert ((crafted >= PIXELS.low) & (crafted <= PIXELS.high)).all()
    nudged = trades_pgd(model, inputs, PIXELS, 0.1, 1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = model(inputs)
        divergence = F.kl_div(F.log_softmax(model(crafted), 1), F.log_softmax(clean, 1), reduction="batchmean", log_target=True)
        one_step = F.kl_div(F.log_softmax(model(nudged), 1), F.log_softmax(clean, 1), reduction="batchmean", log_target=True)
    assert divergence > one_step > 0


@pytest.mark.slow
def test_trades_training_reports_the_epsilon_of_the_same_plan_without_it(tmp_path):
    common = ("dataset=synthetic", "dataset.n_samples=400", "train.epochs=1", "train.progress=false", "audit=none",
              "privacy.target_epsilon=3", "privacy.accountant=rdp", "privacy.grad_sample_mode=hooks")  # fmt: skip
    plain = pipeline.train(make_config(*common), tmp_path / "plain")[0]
    robust = pipeline.train(make_config(*common, "train.adversarial=trades", "train.adversarial_steps=2"), tmp_path / "r")[0]
    assert robust.epsilon == plain.epsilon
    assert robust.steps == plain.steps
    assert robust.noise_multiplier == plain.noise_multiplier
    trained = [torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("plain", "r")]
    assert not all(torch.equal(trained[0][key], trained[1][key]) for key in trained[0])
