"""The training recipes the pipeline runs, behind one interface: ``recipe_for(cfg)`` is the centralized
recipe (one data holder, or several processes over its data) or the federated one (``federation=fedavg``;
on ``federation.engine=flower`` the pipeline trains the target's clients on Flower, ``dptrain.flower.recipe``,
while its reference models train here, on the builtin engine, which computes the same rounds)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, TypeVar

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.config import Config
from dptrain.data import SplitSizes
from dptrain.tracking.tensorboard import TensorBoardLog
from dptrain.training import centralized, federated
from dptrain.training.checkpoint import Checkpoint
from dptrain.training.target import TargetRun


# A recipe's plan: centralized, the PrivacyPlan itself; federated, a FederatedPlan that holds the
# reported guarantee beside the federation. Only the recipe that made a plan reads it.
RecipePlan = TypeVar("RecipePlan")


class Recipe(Protocol[RecipePlan]):
    """What a recipe offers the pipeline and the audit (each recipe is a module with these functions)."""

    def plan(self, cfg: Config, sizes: SplitSizes) -> RecipePlan:
        """The recipe's plan (the privacy plan and, federated, the federation), fixed before any data is loaded."""

    def train_target(
        self, cfg: Config, run_dir: Path, plan: RecipePlan, tb: TensorBoardLog | None, checkpoint: Checkpoint | None
    ) -> TargetRun:
        """Train the target under ``plan`` (continuing ``checkpoint``); write split.json, model.pt, metrics.json."""

    def load_target(self, cfg: Config, run_dir: Path) -> TargetRun:
        """A finished run's target, read back from its artifacts."""

    def resumed_step(self, plan: RecipePlan, checkpoint: Checkpoint) -> int:
        """The first TensorBoard step after ``checkpoint``."""

    def reference_config(self, cfg: Config, plan: RecipePlan, seed: int) -> Config:
        """The config of a reference model imitating the target's mechanism, with its own seed."""

    def train_reference(
        self, cfg: Config, plan: RecipePlan | None, records: TensorDataset, *, input_shape, num_classes: int,
        device: torch.device,
    ) -> nn.Module:
        """A reference model trained by the recipe's own loop on ``records`` under ``reference_config``'s ``cfg``."""


def recipe_for(cfg: Config) -> Recipe:
    """The recipe ``cfg`` describes."""
    return federated if cfg.federation.name == "fedavg" else centralized
