"""Checkpoints after every epoch or round: the model and the recipe's typed state (optimizer, ledgers, RNG),
so a resumed run spends no fresh budget and draws what the uninterrupted run would."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeVar

from dptrain.errors import UserError
from dptrain.tracking.artifacts import CHECKPOINT, read_torch
from dptrain.tracking.atomic import save_torch_atomic
from dptrain.tracking.run_dir import resume_hint


State = TypeVar("State")


@dataclass
class Checkpoint:
    """A run's state after ``completed`` epochs (centralized) or rounds (federated).

    ``state`` is the recipe's own typed state (``CentralizedState``, ``FederatedState``) as plain
    containers, read back with ``state_as``; ``recipe`` names it, so a checkpoint of one recipe is never
    read as the other's. It holds the privacy ledgers (restoring them is what keeps a resumed run from
    starting a fresh budget) and the RNG states, so the resumed run draws what the uninterrupted one
    would. ``train_seconds`` and ``wall_seconds`` are the time so far in optimizer steps (rounds) and in
    the whole loop.
    """

    completed: int
    config_hash: str
    model: dict
    recipe: str
    state: dict
    train_seconds: float
    wall_seconds: float

    def state_as(self, kind: type[State]) -> State:
        """``state`` as the recipe's dataclass ``kind``; a checkpoint of another recipe, or whose state
        lacks or adds fields, is refused with one line."""
        names = {field.name for field in fields(kind)}
        if self.recipe != kind.__name__ or not isinstance(self.state, dict) or set(self.state) != names:
            raise UserError(
                f"train.resume: the checkpoint holds {self.recipe} state, not {kind.__name__}: resume with the "
                "config the run was started with"
            )
        return kind(**self.state)

    @classmethod
    def of(cls, completed: int, config_hash: str, model: dict, state, train_seconds: float, wall_seconds: float):
        """A checkpoint of the recipe state ``state`` (a dataclass)."""
        return cls(completed, config_hash, model, type(state).__name__, asdict(state), train_seconds, wall_seconds)

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
