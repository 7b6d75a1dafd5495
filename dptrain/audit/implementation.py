"""The white-box implementation audit (``audit.whitebox``): separate trainings of the target's exact
DP-SGD mechanism with Dirac gradient canaries, whose releases bound epsilon from below (a regression
test of dptrain's DP code) and estimate it.

Each audit run builds the target's model, wraps it in the canary probe (``dptrain.audit.probe``)
and trains it through ``make_private`` and the shared step loop with the target's plan (noise
multiplier, sample rate, steps, clipping, grad-sample mode, accountant) on records of the target's
size plus one slot per canary, each canary included with probability 1/2. The auditor reads the
released gradient along every canary at every step: these releases are exactly what DP-SGD's
accounting covers (the adaptive composition of every step), so a lower bound from them is sound
against the accountant's epsilon, for any statistic that does not look at the coins. The reported
bound is the f-DP one (Mahloujifar, Melis & Chaudhuri 2025) against the accountant's own family of
curves; Steinke, Nasr & Jagielski's (epsilon, delta) bound is reported beside it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from torch.utils.data import TensorDataset

from dptrain.audit.probe import CanaryProbe, ProbeObserver, canary_magnitude, probe_records
from dptrain.audit.fdp import SubsampledGaussianFamily
from dptrain.audit.results import ImplementationAudit, ImplementationRecord, Skipped, SteinkeBound
from dptrain.audit.whitebox import SETTINGS, canary_lower_bounds, gdp_epsilon, gdp_mu_estimate, setting_scores
from dptrain.models import build_model, ensure_dp_compatible
from dptrain.privacy import PrivacyPlan, PrivateTraining, make_private, unwrap
from dptrain.seeds import Stream, derived_seed
from dptrain.training import ranks
from dptrain.training.loop import train_epoch
from dptrain.training.recipe import make_optimizer

log = logging.getLogger(__name__)


Tamper = Callable[[PrivateTraining], None]

# Hooks and functorch hold every example's gradient of the probe, batch x canaries floats: physical
# batches keep one step's within this many (2^25 floats, 128 MiB).
PROBE_GRADIENT_FLOATS = 2**25


@dataclass(frozen=True)
class AuditRun:
    """One audit run's releases: ``x[t, j]`` along canary j at step t in units of its clipped norm,
    the canaries' coins, each canary's batch under fixed in-order batches (None where batches have
    no order), the noise standard deviation in the same units, and the audit run's accountant
    epsilon (None where not computed)."""

    x: np.ndarray
    included: np.ndarray
    batch_of: np.ndarray | None
    noise: float
    accountant_epsilon: float | None


@dataclass(frozen=True)
class AuditedMechanism:
    """The DP-SGD mechanism an audit run repeats: its ``plan``, real ``records`` of the size it trains
    on, the model's input, and whether it runs as DPDDP over every rank (``distributed``).
    ``scope`` says in words whose mechanism it is."""

    plan: PrivacyPlan
    records: TensorDataset
    input_shape: Sequence[int]
    num_classes: int
    scope: str
    distributed: bool = False

    def run(self, cfg, **kwargs) -> AuditRun:
        """One audit run: ``run_mechanism``."""
        return run_mechanism(cfg, self, **kwargs)


def canary_clip_norm(clipping: str, max_grad_norm: float, layers: int) -> float:
    """The norm a canary's gradient is clipped to: C under flat clipping; under per-layer clipping
    C / sqrt(L) for L trainable parameter tensors (the probe's among them), the probe's share.

    A per-layer canary loads one layer only, so it reaches 1 / sqrt(L) of the sensitivity the
    accountant assumes: the bound stays sound but weaker.
    """
    return max_grad_norm / math.sqrt(layers) if clipping == "per_layer" else max_grad_norm


def run_mechanism(
    cfg,
    mechanism: AuditedMechanism,
    *,
    canaries: int,
    seed: int,
    device: torch.device,
    tamper: Tamper | None = None,
    with_epsilon: bool = True,
) -> AuditRun:
    """Train ``mechanism`` once with ``canaries`` probe canaries and return what each step released.

    ``tamper`` (tests only) is applied to the private training objects right after
    ``make_private``, to break the mechanism without telling the accountant. The audit run's
    accountant epsilon is computed ``with_epsilon`` only (the PRV accountant takes about 0.1 s).
    Under ``mechanism.distributed`` every rank calls this together.
    """
    plan = mechanism.plan
    rank = ranks.rank() if mechanism.distributed else 0
    included = np.random.default_rng(derived_seed(seed, Stream.CANARY_COINS)).random(canaries) < 0.5
    torch.manual_seed(derived_seed(seed, Stream.MODEL))
    model, _ = ensure_dp_compatible(build_model(cfg.model, mechanism.input_shape, mechanism.num_classes))
    layers = sum(1 for p in model.parameters() if p.requires_grad) + 1
    clip = canary_clip_norm(cfg.privacy.clipping, plan.max_grad_norm, layers)
    magnitude = canary_magnitude(clip, mechanism.num_classes)
    probe = CanaryProbe(model, mechanism.input_shape, canaries, magnitude).to(device)
    wrapped = DifferentiallyPrivateDistributedDataParallel(probe) if mechanism.distributed else probe
    # Fillers round the records up to whole batches, so the loader has exactly the plan's batches
    # per epoch (Opacus' sample rate is 1 / batches) whatever the counts.
    batch_size = math.ceil((len(mechanism.records) + canaries) / plan.steps_per_epoch)
    dataset = probe_records(mechanism.records, included, batch_size * plan.steps_per_epoch)
    physical = cfg.train.max_physical_batch_size
    if cfg.privacy.grad_sample_mode not in ("ghost", "bk") and batch_size * (canaries + 1) > PROBE_GRADIENT_FLOATS:
        # Opacus' BatchMemoryManager splits only the computation: the logical batches, the
        # mechanism, are the same. Ghost and book-keeping clipping never hold per-example gradients.
        physical = min(physical or batch_size, max(1, PROBE_GRADIENT_FLOATS // (canaries + 1)))
    training = make_private(
        model=wrapped,
        optimizer=make_optimizer(cfg.train, wrapped.parameters()),
        dataset=dataset,
        plan=plan,
        cfg=cfg.privacy,
        batch_size=batch_size,
        max_physical_batch_size=physical,
        sampling_generator=torch.Generator().manual_seed(derived_seed(seed, Stream.SAMPLING, rank)),
        noise_generator=torch.Generator(device=device).manual_seed(derived_seed(seed, Stream.NOISE, rank)),
    )
    if tamper is not None:
        tamper(training)
    optimizer = training.optimizer
    # Opacus divides the noised sum by the expected batch size; DPDDP's is per rank and the ranks' sums
    # are averaged, so the whole batch's is world_size times it.
    divisor = optimizer.expected_batch_size * getattr(optimizer, "world_size", 1)
    observer = ProbeObserver(optimizer.original_optimizer, unwrap(training.model).probe, scale=divisor / clip)
    optimizer.original_optimizer = observer
    for _ in range(plan.steps // plan.steps_per_epoch):
        train_epoch(training, device)
    x = observer.observations()
    if training.ledger.steps() != plan.steps or len(x) != plan.steps:
        raise RuntimeError(
            f"the audit run's accountant charged {training.ledger.steps()} steps and {len(x)} were released; "
            f"the plan was {plan.steps}"
        )
    slots = len(mechanism.records) + np.arange(canaries)
    return AuditRun(
        x=x,
        included=included,
        batch_of=slots // batch_size,
        noise=plan.noise_multiplier * plan.max_grad_norm / clip,
        accountant_epsilon=training.epsilon() if with_epsilon else None,
    )


def run_seed(audit_seed: int, run: int) -> int:
    """Audit run ``run``'s seed: its own stream of ``audit.seed``, apart from the target's and the audit's."""
    return derived_seed(audit_seed, Stream.IMPLEMENTATION, run)


def implementation_audit(
    cfg, mechanism, epsilon: float | None, device: torch.device, *, tamper: Tamper | None = None
) -> ImplementationAudit | Skipped | None:
    """The white-box lower bound and Gaussian-DP estimate of
    ``mechanism`` (an ``AuditedMechanism``, or any object with its ``plan``, ``scope``,
    ``distributed`` and ``run``) from ``audit.whitebox.runs`` audit runs of
    ``audit.whitebox.canaries`` canaries.

    Per setting, at ``confidence`` for ``delta`` = the plan's (Bonferroni over guess rules and
    statistics): ``epsilon_lower_bound`` is the f-DP bound (``dptrain.audit.fdp``: the epsilon of the
    weakest Poisson-subsampled Gaussian curve of the plan's sample rate and steps that the guesses
    reject, ``rejected_noise_multiplier`` its noise; ``accountant_curve_rejected`` when the plan's
    own curve is rejected, which proves the mechanism is not the one charged for); ``steinke``
    holds Steinke et al. 2023's bound (the runs' counts combined as independent), which assumes
    nothing about the curve's shape. ``gdp_mu_estimate`` and ``epsilon_estimate`` are an estimate
    (Nasr et al. 2023), not a bound. One record per setting run (``both``: every one of ``SETTINGS``);
    ``Skipped`` for the non-private baseline. Every rank calls this under ``mechanism.distributed``;
    ranks other than 0 get None.
    """
    whitebox = cfg.audit.whitebox
    if not mechanism.plan.private:
        return Skipped("the non-private baseline has no clipping norm or noise to audit")
    started = time.perf_counter()
    runs = []
    for r in range(whitebox.runs):
        runs.append(
            mechanism.run(
                cfg,
                canaries=whitebox.canaries,
                seed=run_seed(cfg.audit.seed, r),
                device=device,
                tamper=tamper,
                with_epsilon=r == 0,
            )
        )
        log.info("implementation audit: run %d of %d done (%.0f s)", r + 1, whitebox.runs, time.perf_counter() - started)
    if mechanism.distributed and not ranks.is_main():
        return None
    settings = SETTINGS if whitebox.setting == "both" else (whitebox.setting,)
    records = {
        setting: _setting_record(setting, runs, mechanism, epsilon, cfg.audit.confidence, cfg.audit.seed)
        for setting in settings
    }
    return ImplementationAudit(records, seconds=time.perf_counter() - started)


def _setting_record(
    setting: str, runs: list[AuditRun], mechanism, epsilon, confidence: float, seed: int
) -> ImplementationRecord:
    plan = mechanism.plan
    statistics: dict[str, list[np.ndarray]] = {}
    for run in runs:
        scores = setting_scores(
            setting,
            run.x,
            sample_rate=plan.sample_rate,
            noise=run.noise,
            steps_per_epoch=plan.steps_per_epoch,
            batch_of=run.batch_of,
        )
        for name, values in scores.items():
            statistics.setdefault(name, []).append(values)
    pooled = {name: np.concatenate(values) for name, values in statistics.items()}
    included = np.concatenate([run.included for run in runs])
    labels = np.repeat(np.arange(len(runs)), len(runs[0].included))
    fdp, (steinke_statistic, steinke) = canary_lower_bounds(
        pooled,
        included,
        labels,
        family=SubsampledGaussianFamily(plan.sample_rate, plan.steps, plan.delta),
        claimed_noise=plan.noise_multiplier,
        confidence=confidence,
        seed=seed,
    )
    # The estimate uses the statistic the mechanism's claim is about (the first).
    claimed = next(iter(pooled.values()))
    mu = gdp_mu_estimate(claimed[included], claimed[~included])
    estimate = gdp_epsilon(mu, plan.delta)
    return ImplementationRecord(
        setting=setting,
        epsilon_lower_bound=fdp.epsilon_lower_bound,
        confidence=confidence,
        delta=plan.delta,
        accountant_epsilon=epsilon,
        audit_run_epsilon=runs[0].accountant_epsilon,
        canaries=len(runs[0].included),
        runs=len(runs),
        included=int(included.sum()),
        rejected_noise_multiplier=fdp.rejected_noise,
        accountant_curve_rejected=fdp.claimed_rejected,
        statistic=fdp.statistic,
        statistics=list(pooled),
        n_guesses=fdp.n_guesses,
        n_correct=fdp.n_correct,
        k_plus=fdp.k_plus,
        k_minus=fdp.k_minus,
        n_tests=fdp.n_tests,
        steinke=SteinkeBound(
            epsilon_lower_bound=steinke.epsilon_lower_bound,
            statistic=steinke_statistic,
            n_guesses=steinke.n_guesses,
            n_correct=steinke.n_correct,
            k_plus=steinke.k_plus,
            k_minus=steinke.k_minus,
            n_candidates=steinke.n_candidates,
        ),
        gdp_mu_estimate=None if math.isnan(mu) else mu,
        epsilon_estimate=None if not math.isfinite(estimate) else estimate,
        mechanism=mechanism.scope,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
    )
