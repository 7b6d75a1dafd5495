"""Adversarial input attacks (FGSM, PGD, TRADES' inner maximisation) in the data's own units, below
training and audits so that both use one implementation."""

from dptrain.adversarial.attacks import NORMS, fgsm, pgd, pgd_step_size
from dptrain.adversarial.trades import prediction_divergence, trades_pgd

__all__ = ["NORMS", "fgsm", "pgd", "pgd_step_size", "prediction_divergence", "trades_pgd"]
