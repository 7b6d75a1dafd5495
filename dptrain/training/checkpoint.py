"""Per-epoch checkpoints: model, optimizer, scheduler, accountant and RNG state, so a resumed run spends no fresh budget."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from dptrain.errors import UserError
from dptrain.tracking.artifacts import CHECKPOINT, read_torch
from dptrain.tracking.atomic import save_torch_atomic
from dptrain.tracking.run_dir import resume_hint


@dataclass
class Checkpoint:
    """State after ``epochs_done`` complete epochs.

    ``accountant`` is the privacy ledger's state (its history of noise, sample
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
            raise UserError(resume_hint(run_dir))
        restore = "restore it from a copy of the run, or start the run again in a new directory"
        # A checkpoint is tensors and plain containers, so it loads with weights_only (no pickled code runs).
        state = read_torch(path, restore)
        names = {field.name for field in fields(cls)}
        if not isinstance(state, dict) or set(state) != names:
            raise UserError(f"{path} is not a dptrain checkpoint (it lacks or adds fields): {restore}")
        checkpoint = cls(**state)
        if checkpoint.config_hash != config_hash:
            raise UserError(
                f"train.resume={run_dir}: the checkpoint was written by a different config; "
                "resume with the config the run was started with (its .hydra/config.yaml)"
            )
        return checkpoint
