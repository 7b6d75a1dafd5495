"""Peak memory and wall time of a large CSV run: loading, training and each audit level.

    python scripts/bench_scale.py [--rows 260000] [--levels none,fast,standard] [overrides ...]

Writes a seeded synthetic table (``--rows`` rows, about 195 bytes each: 21 numeric
features, two text columns, a binary label; 260k rows make the 50 MB file of issue 12)
into a temporary directory, then runs each case in its own process and prints its
wall time, CPU time (user + system, steadier than wall time on a shared machine) and
peak RSS (``os.wait4``'s ``ru_maxrss`` of that child alone):

- ``load``: ``describe`` then ``load`` of the table, as a run's validation and its
  data stage call them;
- ``train audit=<level>``: ``python -m dptrain train dataset=csv ...`` for one epoch,
  with the training stage's seconds from ``metrics.json`` (``train_seconds``: the
  optimizer steps; ``wall_seconds``: the whole epoch loop, where the run reports it)
  and the audit's from ``audit.json``.

The difference between the peaks of ``audit=none`` and an audit level is what that
audit adds. Extra arguments are passed to every ``dptrain train`` as overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NUMERIC = 21
REGIONS = ("north", "south", "east", "west", "centre", "coast", "hills", "islands")
SEGMENTS = ("retail", "business", "public", "student")

LOAD = """
import json, sys, time
from dptrain.config import DatasetConfig
from dptrain.data import describe, load
cfg = DatasetConfig(name="csv", path=sys.argv[1], target="label", sensitive="segment")
started = time.perf_counter()
describe(cfg)
described = time.perf_counter()
data = load(cfg)
loaded = time.perf_counter()
print(json.dumps({"describe": described - started, "load": loaded - described, "width": data.input_shape[0]}))
"""


def write_table(path: Path, rows: int, seed: int = 0) -> None:
    """A table whose label is a noisy logistic function of the numeric features and the region."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=NUMERIC)
    region_effect = rng.normal(size=len(REGIONS))
    with path.open("w") as handle:
        handle.write(",".join([*(f"x{i}" for i in range(NUMERIC)), "region", "segment", "label"]) + "\n")
        for start in range(0, rows, 50_000):
            count = min(50_000, rows - start)
            x = rng.normal(size=(count, NUMERIC))
            region = rng.integers(0, len(REGIONS), count)
            segment = rng.integers(0, len(SEGMENTS), count)
            logit = x @ weights / np.sqrt(NUMERIC) + region_effect[region]
            label = (rng.random(count) < 1 / (1 + np.exp(-2 * logit))).astype(int)
            for i in range(count):
                cells = [f"{value:.5f}" for value in x[i]]
                handle.write(",".join([*cells, REGIONS[region[i]], SEGMENTS[segment[i]], str(label[i])]) + "\n")


def run_measured(command: list[str], cwd: Path) -> tuple[float, dict, subprocess.CompletedProcess]:
    """(wall seconds, its usage ``{"peak_rss_mib", "cpu_seconds"}``, the finished process) of
    ``command``, run under ``--measure``.

    RUSAGE_CHILDREN's ``ru_maxrss`` is the largest peak of all children reaped so far, so each case
    goes through a parent of its own that reads its one child's peak from ``os.wait4``.
    """
    started = time.perf_counter()
    child = subprocess.Popen(wrapped(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - started
    usage = json.loads(stderr.strip().splitlines()[-1])
    return wall, usage, subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


def wrapped(command: list[str]) -> list[str]:
    """``command`` under ``--measure``: a parent that reports that one child's usage on its last stderr line."""
    return [sys.executable, __file__, "--measure", "--", *command]


def measure_child(command: list[str]) -> int:
    """Run ``command``, pass its output through, print ``{"peak_rss_mib", "cpu_seconds"}`` last on stderr."""
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    sys.stderr.flush()
    # ru_maxrss is in KiB on Linux.
    measured = {"peak_rss_mib": usage.ru_maxrss / 1024, "cpu_seconds": usage.ru_utime + usage.ru_stime}
    print(json.dumps(measured), file=sys.stderr)
    return child.returncode


def _columns(wall: float, usage: dict) -> str:
    return f"{wall:8.1f} {usage['cpu_seconds']:8.1f} {usage['peak_rss_mib']:13.0f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        sys.exit(measure_child(sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=260_000)
    parser.add_argument("--levels", default="none,fast,standard", help="audit levels to run, comma-separated")
    args, overrides = parser.parse_known_args()

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        workdir = Path(tmp)
        table = workdir / "table.csv"
        write_table(table, args.rows)
        print(f"table: {args.rows} rows, {table.stat().st_size / 1e6:.1f} MB; python {sys.version.split()[0]}")
        print(f"{'case':24} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13}  stages")

        wall, usage, done = run_measured([sys.executable, "-c", LOAD, str(table)], workdir)
        if done.returncode != 0:
            sys.exit(f"load failed:\n{done.stderr}")
        stages = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{'load':24} {_columns(wall, usage)}  describe {stages['describe']:.1f} s, load {stages['load']:.1f} s,"
            f" {stages['width']} input columns"
        )

        for level in args.levels.split(","):
            run_dir = workdir / f"run-{level}"
            command = [
                sys.executable, "-m", "dptrain", "train", "dataset=csv", f"dataset.path={table}",
                "dataset.target=label", "dataset.sensitive=segment", "train.epochs=1", "train.progress=false",
                f"audit={level}", f"hydra.run.dir={run_dir}", *overrides,
            ]  # fmt: skip
            wall, usage, done = run_measured(command, workdir)
            if done.returncode != 0:
                sys.exit(f"audit={level} failed:\n{done.stderr[-3000:]}")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            training = f"training {metrics['train_seconds']:.1f} s in optimizer steps"
            if "wall_seconds" in metrics:
                training += f" ({metrics['wall_seconds']:.1f} s wall)"
            audit_file = run_dir / "audit.json"
            if audit_file.exists():
                training += f", audit {json.loads(audit_file.read_text())['audit_seconds']:.1f} s"
            print(f"{'train audit=' + level:24} {_columns(wall, usage)}  {training}")


if __name__ == "__main__":
    main()
