"""Time each audit level against the training of its target, side by side in one run.

    python scripts/bench_audit.py [--levels fast,standard,...] [overrides ...]      (default: the default job)

For audit=fast, standard, thorough and implementation, trains the default job's
target and audits it, printing the wall time of each stage and the audit /
training ratio; ``fast+extraction`` and ``fast+inversion`` are audit=fast with the extraction or
the model inversion audit on (its cost is the difference to the fast line). ``fedavg+fast`` and ``fedavg+gradient_inversion`` train
the default job federated (``federation=fedavg``) and audit it at fast, the second with the gradient
inversion audit on (federated runs only; its defaults: eight one-record updates). ``thorough+64`` is
audit=thorough with 64 reference models instead of 16 (the LiRA paper's smallest count; the zoo's
models train them stacked, ``dptrain.training.stacked``). The implementation audit trains audit.whitebox.runs separate
audit runs of the target's mechanism (one of 100 000 canaries as shipped), so it
costs about a minute where the others cost seconds; ``--levels`` picks levels.
Training time is the whole training stage a user waits for (data loading,
noise calibration, the epochs, per-epoch evaluation and checkpoints). The
first line, ``fast (first)``, is an ``audit=fast`` run as a ``dptrain train``
process has it: the audit pays its one-time imports (matplotlib's, for the ROC
figure). The levels after it run in the same process, so their imports are
done. ``audit.json`` is the ``audit_seconds`` the audit recorded (the whole
audit stage, panels included); ``audit s`` is the stage timed from outside; ``refs s`` is the part of it spent training
reference models (audit.json's ``reference_models.train_seconds``), where the level has them.
One intra-op thread (torch.set_num_threads(1)): with two on this 2-core VM
small-model training is several times slower and noisier.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from dptrain import pipeline
from dptrain.config import register_configs
from dptrain.tracking.tensorboard import TensorBoardLog
from dptrain.training.recipes import recipe_for
from dptrain.validation import validate

LEVELS = (
    "fast", "standard", "thorough", "implementation", "fast+extraction", "fedavg+fast", "fedavg+gradient_inversion",
    "fast+inversion", "thorough+64",
)  # fmt: skip
# Audits off at every level, timed on top of a level: their own cost is the difference to its line.
ADDED = {
    "fast+extraction": ("fast", ["audit.extraction.enabled=true"]),
    "fedavg+fast": ("fast", ["federation=fedavg"]),
    "fedavg+gradient_inversion": ("fast", ["federation=fedavg", "audit.gradient_inversion.enabled=true"]),
    "fast+inversion": ("fast", ["audit.inversion.enabled=true"]),
    "thorough+64": ("thorough", ["audit.mia.reference_models=64"]),
}


def _config(level: str, overrides: list[str]):
    register_configs()
    base, added = ADDED.get(level, (level, []))
    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        return compose(
            config_name="config", overrides=[f"audit={base}", *added, "train.progress=false", *overrides]
        )


def measure(level: str, overrides: list[str]) -> tuple[float, float, float, float | None]:
    """(training seconds, audit seconds, audit.json's audit_seconds, its reference models' training
    seconds or None) of one run at ``level``, each stage timed on its own."""
    cfg = _config(level, overrides)
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-audit-{level}-"))
    started = time.perf_counter()
    _, sizes = validate(cfg)
    tb = TensorBoardLog(run_dir)
    recipe = recipe_for(cfg)
    target = recipe.train_target(cfg, run_dir, recipe.plan(cfg, sizes), tb, None)
    trained = time.perf_counter()
    pipeline.audit_target(cfg, target, run_dir, tb)
    audited = time.perf_counter()
    tb.close()
    recorded = json.loads((run_dir / "audit.json").read_text())
    references = recorded["reference_models"]
    return trained - started, audited - trained, recorded["audit_seconds"], references and references["train_seconds"]


def main() -> None:
    arguments = sys.argv[1:]
    if {"-h", "--help"} & set(arguments):
        print(__doc__)
        return
    levels = LEVELS
    if arguments[:1] == ["--levels"]:
        levels, arguments = tuple(arguments[1].split(",")), arguments[2:]
    overrides = arguments
    torch.set_num_threads(1)
    print(f"overrides: {' '.join(overrides) or '(none: the default job)'}; torch threads = 1")
    print(f"{'audit':26} {'train s':>8} {'audit s':>8} {'audit.json':>10} {'audit / train':>14} {'refs s':>7} {'refs / train':>13}")
    for name, level in [("fast (first)", "fast"), *((level, level) for level in levels)]:
        train_seconds, audit_seconds, recorded, references = measure(level, overrides)
        refs = "" if references is None else f" {references:7.2f} {references / train_seconds:13.2f}"
        print(f"{name:26} {train_seconds:8.2f} {audit_seconds:8.2f} {recorded:10.2f} {audit_seconds / train_seconds:14.2f}{refs}")


if __name__ == "__main__":
    main()
