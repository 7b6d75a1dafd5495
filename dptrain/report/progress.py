"""Overall progress of a Hydra sweep ("job k of n"), as the Hydra callback ``conf/config.yaml`` registers."""

from __future__ import annotations

import logging
import time
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger("dptrain.sweep")

BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__qualname__}"


def sweep_points(config: DictConfig) -> list[list[str]] | None:
    """The overrides of each job Hydra's basic sweeper launches for the multirun ``config``, in job order,
    or None when unknown.

    The arguments are the basic sweeper's (``BasicSweeper.sweep``): ``hydra.sweeper.params`` (what
    ``conf/experiment/`` recipes set) as ``key=value``, then the command-line overrides; its own
    ``split_arguments`` keeps the last value per key and batches the cartesian product of the sweeps.
    None where that raises: a non-discrete sweep (``interval``), or ``glob``, which expands against the
    config groups and so needs Hydra's config loader. Other sweepers (Optuna, Nevergrad) decide their
    jobs as they go: None.
    """
    if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    try:
        batches = BasicSweeper.split_arguments(overrides, None)
    except HydraException:
        return None
    return [list(job) for batch in batches for job in batch]


def sweep_jobs(config: DictConfig) -> int | None:
    """The number of jobs of the multirun ``config`` (``sweep_points``), or None when unknown."""
    points = sweep_points(config)
    return None if points is None else len(points)


class SweepProgress(Callback):
    """Logs "sweep job k of n" when each job of a multirun starts and ends, and the report and TensorBoard
    commands at the end.

    Hydra builds this object once in the launching process; launchers that run jobs elsewhere
    (joblib's worker processes, submitit's cluster jobs) receive a pickled copy made after
    ``on_multirun_start``, so every job knows the sweep size. Single runs log nothing.
    """

    def __init__(self) -> None:
        self.total: int | None = None
        self.job_started = 0.0

    def _job(self, config: DictConfig) -> str:
        return f"sweep job {config.hydra.job.num + 1} of {self.total or '?'}"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.total = sweep_jobs(config)
        log.info("sweep of %s jobs into %s", self.total or "an unknown number of", config.hydra.sweep.dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        self.job_started = time.perf_counter()
        log.info("%s: %s", self._job(config), " ".join(config.hydra.overrides.task))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        seconds = time.perf_counter() - self.job_started
        if job_return.status == JobStatus.FAILED:
            log.error("%s failed after %.1f s", self._job(config), seconds)
        else:
            log.info("%s finished in %.1f s", self._job(config), seconds)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        log.info(
            "sweep finished; table and figures: dptrain report %s; TensorBoard: tensorboard --logdir %s",
            config.hydra.sweep.dir,
            config.hydra.sweep.dir,
        )
