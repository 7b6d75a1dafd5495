"""The evasion audit: robust accuracy of the trained model under FGSM and PGD (L-infinity and L2), and
optionally torchattacks' APGD, over a list of budgets, with Carlini et al. 2019's sanity checks ("On
Evaluating Adversarial Robustness"). A model behind an inference-time preprocessing defence
(``defense.preprocess``) is attacked adaptively, through BPDA gradients (Athalye et al. 2018).

Budgets are in the data's own units (``dptrain.data.InputUnits``); the attacks are
``dptrain.adversarial``'s, shared with adversarial training.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.adversarial import Defended, Preprocessing, apgd, fgsm, pgd
from dptrain.audit.results import EvasionCurve
from dptrain.config import DefenseConfig
from dptrain.data import InputUnits
from dptrain.privacy.engine import unwrap

ATTACKS = ("fgsm", "pgd")
# Above this robust accuracy at the largest (unbounded) budget the attack failed: gradient masking
# or a bug, not robustness (Carlini et al. 2019, section 5.2).
UNBOUNDED_ACCURACY = 0.05
# PGD's robust accuracy above APGD's by more than this at a budget: our PGD is too weak to stand for
# the model's robustness (Croce & Hein 2020 found published PGD evaluations overstated by up to tens of
# points). A chosen margin, about one standard error of an accuracy near 0.5 on the default 500 records.
APGD_TOLERANCE = 0.02
BATCH = 1024


def preprocessing(defense: DefenseConfig) -> Preprocessing:
    """The inference-time preprocessing ``defense.preprocess`` asks for, with its parameter."""
    return Preprocessing(defense.preprocess, bits=defense.squeeze_bits, kernel=defense.median_kernel)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(x).argmax(dim=1) == y).sum())


def evasion_audit(
    model: nn.Module,
    test: TensorDataset,
    units: InputUnits,
    budgets: dict[str, list[float]],
    steps: int,
    restarts: int,
    device: torch.device,
    seed: int,
    preprocessing: Preprocessing = Preprocessing("none"),
    library: bool = False,
) -> dict[str, EvasionCurve]:
    """Robust accuracy of ``model`` on ``test`` under FGSM and PGD for every norm in ``budgets`` (norm ->
    increasing budgets, data units), keyed ``<attack>_<norm>``; PGD's random starts are drawn from
    ``seed``, restarted at every budget. With ``library`` also torchattacks' APGD-CE (``apgd_<norm>``)
    with PGD's steps and restarts, seeded with ``seed``; ``units`` must then be pixels.

    Behind a ``preprocessing`` other than ``none`` every accuracy is the defended model's and every
    attack's gradient is BPDA's (``Defended``): the adaptive attack, never the masked gradient."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    if preprocessing.name != "none":
        model = Defended(model, units, preprocessing).to(device)
    x_all, y_all = (t.to(device) for t in test.tensors)
    clean = sum(_accuracy(model, x, y) for x, y in zip(x_all.split(BATCH), y_all.split(BATCH))) / len(y_all)
    attacks: dict[str, Callable] = {
        "fgsm": lambda x, y, eps, norm, generator: fgsm(model, x, y, units, eps, norm),
        "pgd": lambda x, y, eps, norm, generator: pgd(model, x, y, units, eps, norm, steps, restarts, generator),
    }
    if library:
        attacks["apgd"] = lambda x, y, eps, norm, generator: apgd(model, x, y, units, eps, norm, steps, restarts, seed)
    curves = {}
    for norm, norm_budgets in budgets.items():
        for name, attack in attacks.items():
            robust = []
            for eps in norm_budgets:
                generator = torch.Generator(device=device).manual_seed(seed)
                correct = sum(
                    _accuracy(model, attack(x, y, eps, norm, generator), y)
                    for x, y in zip(x_all.split(BATCH), y_all.split(BATCH))
                )
                robust.append(correct / len(y_all))
            curves[f"{name}_{norm}"] = EvasionCurve(
                budgets=list(norm_budgets),
                robust_accuracy=robust,
                clean_accuracy=clean,
                n=len(y_all),
                defense=preprocessing.label,
            )
    model.train(was_training)
    return curves


def evasion_warnings(curves: dict[str, EvasionCurve]) -> list[str]:
    """Carlini et al. 2019's sanity checks on the curves, one warning per failure: robust accuracy rising
    with the budget, PGD weaker than FGSM at a budget, PGD's accuracy above the library's APGD's by
    more than ``APGD_TOLERANCE``, and the largest budget (unbounded in the default lists) leaving
    accuracy above ``UNBOUNDED_ACCURACY``. Each points at gradient masking, a weak attack or a bug."""
    warnings = []
    for key, curve in curves.items():
        pairs = list(zip(curve.budgets, curve.robust_accuracy))
        for (low, before), (high, after) in zip(pairs, pairs[1:]):
            if after > before:
                warnings.append(
                    f"evasion {key}: robust accuracy rises from {before:.3f} at budget {low:g} to {after:.3f} at "
                    f"{high:g}; a larger budget can only help the attacker: gradient masking or a weak attack"
                )
        attack, norm = key.split("_", 1)
        fgsm_curve = curves.get(f"fgsm_{norm}")
        if attack == "pgd" and fgsm_curve is not None:
            for eps, pgd_accuracy, fgsm_accuracy in zip(curve.budgets, curve.robust_accuracy, fgsm_curve.robust_accuracy):
                if pgd_accuracy > fgsm_accuracy:
                    warnings.append(
                        f"evasion pgd_{norm}: robust accuracy {pgd_accuracy:.3f} at budget {eps:g} is above FGSM's "
                        f"{fgsm_accuracy:.3f}; an iterative attack should be at least as strong: gradient masking "
                        "or too few PGD steps"
                    )
        apgd_curve = curves.get(f"apgd_{norm}")
        if attack == "pgd" and apgd_curve is not None:
            for eps, pgd_accuracy, apgd_accuracy in zip(curve.budgets, curve.robust_accuracy, apgd_curve.robust_accuracy):
                if pgd_accuracy > apgd_accuracy + APGD_TOLERANCE:
                    warnings.append(
                        f"evasion pgd_{norm}: robust accuracy {pgd_accuracy:.3f} at budget {eps:g} is above APGD's "
                        f"{apgd_accuracy:.3f} by more than {APGD_TOLERANCE}: PGD is too weak here; trust APGD's number "
                        "or raise audit.evasion.steps and restarts"
                    )
        if attack == "pgd" and curve.robust_accuracy and curve.robust_accuracy[-1] > UNBOUNDED_ACCURACY:
            warnings.append(
                f"evasion {key}: robust accuracy {curve.robust_accuracy[-1]:.3f} at the largest budget "
                f"{curve.budgets[-1]:g} is above {UNBOUNDED_ACCURACY}; if that budget is unbounded for this data "
                "the attack failed (gradient masking or a bug), not the model resisted"
            )
    return warnings
