"""Tune a recipe over a small grid with several seeds, and report what the search cost in privacy.

Runs the grid as one Hydra sweep, ``dptrain train -m <recipe> <grid> train.seed=<seeds> audit=none``, then
``dptrain report <sweep> --select test_accuracy``: the best private run, and beside its own epsilon the
epsilon of choosing it (composition over every run of the sweep, and Papernot & Steinke's random-stopping
bounds; docs/guide/sweeps.md). Every run trains on the members, so the search spends their budget once per
run: the composition line is what this search cost, not the selected run's epsilon.

    python scripts/tune_recipe.py "experiment=best_logreg privacy.target_epsilon=1" \
        --grid train.lr=0.1,0.25,0.5 --seeds 0,1 --out multirun/tune-best-logreg
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help='the recipe\'s overrides in one string, e.g. "experiment=best_cnn"')
    parser.add_argument("--grid", nargs="+", required=True, help="swept keys, e.g. train.lr=0.1,0.5 train.epochs=15,30")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed values each grid point runs with")
    parser.add_argument("--out", required=True, help="the sweep directory (hydra.sweep.dir)")
    options = parser.parse_args()
    # One thread per run: the runs are small, and the shared machine's cores are not ours alone.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    train = [sys.executable, "-m", "dptrain", "train", "-m", *options.recipe.split(), *options.grid,
             f"train.seed={options.seeds}", "audit=none", "train.progress=false",
             f"hydra.sweep.dir={options.out}"]  # fmt: skip
    print("$", " ".join(train[2:]), flush=True)
    subprocess.run(train, check=True, env=env, stdout=subprocess.DEVNULL)
    report = [sys.executable, "-m", "dptrain", "report", options.out, "--select", "test_accuracy"]
    print("$", " ".join(report[2:]), flush=True)
    subprocess.run(report, check=True, env=env)


if __name__ == "__main__":
    main()
