"""Time the evasion audit at ``audit=thorough`` against the training of its target, side by side.

    python scripts/bench_evasion.py [--repeats 5] [--threads 1] [overrides ...]   (default: the default job)

Each repeat trains the default job's target (``dptrain train``: logistic regression on digits at
epsilon 3) and then runs the evasion audit on it with thorough's settings (FGSM and PGD, L-inf and
L2, every budget of ``audit.evasion``, PGD's steps and restarts, the first ``audit.evasion.n`` test
records): the call ``dptrain.audit.run`` makes, timed alone. The two stages alternate in one
process, so machine load hits both alike; the medians of wall time and of the process's CPU time
(steadier on a shared machine) and their ratios are printed (issue 14's bar: under 2). Training time is the whole training stage a user waits for (data loading, noise
calibration, the epochs, per-epoch evaluation and checkpoints). One untimed repeat goes first, so
that a process's one-time imports and caches are charged to neither stage.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from torch.utils.data import TensorDataset

from dptrain.audit.evasion import evasion_audit
from dptrain.config import register_configs
from dptrain.seeds import Stream, derived_seed
from dptrain.tracking.tensorboard import TensorBoardLog
from dptrain.training import centralized
from dptrain.validation import validate


def _config(overrides: list[str]):
    register_configs()
    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        return compose(config_name="config", overrides=["audit=thorough", "train.progress=false", *overrides])


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def measure(overrides: list[str]) -> tuple[tuple[float, float], tuple[float, float], dict]:
    """(training, evasion audit) as (wall seconds, CPU seconds) each, and the audit's curves, of one run."""
    cfg = _config(overrides)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-evasion-"))
    started = _clocks()
    _, sizes = validate(cfg)
    tb = TensorBoardLog(run_dir)
    target = centralized.train_target(cfg, run_dir, centralized.plan(cfg, sizes), tb, None)
    trained = _clocks()
    evasion = cfg.audit.evasion
    curves = evasion_audit(
        target.model,
        TensorDataset(*(t[: evasion.n] for t in target.data.test.tensors)),
        target.data.units,
        {norm: list(getattr(evasion, f"budgets_{norm}")) for norm in evasion.norms},
        evasion.steps,
        evasion.restarts,
        target.device,
        derived_seed(cfg.audit.seed, Stream.EVASION),
    )
    audited = _clocks()
    tb.close()
    train = tuple(b - a for a, b in zip(started, trained))
    audit = tuple(b - a for a, b in zip(trained, audited))
    return train, audit, curves


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of training + audit (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("overrides", nargs="*", help="dptrain overrides of the default job")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"overrides: {' '.join(args.overrides) or '(none: the default job)'}; torch threads = {args.threads}")
    measure(args.overrides)  # warm-up: imports and caches, untimed
    train, audit = [], []
    for _ in range(args.repeats):
        train_seconds, audit_seconds, curves = measure(args.overrides)
        train.append(train_seconds)
        audit.append(audit_seconds)
        print(
            f"train {train_seconds[0]:6.2f} s wall {train_seconds[1]:6.2f} s CPU   "
            f"evasion audit {audit_seconds[0]:6.2f} s wall {audit_seconds[1]:6.2f} s CPU"
        )
    for key, curve in curves.items():
        accuracy = " ".join(f"{b:g}:{a:.3f}" for b, a in zip(curve.budgets, curve.robust_accuracy))
        print(f"{key:10} n={curve.n} clean {curve.clean_accuracy:.3f}  {accuracy}")
    for clock, index in (("wall", 0), ("CPU", 1)):
        train_median = statistics.median(t[index] for t in train)
        audit_median = statistics.median(a[index] for a in audit)
        print(
            f"median of {args.repeats}, {clock}: train {train_median:.2f} s, evasion audit {audit_median:.2f} s, "
            f"evasion audit / train = {audit_median / train_median:.2f}"
        )


if __name__ == "__main__":
    main()
