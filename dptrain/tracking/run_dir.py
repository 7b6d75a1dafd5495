"""The run directory as something one process owns: a fresh name for time-stamped runs, an exclusive
lock while a process writes it, no new run on top of a started one, and owner-only permissions."""

from __future__ import annotations

import fcntl
import os
import shutil
from itertools import count
from pathlib import Path

from dptrain.errors import UserError
from dptrain.tracking.artifacts import CHECKPOINT, HYDRA_DIR, METRICS, SPLIT
from dptrain.tracking.atomic import process_umask

LOCK = ".lock"
# Files a started run leaves: a second run writing beside them would mix two runs' artifacts.
STARTED_RUN = (METRICS, CHECKPOINT, SPLIT)
# What Hydra writes into a run directory before dptrain does (.hydra/, the job's log) and the lock.
HYDRA_RECORD = {HYDRA_DIR, "train.log", LOCK}
# DPTRAIN_PRIVATE_ARTIFACTS=0 keeps the user's umask for run directories (e.g. a group-shared project).
PRIVATE_ARTIFACTS = "DPTRAIN_PRIVATE_ARTIFACTS"


def claim_fresh(path: str | Path) -> Path:
    """Create and return ``path``, or else the first of ``path-1``, ``path-2``, ... that did not exist.

    ``mkdir`` of an existing name fails atomically, so processes started in the same second from
    the same time-stamped name each get a directory of their own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in count():
        candidate = path if suffix == 0 else path.with_name(f"{path.name}-{suffix}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``, held while this process writes the run directory.

    The kernel releases it when the process ends, however it ends (SIGKILL included), so a stale
    lock never blocks a later run; the file holds the holder's pid for the refusal message.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        path = self.run_dir / LOCK
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self._fd, 32).decode("ascii", "replace").strip()
            os.close(self._fd)
            raise UserError(
                f"{self.run_dir} is being written by another dptrain process{f' (pid {holder})' if holder else ''}: "
                "wait for it to end, or use another directory"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode("ascii"))

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def refuse_started_run(run_dir: str | Path) -> None:
    """Raise a UserError when ``run_dir`` already holds a run, naming the directory and the way forward."""
    run_dir = Path(run_dir)
    found = [name for name in STARTED_RUN if (run_dir / name).exists()]
    if not found:
        return
    if (run_dir / CHECKPOINT).exists() and not (run_dir / METRICS).exists():
        fix = f"continue it with dptrain train train.resume={run_dir}, or write this run elsewhere"
    else:
        fix = "write this run elsewhere (drop hydra.run.dir for a fresh directory) or remove it first"
    raise UserError(f"{run_dir} already holds a run ({', '.join(found)}): {fix}")


def resume_hint(run_dir: str | Path) -> str:
    """How to go on after ``run_dir``'s run stopped: resume when it left a checkpoint, else start again."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT).is_file():
        return f"continue from the last checkpoint with: dptrain train train.resume={run_dir}"
    again = f"{run_dir} holds no checkpoint to resume from: start the run again"
    if any((run_dir / name).exists() for name in STARTED_RUN):
        return f"{again} in another directory (or remove {run_dir} first)"
    return again


def discard_if_unstarted(run_dir: str | Path) -> bool:
    """Remove ``run_dir`` when it holds nothing but Hydra's record of the run; return whether it did.

    A run refused after Hydra made its directory would otherwise leave a directory that
    ``dptrain report`` lists as an incomplete run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not {entry.name for entry in run_dir.iterdir()} <= HYDRA_RECORD:
        return False
    shutil.rmtree(run_dir)
    return True


def private_artifacts() -> bool:
    """Whether run directories are owner-only (the default); ``DPTRAIN_PRIVATE_ARTIFACTS=0`` turns it off."""
    return os.environ.get(PRIVATE_ARTIFACTS, "1") != "0"


def restrict_umask() -> None:
    """Make what this process creates from now on owner-only (directories 0700, files 0600).

    A run directory holds ``split.json``, the member indices, which is what DP protects, and a model
    that an attacker with file access could audit as well as we do. Called once by the CLI before
    Hydra or any thread creates a file; inherited by worker processes.
    """
    if private_artifacts():
        os.umask((process_umask() or 0) | 0o077)
