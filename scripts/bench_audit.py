"""Time each audit level against the training of its target, side by side in one run.

    python scripts/bench_audit.py [--levels fast,standard,...] [overrides ...]      (default: the default job)

For audit=fast, standard, thorough and implementation, trains the default job's
target and audits it, printing the wall time of each stage and the audit /
training ratio; ``fast+extraction`` and ``fast+inversion`` are audit=fast with the extraction or
the model inversion audit on (its cost is the difference to the fast line). The implementation
audit trains audit.whitebox.runs separate audit runs of the target's mechanism (one of 100 000
canaries as shipped), so it costs about a minute where the others cost seconds; ``--levels`` picks levels.
Training time is the whole training stage a user waits for (data loading,
noise calibration, the epochs, per-epoch evaluation and checkpoints). One
untimed ``audit=fast`` run goes first, so that the one-time imports of a
process (matplotlib's takes about 0.4 s) are charged to no level.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from dptrain import pipeline
from dptrain.config import register_configs
from dptrain.tracking.tensorboard import TensorBoardLog
from dptrain.training import centralized
from dptrain.validation import validate

LEVELS = ("fast", "standard", "thorough", "implementation", "fast+extraction", "fast+inversion")
# Audits off at every level, timed on top of a level: their own cost is the difference to its line.
ADDED = {
    "fast+extraction": ("fast", ["audit.extraction.enabled=true"]),
    "fast+inversion": ("fast", ["audit.inversion.enabled=true"]),
}


def _config(level: str, overrides: list[str]):
    register_configs()
    base, added = ADDED.get(level, (level, []))
    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        return compose(
            config_name="config", overrides=[f"audit={base}", *added, "train.progress=false", *overrides]
        )


def measure(level: str, overrides: list[str]) -> tuple[float, float]:
    """(training seconds, audit seconds) of one run at ``level``, each stage timed on its own."""
    cfg = _config(level, overrides)
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-audit-{level}-"))
    started = time.perf_counter()
    _, sizes = validate(cfg)
    tb = TensorBoardLog(run_dir)
    target = centralized.train_target(cfg, run_dir, centralized.plan(cfg, sizes), tb, None)
    trained = time.perf_counter()
    pipeline.audit_target(cfg, target, run_dir, tb)
    audited = time.perf_counter()
    tb.close()
    return trained - started, audited - trained


def main() -> None:
    arguments = sys.argv[1:]
    if {"-h", "--help"} & set(arguments):
        print(__doc__)
        return
    levels = LEVELS
    if arguments[:1] == ["--levels"]:
        levels, arguments = tuple(arguments[1].split(",")), arguments[2:]
    overrides = arguments
    print(f"overrides: {' '.join(overrides) or '(none: the default job)'}")
    measure("fast", overrides)  # warm-up: imports and caches, untimed
    print(f"{'audit':15} {'train s':>8} {'audit s':>8} {'audit / train':>14}")
    for level in levels:
        train_seconds, audit_seconds = measure(level, overrides)
        print(f"{level:15} {train_seconds:8.2f} {audit_seconds:8.2f} {audit_seconds / train_seconds:14.2f}")


if __name__ == "__main__":
    main()
