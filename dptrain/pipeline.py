"""A run as one straight pipeline: config -> data -> model -> privacy -> train -> evaluate -> audit -> artifacts.

Each stage is a function of the previous stage's output; this module only
sequences them and writes what spans stages (audit.json, HParams, manifest).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from dptrain.config import Config, recipe_hash, validate
from dptrain.tracking.artifacts import AUDIT, recorded_overrides, write_manifest
from dptrain.tracking.atomic import write_json_atomic
from dptrain.tracking.tensorboard import TensorBoardLog
from dptrain.training import centralized, federated, ranks
from dptrain.training.centralized import TargetRun, flat_config
from dptrain.training.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def _recipe(cfg: Config):
    """The training recipe module for ``cfg``: each has ``plan(cfg, sizes)``, ``train_target(...)``,
    ``load_target(cfg, run_dir)`` and ``resumed_step(plan, checkpoint)``."""
    return federated if cfg.federation.name == "fedavg" else centralized


def audit_target(cfg: Config, target: TargetRun, run_dir: Path, tb: TensorBoardLog | None) -> dict | None:
    """Run the audit stage on a trained target and write ``audit.json``.

    Returns None for ``audit=none`` and on ranks other than 0, which only help
    train reference models.
    """
    if cfg.audit.name == "none":
        return None
    from dptrain.audit.run import AuditTarget, run_audit

    report = run_audit(
        AuditTarget(cfg, target.model, target.data, target.plan, target.epsilon, target.canaries, target.device),
        run_dir,
        tb,
    )
    if report is not None:
        write_json_atomic(run_dir / AUDIT, report)
    return report


def _hparams(cfg: Config, run_dir: Path, tb: TensorBoardLog, metrics: dict, report: dict | None) -> None:
    from dptrain.audit.run import audit_scalars

    final = {
        "hparams/test_accuracy": metrics["test_accuracy"],
        "hparams/train_accuracy": metrics["train_accuracy"],
        "hparams/epsilon": metrics["epsilon"],
    }
    if report is not None:
        final.update({f"hparams/{tag}": value for tag, value in audit_scalars(report).items()})
    # The overrides Hydra recorded in the run directory label the run's row in the HParams dashboard as
    # they label it in `dptrain report`; a resumed or re-audited run keeps the ones it started with.
    overrides = " ".join(recorded_overrides(run_dir))
    tb.hparams({"overrides": overrides, **flat_config(cfg)}, final)


def train(cfg: Config, run_dir: str | Path) -> tuple[dict, dict | None]:
    """Train and audit the run ``cfg`` describes in ``run_dir``; return ``metrics.json`` and ``audit.json``.

    Validation and the privacy plan (noise calibration included) run before
    any data is loaded. With ``cfg.train.resume`` the run continues from
    ``run_dir``'s checkpoint with its accountant restored.
    """
    started = datetime.now(timezone.utc)
    run_dir = Path(run_dir)
    info, sizes = validate(cfg)
    recipe = _recipe(cfg)
    plan = recipe.plan(cfg, sizes)
    log.info("%s: %s", info.name, sizes)
    log.info("privacy plan: %s", plan)
    checkpoint = Checkpoint.load(run_dir, recipe_hash(cfg)) if cfg.train.resume is not None else None
    # Events a crashed run logged after its last checkpoint are dropped on resume.
    purge_step = recipe.resumed_step(plan, checkpoint) if checkpoint else None
    # In a multi-process run every rank trains; only rank 0 writes artifacts and TensorBoard.
    main = ranks.is_main()
    tb = TensorBoardLog(run_dir, purge_step=purge_step) if main else None
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
            seeds={"train": cfg.train.seed, "dataset": cfg.dataset.seed, "audit": cfg.audit.seed},
            started_at=started.isoformat(),
            finished_at=datetime.now(timezone.utc).isoformat(),
            resumed=checkpoint is not None,
            world_size=ranks.world_size(),
        )
    return target.metrics, report


def audit(cfg: Config, run_dir: str | Path) -> dict:
    """Audit a finished run again with ``cfg.audit``, from its saved model and recorded split.

    Precondition: ``cfg`` is the run's own config with only ``audit`` changed
    (canaries come from the training config: they had to be inserted before
    training). Reference models cached in the run directory are reused.
    """
    run_dir = Path(run_dir)
    validate(cfg)
    target = _recipe(cfg).load_target(cfg, run_dir)
    tb = TensorBoardLog(run_dir)
    try:
        report = audit_target(cfg, target, run_dir, tb)
        _hparams(cfg, run_dir, tb, target.metrics, report)
    finally:
        tb.close()
    return report
