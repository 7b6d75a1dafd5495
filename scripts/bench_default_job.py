"""Time the default job (`dptrain` with no arguments: training, audit and artifacts) of this tree
against a previous commit's, interleaved, and print medians and ratios.

    python scripts/bench_default_job.py [--rev 9eefced] [--runs 5] [--threads N] [-- OVERRIDES...]

Each run is `python -m dptrain OVERRIDES` as a fresh process in its own empty directory; its wall
time is measured around the process (imports, calibration, training, audit, artifacts), with its
CPU seconds (user + system, child processes included: less sensitive than wall time to other load
on a shared machine), and the training stage is read from the run's metrics.json: `train_seconds`
(optimizer steps) and `wall_seconds` (the epoch loop with per-epoch evaluation, accounting and
TensorBoard). The previous commit runs from a temporary `git worktree` of `--rev` put first on
PYTHONPATH, with the same interpreter and libraries. Runs alternate between the trees (ABBA order),
so a change in the machine's load biases neither, after one untimed warm-up run of each (which also
fills this tree's noise-calibration cache, in a temporary directory, as a user's second run finds it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The commit the fixed-cost work of issue 16 started from.
DEFAULT_REV = "9eefced"


def previous_tree(rev: str, into: Path) -> Path:
    """A detached worktree of ``rev`` at ``into``, importable as ``dptrain`` from PYTHONPATH: the
    config tree (``conf/``, installed as ``dptrain.conf``) is linked into the package."""
    add = ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev]
    subprocess.run(add, check=True, capture_output=True)
    (into / "dptrain" / "conf").symlink_to(into / "conf", target_is_directory=True)
    probe = "import dptrain.conf; print(dptrain.conf.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=into.parent, env=_env(into, None), capture_output=True, text=True, check=True
    )
    if not Path(found.stdout.strip()).resolve().is_relative_to(into.resolve()):
        raise RuntimeError(f"the previous tree's dptrain is shadowed: {found.stdout.strip()}")
    return into


def _env(tree: Path | None, cache: Path | None) -> dict[str, str]:
    """This process's environment, with ``tree`` first on PYTHONPATH and ``cache`` as the calibration cache
    (and ``OMP_NUM_THREADS`` as ``--threads`` set it)."""
    env = dict(os.environ)
    if cache is not None:
        env["DPTRAIN_CACHE"] = str(cache)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    return env


def run_job(tree: Path | None, overrides: list[str], cache: Path) -> dict[str, float]:
    """One default job; ``tree`` None is this tree (the installed package). Returns its seconds."""
    env = _env(tree, cache)
    with tempfile.TemporaryDirectory(prefix="bench-default-") as cwd:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        command = [sys.executable, "-m", "dptrain", *overrides]
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        if done.returncode != 0:
            raise RuntimeError(f"dptrain failed in {tree or ROOT}:\n{done.stderr[-2000:]}")
        (metrics_path,) = Path(cwd).glob("outputs/*/*/metrics.json")
        metrics = json.loads(metrics_path.read_text())
    return {
        "wall": wall,
        "cpu": cpu,
        "train_seconds": metrics["train_seconds"],
        "train_wall_seconds": metrics["wall_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default=DEFAULT_REV, help="the previous commit (default %(default)s)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per tree (default %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS for both trees (default: torch's own choice)"
    )
    parser.add_argument("overrides", nargs="*", help="overrides for both trees' `dptrain` (default: none)")
    args = parser.parse_args()
    if args.threads is not None:
        # torch reads it at import: both trees' training, evaluation and reference models use it.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-default-") as scratch:
        scratch = Path(scratch)
        old = previous_tree(args.rev, scratch / "previous")
        trees = {"previous": old, "current": None}
        try:
            for tree in trees.values():
                run_job(tree, args.overrides, scratch / "cache")
            times: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for index in range(args.runs):
                order = list(trees) if index % 2 == 0 else list(reversed(trees))
                for name in order:
                    times[name].append(run_job(trees[name], args.overrides, scratch / "cache"))
                    seconds = ", ".join(f"{key} {value:.2f} s" for key, value in times[name][-1].items())
                    print(f"run {index + 1} {name}: {seconds}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    threads = "torch's default" if args.threads is None else args.threads
    job = " ".join(["dptrain", *args.overrides])
    print(f"\nmedians of {args.runs} interleaved runs, {args.rev} vs this tree ({job}), threads {threads}:")
    for key in ("wall", "cpu", "train_seconds", "train_wall_seconds"):
        before = statistics.median(t[key] for t in times["previous"])
        after = statistics.median(t[key] for t in times["current"])
        print(f"  {key:<20} {before:7.2f} s -> {after:7.2f} s   {before / after:5.2f}x")


if __name__ == "__main__":
    main()
