"""The centralized recipe, top to bottom: config -> data -> model -> privacy -> train -> evaluate -> artifacts."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from dptrain.config import Config, recipe_hash, validate
from dptrain.data import Split, load, make_split, prepare
from dptrain.privacy import plan_privacy
from dptrain.tracking.artifacts import save_model, write_manifest, write_metrics
from dptrain.tracking.tensorboard import TensorBoardLog
from dptrain.training.checkpoint import Checkpoint
from dptrain.training.loop import evaluate
from dptrain.training.recipe import resolve_device, train_model

log = logging.getLogger(__name__)

SPLIT = "split.json"


def flat_config(cfg: Config) -> dict:
    """The config as ``{"group.key": value}``, the form HParams and reports use."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    flat: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", container)
    return flat


def run(cfg: Config, run_dir: str | Path) -> dict:
    """Train the target model of ``cfg`` and write the run's artifacts into ``run_dir``; return ``metrics.json``'s content.

    With ``cfg.train.resume`` the run continues from ``run_dir``'s checkpoint
    on the split recorded there, with its accountant restored.
    """
    started = datetime.now(timezone.utc)
    run_dir = Path(run_dir)
    info, sizes = validate(cfg)
    plan = plan_privacy(cfg.privacy, members=sizes.members, batch_size=cfg.train.batch_size, epochs=cfg.train.epochs)
    log.info("%s: %s", info.name, sizes)
    log.info("privacy plan: %s", plan)

    data = load(cfg.dataset)
    resume = cfg.train.resume is not None
    if resume:
        split = Split.load(run_dir / SPLIT, expected_fingerprint=data.fingerprint)
    else:
        split = make_split(data, cfg.dataset)
        split.save(run_dir / SPLIT)
    prepared = prepare(data, split)

    checkpoint = Checkpoint.load(run_dir, recipe_hash(cfg)) if resume else None
    # Events a crashed run logged after its last checkpoint are dropped on resume.
    purge_step = checkpoint.epochs_done * plan.steps_per_epoch + 1 if checkpoint else None
    tb = TensorBoardLog(run_dir, purge_step=purge_step)
    trained = train_model(
        cfg,
        prepared.members,
        input_shape=prepared.input_shape,
        num_classes=prepared.num_classes,
        plan=plan,
        eval_set=prepared.test,
        tb=tb,
        run_dir=run_dir,
        checkpoint=checkpoint,
    )
    device = resolve_device(cfg.train.device)
    train_loss, train_accuracy = evaluate(trained.model, prepared.members, device)
    test_loss, test_accuracy = evaluate(trained.model, prepared.test, device)
    metrics = {
        "test_accuracy": test_accuracy,
        "train_accuracy": train_accuracy,
        "test_loss": test_loss,
        "train_loss": train_loss,
        "epsilon": trained.epsilon,
        "delta": plan.delta if plan.private else None,
        "target_epsilon": plan.target_epsilon,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": trained.steps,
        "epochs": cfg.train.epochs,
        "accountant": plan.accountant if plan.private else None,
        "max_grad_norm": plan.max_grad_norm,
        "private": plan.private,
        "members": sizes.members,
        "non_members": sizes.non_members,
        "population": sizes.population,
        "test_size": sizes.test,
        "train_seconds": trained.train_seconds,
        "replaced_modules": trained.replaced_modules,
    }
    save_model(run_dir, trained.model.state_dict())
    write_metrics(run_dir, metrics)
    write_manifest(
        run_dir,
        config_hash=recipe_hash(cfg),
        data_fingerprint=data.fingerprint,
        seeds={"train": cfg.train.seed, "dataset": cfg.dataset.seed},
        started_at=started.isoformat(),
        finished_at=datetime.now(timezone.utc).isoformat(),
        resumed=resume,
        world_size=1,
    )
    tb.hparams(
        flat_config(cfg),
        {
            "hparams/test_accuracy": test_accuracy,
            "hparams/train_accuracy": train_accuracy,
            "hparams/epsilon": trained.epsilon,
        },
    )
    tb.close()
    return metrics
