"""The evasion audit: every adversarial input stays within its budget (in the data's units) and the valid
range, FGSM on a linear model equals its closed form, PGD is at least as strong as FGSM, an unbounded
budget defeats a trained model, the sanity checks fire, and bad budgets are refused before training."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from dptrain.audit.evasion import evasion_audit, evasion_warnings, fgsm, pgd
from dptrain.audit.results import AuditReport, EvasionCurve
from dptrain.config import DatasetConfig
from dptrain.data import InputUnits, load, make_split, prepare
from dptrain.errors import UserError
from dptrain.validation import validate

D = 6


def _units(infinite: bool = False) -> InputUnits:
    """Standardized-pixel-like units: unequal scales, a valid range per feature, one frozen feature."""
    scale = torch.tensor([2.0, 0.5, 4.0, 1.0, 3.0, 0.0])
    low = torch.full((D,), -math.inf) if infinite else -torch.rand(D, generator=torch.Generator().manual_seed(1))
    high = torch.full((D,), math.inf) if infinite else low + scale.clamp_min(1.0)
    return InputUnits(scale=scale, low=low, high=high)


def _inputs(units: InputUnits, n: int = 64, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    low = torch.where(units.low.isinf(), -2.0, units.low)
    high = torch.where(units.high.isinf(), 2.0, units.high)
    x = low + (high - low) * torch.rand(n, D, generator=generator)
    return x, torch.randint(classes, (n,), generator=generator)


def _mlp(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, classes)).eval()


def _trained_logreg(x: torch.Tensor, y: torch.Tensor, classes: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def _separable(n: int = 200, classes: int = 3):
    """Gaussian blobs with well separated means in D features (the last one constant)."""
    generator = torch.Generator().manual_seed(2)
    y = torch.arange(n) % classes
    means = 3 * torch.randn(classes, D, generator=generator)
    x = means[y] + torch.randn(n, D, generator=generator)
    x[:, -1] = 0
    return x, y


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_every_adversarial_input_stays_within_its_budget_in_data_units_and_in_the_valid_range(attack, norm):
    units = _units()
    x, y = _inputs(units)
    model = _mlp()
    for eps in (0.05, 0.3, 2.0):
        if attack == "fgsm":
            adversarial = fgsm(model, x, y, units, eps, norm)
        else:
            adversarial = pgd(model, x, y, units, eps, norm, steps=5, restarts=2, generator=torch.Generator().manual_seed(0))
        moved = adversarial - x
        assert torch.all(moved[:, -1] == 0)  # scale 0: a feature the attack may not move
        spent = moved[:, :-1] / units.scale[:-1]
        size = spent.abs().amax(dim=1) if norm == "linf" else spent.norm(dim=1)
        assert torch.all(size <= eps * (1 + 1e-5))
        assert torch.all(adversarial >= units.low) and torch.all(adversarial <= units.high)
        assert moved.abs().sum() > 0


@pytest.mark.parametrize("classes", [2, 5])
def test_fgsm_on_a_linear_model_is_the_closed_form_step_along_w_transpose_p_minus_onehot(classes):
    # Softmax cross-entropy of z = W x + b has input gradient W^T (softmax(z) - onehot(y)); in data units
    # (x = scale * u) it is scale * W^T (p - onehot), so L-inf FGSM moves x by eps * scale * sign(W^T (p - y))
    # and L2 FGSM by scale * eps * g / ||g|| with g = scale * W^T (p - onehot).
    units = _units(infinite=True)
    x, y = _inputs(units, classes=classes)
    model = nn.Linear(D, classes)
    torch.manual_seed(classes)
    nn.init.normal_(model.weight)
    w, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    xs, ys, scale = x.double().numpy(), y.numpy(), units.scale.double().numpy()
    z = xs @ w.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    gradient = (p - np.eye(classes)[ys]) @ w
    eps = 0.2
    expected_linf = xs + eps * scale * np.sign(gradient * scale)
    g = gradient * scale
    expected_l2 = xs + scale * eps * g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(fgsm(model, x, y, units, eps, "linf").numpy(), expected_linf, atol=1e-5)
    np.testing.assert_allclose(fgsm(model, x, y, units, eps, "l2").numpy(), expected_l2, atol=1e-5)


@pytest.fixture(scope="module")
def trained():
    """A logistic regression trained on separable blobs, with its training records."""
    x, y = _separable()
    return _trained_logreg(x, y, 3), x, y


def test_pgd_is_at_least_as_strong_as_fgsm_on_a_fixed_model(trained):
    model, x, y = trained
    units = _units(infinite=True)
    budgets = {"linf": [0.1, 0.3, 0.6, 1.0], "l2": [0.2, 0.5, 1.0, 2.0]}
    curves = evasion_audit(model, torch.utils.data.TensorDataset(x, y), units, budgets, 10, 2, torch.device("cpu"), 0)
    for norm in budgets:
        pgd_curve, fgsm_curve = curves[f"pgd_{norm}"], curves[f"fgsm_{norm}"]
        assert all(p <= f for p, f in zip(pgd_curve.robust_accuracy, fgsm_curve.robust_accuracy))
        assert pgd_curve.robust_accuracy[-1] < pgd_curve.clean_accuracy  # the budgets bite
    assert curves["pgd_linf"].clean_accuracy > 0.9


def test_an_unbounded_budget_drives_a_trained_logistic_regression_to_zero_accuracy(trained):
    model, x, y = trained
    units = _units(infinite=True)
    curves = evasion_audit(
        model, torch.utils.data.TensorDataset(x, y), units, {"linf": [100.0], "l2": [1000.0]}, 10, 1,
        torch.device("cpu"), 0,
    )  # fmt: skip
    assert curves["fgsm_linf"].clean_accuracy > 0.9
    assert curves["pgd_linf"].robust_accuracy == [0.0] and curves["pgd_l2"].robust_accuracy == [0.0]
    assert evasion_warnings(curves) == []


def test_digits_units_are_pixels_in_zero_one_through_the_standardization():
    cfg = DatasetConfig(name="digits")
    data = load(cfg)
    prepared = prepare(data, make_split(data, cfg))
    x = prepared.test.tensors[0]
    raw = data.features[torch.from_numpy(prepared.split.test)]
    units = prepared.units
    assert torch.all(x >= units.low) and torch.all(x <= units.high)
    # A black pixel (0) is exactly the low end, a full one (16/16) the high end, and one pixel of change
    # moves the standardized feature by scale: (x - low) / scale recovers the raw pixel.
    np.testing.assert_allclose((x - units.low) / units.scale, raw, atol=1e-5)
    assert torch.equal(x[raw == 0], units.low.expand_as(x)[raw == 0])


def test_the_sanity_checks_flag_a_rising_curve_pgd_weaker_than_fgsm_and_an_unbounded_budget_that_fails():
    def curve(accuracies):
        return EvasionCurve(budgets=[0.1, 0.3, 1.0], robust_accuracy=accuracies, clean_accuracy=0.9, n=100)

    healthy = {"fgsm_linf": curve([0.5, 0.2, 0.0]), "pgd_linf": curve([0.4, 0.1, 0.0])}
    assert evasion_warnings(healthy) == []
    broken = {"fgsm_linf": curve([0.5, 0.2, 0.0]), "pgd_linf": curve([0.4, 0.6, 0.3])}
    warnings = evasion_warnings(broken)
    assert len(warnings) == 4
    assert "rises from 0.400 at budget 0.1 to 0.600 at 0.3" in warnings[0]
    assert sum("above FGSM's" in warning for warning in warnings) == 2
    assert "0.300 at the largest budget 1 is above 0.05" in warnings[-1]


def test_audit_json_carries_the_evasion_curves_and_reads_them_back(tmp_path):
    from conftest import make_audit_report

    curves = {
        "fgsm_linf": EvasionCurve(budgets=[0.1, 1.0], robust_accuracy=[0.5, 0.0], clean_accuracy=0.9, n=50),
        "pgd_linf": EvasionCurve(budgets=[0.1, 1.0], robust_accuracy=[0.25, 0.0], clean_accuracy=0.9, n=50),
    }
    written = make_audit_report(evasion=curves).to_dict()
    assert set(written["evasion"]) == {"fgsm_linf", "pgd_linf"}
    assert set(written["evasion"]["pgd_linf"]) == {"budgets", "robust_accuracy", "clean_accuracy", "n", "defense"}
    assert AuditReport.from_dict(written).evasion == curves
    off = make_audit_report().to_dict()
    assert off["evasion"] is None and AuditReport.from_dict(off).evasion is None
    del off["evasion"]  # an audit.json written before the evasion audit existed
    assert AuditReport.from_dict(off).evasion is None


def test_the_evasion_audit_is_on_at_thorough_and_off_elsewhere():
    from conftest import make_config

    assert make_config("audit=thorough").audit.evasion.enabled
    assert not make_config().audit.evasion.enabled and not make_config("audit=fast").audit.evasion.enabled
    assert make_config("audit=fast", "audit.evasion.enabled=true").audit.evasion.enabled


@pytest.mark.parametrize(
    "override, message",
    [
        ("audit.evasion.budgets_linf=[0.1,0]", r"audit.evasion.budgets_linf=\[0.1, 0.0\]: each entry must be positive"),
        ("audit.evasion.budgets_l2=[-1.0]", "audit.evasion.budgets_l2=.*each entry must be positive"),
        ("audit.evasion.budgets_linf=[0.1,inf]", "audit.evasion.budgets_linf=.*each entry must be positive"),
        ("audit.evasion.budgets_linf=[0.1,nan]", "audit.evasion.budgets_linf=.*each entry must be positive"),
        ("audit.evasion.budgets_linf=[0.3,0.1]", "increasing order"),
        ("audit.evasion.budgets_l2=[]", "audit.evasion.budgets_l2 is empty"),
        ("audit.evasion.norms=[linf,l1]", "audit.evasion.norms=l1 is unknown: choose one of linf, l2"),
        ("audit.evasion.steps=0", "audit.evasion.steps=0 must be at least 1"),
        ("audit.evasion.restarts=0", "audit.evasion.restarts=0 must be at least 1"),
        ("audit.evasion.n=0", "audit.evasion.n=0 must be at least 1"),
    ],
)
def test_bad_evasion_settings_are_refused_with_one_line_before_training(override, message):
    from conftest import make_config

    with pytest.raises(UserError, match=message) as refused:
        validate(make_config("audit.evasion.enabled=true", override))
    assert "\n" not in str(refused.value)


def test_the_summary_prints_one_line_per_attack_and_norm_with_each_budgets_robust_accuracy():
    from conftest import make_audit_report

    from dptrain.views.summary import format_audit

    curve = EvasionCurve(budgets=[0.1, 1.0], robust_accuracy=[0.25, 0.0], clean_accuracy=0.9, n=50)
    text = format_audit(make_audit_report(evasion={"pgd_linf": curve}))
    assert "evasion      pgd_linf  robust accuracy 0.250 @ 0.1, 0.000 @ 1  (clean 0.900, 50 test records)" in text
    assert "evasion" not in format_audit(make_audit_report())
    squeezed = dataclasses.replace(curve, defense="squeeze(bits=3)")
    text = format_audit(make_audit_report(evasion={"pgd_linf": squeezed}))
    assert "(clean 0.900, 50 test records, behind squeeze(bits=3) (BPDA))" in text
