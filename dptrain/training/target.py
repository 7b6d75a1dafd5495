"""What every recipe shares around its training loop: the trained target (model, audited data, plan,
spend), the run's data with its recorded split, the ``metrics.json`` fields common to every recipe,
and a finished run's model read back."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dptrain.config import Config
from dptrain.data import Canaries, Split, SplitData, draw_canaries, load, make_split, prepare
from dptrain.models import build_model
from dptrain.privacy import ModeChoice, PrivacyPlan
from dptrain.privacy.crosscheck import cross_check, pld_check_enabled, pld_epsilon
from dptrain.tracking.artifacts import SPLIT, load_model
from dptrain.training import ranks
from dptrain.training.loop import evaluate
from dptrain.training.metrics import CentralizedMetrics, FederationMetrics, RunMetrics
from dptrain.training.threads import ThreadChoice


@dataclass
class TargetRun:
    """The trained target model with the data the audit sees (members: exactly the records that trained
    it), the recipe's plan, the privacy plan of the guarantee the run reports (centralized: the
    plan itself), and what it spent."""

    model: nn.Module
    data: SplitData
    plan: object
    guarantee: PrivacyPlan
    epsilon: float | None
    canaries: Canaries | None
    metrics: RunMetrics
    device: torch.device
    fingerprint: str


def load_data(cfg: Config, run_dir: Path, reuse_split: bool) -> tuple[SplitData, Canaries | None, str]:
    """The run's data, split afresh (and recorded in ``split.json`` by rank 0) or by the split the run
    recorded; its canaries (drawn from ``audit.seed``), and the data's fingerprint."""
    data = load(cfg.dataset)
    if reuse_split:
        split = Split.load(run_dir / SPLIT, expected_fingerprint=data.fingerprint)
    else:
        split = make_split(data, cfg.dataset)
        if ranks.is_main():
            split.save(run_dir / SPLIT)
    count = cfg.audit.canaries.count
    canaries = draw_canaries(split, data.labels, data.num_classes, count, cfg.audit.seed) if count else None
    return prepare(data, split), canaries, data.fingerprint


def independent_epsilon(cfg: Config, epsilon: float | None, mechanisms: list[dict], delta: float) -> float | None:
    """dp-accounting's PLD epsilon of the reported guarantee's ``mechanisms`` (the largest over several,
    each a list of ``(noise_multiplier, sample_rate, steps)`` blocks; equal ones computed once), when
    ``privacy.pld_check`` asks for it; a warning when ``epsilon`` is below it (``cross_check``)."""
    if epsilon is None or not pld_check_enabled(cfg.privacy.pld_check):
        return None
    distinct = {tuple(tuple(sorted(block.items())) for block in blocks) for blocks in mechanisms}
    independent = max(pld_epsilon([dict(block) for block in blocks], delta) for blocks in distinct)
    return cross_check(epsilon, independent, "training")


def run_metrics(
    model: nn.Module,
    guarantee: PrivacyPlan,
    epsilon: float | None,
    epsilon_pld: float | None,
    data: SplitData,
    audited: SplitData,
    device: torch.device,
    *,
    train_seconds: float,
    wall_seconds: float,
    replaced_modules: list[str],
    threads: ThreadChoice,
    grad_sample: ModeChoice | None = None,
    centralized: CentralizedMetrics | None = None,
    federation: FederationMetrics | None = None,
) -> RunMetrics:
    """The run's metrics, the one builder every recipe uses: accuracy and loss of ``model`` on the audited
    members and the test split, the reported ``guarantee`` (noise, rate, steps, accountant, clipping
    norm and the ``epsilon`` spent, with PLD's beside it), the split's sizes, the training time and
    ``threads``, and the recipe's own fields."""
    train_loss, train_accuracy = evaluate(model, audited.members, device)
    test_loss, test_accuracy = evaluate(model, data.test, device)
    sizes = data.split.sizes
    return RunMetrics(
        test_accuracy=test_accuracy,
        train_accuracy=train_accuracy,
        test_loss=test_loss,
        train_loss=train_loss,
        epsilon=epsilon,
        delta=guarantee.delta if guarantee.private else None,
        target_epsilon=guarantee.target_epsilon,
        noise_multiplier=guarantee.noise_multiplier,
        sample_rate=guarantee.sample_rate,
        steps=guarantee.steps,
        accountant=guarantee.accountant if guarantee.private else None,
        max_grad_norm=guarantee.max_grad_norm,
        private=guarantee.private,
        epsilon_pld=epsilon_pld,
        members=sizes.members,
        audited_members=len(audited.members),
        non_members=sizes.non_members,
        population=sizes.population,
        test_size=sizes.test,
        train_seconds=train_seconds,
        wall_seconds=wall_seconds,
        replaced_modules=replaced_modules,
        threads=threads.threads,
        threads_calibration=threads.record(),
        grad_sample_mode=None if grad_sample is None else grad_sample.mode,
        grad_sample_seconds=None if grad_sample is None else grad_sample.seconds,
        centralized=centralized,
        federation=federation,
    )


def trained_model(cfg: Config, run_dir: Path, data: SplitData, device: torch.device) -> nn.Module:
    """A finished run's ``model.pt`` in the model its config builds, on ``device``."""
    return load_model(run_dir, build_model(cfg.model, data.input_shape, data.num_classes)).to(device)


def reference_base(cfg: Config, seed: int) -> Config:
    """``cfg`` for a reference model: its own ``train.seed`` (whose streams are the model's), no resume,
    checkpoint or progress bar; each recipe then fixes the noise its mechanism needs. Under public
    pretraining it keeps the target's pretraining seed, so it starts from the target's public model."""
    derived = copy.deepcopy(cfg)
    if cfg.train.pretrain_seed is None:
        derived.train.pretrain_seed = cfg.train.seed
    derived.train.seed = seed
    derived.train.resume = None
    derived.train.checkpoint = False
    derived.train.progress = False
    return derived
