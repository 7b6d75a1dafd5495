"""DP compatibility: make a model trainable with per-example gradients, and say what was changed."""

from __future__ import annotations

import logging

from opacus.validators import ModuleValidator
from torch import nn

log = logging.getLogger(__name__)


def ensure_dp_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Return ``(model, replaced)``: the model unchanged when Opacus accepts it, else fixed.

    The zoo's models are valid as built; a model that is not (e.g. one with
    BatchNorm) goes through ``ModuleValidator.fix`` and every replaced module is
    reported as ``"<name>: <old type> -> <new type>"``, because the fix changes
    the architecture the user asked for.
    """
    if ModuleValidator.is_valid(model):
        return model, []
    before = {name: type(module).__name__ for name, module in model.named_modules()}
    fixed = ModuleValidator.fix(model)
    ModuleValidator.validate(fixed, strict=True)
    replaced = [
        f"{name or '<root>'}: {before[name]} -> {type(module).__name__}"
        for name, module in fixed.named_modules()
        if name in before and before[name] != type(module).__name__
    ]
    log.warning("model was not DP-compatible; Opacus' ModuleValidator.fix replaced %s", "; ".join(replaced))
    return fixed, replaced
