"""Tune a recipe over a small grid with several seeds, and report what the search cost in privacy.

On the members (default): runs the grid as one Hydra sweep, ``dptrain train -m <recipe> <grid>
train.seed=<seeds> audit=none``, then ``dptrain report <sweep> --select test_accuracy``: the best private
run, and beside its own epsilon the epsilon of choosing it (composition over every run of the sweep, and
Papernot & Steinke's random-stopping bounds; docs/guide/sweeps.md). Every run trains on the members, so
the search spends their budget once per run: the composition line is what this search cost, not the
selected run's epsilon.

    python scripts/tune_recipe.py "experiment=best_logreg privacy.target_epsilon=1" \
        --grid train.lr=0.1,0.25,0.5 --seeds 0,1 --out multirun/tune-best-logreg

On a proxy (``--proxy population``, Sander et al. 2023): the sweep runs with ``train.proxy=population``
(half of the population split trains at the members' sample rate, steps and noise-to-batch ratio; the
other half validates), in ``<out>/proxy``; the grid point with the best mean validation accuracy over the
seeds is then trained once on the members (first seed, ``<out>/final``). The members pay that one run's
epsilon; the report (``<out>/tuning.md``) sets it beside what the same search on the members would cost.

    python scripts/tune_recipe.py "model=logreg privacy.target_epsilon=1" --proxy population \
        --grid train.lr=0.25,0.5,1 --seeds 0,1 --out multirun/tune-logreg-proxy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def dptrain(arguments: list[str], env: dict, quiet: bool = True) -> None:
    """Run ``dptrain <arguments>`` in a child process, echoing the command."""
    print("$ dptrain", " ".join(arguments), flush=True)
    subprocess.run([sys.executable, "-m", "dptrain", *arguments], check=True, env=env,
                   stdout=subprocess.DEVNULL if quiet else None)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help='the recipe\'s overrides in one string, e.g. "experiment=best_cnn"')
    parser.add_argument("--grid", nargs="+", required=True, help="swept keys, e.g. train.lr=0.1,0.5 train.epochs=15,30")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed values each grid point runs with")
    parser.add_argument("--proxy", choices=("population",), help="search on this proxy, then train the choice once")
    parser.add_argument("--out", required=True, help="the sweep directory (hydra.sweep.dir)")
    options = parser.parse_args()
    # One thread per run: the runs are small, and the shared machine's cores are not ours alone.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    recipe = options.recipe.split()
    common = ["audit=none", "train.progress=false"]
    if options.proxy is None:
        dptrain(["train", "-m", *recipe, *options.grid, f"train.seed={options.seeds}", *common,
                 f"hydra.sweep.dir={options.out}"], env)  # fmt: skip
        dptrain(["report", options.out, "--select", "test_accuracy"], env, quiet=False)
        return
    from dptrain.report.collect import find_runs
    from dptrain.report.proxy_search import proxy_search, proxy_search_markdown

    out = Path(options.out)
    dptrain(["train", "-m", *recipe, *options.grid, f"train.seed={options.seeds}", f"train.proxy={options.proxy}",
             *common, f"hydra.sweep.dir={out / 'proxy'}"], env)  # fmt: skip
    search = proxy_search(find_runs(out / "proxy").runs)
    final = out / "final"
    seed = options.seeds.split(",")[0]
    dptrain(["train", *search.best.overrides, f"train.seed={seed}", f"hydra.run.dir={final}"], env)
    metrics = json.loads((final / "metrics.json").read_text())
    text = proxy_search_markdown(search, f"{' '.join(search.best.overrides)} train.seed={seed}", metrics)
    (out / "tuning.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
