"""Our attacks cross-checked against torchattacks (the optional ``attacks`` extra; these tests skip without
it): FGSM equals torchattacks' FGSM, PGD without random start fools every example torchattacks' PGD
fools, and APGD through the library stays in its budget and the pixel range. The PGD-vs-APGD sanity
check and the refusal without the library need no library."""

from __future__ import annotations

import pytest
import torch

from conftest import on_pixels, to_pixels
from dptrain.adversarial import apgd, fgsm, pgd, pgd_step_size
from dptrain.adversarial.library import pixel_units
from dptrain.audit.evasion import evasion_warnings
from dptrain.audit.results import EvasionCurve


def test_fgsm_equals_torchattacks_fgsm_on_standardized_digits(digits_mlp):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y, units = digits_mlp
    ours = to_pixels(fgsm(model, x, y, units, 0.1, "linf"), units)
    theirs = torchattacks.FGSM(on_pixels(model, units), eps=0.1)(to_pixels(x, units), y)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_pgd_from_the_clean_input_fools_every_example_torchattacks_pgd_fools_within_the_same_budget(digits_mlp):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y, units = digits_mlp
    eps, steps = 0.1, 10
    ours = pgd(model, x, y, units, eps, "linf", steps, 0, torch.Generator().manual_seed(0))
    theirs = torchattacks.PGD(
        on_pixels(model, units), eps=eps, alpha=pgd_step_size(eps, steps), steps=steps, random_start=False
    )(to_pixels(x, units), y)
    with torch.no_grad():
        ours_right = model(ours).argmax(1) == y
        theirs_right = on_pixels(model, units)(theirs).argmax(1) == y
    # Both walk the same iterates (signed-gradient steps of the same size, projected and clamped alike);
    # ours keeps the first that fools the model, torchattacks the last, so ours fools a superset.
    assert not torch.any(ours_right & ~theirs_right)
    assert ours_right.float().mean() <= theirs_right.float().mean() <= ours_right.float().mean() + 0.02
    assert theirs_right.float().mean() < 0.5  # the attack bites: the comparison is not of two no-ops
    assert (to_pixels(ours, units) - to_pixels(x, units)).abs().max() <= eps + 1e-5


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_apgd_through_torchattacks_stays_in_its_budget_and_the_pixel_range_and_beats_the_clean_model(digits_mlp, norm, eps):
    pytest.importorskip("torchattacks")
    model, x, y, units = digits_mlp
    assert pixel_units(units)
    adversarial = apgd(model, x, y, units, eps, norm, steps=10, restarts=1, seed=0)
    moved = (to_pixels(adversarial, units) - to_pixels(x, units)).flatten(1)
    size = moved.abs().amax(dim=1) if norm == "linf" else moved.norm(dim=1)
    assert torch.all(size <= eps * (1 + 1e-4))
    assert torch.all(adversarial >= units.low - 1e-5) and torch.all(adversarial <= units.high + 1e-5)
    with torch.no_grad():
        right = model(adversarial).argmax(1) == y
        assert right.float().mean() < (model(x).argmax(1) == y).float().mean() - 0.3
    # torchattacks returns the clean input where no restart fooled the model: every input it moved must
    # fool our model, which it does only if the library attacked the model through our units.
    assert not torch.any(right & (size > 1e-4))


def test_pgd_above_apgd_by_more_than_the_tolerance_is_flagged_as_too_weak():
    def curve(accuracies):
        return EvasionCurve(budgets=[0.1, 1.0], robust_accuracy=accuracies, clean_accuracy=0.9, n=100)

    close = {"pgd_linf": curve([0.32, 0.0]), "apgd_linf": curve([0.30, 0.0])}
    assert evasion_warnings(close) == []
    weak = {"pgd_linf": curve([0.40, 0.0]), "apgd_linf": curve([0.30, 0.0])}
    (warning,) = evasion_warnings(weak)
    assert "pgd_linf: robust accuracy 0.400 at budget 0.1 is above APGD's 0.300" in warning


def test_apgd_without_torchattacks_installed_is_refused_with_the_install_line(monkeypatch):
    from conftest import make_config

    from dptrain.adversarial import library
    from dptrain.errors import UserError
    from dptrain.validation import validate

    monkeypatch.setattr(library, "available", lambda: False)
    with pytest.raises(UserError, match=r'audit.evasion.apgd=true needs torchattacks: pip install "dptrain\[attacks\]"'):
        validate(make_config("audit.evasion.enabled=true", "audit.evasion.apgd=true"))
