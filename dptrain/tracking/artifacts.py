"""The run directory's files (DESIGN's results schema): metrics.json, model.pt, audit.json and the audit
history in audits/, manifest.json, and the overrides Hydra recorded in .hydra/."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import pickle
import platform
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from dptrain.errors import UserError
from dptrain.tracking.atomic import save_torch_atomic, write_json_atomic

METRICS = "metrics.json"
MODEL = "model.pt"
AUDIT = "audit.json"
MANIFEST = "manifest.json"
SPLIT = "split.json"
CHECKPOINT = "checkpoint.pt"
# The manifest's digest of its own content (``manifest_self_digest``) and of the data files a run read.
SELF_DIGEST = "self_digest"
DATA_FILES = "data_files"
# Every audit of the run, one file each, named by its UTC time and level; audit.json is the latest.
AUDITS = "audits"
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


def read_json_object(path: str | Path, restore: str) -> dict:
    """The JSON object in ``path``, or a UserError naming the file, what is wrong with it and ``restore``
    (how to get a good one back)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: {restore}") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({str(error).splitlines()[0]}): {restore}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} holds a JSON {type(record).__name__}, not an object: {restore}")
    return record


def read_metrics(run_dir: str | Path) -> dict:
    """A finished run's ``metrics.json``, with every key of ``METRICS_KEYS``, or a UserError naming the file."""
    path = Path(run_dir) / METRICS
    restore = "audit a run that finished training, or continue this one with train.resume"
    metrics = read_json_object(path, restore)
    missing = [key for key in METRICS_KEYS if key not in metrics]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: {restore}")
    return metrics


def read_torch(path: str | Path, restore: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, or a UserError naming the file and what is wrong.

    weights_only unpickles tensors and plain containers only, so a tampered file runs no code. Torch's
    own message for a file it refuses advises ``weights_only=False``, which would run that code: it is
    never passed on. On garbage torch raises anything from EOFError to IndexError, hence the broad catch.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: {restore}")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty: {restore}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # A well-formed pickle of anything but tensors and plain containers names a class ("global").
        refused = isinstance(error, pickle.UnpicklingError) and "Unsupported global" in str(error)
        what = "holds pickled objects besides tensors, which dptrain does not load" if refused else (
            "is truncated or not a PyTorch file"
        )
        raise UserError(f"{path} {what}: {restore}") from None


def load_state(path: str | Path, model, restore: str, whose: str = "the run's model"):
    """``model`` with the state dict at ``path``, or a UserError naming the file when it is unreadable,
    not a state dict, or written for another model than ``whose``; ``restore`` says how to fix it."""
    state = read_torch(path, restore)
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict: {restore}")
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"{path} does not fit {whose} (other layer names or shapes): {restore}") from None
    return model


def load_model(run_dir: str | Path, model):
    """``model`` with the weights of ``<run_dir>/model.pt`` (``load_state``)."""
    return load_state(Path(run_dir) / MODEL, model, "restore it from a copy of the run, or train the run again")


def record_audit(run_dir: str | Path, report):
    """Write the audit ``report`` (a ``dptrain.audit.results.AuditReport``, ``to_dict`` its JSON) as
    ``audits/<UTC time>-<level>.json``, which no later audit overwrites, and as ``audit.json``, the
    latest; both atomically, the history first. Returns the report as recorded: with ``history_file``,
    the history file's path relative to ``run_dir``.

    The times have millisecond digits, so the names sort in the order the audits finished.
    """
    run_dir = Path(run_dir)
    stamp = datetime.fromisoformat(report.audited_at).strftime("%Y%m%dT%H%M%S.%f")[:-3]
    name = f"{stamp}Z-{report.level}"
    path, copy = run_dir / AUDITS / f"{name}.json", 1
    while path.exists():
        copy += 1
        path = run_dir / AUDITS / f"{name}-{copy}.json"
    recorded = dataclasses.replace(report, history_file=path.relative_to(run_dir).as_posix())
    write_json_atomic(path, recorded.to_dict())
    write_json_atomic(run_dir / AUDIT, recorded.to_dict())
    return recorded


def audit_history(run_dir: str | Path) -> list[str]:
    """The run's audits, oldest first, as paths relative to ``run_dir`` (``audits/...json``)."""
    return sorted(f"{AUDITS}/{path.name}" for path in (Path(run_dir) / AUDITS).glob("*.json"))


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


def file_sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of the file at ``path``, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_digests(run_dir: str | Path) -> dict[str, str]:
    """SHA-256 of every artifact in ``run_dir``, keyed by path relative to it: every file but the
    manifest itself, logs (Hydra's keeps growing after the manifest) and hidden files (temporaries of
    atomic writes, locks); Hydra's record ``.hydra/`` is included."""
    run_dir = Path(run_dir)
    digests = {}
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir)
        hidden = any(part.startswith(".") and part != HYDRA_DIR for part in relative.parts)
        if path.is_file() and not hidden and relative.as_posix() != MANIFEST and path.suffix != ".log":
            digests[relative.as_posix()] = file_sha256(path)
    return digests


def write_manifest(run_dir: str | Path, **fields) -> Path:
    """Write ``manifest.json``: versions, git commit, host and interpreter, the caller's ``fields``
    (config hash, data fingerprint, ``data_files``: the SHA-256 of each data file by its path, seeds,
    start / end time, world size), the audit history, the SHA-256 of every artifact and the manifest's
    ``self_digest``. Written last, it marks the run complete."""
    manifest = {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "argv": sys.argv,
        **fields,
    }
    return _write_manifest(run_dir, manifest)


def update_manifest(run_dir: str | Path, **fields) -> Path:
    """Bring ``manifest.json`` up to date after a later stage (``dptrain audit``): the audit history and
    digests current, the training's record kept (``fields`` only fill in what it lacks). A run whose
    manifest is missing or unreadable (it was interrupted before writing one) gets a new one with
    ``fields``, marked ``written_after_interruption`` (it has no training start and end times)."""
    path = Path(run_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        return write_manifest(run_dir, **fields, written_after_interruption=True)
    return _write_manifest(run_dir, {**fields, **manifest})


def manifest_self_digest(manifest: Mapping) -> str:
    """SHA-256 of the manifest's content without its own ``self_digest`` field (canonical JSON: sorted keys,
    no spaces). It catches an edit of the manifest that did not recompute it; whoever rewrites the manifest
    can recompute it too, so only a digest of manifest.json kept elsewhere makes the record tamper-evident."""
    content = {key: value for key, value in manifest.items() if key != SELF_DIGEST}
    return fingerprint(json.dumps(content, sort_keys=True, separators=(",", ":")))


def _write_manifest(run_dir: str | Path, manifest: dict) -> Path:
    manifest = {**manifest, "audits": audit_history(run_dir), "digests": artifact_digests(run_dir)}
    manifest[SELF_DIGEST] = manifest_self_digest(manifest)
    return write_json_atomic(Path(run_dir) / MANIFEST, manifest)
