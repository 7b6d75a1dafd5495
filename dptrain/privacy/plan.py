"""The privacy plan of a run: noise, sample rate and steps fixed before any data is loaded."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dptrain.config import PrivacyConfig
from dptrain.errors import UserError
from dptrain.privacy.accounting import MAX_NOISE, calibrate_noise, epsilon_spent
from dptrain.privacy.calibration_cache import cached_calibration


@dataclass(frozen=True)
class PrivacyPlan:
    """What the run will spend: ``steps`` steps at ``noise_multiplier`` and ``sample_rate``.

    ``private`` is False for the non-private baseline (no clipping, no noise,
    ``epsilon`` is None). For a private run ``planned_epsilon`` is the
    accountant's epsilon after all ``steps`` (None in a reference model's plan,
    whose epsilon is never reported); it never exceeds
    ``target_epsilon`` when a target is set, and the training loop never takes
    more than ``steps`` steps, so the run cannot spend beyond its target.
    """

    private: bool
    accountant: str
    delta: float
    target_epsilon: float | None
    noise_multiplier: float
    max_grad_norm: float | None
    sample_rate: float
    steps_per_epoch: int
    steps: int
    planned_epsilon: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def is_private(cfg: PrivacyConfig) -> bool:
    """False for the non-private baseline: ``privacy=none`` or ``privacy.target_epsilon=inf``."""
    return cfg.name != "none" and not (cfg.target_epsilon is not None and math.isinf(cfg.target_epsilon))


def plan_privacy(
    cfg: PrivacyConfig,
    *,
    members: int,
    batch_size: int,
    epochs: int,
    length_key: str = "train.epochs",
    accounted: bool = True,
) -> PrivacyPlan:
    """Fix noise, sample rate and step count for training on ``members`` records.

    The sample rate follows Opacus' Poisson loader: q = 1 / ceil(members /
    batch_size), with ceil(members / batch_size) steps per epoch, so the
    accountant during training sees exactly the (q, steps) planned here.
    ``length_key`` names, in error lines, the setting that makes the epochs.
    ``accounted=False`` (``plan_mechanism``) plans a mechanism whose epsilon is never reported.
    """
    steps_per_epoch = math.ceil(members / batch_size)
    sample_rate = 1.0 / steps_per_epoch
    steps = epochs * steps_per_epoch
    return plan_mechanism(
        cfg,
        sample_rate=sample_rate,
        steps=steps,
        steps_per_epoch=steps_per_epoch,
        schedule=f"{steps} steps at sample rate {sample_rate:.4g}",
        length_key=length_key,
        accounted=accounted,
    )


def plan_mechanism(
    cfg: PrivacyConfig,
    *,
    sample_rate: float,
    steps: int,
    steps_per_epoch: int,
    schedule: str,
    length_key: str,
    accounted: bool = True,
) -> PrivacyPlan:
    """The plan of ``steps`` Poisson-subsampled Gaussian steps at ``sample_rate``.

    With a target epsilon the noise is calibrated (``cached_calibration``) to spend it in the planned
    steps; an explicit ``noise_multiplier`` is used as given and must stay
    within a target set beside it. ``schedule`` describes the steps and
    ``length_key`` names the setting that shortens them, for the error lines.

    ``accounted=False`` is for a mechanism whose epsilon nobody reports (a reference model, which
    imitates the target's noise): it needs an explicit ``noise_multiplier`` and no target, runs no
    accountant, and its plan's ``planned_epsilon`` is None.
    """
    common = dict(
        accountant=cfg.accountant,
        delta=cfg.delta,
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        steps=steps,
    )
    if not is_private(cfg):
        return PrivacyPlan(
            private=False,
            target_epsilon=None,
            noise_multiplier=0.0,
            max_grad_norm=None,
            planned_epsilon=None,
            **common,
        )
    if not accounted:
        if cfg.noise_multiplier is None or cfg.target_epsilon is not None:
            raise ValueError("an unaccounted plan takes an explicit noise_multiplier and no target_epsilon")
        return PrivacyPlan(
            private=True,
            target_epsilon=None,
            noise_multiplier=cfg.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            planned_epsilon=None,
            **common,
        )
    account = dict(accountant=cfg.accountant, sample_rate=sample_rate, steps=steps, delta=cfg.delta)
    if cfg.noise_multiplier is None:
        try:
            noise, epsilon = cached_calibration(target_epsilon=cfg.target_epsilon, **account)
        except ValueError:
            raise UserError(
                f"privacy.target_epsilon={cfg.target_epsilon} cannot be met in {schedule} even with noise "
                f"multiplier {MAX_NOISE:g}: raise target_epsilon or lower {length_key}"
            ) from None
    else:
        noise = cfg.noise_multiplier
        epsilon = epsilon_spent(noise_multiplier=noise, **account)
    if cfg.target_epsilon is not None and epsilon > cfg.target_epsilon:
        needed = calibrate_noise(target_epsilon=cfg.target_epsilon, **account)
        raise UserError(
            f"privacy.noise_multiplier={noise} spends epsilon {epsilon:.3g} in {schedule}, above "
            f"privacy.target_epsilon={cfg.target_epsilon}: set noise_multiplier >= {needed:.4g}, or "
            f"privacy.noise_multiplier=null to calibrate it, or privacy.target_epsilon=null to spend what it spends"
        )
    return PrivacyPlan(
        private=True,
        target_epsilon=cfg.target_epsilon,
        noise_multiplier=noise,
        max_grad_norm=cfg.max_grad_norm,
        planned_epsilon=epsilon,
        **common,
    )
