"""Peak memory of the membership audit at a large member count, each mode in a process of its own.

    python scripts/bench_audit_memory.py [--members 320000] [--modes metrics,run] [overrides ...]

``metrics``: ``membership_metrics`` (1000 bootstrap replicates, the ``fast`` default) on
``--members`` Gaussian member scores and as many non-member scores; the baseline is the process
with the scores in memory. ``run``: a ``dataset=synthetic`` logistic-regression run sized so the
split has ``--members`` members (one epoch, batch 4096, delta 1e-7: the training is not what is measured),
audited at ``audit=fast`` through ``pipeline.audit_target`` (attacks, TensorBoard panels,
audit.json); the baseline is the process after training, model and data in memory. Extra
arguments are Hydra overrides of that run.

Peak RSS is the kernel's high-water mark VmHWM, reset just before the measured stage by writing 5
to /proc/self/clear_refs (Linux >= 4.0), so the peaks of imports and training do not mask the
audit's; printed as the peak above the RSS at the reset. One thread (torch.set_num_threads(1)).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODES = ("metrics", "run")
# The synthetic split: test 0.2 and population 0.2 of the records, the rest halved into members and
# non-members (dataset.test_fraction, dataset.population_fraction defaults).
MEMBER_SHARE = 0.3


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS; return that RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _kib("VmRSS")


def _metrics(members: int, _overrides: list[str]) -> dict:
    from dptrain.audit.metrics import membership_metrics

    rng = np.random.default_rng(0)
    member_scores, nonmember_scores = rng.normal(0.1, 1.0, members), rng.normal(0.0, 1.0, members)
    membership_metrics(member_scores[:100], nonmember_scores[:100])  # imports and first-call costs, unmeasured
    baseline = _reset_peak()
    started = time.perf_counter()
    result = membership_metrics(member_scores, nonmember_scores, n_bootstrap=1000)
    return {"baseline": baseline, "seconds": time.perf_counter() - started, "auc": result.auc}


def _run(members: int, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_module

    from dptrain import pipeline
    from dptrain.config import register_configs
    from dptrain.tracking.tensorboard import TensorBoardLog
    from dptrain.training import centralized
    from dptrain.validation import validate

    register_configs()
    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "audit=fast", "dataset=synthetic", f"dataset.n_samples={round(members / MEMBER_SHARE)}",
                "model=logreg", "privacy.delta=1e-7", "train.epochs=1", "train.batch_size=4096", "train.progress=false", *overrides,
            ],
        )
    run_dir = Path(tempfile.mkdtemp(prefix="bench-audit-memory-"))
    _, sizes = validate(cfg)
    tb = TensorBoardLog(run_dir)
    target = centralized.train_target(cfg, run_dir, centralized.plan(cfg, sizes), tb, None)
    baseline = _reset_peak()
    started = time.perf_counter()
    pipeline.audit_target(cfg, target, run_dir, tb)
    seconds = time.perf_counter() - started
    tb.close()
    audit = json.loads((run_dir / "audit.json").read_text())
    return {
        "baseline": baseline, "seconds": seconds, "auc": audit["mia"]["loss"]["auc"],
        "members": audit["mia"]["loss"]["n_members"], "audit_seconds": audit["audit_seconds"],
    }


def _measure(mode: str, members: int, overrides: list[str]) -> None:
    """Child process: run ``mode`` and print its numbers as one JSON line."""
    torch.set_num_threads(1)
    numbers = {"metrics": _metrics, "run": _run}[mode](members, overrides)
    numbers["peak_above_baseline"] = _kib("VmHWM") - numbers["baseline"]
    print(json.dumps(numbers))


def main() -> None:
    arguments = sys.argv[1:]
    if {"-h", "--help"} & set(arguments):
        print(__doc__)
        return
    if arguments[:1] == ["--child"]:
        _measure(arguments[1], int(arguments[2]), arguments[3:])
        return
    members, modes = 320_000, MODES
    while arguments[:1] and arguments[0] in ("--members", "--modes"):
        if arguments[0] == "--members":
            members = int(arguments[1])
        else:
            modes = tuple(arguments[1].split(","))
        arguments = arguments[2:]
    print(f"{members} members, one thread; peak RSS above the baseline (VmHWM after a reset)")
    for mode in modes:
        child = subprocess.run(
            [sys.executable, __file__, "--child", mode, str(members), *arguments],
            capture_output=True, text=True,
        )
        if child.returncode:
            sys.exit(f"{mode} failed:\n{child.stderr[-3000:]}")
        numbers = json.loads(child.stdout.strip().splitlines()[-1])
        extra = f", audit.json audit_seconds {numbers['audit_seconds']:.2f}" if "audit_seconds" in numbers else ""
        print(
            f"{mode:8} peak above baseline {numbers['peak_above_baseline'] / 2**20:6.3f} GiB "
            f"(baseline {numbers['baseline'] / 2**20:.3f} GiB), {numbers['seconds']:.2f} s{extra}, "
            f"AUC {numbers['auc']:.4f}"
        )


if __name__ == "__main__":
    main()
