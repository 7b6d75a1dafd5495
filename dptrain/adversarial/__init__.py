"""Adversarial input attacks (FGSM, PGD) in the data's own units, below training and audits so that both
use one implementation."""

from dptrain.adversarial.attacks import NORMS, fgsm, pgd, pgd_step_size

__all__ = ["NORMS", "fgsm", "pgd", "pgd_step_size"]
