"""What ``dptrain train`` settles before Hydra writes anything (the Hydra callback ``conf/config.yaml``
registers): every job of a sweep validated, the run or sweep directory fresh or free, locked, owner-only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from dptrain.errors import config_error_line
from dptrain.validation import validate
from dptrain.errors import UserError, fail
from dptrain.report.progress import sweep_points
from dptrain.tracking.run_dir import RunLock, claim_fresh, discard_if_unstarted, refuse_started_run, restrict_umask

MULTIRUN = "multirun.yaml"


def _quoted(value: str) -> str:
    """``value`` as a quoted string of Hydra's override grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _refusal(error: UserError | OSError) -> str:
    if isinstance(error, OSError):
        return f"cannot write the run directory: {error.strerror}: {error.filename}"
    return str(error)


def _label(point: list[str], varying: set[str]) -> str:
    return " ".join(o for o in point if o.split("=", 1)[0] in varying) or " ".join(point)


def validate_sweep(config: DictConfig) -> None:
    """Validate every job of the multirun ``config`` before the first one starts; a UserError names the bad ones.

    Each job's config is composed as Hydra's launcher will compose it (``load_sweep_config``: the
    sweep's Hydra overrides plus the job's). Sweeps whose jobs are not known in advance (Optuna,
    ``interval``) are validated job by job, as they start.
    """
    points = sweep_points(config)
    if points is None:
        return
    loader = GlobalHydra.instance().config_loader()
    failures = []
    for number, point in enumerate(points):
        try:
            validate(loader.load_sweep_config(config, point))
        except UserError as error:
            failures.append((number, point, str(error)))
        except (HydraException, OmegaConfBaseException) as error:
            failures.append((number, point, config_error_line(error)))
    if not failures:
        return
    values: dict[str, set[str]] = {}
    for point in points:
        for override in point:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    varying = {key for key, seen in values.items() if len(seen) > 1}
    total = len(points)
    if len(failures) == 1:
        number, point, error = failures[0]
        label = _label(point, varying)
        raise UserError(f"sweep job {number + 1} of {total} ({label}) is invalid, so no job ran: {error}")
    # Jobs that fail for the same reason are listed together; one job is named by its swept values.
    by_error: dict[str, list[tuple[int, list[str]]]] = {}
    for number, point, error in failures:
        by_error.setdefault(error, []).append((number, point))
    listed = "; ".join(
        f"job {jobs[0][0] + 1} ({_label(jobs[0][1], varying)}): {error}"
        if len(jobs) == 1
        else f"jobs {', '.join(str(number + 1) for number, _ in jobs)}: {error}"
        for error, jobs in by_error.items()
    )
    raise UserError(f"{len(failures)} of {total} sweep jobs are invalid, so no job ran: {listed}")


# Run directories this process made; a run refused in one of them may remove it again (only these:
# never a directory the user made or one being resumed).
_made: set[Path] = set()


def discard_refused_run(run_dir: str | Path) -> None:
    """Remove ``run_dir`` after its run was refused, if this process made it and it holds nothing but
    Hydra's record: a directory that ``dptrain report`` would otherwise list as an incomplete run."""
    if Path(run_dir).resolve() in _made:
        discard_if_unstarted(run_dir)


class Preflight(Callback):
    """Validates the config, then claims and locks the directory a run or a sweep writes.

    A directory named by an interpolation (the default ``outputs/${now:...}``) is made unique with
    a suffix (``claim_fresh``); a literal one (``hydra.run.dir=...``) is used as given unless another
    process holds its lock or it holds a started run (then only ``train.resume`` may write it). The
    lock is held until the run ends; the process umask is made owner-only first (``restrict_umask``).
    Hydra turns an exception in a callback into a warning and carries on, so a refusal here prints
    its one line and exits (status 2) itself.
    """

    def __init__(self) -> None:
        self.lock: RunLock | None = None

    def _let_go(self) -> None:
        if self.lock is not None:
            discard_refused_run(self.lock.run_dir)
            self.lock.release()
            self.lock = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._start_run(config)
        except (UserError, OSError) as error:
            self._let_go()
            fail(_refusal(error))

    def _start_run(self, config: DictConfig) -> None:
        restrict_umask()
        if config.train.resume is not None:
            run_dir = Path(config.train.resume)
            if not run_dir.is_dir():
                raise UserError(f"train.resume={run_dir} is not a directory: give the directory of the run to continue")
            self.lock = RunLock(run_dir)
            return
        if OmegaConf.is_interpolation(config.hydra.run, "dir"):
            validate(config)
            run_dir = claim_fresh(config.hydra.run.dir)
            _made.add(run_dir.resolve())
            with read_write(config.hydra.run):
                config.hydra.run.dir = str(run_dir)
            self.lock = RunLock(run_dir)
            return
        # A named directory: a busy or finished one is refused at once, before the slower validation.
        run_dir = Path(config.hydra.run.dir)
        try:
            run_dir.mkdir(parents=True)
            _made.add(run_dir.resolve())
        except FileExistsError:
            pass
        self.lock = RunLock(run_dir)
        refuse_started_run(run_dir)
        validate(config)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._let_go()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._start_sweep(config)
        except (UserError, OSError) as error:
            self._let_go()
            fail(_refusal(error))

    def _start_sweep(self, config: DictConfig) -> None:
        restrict_umask()
        validate_sweep(config)
        if OmegaConf.is_interpolation(config.hydra.sweep, "dir"):
            sweep_dir = claim_fresh(config.hydra.sweep.dir)
            with read_write(config.hydra):
                config.hydra.sweep.dir = str(sweep_dir)
                # Each job's config is composed again from these overrides (Hydra's load_sweep_config).
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={_quoted(str(sweep_dir))}")
            self.lock = RunLock(sweep_dir)
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(sweep_dir)
        if (sweep_dir / MULTIRUN).exists():
            raise UserError(
                f"{sweep_dir} already holds a sweep ({MULTIRUN}): its jobs would be overwritten; "
                "give another hydra.sweep.dir or drop it for a fresh directory"
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._let_go()
