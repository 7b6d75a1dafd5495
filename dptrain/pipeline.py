"""A run as one straight pipeline: config -> data -> model -> privacy -> train -> evaluate -> audit -> artifacts.

Each stage is a function of the previous stage's output; this module only
sequences them and writes what spans stages (audit.json, HParams, manifest).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from dptrain.audit.results import AuditReport
from dptrain.config import NOT_IN_RECIPE, Config, flat_config, recipe_hash
from dptrain.data.registry import data_files
from dptrain.errors import UserError
from dptrain.tracking.artifacts import (
    audit_history,
    file_sha256,
    record_audit,
    recorded_overrides,
    update_manifest,
    write_manifest,
)
from dptrain.tracking.tensorboard import TensorBoardLog, training_layout
from dptrain.training import ranks
from dptrain.training.checkpoint import Checkpoint
from dptrain.training.metrics import RunMetrics
from dptrain.flower import recipe as flower_recipe
from dptrain.training.recipes import Recipe, recipe_for
from dptrain.training.target import TargetRun
from dptrain.training.threads import recorded_threads
from dptrain.validation import validate

log = logging.getLogger(__name__)

# Config keys every run's HParams record carries beside its own overrides: what runs are told apart by.
HPARAMS_KEYS = ("privacy.target_epsilon", "model.name", "dataset.name")
# A run's numbers under attack that the HParams record carries when its recipe has them (a centralized
# run only the backdoor's success rate).
ATTACK_METRICS = ("backdoor_success_rate", "poisoned_class_accuracy", "byzantine_selected_fraction")


def audit_target(
    cfg: Config, target: TargetRun, run_dir: Path, tb: TensorBoardLog | None, canaries_requested: int | None = None
) -> AuditReport | None:
    """Run the audit stage on a trained target and record it: ``audit.json`` (the latest audit) and
    ``audits/<UTC time>-<level>.json`` (the history, never overwritten). Its TensorBoard panels go
    at step n for the run's n-th audit.

    Returns None for ``audit=none`` and on ranks other than 0, which only help
    train reference models. The report's ``audit_seconds`` is this whole stage's wall time: the
    audit's imports (matplotlib, the first time in a process), its attacks and its TensorBoard panels.
    """
    if cfg.audit.name == "none":
        return None
    started = time.perf_counter()
    from dptrain.audit.run import AuditTarget, run_audit
    from dptrain.views.panels import draw_audit

    result = run_audit(AuditTarget(cfg, target), run_dir, canaries_requested=canaries_requested)
    if result is None:
        return None
    # The panels are drawn before the report is recorded so that its time includes them; they are the
    # step of the audit about to be recorded.
    if tb is not None:
        step = len(audit_history(run_dir)) + 1
        draw_audit(tb, result.report, result.scores, step=step, inversion_images=result.inversion_images)
    return record_audit(run_dir, dataclasses.replace(result.report, audit_seconds=time.perf_counter() - started))


def hparams_of(cfg: Config, run_dir: Path) -> dict:
    """The run's hyperparameters for HParams: ``HPARAMS_KEYS`` and every override Hydra recorded for the
    run, a config key with its typed value, a config group (``model=mlp``) with its option; overrides
    that leave the training recipe as it is (``train.progress``, ``train.device``, ...) are left out.

    In a sweep each run knows only its own overrides; the dashboard puts the keys whose values differ
    between runs first, so its table opens on what the sweep varied. The overrides are the run's own
    record: a resumed or re-audited run keeps those it was started with.
    """
    flat = flat_config(cfg)
    values = {key: flat[key] for key in HPARAMS_KEYS}
    for override in recorded_overrides(run_dir):
        key, _, text = override.partition("=")
        key = key.lstrip("+~")
        if key not in NOT_IN_RECIPE:
            values[key] = flat.get(key, text)
    return values


def _hparams(cfg: Config, run_dir: Path, tb: TensorBoardLog, metrics: RunMetrics, report: AuditReport | None) -> None:
    """Write the run's HParams record; after the n-th audit at step n, so the latest audit's metrics are
    the ones the dashboard shows (step 0: a run not audited yet)."""
    from dptrain.views.panels import headline_metrics

    recipe = metrics.federation or metrics.centralized
    final = {
        "accuracy/test": metrics.test_accuracy,
        "accuracy/train": metrics.train_accuracy,
        "epsilon": metrics.epsilon,
        **{key: getattr(recipe, key, None) for key in ATTACK_METRICS},
    }
    history = audit_history(run_dir)
    # What an earlier audit measured and the latest did not (RMIA after a re-audit with audit=fast) is
    # NaN: the dashboard shows each metric's last value, so it would show the earlier audit's beside the latest's.
    for earlier in history[:-1]:
        recorded = AuditReport.from_dict(json.loads((run_dir / earlier).read_text()))
        final.update(dict.fromkeys(headline_metrics(recorded), math.nan))
    if report is not None:
        final.update(headline_metrics(report))
    tb.hparams(hparams_of(cfg, run_dir), final, step=len(history))


def _seeds(cfg: Config) -> dict:
    return {"train": cfg.train.seed, "dataset": cfg.dataset.seed, "audit": cfg.audit.seed}



def _training_recipe(cfg: Config) -> Recipe:
    """``recipe_for(cfg)``, but a federation on ``federation.engine=flower`` trains its target's clients as
    Flower ClientApps (``dptrain.flower.recipe``: the federated recipe with its own ``train_target``)."""
    if cfg.federation.name == "fedavg" and cfg.federation.engine == "flower":
        return flower_recipe
    return recipe_for(cfg)

def train(cfg: Config, run_dir: str | Path) -> tuple[RunMetrics, AuditReport | None]:
    """Train and audit the run ``cfg`` describes in ``run_dir``; return its metrics (``metrics.json``) and
    the audit's report (``audit.json``; None without an audit).

    Validation and the privacy plan (noise calibration included) run before
    any data is loaded. With ``cfg.train.resume`` the run continues from
    ``run_dir``'s checkpoint with its accountant restored.
    """
    started = datetime.now(timezone.utc)
    run_dir = Path(run_dir)
    info, sizes = validate(cfg)
    recipe = _training_recipe(cfg)
    plan = recipe.plan(cfg, sizes)
    log.info("%s: %s", info.name, sizes)
    log.info("plan: %s", plan)
    checkpoint = Checkpoint.load(run_dir, recipe_hash(cfg)) if cfg.train.resume is not None else None
    # Events a crashed run logged after its last checkpoint are dropped on resume.
    purge_step = recipe.resumed_step(plan, checkpoint) if checkpoint else None
    # In a multi-process run every rank trains; only rank 0 writes artifacts and TensorBoard.
    main = ranks.is_main()
    tb = TensorBoardLog(run_dir, purge_step=purge_step) if main else None
    if tb is not None:
        tb.layout(training_layout(federated=cfg.federation.name == "fedavg"))
    try:
        target = recipe.train_target(cfg, run_dir, plan, tb, checkpoint)
        report = audit_target(cfg, target, run_dir, tb)
        if main:
            _hparams(cfg, run_dir, tb, target.metrics, report)
    finally:
        if tb is not None:
            tb.close()
    if main:
        write_manifest(
            run_dir,
            config_hash=recipe_hash(cfg),
            data_fingerprint=target.fingerprint,
            data_files={str(path): file_sha256(path) for path in data_files(cfg.dataset)},
            seeds=_seeds(cfg),
            started_at=started.isoformat(),
            finished_at=datetime.now(timezone.utc).isoformat(),
            resumed=checkpoint is not None,
            world_size=ranks.world_size(),
        )
    return target.metrics, report


def _audit_config(cfg: Config, requested) -> Config:
    """``cfg`` with the audit config ``requested``, but the canaries and the seed that drew them from
    ``cfg``: canaries are inserted at training time."""
    trained = cfg.audit
    # Without inserted canaries the audit records why it has no canary bound (``run_audit``).
    if trained.canaries.count and requested.canaries.count != trained.canaries.count:
        log.warning(
            "canaries are inserted at training time: this run was trained with %d, the audit uses those",
            trained.canaries.count,
        )
    audited = copy.deepcopy(cfg)
    audited.audit = requested
    audited.audit.canaries = trained.canaries
    audited.audit.seed = trained.seed
    return audited


def audit(cfg: Config, run_dir: str | Path, requested=None) -> AuditReport:
    """Audit a finished run again, from its saved model and recorded split, with the audit config
    ``requested`` (default: the run's own); return the new audit's report (``audit.json``).

    ``cfg`` is the run's recorded config. The audit is kept beside the earlier ones
    (``audit_target``), the HParams record is brought up to it, and ``manifest.json`` gets the audit
    history and current digests; a run interrupted before its manifest was written gets one, so it
    is complete. Reference models cached in the run directory are reused.
    """
    run_dir = Path(run_dir)
    requested = cfg.audit if requested is None else requested
    if requested.name == "none":
        raise UserError("dptrain audit with audit=none runs no audit: choose audit=fast, standard or thorough")
    audited = _audit_config(cfg, requested)
    validate(audited)
    target = recipe_for(audited).load_target(audited, run_dir)
    # The audit's predictions run at the threads the run chose for its model (reference models too).
    torch.set_num_threads(recorded_threads(target.metrics.threads))
    tb = TensorBoardLog(run_dir)
    try:
        report = audit_target(audited, target, run_dir, tb, canaries_requested=requested.canaries.count)
        _hparams(cfg, run_dir, tb, target.metrics, report)
    finally:
        tb.close()
    update_manifest(
        run_dir,
        config_hash=recipe_hash(cfg),
        data_fingerprint=target.fingerprint,
        data_files={str(path): file_sha256(path) for path in data_files(cfg.dataset)},
        seeds=_seeds(cfg),
    )
    return report
