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
from typing import Iterator

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from dptrain.config import Config
from dptrain.training import ranks

log = logging.getLogger(__name__)

# A collective that waits longer than this for a dead peer fails instead of hanging; the
# launcher's monitor usually notices a dead worker within a second and stops the rest.
COLLECTIVE_TIMEOUT = timedelta(seconds=45)


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
        format=f"[%(asctime)s][{tag}][%(name)s][%(levelname)s] - %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(Path(run_dir) / "train.log")],
        force=True,
    )
    logging.getLogger("opacus").setLevel(logging.WARNING)


def _worker(config: dict, run_dir: str):
    """One rank of a ``launcher.nproc_per_node`` run (module-level so that spawn can pickle it)."""
    from dptrain import pipeline

    _log_to(run_dir)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), config)
    if not torch.cuda.is_available():
        # The elastic launcher, unlike torchrun, leaves every worker all cores' threads.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.launcher.nproc_per_node))
    with process_group(cfg.launcher.backend):
        metrics, report = pipeline.train(cfg, run_dir)
    return (metrics, report) if ranks.is_main() else None


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a rendezvous or MASTER_PORT)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _failure_message(error: ChildFailedError, nproc: int) -> str:
    parts = []
    for rank, failure in sorted(error.failures.items()):
        how = f"killed by signal {-failure.exitcode}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        detail = failure.message if isinstance(failure.message, str) and failure.message else ""
        parts.append(f"rank {rank} ({how}{': ' + detail.splitlines()[0] if detail else ''})")
    return f"worker {'; '.join(parts)} of {nproc} failed, so the run stopped"


def launch(cfg: DictConfig, run_dir: Path) -> tuple[dict, dict | None]:
    """Run ``cfg`` on ``cfg.launcher.nproc_per_node`` local worker processes; return rank 0's results.

    Uses torch.distributed's elastic launcher (what ``torchrun`` runs) with no restarts: a worker
    that dies makes the launcher stop the others and raise ``WorkerFailed`` naming its rank. The
    last epoch's checkpoint stays complete (written atomically), so ``train.resume`` continues.
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
        results = elastic_launch(config, _worker)(OmegaConf.to_container(cfg, resolve=True), str(run_dir))
    except ChildFailedError as error:
        raise WorkerFailed(_failure_message(error, nproc)) from None
    return results[0]
