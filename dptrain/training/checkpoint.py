"""Per-epoch checkpoints: model, optimizer, scheduler, accountant and RNG state, so a resumed run spends no fresh budget."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dptrain.errors import UserError
from dptrain.tracking.atomic import save_torch_atomic

CHECKPOINT = "checkpoint.pt"


@dataclass
class Checkpoint:
    """State after ``epochs_done`` complete epochs.

    ``accountant`` is Opacus' accountant state (its history of noise, sample
    rate and steps); restoring it is what keeps a resumed run from starting a
    fresh budget. ``rng`` holds the global torch RNG and the sampling and
    noise generators (centralized: a list with one entry per rank; federated:
    the server's), so the resumed epochs draw what the uninterrupted run would.
    ``train_seconds`` and ``wall_seconds`` are the time spent so far in optimizer
    steps (rounds) and in the whole loop; the wall clock defaults to 0 for a
    checkpoint written before it was recorded.
    """

    epochs_done: int
    config_hash: str
    model: dict
    optimizer: dict
    scheduler: dict | None
    accountant: dict | None
    rng: list | dict
    train_seconds: float
    wall_seconds: float = 0.0

    def save(self, run_dir: str | Path) -> Path:
        return save_torch_atomic(Path(run_dir) / CHECKPOINT, asdict(self))

    @classmethod
    def load(cls, run_dir: str | Path, config_hash: str) -> Checkpoint:
        """Load ``<run_dir>/checkpoint.pt``; precondition: it was written by a run of the same recipe."""
        path = Path(run_dir) / CHECKPOINT
        if not path.is_file():
            raise UserError(f"train.resume={run_dir} holds no {CHECKPOINT}: give the directory of the run to continue")
        # weights_only: a checkpoint is tensors and plain containers, so no pickle code runs on load.
        checkpoint = cls(**torch.load(path, map_location="cpu", weights_only=True))
        if checkpoint.config_hash != config_hash:
            raise UserError(
                f"train.resume={run_dir}: the checkpoint was written by a different config; "
                "resume with the config the run was started with (its .hydra/config.yaml)"
            )
        return checkpoint
