"""Adversarial input attacks (FGSM, PGD, TRADES' inner maximisation; APGD through torchattacks) in the
data's own units, and the inference-time preprocessing defences they are run against adaptively (BPDA),
below training and audits so that both use one implementation."""

from dptrain.adversarial.attacks import NORMS, fgsm, pgd, pgd_step_size
from dptrain.adversarial.library import apgd
from dptrain.adversarial.preprocess import PREPROCESSORS, Defended, Preprocessing
from dptrain.adversarial.trades import prediction_divergence, trades_pgd

__all__ = [
    "NORMS",
    "PREPROCESSORS",
    "Defended",
    "Preprocessing",
    "apgd",
    "fgsm",
    "pgd",
    "pgd_step_size",
    "prediction_divergence",
    "trades_pgd",
]
