"""The run summary printed at the end: accuracy, epsilon at delta, where the artifacts are."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping


def format_summary(metrics: Mapping, run_dir: str | Path) -> str:
    """A few aligned lines a person reads at the end of ``dptrain train``."""
    if metrics["private"]:
        target = metrics["target_epsilon"]
        privacy = (
            f"epsilon {metrics['epsilon']:.3f} at delta {metrics['delta']:.0e}"
            f" ({'no target' if target is None else f'target {target:g}'}, {metrics['accountant']} accountant,"
            f" noise multiplier {metrics['noise_multiplier']:.3f}, clipping norm {metrics['max_grad_norm']:g},"
            f" {metrics['steps']} steps at sample rate {metrics['sample_rate']:.4f})"
        )
    else:
        privacy = "none: non-private baseline (no clipping, no noise, epsilon = inf)"
    lines = [
        f"test accuracy  {metrics['test_accuracy']:.4f}   (train {metrics['train_accuracy']:.4f},"
        f" {metrics['members']} training records, {metrics['train_seconds']:.1f} s)",
        f"privacy        {privacy}",
        f"artifacts      {run_dir}  (metrics.json, model.pt, manifest.json, split.json, tb/)",
        f"tensorboard    tensorboard --logdir {Path(run_dir) / 'tb'}",
    ]
    return "\n".join(lines)
