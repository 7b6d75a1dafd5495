"""Torch intra-op threads for a run (``train.threads``): a fixed count, or ``auto``, chosen by timing a
few training steps at each candidate count on the run's own model and batch.

Why measure rather than default to every core: on small models the threads cost more in wake-ups
and synchronization than they save. On the shared, loaded 2-core machine the default job (logreg)
trained 9x slower at two threads than at one, and the digits CNN 13x (medians of 78 s against 6 s,
scripts/bench_threads.py); a wide model on a quiet many-core machine gains from them. No rule on parameters and batch alone transfers
between machines and loads, so ``auto`` asks the machine.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

AUTO = "auto"
# Timed steps per candidate at most. A count leaves the race early only when it has more threads than
# the leader and its fastest step is slower than the leader's slowest by ``MARGIN``: on 2 cores two
# threads lose by 6x or more on the zoo's small models, so one timed step each settles those. Fewer
# threads are never dropped early: on the loaded machine one stalled step at one thread (14 ms, against
# 1.3 ms for one at two) sent the default job to two threads, where it then trained 19x slower.
ROUNDS = 3
MARGIN = 2.0
# More threads are raced only when the whole training would take this long at one thread (the first
# timed step times the planned steps). Below it they could save at most a share of a few seconds,
# while the race's one step at more threads cost 0.35 s for the default job (whose training takes
# 0.5 s at one thread) and 0.8-2 s for the digits CNN (3 s) on the loaded 2-core machine.
WORTH_RACING_SECONDS = 10.0


def thread_count(setting: str) -> int | None:
    """``train.threads`` as a count: None for ``auto``, else the positive integer it spells.

    Raises ValueError for anything else (validation turns it into a one-line error)."""
    if setting == AUTO:
        return None
    if re.fullmatch(r"[0-9]+", setting) and int(setting) >= 1:
        return int(setting)
    raise ValueError(f"train.threads={setting} must be auto or a whole number of threads, at least 1")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. under taskset or a
    container's cpuset), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def core_share(workers: int = 1) -> int:
    """Cores each of ``workers`` processes started by this one may use: the usable cores split over the
    processes of this run on this machine (LOCAL_WORLD_SIZE, set by torchrun and by ``dptrain``'s own
    launcher for each rank) and then over the ``workers``; at least 1. ``auto`` never exceeds it, so
    ranks and process pools split the cores instead of oversubscribing them."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * workers
    return max(1, usable_cores() // processes)


def recorded_threads(recorded: int | None) -> int:
    """The intra-op threads a finished run trained at (``metrics.json``'s ``threads``), or this process's
    share of the cores for a run recorded before ``train.threads`` existed."""
    return recorded or core_share()


def candidates(share: int) -> list[int]:
    """Thread counts ``auto`` times: 1, ``share`` and, from 4 cores on, their geometric middle."""
    middle = round(math.sqrt(share)) if share >= 4 else 1
    return sorted({1, middle, share})


@dataclass
class ThreadCalibration:
    """A race between thread ``counts`` over timed training steps (``paced``), round robin so that a
    change of load shifts every count alike. Step time is read from ``clock`` (injectable for tests).

    One thread is timed first; when ``planned_steps`` of it would take less than
    ``WORTH_RACING_SECONDS`` the race ends there, at one thread.

    The first step runs untimed at one thread: it pays one-time costs (allocations, Opacus' hooks) that
    would otherwise be charged to whichever count came first. One thread because a slow step is the
    race's whole cost: on the loaded 2-core machine one step of the digits CNN at two threads took
    0.8-2 s against 0.1 s at one.
    """

    counts: list[int]
    planned_steps: int
    clock: Callable[[], float] = time.perf_counter
    rounds: int = ROUNDS
    seconds: dict[int, list[float]] = field(init=False)
    racing: list[int] = field(init=False)
    warmed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.seconds = {count: [] for count in self.counts}
        self.racing = list(self.counts)

    @property
    def done(self) -> bool:
        return len(self.racing) == 1 or min(len(self.seconds[count]) for count in self.racing) >= self.rounds

    def paced(self, batches: Iterable) -> Iterator:
        """``batches``, each yielded at the thread count whose turn it is; the time until the next batch
        is asked for (the step's) is that count's. Ends early once the race is decided."""
        for batch in batches:
            if self.done:
                return
            count = min(self.counts) if not self.warmed else self._next()
            torch.set_num_threads(count)
            started = self.clock()
            yield batch
            elapsed = self.clock() - started
            # An empty Poisson batch times nothing of the model.
            if self.warmed and len(batch[-1]):
                self.seconds[count].append(elapsed)
                if count == 1 and len(self.seconds[1]) == 1 and self.planned_steps * elapsed < WORTH_RACING_SECONDS:
                    self.racing = [1]
                self._drop_losers()
            self.warmed = True

    def _next(self) -> int:
        """The racing count with the fewest timed steps (the smallest among equals)."""
        return min(self.racing, key=lambda count: (len(self.seconds[count]), count))

    def _drop_losers(self) -> None:
        if any(not self.seconds[count] for count in self.racing):
            return
        leader = self.fastest()
        slowest = max(self.seconds[leader])
        self.racing = [
            count for count in self.racing if count <= leader or min(self.seconds[count]) <= MARGIN * slowest
        ]

    def fastest(self) -> int:
        """The count with the lowest median step time so far (the fewest threads among equals; 1 when
        nothing was timed)."""
        timed = [count for count in self.racing if self.seconds[count]]
        if not timed:
            return 1
        return min(timed, key=lambda count: (statistics.median(self.seconds[count]), count))


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count a run trained at, and, when ``auto`` raced counts, each count's timed
    step seconds (keyed by the count as text, as ``metrics.json`` holds them) and the race's whole
    cost in seconds (its throwaway model and optimizer included)."""

    threads: int
    step_seconds: dict[str, list[float]] | None = None
    calibration_seconds: float | None = None

    def record(self) -> dict | None:
        """``metrics.json``'s ``threads_calibration``: None when nothing was raced."""
        if self.step_seconds is None:
            return None
        return {"seconds": self.calibration_seconds, "step_seconds": self.step_seconds}


def choose_threads(
    setting: str,
    race: Callable[[ThreadCalibration], None],
    planned_steps: int,
    share: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> ThreadChoice:
    """Set torch's intra-op threads for ``train.threads`` = ``setting`` and return the choice.

    A count is taken as given. ``auto`` with more than one core in this process's share
    (``core_share``) builds a ``ThreadCalibration`` over ``candidates(share)`` for a training of
    ``planned_steps`` steps and hands it to ``race``,
    which runs throwaway training steps through ``calibration.paced`` until it is ``done`` (or its
    steps run out); the fastest count wins. Guarantee: the run's real steps all run at the one count
    returned, so the choice changes no result beyond the last bits of floating-point sums. ``share``
    (default ``core_share()``) and ``clock`` (the race's stopwatch) are for tests.
    """
    fixed = thread_count(setting)
    share = core_share() if share is None else share
    if fixed is not None or share == 1:
        choice = ThreadChoice(fixed or 1)
    else:
        started = clock()
        calibration = ThreadCalibration(candidates(share), planned_steps, clock)
        race(calibration)
        choice = ThreadChoice(
            calibration.fastest(),
            {str(count): steps for count, steps in calibration.seconds.items()},
            clock() - started,
        )
    torch.set_num_threads(choice.threads)
    return choice
