"""Our FGSM and PGD cross-checked against the Adversarial Robustness Toolbox (ART, in the ``test`` extra, so
CI runs these; torchattacks' checks in test_evasion_library.py need the ``attacks`` extra, which cannot be
installed beside the docs extra). Both libraries attack the same fixed digits model fed pixels in [0, 1],
with the same budgets and step sizes: FGSM must agree to float precision, PGD from the clean input walks
the same iterates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import on_pixels, to_pixels
from dptrain.adversarial import fgsm, pgd, pgd_step_size

art = pytest.importorskip("art")
from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402


def _art_classifier(model, units):
    """ART's estimator of ``model`` fed flat pixels in [0, 1]."""
    return PyTorchClassifier(
        model=on_pixels(model, units), loss=nn.CrossEntropyLoss(), input_shape=tuple(units.scale.shape), nb_classes=10,
        clip_values=(0.0, 1.0),
    )  # fmt: skip


def _pixels(x, units) -> np.ndarray:
    return to_pixels(x, units).numpy()


@pytest.mark.parametrize("norm, eps, art_norm", [("linf", 0.1, np.inf), ("l2", 1.0, 2)])
def test_fgsm_equals_arts_fast_gradient_method(digits_mlp, norm, eps, art_norm):
    model, x, y, units = digits_mlp
    ours = _pixels(fgsm(model, x, y, units, eps, norm), units)
    theirs = FastGradientMethod(_art_classifier(model, units), norm=art_norm, eps=eps).generate(
        _pixels(x, units), y=y.numpy()
    )
    assert np.abs(ours - _pixels(x, units)).max() > eps / 4  # the attack moved the inputs
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_pgd_fools_every_example_arts_pgd_fools(digits_mlp):
    model, x, y, units = digits_mlp
    eps, steps = 0.1, 10
    ours = pgd(model, x, y, units, eps, "linf", steps, 0, torch.Generator().manual_seed(0))
    classifier = _art_classifier(model, units)
    theirs = ProjectedGradientDescentPyTorch(
        classifier, norm=np.inf, eps=eps, eps_step=pgd_step_size(eps, steps), max_iter=steps, num_random_init=0,
        verbose=False,
    ).generate(_pixels(x, units), y=y.numpy())  # fmt: skip
    with torch.no_grad():
        ours_right = (model(ours).argmax(1) == y).numpy()
    theirs_right = classifier.predict(theirs).argmax(1) == y.numpy()
    # Same signed-gradient iterates; ours keeps the first that fools the model, ART the last: ours fools a
    # superset, and the two accuracies differ only by examples the last iterate lost again.
    assert not np.any(ours_right & ~theirs_right)
    assert ours_right.mean() <= theirs_right.mean() <= ours_right.mean() + 0.02
    assert theirs_right.mean() < 0.5
    assert np.abs(theirs - _pixels(x, units)).max() <= eps + 1e-6
