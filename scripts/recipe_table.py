"""Test accuracy of named recipes at several budgets over several seeds: the table of docs/guide/recipes.md.

Each cell is ``dptrain train <recipe> privacy.target_epsilon=E train.seed=S audit=none`` composed and run
in this process (one thread, seeds one after another), reported as mean ± sample standard deviation.

    python scripts/recipe_table.py "model=logreg" "model=cnn" "experiment=best_logreg" \
        "experiment=pretrained_cnn" --epsilons 1,3,8 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch


def run_accuracy(overrides: list[str]) -> float:
    """Test accuracy of one ``dptrain train`` run with ``overrides``, in a scratch directory."""
    from hydra import compose, initialize_config_module

    from dptrain import pipeline

    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        return pipeline.train(cfg, run_dir)[0].test_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help='a recipe: its overrides in one string, e.g. "experiment=best_cnn"')
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--seeds", default="0,1,2")
    options = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    from dptrain.config import register_configs

    register_configs()
    epsilons, seeds = options.epsilons.split(","), options.seeds.split(",")
    print(f"| recipe | {' | '.join(f'epsilon {e}' for e in epsilons)} | seconds per run |")
    print(f"|---|{'---|' * len(epsilons)}---|")
    for recipe in options.recipes:
        cells, started, runs = [], time.perf_counter(), 0
        for epsilon in epsilons:
            accuracies = []
            for seed in seeds:
                overrides = [*recipe.split(), f"privacy.target_epsilon={epsilon}", f"train.seed={seed}", "audit=none",
                             "train.progress=false"]  # fmt: skip
                accuracies.append(run_accuracy(overrides))
                runs += 1
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            cells.append(f"{statistics.mean(accuracies):.3f} ± {spread:.3f}")
        print(f"| `{recipe}` | {' | '.join(cells)} | {(time.perf_counter() - started) / runs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
