"""Where this process stands in a torch.distributed job: rank, world size, and whether it writes artifacts."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on the one process that writes artifacts, checkpoints, TensorBoard and progress bars (rank 0)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when an outside launcher (torchrun, SLURM wrappers) set RANK and WORLD_SIZE for several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def backend(requested: str) -> str:
    """``launcher.backend``: ``auto`` is nccl when CUDA is available (one GPU per rank), gloo on CPU."""
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def all_gather_object(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in one process); collective."""
    if world_size() == 1:
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_to_main(obj) -> list | None:
    """``obj`` of every rank, in rank order, on rank 0 and None on the others (``[obj]`` in one process); collective."""
    if world_size() == 1:
        return [obj]
    gathered: list | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process); collective."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
