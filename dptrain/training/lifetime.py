"""Worker processes that end with the process that started them, however it ends (SIGKILL included)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

# linux/prctl.h
PR_SET_PDEATHSIG = 1
# How often the portable fallback looks for its parent.
POLL_SECONDS = 0.2


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os._exit(1)


def end_with_parent(parent: int) -> None:
    """Make this process end as soon as process ``parent`` (the one that started it) ends.

    On Linux the kernel sends SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a
    daemon thread polls ``os.getppid()``. A parent killed with SIGKILL runs no clean-up of its own, so
    without this its pool or worker processes would keep training, and writing its run directory,
    after its lock on that directory is gone. Precondition: ``parent`` is ``os.getppid()`` as seen by
    the parent, passed in so that a parent that died before this call is noticed too.
    """
    linux = sys.platform.startswith("linux")
    if not (linux and ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0):
        threading.Thread(target=_watch, args=(parent,), daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def child_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes (no fork: torch's threads and CUDA state do not survive one)
    that end with this process (``end_with_parent``)."""
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=end_with_parent, initargs=(os.getpid(),)
    )
