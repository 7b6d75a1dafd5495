"""Book-keeping clipping takes the DP-SGD step of explicit per-example clipping (torch.func), layer by layer."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dptrain.config import ModelConfig
from dptrain.models import build_model
from dptrain.privacy.bookkeeping import BookkeepingModule, unsupported_layers
from conftest import full_batch_dp_training

NOISE, CLIP, LR, NOISE_SEED = 0.5, 0.3, 0.7, 5

pytestmark = pytest.mark.usefixtures("one_thread")


def explicit_dp_step(model: nn.Module, inputs, labels, *, noise: float, clip: float, lr: float, noise_seed: int):
    """One DP-SGD step by definition: each example's gradient by torch.func (vmap of grad), scaled by
    min(1, C / (||g_i|| + 1e-6)), summed, N(0, (noise C)^2) added per parameter in the model's order
    (drawn from ``noise_seed`` in the parameter's dtype, as Opacus draws them), divided by the batch size, times ``lr``."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, x, y):
        return nn.functional.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, labels)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    generator = torch.Generator().manual_seed(noise_seed)
    stepped = {}
    for name, p in params.items():
        clipped = torch.einsum("n,n...->...", factors, grads[name])
        draws = torch.normal(mean=0, std=noise * clip, size=p.shape, generator=generator, dtype=p.dtype)
        stepped[name] = p - lr * (clipped + draws) / len(labels)
    return stepped


def bookkeeping_dp_step(model: nn.Module, inputs, labels, **step):
    training = full_batch_dp_training(model, inputs, labels, grad_sample_mode="bk", **step)
    training.optimizer.zero_grad(set_to_none=True)
    training.loss_fn(training.model(inputs), labels).backward()
    training.optimizer.step()
    return dict(training.standard_model().named_parameters())


def _layers(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A small model around one layer type and a batch of 6 inputs for it."""
    torch.manual_seed(0)
    if name == "linear_ghost_norm":  # 3 positions: the (T, T) Gram matrices are the smaller
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)), torch.randn(6, 3, 5)
    if name == "linear_instantiated":  # 6 positions of 2 -> 3: the per-example gradients are the smaller
        return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)), torch.randn(6, 6, 2)
    if name == "conv2d_strided":
        conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)), torch.randn(6, 2, 7, 7)
    if name == "conv2d_ghost_norm":
        conv = nn.Conv2d(2, 4, 2, dilation=1, bias=False)
        return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)), torch.randn(6, 2, 3, 3)
    if name == "embedding":  # repeated tokens add into one row; the padding row gets no gradient
        tokens = torch.tensor([[1, 1, 0, 2, 1], [3, 4, 5, 6, 0], [2, 2, 2, 2, 2], [0, 0, 0, 0, 0], [6, 5, 4, 3, 2], [1, 0, 1, 0, 1]])
        return nn.Sequential(nn.Embedding(7, 4, padding_idx=0), nn.Flatten(), nn.Linear(20, 3)), tokens
    if name == "embedding_one_token":  # one index per example, as the canary probe's
        return nn.Sequential(nn.Embedding(7, 3), nn.Linear(3, 3)), torch.tensor([1, 1, 0, 6, 5, 1])
    if name == "layer_norm":
        return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(6, 6)
    if name == "group_norm":
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(64, 3))
        return model, torch.randn(6, 2, 4, 4)
    raise KeyError(name)


def _assert_same_step(model: nn.Module, inputs, labels) -> None:
    model = model.double()
    inputs = inputs.double() if inputs.is_floating_point() else inputs
    step = dict(noise=NOISE, clip=CLIP, lr=LR, noise_seed=NOISE_SEED)
    expected = explicit_dp_step(model, inputs, labels, **step)
    actual = bookkeeping_dp_step(model, inputs, labels, **step)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name].detach(), expected[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize(
    "name",
    ["linear_ghost_norm", "linear_instantiated", "conv2d_strided", "conv2d_ghost_norm", "embedding", "embedding_one_token", "layer_norm",
     "group_norm"],
)
def test_bookkeeping_step_equals_explicit_per_example_clipping_for_each_layer_type(name):
    model, inputs = _layers(name)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    _assert_same_step(model, inputs, labels)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(name="logreg"),
        ModelConfig(name="mlp", hidden=[7, 5], activation="tanh"),
        ModelConfig(name="cnn", channels=[4, 4], groups=2, activation="tanh"),
        pytest.param(ModelConfig(name="cnn", channels=[2], pool_to=2, skip=True), id="cnn_skip"),
        ModelConfig(name="resnet", width=4, blocks=[1, 1], groups=2, activation="relu"),
    ],
    ids=lambda cfg: cfg.name,
)
def test_bookkeeping_step_equals_explicit_per_example_clipping_for_the_zoo(cfg):
    torch.manual_seed(1)
    model = build_model(cfg, (1, 8, 8), 4)
    inputs, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    _assert_same_step(model, inputs, labels)


def test_bookkeeping_clips_at_the_bound_and_keeps_small_gradients():
    """A large input (labelled against the model's prediction) gives a gradient norm above C, which
    clipping brings to C; a tiny one a norm below C, which it keeps: the norms returned are the unclipped ones."""
    torch.manual_seed(2)
    layer = nn.Linear(3, 2, bias=False).double()
    module = BookkeepingModule(layer, max_grad_norm=CLIP)
    inputs = torch.randn(1, 3, dtype=torch.float64)
    for scale, clipped in ((1e3, True), (1e-4, False)):
        module.zero_grad(set_to_none=True)
        logits = module(inputs * scale)
        nn.functional.cross_entropy(logits, logits.argmin(dim=1), reduction="sum").backward()
        norm = module.clip_and_accumulate()
        assert (norm > CLIP).item() is clipped
        assert layer.weight.grad.norm().item() == pytest.approx(min(norm.item(), CLIP), rel=1e-5)


def test_bookkeeping_handles_an_empty_poisson_batch():
    """Poisson sampling can draw no record: the clipped sum is then zero, and the step noise alone."""
    torch.manual_seed(3)
    model = build_model(ModelConfig(name="cnn", channels=[4], groups=2, activation="tanh"), (1, 8, 8), 3)
    module = BookkeepingModule(model, max_grad_norm=CLIP)
    nn.functional.cross_entropy(module(torch.zeros(0, 1, 8, 8)), torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    module.clip_and_accumulate()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_layers_bookkeeping_cannot_clip_are_named():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4), nn.Linear(3, 3))
    assert unsupported_layers(model) == ["0 (Conv2d)", "1 (BatchNorm2d)"]
    with pytest.raises(ValueError, match="does not support 0 \\(Conv2d\\), 1 \\(BatchNorm2d\\)"):
        BookkeepingModule(model, max_grad_norm=1.0)
