"""Inference-time preprocessing defences (``defense.preprocess``): the squeeze and the median against hand
computations and scipy, the defended model's forward pass and BPDA gradient, the evasion audit against a
squeezed model measuring the adaptive attack (never weaker than masked gradients) and the defended clean
accuracy, and the refusals before training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import median_filter
from torch.utils.data import TensorDataset

from dptrain.adversarial import Defended, Preprocessing, pgd
from dptrain.adversarial.preprocess import median_smooth, squeeze_bits
from dptrain.audit.evasion import evasion_audit
from dptrain.errors import UserError
from dptrain.validation import validate


def test_squeezing_rounds_each_pixel_to_the_nearest_of_two_to_the_bits_levels():
    pixels = torch.tensor([0.0, 0.2, 0.49, 0.5, 0.51, 0.8, 1.0])
    # One bit: 0 or 1, a pixel at exactly 0.5 rounding half to even (to 0), as NumPy's round does.
    assert squeeze_bits(pixels, 1).tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    # Two bits: levels 0, 1/3, 2/3, 1; 0.5 * 3 = 1.5 rounds to 2.
    expected = torch.tensor([0.0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1.0])
    torch.testing.assert_close(squeeze_bits(pixels, 2), expected)


@pytest.mark.parametrize("kernel", [2, 3, 4])
def test_median_smoothing_equals_scipys_median_filter_with_reflected_edges(kernel):
    pixels = torch.rand(3, 2, 7, 9, generator=torch.Generator().manual_seed(0))
    expected = median_filter(pixels.numpy(), size=(1, 1, kernel, kernel), mode="reflect")
    np.testing.assert_array_equal(median_smooth(pixels, kernel).numpy(), expected)


def test_the_defended_model_sees_the_squeezed_pixels_and_bpda_passes_the_gradient_straight_through(digits_mlp):
    model, x, _, units = digits_mlp
    x = x[:16]
    pixels = ((x - units.low) / units.scale).numpy()
    squeezed = units.low + units.scale * torch.from_numpy(np.round(pixels * 7) / 7).float()
    defended = Defended(model, units, Preprocessing("squeeze", bits=3))
    torch.testing.assert_close(defended(x), model(squeezed), atol=1e-5, rtol=0)

    def input_gradient(net, at):
        point = at.clone().requires_grad_(True)
        net(point).logsumexp(dim=1).sum().backward()
        return point.grad

    # BPDA: the gradient at x is the model's gradient at the squeezed point (the squeeze's Jacobian taken
    # as the identity); through the rounding itself it is zero, which is what masks an attack.
    torch.testing.assert_close(input_gradient(defended, x), input_gradient(model, squeezed), atol=1e-5, rtol=0)
    masked = input_gradient(Defended(model, units, Preprocessing("squeeze", bits=3), adaptive=False), x)
    assert torch.count_nonzero(masked) == 0


def test_bpda_pgd_against_a_squeezed_model_is_at_least_as_strong_as_pgd_through_the_masked_rounding(digits_mlp):
    model, x, y, units = digits_mlp
    x, y = x[:100], y[:100]
    preprocessing = Preprocessing("squeeze", bits=3)

    def robust_accuracy(adaptive: bool) -> float:
        attacked = Defended(model, units, preprocessing, adaptive=adaptive)
        adversarial = pgd(attacked, x, y, units, 0.1, "linf", 10, 1, torch.Generator().manual_seed(0))
        # Both attacks' inputs are scored by the same defended forward pass.
        with torch.no_grad():
            return float((Defended(model, units, preprocessing)(adversarial).argmax(1) == y).float().mean())

    adaptive, masked = robust_accuracy(True), robust_accuracy(False)
    assert adaptive <= masked
    # Zero gradients leave PGD with its random start alone: far weaker than the adaptive attack.
    assert masked - adaptive > 0.3


def test_the_evasion_audit_reports_the_defended_clean_accuracy_the_hand_squeeze_gives(digits_mlp):
    model, x, y, units = digits_mlp
    pixels = ((x - units.low) / units.scale).numpy()
    squeezed = units.low + units.scale * torch.from_numpy(np.round(pixels * 3) / 3).float()
    with torch.no_grad():
        expected = float((model(squeezed).argmax(1) == y).float().mean())
        bare = float((model(x).argmax(1) == y).float().mean())
    curves = evasion_audit(
        model, TensorDataset(x, y), units, {"linf": [0.1]}, 5, 1, torch.device("cpu"), 0, Preprocessing("squeeze", bits=2)
    )
    assert expected != bare  # two bits change the digits enough to move accuracy
    for curve in curves.values():
        assert curve.clean_accuracy == pytest.approx(expected)
        assert curve.defense == "squeeze(bits=2)"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["defense.preprocess=blur"], "defense.preprocess=blur is unknown: choose one of none, squeeze, median"),
        (["defense.preprocess=median"], "defense.preprocess=median is measured by the evasion audit alone"),
        (
            ["dataset=breast_cancer", "defense.preprocess=squeeze", "audit.evasion.enabled=true"],
            "defense.preprocess=squeeze works on pixels and dataset=breast_cancer is a table",
        ),
        (["defense.preprocess=squeeze", "defense.squeeze_bits=0"], "defense.squeeze_bits=0 must be"),
        (["defense.preprocess=median", "defense.median_kernel=1"], "defense.median_kernel=1 must be"),
        (
            ["dataset=breast_cancer", "audit.evasion.enabled=true", "audit.evasion.apgd=true"],
            "audit.evasion.apgd=true runs torchattacks, which clamps inputs to pixels in \\[0, 1\\]",
        ),
    ],
)
def test_bad_preprocessing_settings_are_refused_with_one_line_before_training(overrides, message):
    from conftest import make_config

    with pytest.raises(UserError, match=message) as refused:
        validate(make_config(*overrides))
    assert "\n" not in str(refused.value)
