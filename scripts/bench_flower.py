"""Rounds per second of the same federation on the builtin engine and on the Flower engine, and the ratio.

    python scripts/bench_flower.py [--clients 20] [--rounds 5] [--model cnn] [--private]

Each engine runs ``dptrain train federation=fedavg federation.clients=<clients> dataset=digits`` (no
audit, no checkpoints) in a fresh interpreter with the same seed. Rounds per second is
``federation.rounds / train_seconds`` from metrics.json: the round loop, local training and messages
included (on Flower, also each ClientApp process building its data and plan on its first message),
without Python, Ray and Simulation Engine start-up, which the command's wall time shows beside it.
Both runs must end with the same epsilon. Torch threads: one per process (``OMP_NUM_THREADS=1``);
Flower's ClientApps run in Ray actors, one per usable core.
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


def _run(engine: str, args, root: Path) -> tuple[dict, float]:
    run_dir = root / engine
    command = [
        sys.executable, "-m", "dptrain", "train", "federation=fedavg", "dataset=digits",
        f"model={args.model}", f"federation.clients={args.clients}", f"federation.rounds={args.rounds}",
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
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--private", action="store_true", help="DP-SGD per client (default: privacy=none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        results = {engine: _run(engine, args, Path(root)) for engine in ("builtin", "flower")}
    print(f"{args.clients} clients, {args.rounds} rounds, model={args.model}, {'DP-SGD' if args.private else 'non-private'}")
    rates = {}
    for engine, (metrics, wall) in results.items():
        rates[engine] = args.rounds / metrics["train_seconds"]
        print(
            f"{engine:8s} {rates[engine]:6.2f} rounds/s  ({metrics['train_seconds']:.1f} s in rounds, "
            f"{wall:.1f} s command wall time, epsilon {metrics['epsilon']})"
        )
    if results["builtin"][0]["epsilon"] != results["flower"][0]["epsilon"]:
        raise SystemExit("the engines spent different epsilons: they did not run the same federation")
    print(f"overhead: the Flower engine runs at {rates['flower'] / rates['builtin']:.2f}x the builtin engine's rounds/s")


if __name__ == "__main__":
    main()
