"""The federated recipe on the Flower engine (``federation.engine=flower``): the builtin recipe's plan,
artifacts and reference models, with the target's clients trained by Flower ClientApps.

The pipeline picks it for the target; the audit's reference models train in process by the builtin
recipe (``training.recipes.recipe_for``), which computes the same rounds as the Flower engine (same
partition, Byzantine clients, local updates and aggregates; tests/test_flower.py), so they imitate the
target's mechanism exactly.
"""

from __future__ import annotations

from pathlib import Path

from dptrain.config import Config
from dptrain.tracking.tensorboard import TensorBoardLog
from dptrain.training.checkpoint import Checkpoint
from dptrain.training.federated import (
    FederatedPlan,
    load_target,
    plan,
    reference_config,
    resumed_step,
    train_reference,
)
from dptrain.training.target import TargetRun

# The Recipe interface (training.recipes): all but train_target are the builtin engine's.
__all__ = ["load_target", "plan", "reference_config", "resumed_step", "train_reference", "train_target"]


def train_target(
    cfg: Config, run_dir: Path, planned: FederatedPlan, tb: TensorBoardLog, checkpoint: Checkpoint | None
) -> TargetRun:
    """``federated.train_target`` with every round's clients trained by Flower ClientApps, under the
    Simulation Engine or a deployed app's SuperLink (``dptrain.flower.engine.train_on_flower``)."""
    from dptrain.flower.engine import train_on_flower

    return train_on_flower(cfg, run_dir, planned, tb, checkpoint)
