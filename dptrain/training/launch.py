"""Start the workers of a multi-process run: torch.distributed's elastic launcher from ``dptrain train``,
or join the process group an outside ``torchrun`` prepared."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from dptrain.config import Config
from dptrain.training import ranks
from dptrain.training.lifetime import end_with_parent
from dptrain.training.threads import core_share

log = logging.getLogger(__name__)

# A collective that waits longer than this for a dead peer fails instead of hanging; the
# launcher's monitor usually notices a dead worker within a second and stops the rest.
COLLECTIVE_TIMEOUT = timedelta(seconds=45)
# torch's loggers that report a failed worker with its traceback and the others' termination: details
# for the run's log, while the console gets dptrain's one line (WorkerFailed).
ELASTIC_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


# What every rank runs: (config, run directory) -> its result (the pipeline's: the run's metrics and
# audit report), picklable so that rank 0's reaches the caller.
Result = TypeVar("Result")
Job = Callable[[Config, Path], Result]


class WorkerFailed(RuntimeError):
    """A worker process died or raised; the message names the rank(s) and how they ended."""


@contextmanager
def process_group(backend: str) -> Iterator[None]:
    """Join the process group described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    name = ranks.backend(backend)
    if name == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=name, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _log_to(run_dir: str) -> None:
    """A spawned worker's logging: the console and the run's train.log, each line tagged with its rank."""
    tag = f"rank {os.environ.get('RANK', '?')}"
    logging.basicConfig(
        level=logging.INFO,
        format=LOG_FORMAT.replace("[%(name)s]", f"[{tag}][%(name)s]"),
        handlers=[logging.StreamHandler(), logging.FileHandler(Path(run_dir) / "train.log")],
        force=True,
    )
    logging.getLogger("opacus").setLevel(logging.WARNING)


def _worker(job: Job, config: dict, run_dir: str, launcher: int):
    """One rank of a ``launcher.nproc_per_node`` run (module-level so that spawn can pickle it, as it
    pickles ``job``, a module-level function, by name); it ends with the ``launcher`` process, which
    holds the run directory's lock."""
    end_with_parent(launcher)
    _log_to(run_dir)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), config)
    # The elastic launcher leaves every worker all cores' threads; each rank gets its share until its
    # training chooses (``train.threads``).
    torch.set_num_threads(core_share())
    with process_group(cfg.launcher.backend):
        metrics, report = job(cfg, run_dir)
    return (metrics, report) if ranks.is_main() else None


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a rendezvous or MASTER_PORT)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _failure_message(error: ChildFailedError, nproc: int) -> str:
    parts = []
    for rank, failure in sorted(error.failures.items()):
        killed = failure.exitcode < 0
        how = f"killed by signal {-failure.exitcode}" if killed else f"exit code {failure.exitcode}"
        # For a signal torch's message only repeats it ("Signal 9 (SIGKILL) received by PID ...").
        detail = failure.message if isinstance(failure.message, str) and not killed else ""
        parts.append(f"rank {rank} ({how}{': ' + detail.splitlines()[0] if detail else ''})")
    return f"worker {'; '.join(parts)} of {nproc} failed, so the run stopped"


@contextmanager
def _elastic_logs_to(log_file: Path) -> Iterator[None]:
    """Send torch elastic's own logging (``ELASTIC_LOGGERS``) to ``log_file`` only, for the ``with`` block."""
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    saved = []
    for name in ELASTIC_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers, logger.propagate))
        logger.handlers, logger.propagate = [handler], False
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        handler.close()


def launch(cfg: DictConfig, run_dir: Path, job: Job[Result]) -> Result:
    """Run ``job(cfg, run_dir)`` on ``cfg.launcher.nproc_per_node`` local worker processes, each in the
    process group; return rank 0's results. ``job`` is a module-level function (the pipeline's
    ``train``), given by the caller so that launching knows nothing of what runs.

    Uses torch.distributed's elastic launcher (what ``torchrun`` runs) with no restarts: a worker
    that dies makes the launcher stop the others and raise ``WorkerFailed`` naming its rank; the
    launcher's traceback of it goes to ``train.log``. The last epoch's checkpoint stays complete
    (written atomically), so ``train.resume`` continues.
    """
    nproc = cfg.launcher.nproc_per_node
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"dptrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"localhost:{free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    log.info("launching %d worker processes (backend %s)", nproc, ranks.backend(cfg.launcher.backend))
    try:
        with _elastic_logs_to(Path(run_dir) / "train.log"):
            results = elastic_launch(config, _worker)(
                job, OmegaConf.to_container(cfg, resolve=True), str(run_dir), os.getpid()
            )
    except ChildFailedError as error:
        raise WorkerFailed(_failure_message(error, nproc)) from None
    return results[0]
