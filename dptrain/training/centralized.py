"""The centralized recipe: one data holder trains the target model on its members (plus included canaries)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.config import Config
from dptrain.data import Canaries, SplitData, SplitSizes, audited_split, canary_inclusion, subset
from dptrain.poisoning import detection
from dptrain.privacy import PrivacyPlan, plan_privacy
from dptrain.robust import build_attack
from dptrain.seeds import Stream, derived_seed
from dptrain.tracking.artifacts import read_metrics, save_model, write_metrics
from dptrain.tracking.tensorboard import TensorBoardLog
from dptrain.training import ranks
from dptrain.training.checkpoint import Checkpoint
from dptrain.training.distributed import (
    byzantine_ranks,
    canary_ranks,
    honest_positions,
    local_batch_size,
    parallel_mode,
    shard_positions,
    shard_size,
)
from dptrain.training.federated import backdoor_success_rate
from dptrain.training.metrics import CentralizedMetrics, RunMetrics
from dptrain.training.poisoning import (
    poison_members,
    poisoned_class_accuracy,
    poisoned_positions,
    poisoning_attack,
    poisons_members,
    record_poisoned,
    targets_class,
)
from dptrain.training.pretrain import pretrain_record
from dptrain.training.proxy import proxy_plan, train_proxy_target
from dptrain.training.recipe import resolve_device, train_model
from dptrain.training.sanitization import record_sanitized, recorded_sanitized, sanitized_positions
from dptrain.training.target import (
    TargetRun,
    independent_epsilon,
    load_data,
    reference_base,
    run_metrics,
    trained_model,
)
from dptrain.watermark import TriggerSet, agreement, draw_trigger_set, watermark_test

log = logging.getLogger(__name__)


def training_size(cfg: Config, members: int) -> int:
    """Records the target trains on: the members, the canaries whose coin said "in" and the watermark's
    keys. The privacy plan's sampling rate and the accountant count them all: a key is trained in the same
    Poisson-sampled DP-SGD steps as a member, so it is protected as a record like a member is, and the
    members' epsilon is the one the plan reports (the keys only enlarge the dataset)."""
    keys = cfg.train.watermark.count if cfg.train.watermark.enabled else 0
    return members + int(canary_inclusion(cfg.audit.canaries.count, cfg.audit.seed).sum()) + keys


def plan(cfg: Config, sizes: SplitSizes) -> PrivacyPlan:
    """The privacy plan of the target's training, fixed before any data is loaded.

    Under robust data parallelism it is each rank's plan: its equal shard of the
    members at its share of the batch. The canaries an honest rank holds besides
    (``canary_ranks``) are sampled at the same rate, so the plan, and with it the
    mechanism each canary's coin toggles, does not depend on the coins. A run on a proxy
    (``train.proxy``) has the proxy's plan, which imitates the members' (``proxy_plan``).
    """
    if cfg.train.proxy != "none":
        return proxy_plan(cfg, sizes)
    records = training_size(cfg, sizes.members)
    batch_size = cfg.train.batch_size
    if parallel_mode(cfg) == "robust":
        records = shard_size(sizes.members, ranks.world_size())
        batch_size = local_batch_size(cfg)
    return plan_privacy(cfg.privacy, members=records, batch_size=batch_size, epochs=cfg.train.epochs)


def resumed_step(plan: PrivacyPlan, checkpoint: Checkpoint) -> int:
    """The first TensorBoard step after ``checkpoint`` (steps count optimizer steps)."""
    return checkpoint.completed * plan.steps_per_epoch + 1


@dataclass(frozen=True)
class MemberEdits:
    """What centralized data poisoning and sanitization do to the members, derived from the config and
    the members alone (so every process, resume and re-audit derives the same): the positions
    poisoned (``poisoning.poisoned_positions``) and the positions ``defense.sanitize`` removes, judged
    on the members as poisoned; None where that step is off."""

    poisoned: np.ndarray | None
    sanitized: np.ndarray | None

    @classmethod
    def of(cls, cfg: Config, data: SplitData, recorded: Path | None = None) -> MemberEdits:
        """The edits of ``cfg`` on ``data``; with ``recorded``, a run directory whose ``sanitized.json``
        holds them (a resume or re-audit), the removed positions are read back, not derived again.
        In a torch.distributed job every rank calls this together: rank 0 derives the removed
        positions and broadcasts them, so all ranks drop the same records even where training the
        preliminary model is not bitwise reproducible (CUDA)."""
        poisoned = poisoned_positions(cfg, data.members.tensors[1]) if poisons_members(cfg) else None
        if cfg.defense.sanitize == "none":
            return cls(poisoned, None)
        if recorded is not None:
            return cls(poisoned, recorded_sanitized(recorded))
        sanitized = None
        if ranks.is_main():
            members = data.members if poisoned is None else poison_members(cfg, data.members, data.num_classes, poisoned)
            sanitized = sanitized_positions(
                cfg, members, input_shape=data.input_shape, num_classes=data.num_classes, units=data.units
            )
        return cls(poisoned, ranks.broadcast_object(sanitized))

    def left_out(self) -> np.ndarray | None:
        """The positions the audit leaves out (poisoned or removed), None when nothing is edited."""
        parts = [p for p in (self.poisoned, self.sanitized) if p is not None and len(p)]
        return np.union1d(*parts) if len(parts) == 2 else parts[0] if parts else None


def training_set(
    cfg: Config,
    data: SplitData,
    canaries: Canaries | None,
    poisoned: np.ndarray | None = None,
    sanitized: np.ndarray | None = None,
    watermark: TriggerSet | None = None,
) -> TensorDataset:
    """The records this process trains on: members (those at ``poisoned`` positions poisoned,
    ``poison_members``, those at ``sanitized`` positions removed), included canaries and the ``watermark``
    keys (never under robust data parallelism, which validation refuses with a watermark), or under
    robust data parallelism its shard of them and the included canaries of its slot
    (``canary_ranks``), poisoned when this rank plays a data-poisoning attacker."""
    records = data.members
    if poisoned is not None:
        records = poison_members(cfg, records, data.num_classes, poisoned)
    if sanitized is not None:
        records = subset(records, np.setdiff1d(np.arange(len(records)), sanitized))
    included = np.zeros(0, dtype=bool) if canaries is None else canaries.included
    robust = parallel_mode(cfg) == "robust"
    if robust:
        rank, world = ranks.rank(), ranks.world_size()
        byzantine = byzantine_ranks(cfg.attack.byzantine, world, cfg.train.seed)
        records = subset(records, shard_positions(len(records), rank, world))
        included = included & (canary_ranks(len(included), world, byzantine) == rank)
    if included.any():
        inserted = canaries.dataset(data.population.tensors[0], data.split.population)
        keep = torch.from_numpy(included)
        records = TensorDataset(*(torch.cat([a, b[keep]]) for a, b in zip(records.tensors, inserted.tensors)))
    if watermark is not None:
        keys = (watermark.inputs, watermark.labels)
        records = TensorDataset(*(torch.cat([a, b]) for a, b in zip(records.tensors, keys)))
    if not robust:
        return records
    attack = build_attack(cfg.attack, derived_seed(cfg.train.seed, Stream.POISON))
    if attack.poison is not None and rank in byzantine:
        records = TensorDataset(*attack.poison(*records.tensors, data.num_classes))
    return records


def watermark_keys(cfg: Config, data: SplitData) -> TriggerSet | None:
    """The run's watermark key set (``train.watermark``), drawn from ``train.seed``; None when off."""
    if not cfg.train.watermark.enabled:
        return None
    return draw_trigger_set(cfg.train.watermark.count, data.units, data.num_classes, cfg.train.seed)


def audited_data(cfg: Config, data: SplitData, world: int, edits: MemberEdits) -> SplitData:
    """The split the membership audit sees: the recorded split; under robust data parallelism over
    ``world`` ranks the honest ranks' shards (``honest_positions``); under centralized data poisoning
    or sanitization (``edits``) the members left clean and not removed. Those are the records
    trained on exactly as the audit holds them (a poisoned copy would be told from non-members by its
    trigger, not by what the model learned); as many label-stratified non-members go beside them
    (``audited_split``, seeded by audit.seed). Derivable from the config alone."""
    left_out = edits.left_out()
    if left_out is not None:
        trained = np.setdiff1d(np.arange(len(data.members)), left_out)
    elif parallel_mode(cfg, world) == "robust":
        trained = honest_positions(len(data.members), world, byzantine_ranks(cfg.attack.byzantine, world, cfg.train.seed))
    else:
        return data
    return audited_split(data, trained, derived_seed(cfg.audit.seed, Stream.AUDIT))


def train_target(
    cfg: Config, run_dir: Path, plan: PrivacyPlan, tb: TensorBoardLog, checkpoint: Checkpoint | None
) -> TargetRun:
    """Load the data, train the target model under ``plan`` and write ``split.json``, ``model.pt`` and ``metrics.json``
    (and ``poisoned.json`` under centralized data poisoning, ``dptrain.training.poisoning``).

    With a ``checkpoint`` the run continues on the split recorded in
    ``run_dir``. Reported accuracies are on members and test records only:
    canaries are mislabelled on purpose and would distort them. Members count with their
    clean labels, poisoned or not: the accuracies are the main task's. A run on a proxy trains on it
    instead (``train_proxy_target``).
    """
    data, canaries, fingerprint = load_data(cfg, run_dir, reuse_split=checkpoint is not None)
    if cfg.train.proxy != "none":
        return train_proxy_target(cfg, run_dir, plan, tb, data, fingerprint)
    edits = MemberEdits.of(cfg, data, recorded=None if checkpoint is None else run_dir)
    poisoned, sanitized = edits.poisoned, edits.sanitized
    if poisoned is not None and ranks.is_main():
        record_poisoned(run_dir, cfg, poisoned)
    if sanitized is not None and ranks.is_main():
        record_sanitized(run_dir, cfg, sanitized)
    detected = None if sanitized is None or poisoned is None else detection(sanitized, poisoned)
    keys = watermark_keys(cfg, data)
    if keys is not None and ranks.is_main():
        keys.save(run_dir)
    records = training_set(cfg, data, canaries, poisoned, sanitized, keys)
    trained = train_model(
        cfg,
        records,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        plan=plan,
        eval_set=data.test,
        tb=tb,
        run_dir=run_dir,
        checkpoint=checkpoint,
        data_parallel=True,
        units=data.units,
    )
    device = resolve_device(cfg.train.device)
    audited = audited_data(cfg, data, ranks.world_size(), edits)
    epsilon_pld = independent_epsilon(cfg, trained.epsilon, [trained.mechanisms], plan.delta)
    metrics = run_metrics(
        trained.model,
        plan,
        trained.epsilon,
        epsilon_pld,
        data,
        audited,
        device,
        train_seconds=trained.train_seconds,
        wall_seconds=trained.wall_seconds,
        replaced_modules=trained.replaced_modules,
        threads=trained.threads,
        grad_sample=trained.grad_sample,
        centralized=CentralizedMetrics(
            epochs=cfg.train.epochs,
            canaries_included=0 if canaries is None else int(canaries.included.sum()),
            world_size=ranks.world_size(),
            parallel_mode=parallel_mode(cfg),
            poisoned=0 if poisoned is None else len(poisoned),
            backdoor_success_rate=None
            if poisoned is None or cfg.attack.name != "backdoor"
            else backdoor_success_rate(trained.model, data.test, poisoning_attack(cfg), cfg.attack.target_label, device),
            poisoned_class_accuracy=poisoned_class_accuracy(trained.model, data.test, cfg.attack.source_label, device)
            if poisoned is not None and targets_class(cfg.attack)
            else None,
            sanitized=0 if sanitized is None else len(sanitized),
            sanitize_precision=None if detected is None else detected[0],
            sanitize_recall=None if detected is None else detected[1],
            watermark=None if keys is None else watermark_test(agreement(trained.model, keys, device), keys).record(),
            pretrain=pretrain_record(cfg, data.split.sizes.population, len(records)),
        ),
    )
    if ranks.is_main():
        save_model(run_dir, trained.model.state_dict())
        write_metrics(run_dir, metrics.to_dict())
    return TargetRun(trained.model, audited, plan, plan, trained.epsilon, canaries, metrics, device, fingerprint)


def load_target(cfg: Config, run_dir: Path) -> TargetRun:
    """A finished run's target model, data (its recorded split) and plan, read back from its artifacts."""
    metrics = RunMetrics.from_dict(read_metrics(run_dir))
    data, canaries, fingerprint = load_data(cfg, run_dir, reuse_split=True)
    device = resolve_device(cfg.train.device)
    plan = PrivacyPlan(
        private=metrics.private,
        accountant=cfg.privacy.accountant,
        delta=cfg.privacy.delta,
        target_epsilon=metrics.target_epsilon,
        noise_multiplier=metrics.noise_multiplier,
        max_grad_norm=metrics.max_grad_norm,
        sample_rate=metrics.sample_rate,
        steps_per_epoch=metrics.steps // metrics.centralized.epochs,
        steps=metrics.steps,
        planned_epsilon=metrics.epsilon,
    )
    audited = audited_data(cfg, data, metrics.centralized.world_size, MemberEdits.of(cfg, data, recorded=run_dir))
    model = trained_model(cfg, run_dir, data, device)
    return TargetRun(model, audited, plan, plan, metrics.epsilon, canaries, metrics, device, fingerprint)


def reference_config(cfg: Config, plan: PrivacyPlan, seed: int) -> Config:
    """The target's recipe for a reference model, with another seed: same model, batch, epochs and
    clipping, and the target's noise multiplier (not re-calibrated to the reference data's size), so
    each step is the mechanism the target ran."""
    derived = reference_base(cfg, seed)
    if plan.private:
        derived.privacy.noise_multiplier = plan.noise_multiplier
        derived.privacy.target_epsilon = None
    return derived


def train_reference(
    cfg: Config, plan: PrivacyPlan | None, records: TensorDataset, *, input_shape, num_classes: int,
    device: torch.device,
) -> nn.Module:
    """A reference model: ``train_model`` on ``records`` (its own plan, at ``cfg``'s fixed noise). Its
    epsilon is never reported, so it is not accounted (``accounted=False``): a default-job reference
    model took 0.67 s with its accounting, 0.30 s without (one thread)."""
    return train_model(cfg, records, input_shape=input_shape, num_classes=num_classes, accounted=False).model
