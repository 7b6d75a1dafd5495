"""The run directory's files (DESIGN's results schema): metrics.json, model.pt, audit.json, manifest.json,
and the overrides Hydra recorded in .hydra/."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from omegaconf import OmegaConf

from dptrain.tracking.atomic import save_torch_atomic, write_json_atomic

METRICS = "metrics.json"
MODEL = "model.pt"
AUDIT = "audit.json"
MANIFEST = "manifest.json"
# Hydra's record of the run: config.yaml, overrides.yaml.
HYDRA_DIR = ".hydra"

# The keys every metrics.json has (DESIGN.md, "Run artifacts").
METRICS_KEYS = (
    "test_accuracy",
    "train_accuracy",
    "epsilon",
    "delta",
    "target_epsilon",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "accountant",
    "max_grad_norm",
    "train_seconds",
)

_PACKAGES = ("dptrain", "torch", "opacus", "numpy", "hydra-core", "omegaconf", "tensorboard", "scikit-learn", "scipy")


def write_metrics(run_dir: str | Path, metrics: Mapping) -> Path:
    """Write ``metrics.json``; precondition: it has every key of ``METRICS_KEYS``."""
    missing = [key for key in METRICS_KEYS if key not in metrics]
    if missing:
        raise ValueError(f"metrics.json would lack {missing}")
    return write_json_atomic(Path(run_dir) / METRICS, dict(metrics))


def save_model(run_dir: str | Path, state_dict: Mapping) -> Path:
    """Write ``model.pt``: a plain state dict, loadable with ``torch.load(..., weights_only=True)``."""
    return save_torch_atomic(Path(run_dir) / MODEL, dict(state_dict))


def recorded_overrides(run_dir: str | Path) -> list[str]:
    """The task overrides Hydra recorded for the run in ``run_dir`` (``.hydra/overrides.yaml``); [] without one.

    This is the run's own record: a resumed run and a re-audit keep the overrides it was started with.
    """
    path = Path(run_dir) / HYDRA_DIR / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the dptrain source tree when it is a git checkout (editable install), else None."""
    source = Path(__file__).resolve().parents[2]
    try:
        result = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_manifest(run_dir: str | Path, **fields) -> Path:
    """Write ``manifest.json``: versions, git commit, host and interpreter, plus the caller's ``fields``
    (config hash, data fingerprint, seeds, start / end time, world size)."""
    manifest = {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "argv": sys.argv,
        **fields,
    }
    return write_json_atomic(Path(run_dir) / MANIFEST, manifest)
