"""model.features=scattering (Tramer & Boneh 2021's ScatterNet front end) and
model.weight_standardization (Qiao et al. 2019): what the head sees, what DP-SGD trains, what is refused."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn
from torch.func import grad, vmap

from conftest import TINY, make_config
from dptrain import pipeline
from dptrain.config import ModelConfig
from dptrain.errors import UserError
from dptrain.models import build_model
from dptrain.models.features import StandardizedConv2d, check_features
from dptrain.validation import validate

needs_kymatio = pytest.mark.skipif(
    importlib.util.find_spec("kymatio") is None, reason='pip install "dptrain[scattering]"'
)


def _scattering2d(j: int, shape):
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=j, shape=shape, L=8, max_order=2)


@needs_kymatio
def test_the_head_reads_kymatios_scattering_of_every_channel_normalized_per_example():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="logreg", features="scattering", scattering_j=2, groups=2), (2, 16, 16), 10)
    # Per input channel 1 + J L + L^2 J (J - 1) / 2 = 1 + 16 + 64 = 81 coefficients (Tramer & Boneh's 81
    # for J=2, L=8) on a 16/4 x 16/4 grid: the head's input width.
    head = model[-1][-1]
    assert model[1].weight is None  # the linear head already scales and shifts each feature
    assert head.in_features == 2 * 81 * 4 * 4
    x = torch.rand(3, 2, 16, 16)
    seen = []
    head.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    model(x)
    expected = _scattering2d(2, (16, 16))(x).reshape(3, 2 * 81, 4, 4)
    # GroupNorm without affine parameters, one group per input channel (model.groups=2), example by example.
    groups = expected.reshape(3, 2, -1)
    variance = groups.var(2, unbiased=False, keepdim=True)
    normalized = (groups - groups.mean(2, keepdim=True)) / torch.sqrt(variance + 1e-5)
    torch.testing.assert_close(seen[0], normalized.reshape(3, -1), atol=1e-5, rtol=1e-4)


@needs_kymatio
def test_a_dp_step_trains_the_model_behind_the_scattering_and_leaves_its_filters():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn", features="scattering", channels=[4], groups=1), (1, 8, 8), 10)
    scattering, norm, cnn = model
    assert list(scattering.parameters()) == [] and norm.weight is not None
    filters = {name: b.clone() for name, b in scattering.named_buffers()}
    assert filters
    private = GradSampleModule(model)
    F.cross_entropy(private(torch.rand(5, 1, 8, 8)), torch.arange(5)).backward()
    # Every trainable parameter (the GroupNorm's and the cnn's) has its per-example gradients; the
    # scattering is no part of what DP-SGD clips.
    assert all(p.grad_sample.shape[0] == 5 for p in model.parameters())
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert all(torch.equal(b, filters[name]) for name, b in scattering.named_buffers())


def test_a_standardized_kernel_has_zero_mean_and_unit_variance_per_output_channel():
    conv = StandardizedConv2d(1, 2, kernel_size=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2, 3, 4, 2, 2, 2, 6]).view(2, 1, 2, 2))
    # Channel 0: mean 2.5, variance 1.25; channel 1: mean 3, variance 3 (biased, over the fan-in of 4).
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5], [-1.0, -1.0, -1.0, 3.0]])
    expected = expected / torch.sqrt(torch.tensor([[1.25], [3.0]]) + 1e-5)
    torch.testing.assert_close(conv.standardized_weight().view(2, 4), expected)
    x = torch.rand(1, 1, 3, 3)
    torch.testing.assert_close(conv(x), F.conv2d(x, expected.view(2, 1, 2, 2)))


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_per_example_gradients_of_a_standardized_cnn_are_those_of_the_standardized_convolution(mode):
    torch.manual_seed(0)
    config = ModelConfig(name="cnn", channels=[3], groups=1, activation="tanh", weight_standardization=True)
    model = build_model(config, (2, 6, 6), 4)
    assert isinstance(model[0], StandardizedConv2d)
    inputs, labels = torch.rand(5, 2, 6, 6), torch.tensor([0, 1, 2, 3, 0])

    def loss(params, x, y):
        # The standardization written out again, independently of StandardizedConv2d.
        w = params["0.weight"]
        centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
        w = centred / torch.sqrt(centred.pow(2).mean(dim=(1, 2, 3), keepdim=True) + 1e-5)
        h = F.conv2d(x.unsqueeze(0), w, params["0.bias"], padding=1)
        h = F.max_pool2d(torch.tanh(F.group_norm(h, 1, params["1.weight"], params["1.bias"])), 2)
        return F.cross_entropy(F.linear(h.flatten(1), params["5.weight"], params["5.bias"]), y.unsqueeze(0))

    params = {name: p.detach() for name, p in model.named_parameters()}
    expected = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, labels)
    if mode == "ghost":
        # Ghost clipping keeps each example's gradient norm, the input of its clipping factor.
        private = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, loss_reduction="sum")
    else:
        private = GradSampleModule(model, loss_reduction="sum", force_functorch=mode == "functorch")
    F.cross_entropy(private(inputs), labels, reduction="sum").backward()
    if mode == "ghost":
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in expected.values()], dim=1).norm(dim=1)
        torch.testing.assert_close(private.get_norm_sample(), norms, atol=1e-5, rtol=1e-4)
    else:
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad_sample, expected[name], atol=1e-5, rtol=1e-4)


def test_weight_standardization_reaches_every_convolution_of_the_resnet():
    model = build_model(ModelConfig(name="resnet", blocks=[1, 1], weight_standardization=True), (1, 8, 8), 10)
    convolutions = [type(m) for m in model.modules() if isinstance(m, nn.Conv2d)]
    # The stem, two per block and the second stage's projection.
    assert convolutions == [StandardizedConv2d] * 6


@pytest.mark.parametrize(
    "model, modality, refusal",
    [
        (ModelConfig(name="logreg", features="scattering"), "tabular", "needs image input"),
        (ModelConfig(name="logreg", features="scattering", scattering_j=4), "image", "does not divide the 8x8 images"),
        (ModelConfig(name="logreg", scattering_j=2), "image", "the scale of model.features=scattering"),
        (ModelConfig(name="mlp", weight_standardization=True), "image", "model=mlp has none"),
    ],
)  # fmt: skip
def test_settings_that_cannot_run_soundly_are_refused_in_one_line(model, modality, refusal):
    with pytest.raises(UserError, match=refusal):
        check_features(model, "auto", modality, (1, 8, 8))


def test_book_keeping_clipping_of_standardized_convolutions_is_refused_before_training():
    # Book-keeping clipping handles plain Conv2d only: unchecked, the run would fail after loading the data.
    with pytest.raises(UserError, match="grad_sample_mode=bk .* supports plain convolutions only"):
        validate(make_config(*TINY, "model=cnn", "model.weight_standardization=true", "privacy.grad_sample_mode=bk"))


def test_scattering_without_kymatio_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kymatio" else real(name, *a))
    with pytest.raises(UserError, match=r'needs kymatio, which is not installed: pip install "dptrain\[scattering\]"'):
        validate(make_config(*TINY, "model.features=scattering"))


@needs_kymatio
@pytest.mark.slow
def test_a_scattering_logreg_run_is_audited_end_to_end_without_the_linear_only_attack(tmp_path):
    overrides = (
        "train.progress=false", "train.epochs=2", "model.features=scattering", "audit=thorough",
        "audit.mia.attacks=[loss,rmia]", "audit.mia.reference_models=2", "audit.canaries.count=0",
        "audit.evasion.n=50", "audit.extraction.queries=[100]",
    )  # fmt: skip
    metrics, report = pipeline.train(make_config(*overrides), tmp_path / "run")
    assert metrics.test_accuracy > 0.5
    # RMIA's reference models were trained (one by one), the evasion audit crafted through the
    # ScatterNet, the surrogate was fitted; equation solving, exact for softmax regression on the raw
    # input only, was not run on a model whose log-probabilities are not affine in it.
    assert "rmia" in report.mia and report.reference_models is not None
    assert report.evasion and report.extraction.curves
    assert report.extraction.equation_solving is None
