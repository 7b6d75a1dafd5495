"""Rounds per second of the same federation on the builtin engine and on the Flower engine, and the ratio.

    python scripts/bench_flower.py [--clients 20] [--rounds 5] [--model convnet] [--private]

Each engine runs ``dptrain train federation=fedavg federation.clients=<clients> dataset=digits`` (no
audit, no checkpoints) in a fresh interpreter with the same seed, once for 1 round and once for
1 + ``rounds`` rounds. The round loop's time is ``train_seconds`` from metrics.json (local training
and messages included; Python, Ray and Simulation Engine start-up excluded, the command's wall time
shows them). The first round also pays the one-time costs (on Flower: every ClientApp process
importing torch and dptrain and building its clients' data and plans), so the steady rate is
``rounds / (train_seconds(1 + rounds) - train_seconds(1))``. Both runs must end with the same
epsilon. Torch threads: one per process (``OMP_NUM_THREADS=1``); Flower's ClientApps run in Ray
actors, one per usable core (``federation.flower.client_cpus=1``).
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


def _run(engine: str, rounds: int, args, root: Path) -> tuple[dict, float]:
    run_dir = root / f"{engine}-{rounds}"
    command = [
        sys.executable, "-m", "dptrain", "train", "federation=fedavg", "dataset=digits",
        f"model={args.model}", f"federation.clients={args.clients}", f"federation.rounds={rounds}",
        f"federation.engine={engine}", "audit=none", "train.checkpoint=false", "train.progress=false",
        *([] if args.private else ["privacy=none"]), f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - started
    return json.loads((run_dir / "metrics.json").read_text()), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--private", action="store_true", help="DP-SGD per client (default: privacy=none)")
    args = parser.parse_args()
    print(f"{args.clients} clients, model={args.model}, {'DP-SGD' if args.private else 'non-private'}")
    rates = {}
    with tempfile.TemporaryDirectory() as root:
        for engine in ("builtin", "flower"):
            first, _ = _run(engine, 1, args, Path(root))
            full, wall = _run(engine, 1 + args.rounds, args, Path(root))
            steady = full["train_seconds"] - first["train_seconds"]
            rates[engine] = (args.rounds / steady, full["epsilon"])
            print(
                f"{engine:8s} {rates[engine][0]:6.2f} rounds/s over rounds 2..{1 + args.rounds} "
                f"(first round {first['train_seconds']:.1f} s, all {1 + args.rounds} rounds "
                f"{full['train_seconds']:.1f} s, command wall time {wall:.1f} s, epsilon {full['epsilon']})"
            )
    if rates["builtin"][1] != rates["flower"][1]:
        raise SystemExit("the engines spent different epsilons: they did not run the same federation")
    print(f"overhead: the Flower engine runs at {rates['flower'][0] / rates['builtin'][0]:.2f}x the builtin engine's rounds/s")


if __name__ == "__main__":
    main()
