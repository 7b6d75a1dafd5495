"""Finding a watermark in a suspect model: its agreement with the secret labels on the key set, and the
one-sided binomial test of that agreement against chance (Adi et al. 2018, Section 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.stats import binomtest
from torch import nn

from dptrain.watermark.trigger_set import TriggerSet

# The p-value below which a suspect model is said to carry the watermark (``dptrain verify``'s
# verify.alpha): a one-in-a-million chance of accusing a model that was never trained on the keys.
DEFAULT_ALPHA = 1e-6


@dataclass(frozen=True)
class WatermarkCheck:
    """``matches`` of ``keys`` predictions equal to the secret labels, the p-value of that many or more
    under chance, and whether it is below ``alpha``."""

    keys: int
    matches: int
    chance: float
    p_value: float
    alpha: float

    @property
    def accuracy(self) -> float:
        return self.matches / self.keys

    @property
    def found(self) -> bool:
        return self.p_value < self.alpha

    def record(self) -> dict:
        """metrics.json's ``watermark`` object."""
        return {"keys": self.keys, "accuracy": self.accuracy, "p_value": self.p_value}


@torch.no_grad()
def agreement(model: nn.Module, keys: TriggerSet, device: torch.device | str = "cpu") -> int:
    """How many of the key inputs ``model`` labels with the secret label (argmax of its outputs)."""
    model.eval()
    predictions = model(keys.inputs.to(device)).argmax(dim=1).cpu()
    return int((predictions == keys.labels).sum())


def watermark_test(matches: int, keys: TriggerSet, alpha: float = DEFAULT_ALPHA) -> WatermarkCheck:
    """The one-sided binomial test of ``matches`` agreements out of ``len(keys.labels)``: p = P[X >= matches]
    for X ~ Binomial(n, 1 / num_classes).

    The null is exact, not an approximation: the secret labels are uniform and drawn independently of
    any model trained without them, so whatever such a model predicts on a key, it matches the label
    with probability 1 / num_classes, independently across keys. (A model trained on data that shares
    the keys' distribution still knows nothing of their labels.) ``alpha`` bounds the probability of
    finding a watermark in a model that does not carry it."""
    n = len(keys.labels)
    chance = 1.0 / keys.num_classes
    p_value = float(binomtest(matches, n, chance, alternative="greater").pvalue)
    return WatermarkCheck(keys=n, matches=matches, chance=chance, p_value=p_value, alpha=alpha)
