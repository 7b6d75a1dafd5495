"""Time the default job's training at train.threads=1, 2 and auto, interleaved, in one process.

    python scripts/bench_threads.py [--rounds 3] [overrides ...]      (default: the default job)

Each round trains the job's target once per setting, in turn (1, 2, auto), so a change of the
machine's load shifts every setting alike; the medians over rounds are printed last. ``train s`` is
``train_model``'s wall time (the model, auto's race, Opacus' wrapping, the epochs and the final
accounting; no per-epoch evaluation, which runs only for TensorBoard), ``steps s`` the optimizer
steps alone (metrics.json's ``train_seconds``), ``race s`` what auto's race cost, and ``threads``
the count each run trained at. The first round also pays one-time costs (Opacus' first wrap);
compare the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from hydra import compose, initialize_config_module

from dptrain.config import register_configs
from dptrain.data import load, make_split, prepare
from dptrain.training.recipe import train_model
from dptrain.training.threads import core_share
from dptrain.validation import validate

SETTINGS = ("1", "2", "auto")


def _config(setting: str, overrides: list[str]):
    register_configs()
    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        return compose(
            config_name="config", overrides=["audit=none", "train.progress=false", *overrides, f"train.threads={setting}"]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = _config("auto", args.overrides)
    validate(cfg)
    raw = load(cfg.dataset)
    data = prepare(raw, make_split(raw, cfg.dataset))
    print(
        f"overrides: {' '.join(args.overrides) or '(none: the default job)'}; {os.cpu_count()} CPUs, "
        f"auto races within {core_share()} thread(s); torch {torch.__version__}"
    )
    print(f"{'round':>5} {'setting':>7} {'threads':>7} {'train s':>8} {'steps s':>8} {'race s':>7}")
    seconds: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
    for round_index in range(args.rounds):
        for setting in SETTINGS:
            started = time.perf_counter()
            trained = train_model(
                _config(setting, args.overrides), data.members, input_shape=data.input_shape,
                num_classes=data.num_classes,
            )  # fmt: skip
            elapsed = time.perf_counter() - started
            seconds[setting].append(elapsed)
            race = trained.threads.calibration_seconds
            print(
                f"{round_index + 1:>5} {setting:>7} {trained.threads.threads:>7} {elapsed:>8.2f} "
                f"{trained.train_seconds:>8.2f} {'-' if race is None else f'{race:.3f}':>7}",
                flush=True,
            )
    one = statistics.median(seconds["1"])
    for setting in SETTINGS:
        median = statistics.median(seconds[setting])
        print(f"median train s at threads={setting}: {median:.2f} ({median / one:.2f}x threads=1)")


if __name__ == "__main__":
    main()
