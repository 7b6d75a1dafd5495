"""Opacus integration: accounting, noise calibration, budget enforcement and the private wrapping of a training setup."""

from dptrain.privacy.accounting import ACCOUNTANTS, calibrate_noise, epsilon_spent
from dptrain.privacy.engine import PrivateTraining, make_private, unwrap
from dptrain.privacy.mode_race import ModeChoice
from dptrain.privacy.plan import PrivacyPlan, plan_privacy

__all__ = [
    "ACCOUNTANTS",
    "ModeChoice",
    "PrivacyPlan",
    "PrivateTraining",
    "calibrate_noise",
    "epsilon_spent",
    "make_private",
    "plan_privacy",
    "unwrap",
]
