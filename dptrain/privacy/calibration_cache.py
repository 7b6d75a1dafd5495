"""On-disk cache of noise calibrations: the noise multiplier ``calibrate_noise`` returns for an
(accountant, sample rate, steps, delta, target) and the epsilon it spends, so a repeated job skips the search."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import opacus

from dptrain.privacy.accounting import CALIBRATION_TOLERANCE, MAX_NOISE, MIN_NOISE, calibrate_noise, epsilon_spent
from dptrain.tracking.atomic import write_json_atomic

log = logging.getLogger(__name__)

# A directory, or "off" (or empty) to calibrate every time; unset: $XDG_CACHE_HOME/dptrain, else ~/.cache/dptrain.
CACHE_ENV = "DPTRAIN_CACHE"


def cache_dir() -> Path | None:
    """Where calibrations are cached (``DPTRAIN_CACHE``, else the user cache directory); None when disabled."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off") else Path(chosen)
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "dptrain"
    try:
        return Path.home() / ".cache" / "dptrain"
    except RuntimeError:
        # No home directory to resolve (a service account): calibrate every time.
        return None


# The digest of the module that searches and computes epsilon: any change to either gives new keys,
# so an entry written by another version of dptrain is never read as this one's answer.
ACCOUNTING_DIGEST = hashlib.sha256(Path(calibrate_noise.__code__.co_filename).read_bytes()).hexdigest()


def calibration_key(*, accountant: str, target_epsilon: float, sample_rate: float, steps: int, delta: float) -> dict:
    """Everything the calibrated noise depends on: the mechanism, the target, the search's tolerance and
    range, and the code and library versions that compute epsilon (opacus; numpy under its PRV)."""
    return {
        "accountant": accountant,
        "target_epsilon": float(target_epsilon),
        "sample_rate": float(sample_rate),
        "steps": int(steps),
        "delta": float(delta),
        "tolerance": CALIBRATION_TOLERANCE,
        "noise_range": [MIN_NOISE, MAX_NOISE],
        "opacus": opacus.__version__,
        "numpy": np.__version__,
        "accounting": ACCOUNTING_DIGEST,
    }


def _entry_path(directory: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return directory / "calibrations" / f"{digest}.json"


def _read_entry(path: Path, key: dict) -> tuple[float, float] | None:
    """The cached (noise multiplier, epsilon) at ``path`` when it is a well-formed entry for ``key``
    within the calibration's guarantee (noise in the searched range, epsilon within the target); else None."""
    try:
        entry = json.loads(path.read_text())
        noise, epsilon = entry["noise_multiplier"], entry["epsilon"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    numbers = all(isinstance(x, float) and math.isfinite(x) for x in (noise, epsilon))
    if entry.get("key") != key or not numbers:
        return None
    if not (MIN_NOISE <= noise <= MAX_NOISE and 0.0 <= epsilon <= key["target_epsilon"]):
        return None
    return noise, epsilon


def cached_calibration(
    *, accountant: str, target_epsilon: float, sample_rate: float, steps: int, delta: float
) -> tuple[float, float]:
    """``(calibrate_noise(...), epsilon_spent(...) at that noise)``, read from the cache when a valid
    entry exists, else computed and written there (atomically, so concurrent runs never read half an entry).

    A hit returns exactly the floats the calibration produced (JSON keeps a float's shortest repr,
    which reads back to the same double). An entry that does not parse, names another key or breaks
    the calibration's guarantee is ignored and overwritten. The reported epsilon never comes from
    here: the run's ledger recomputes it from the steps charged, and checks it against the target.
    Raises ValueError as ``calibrate_noise`` does when the target is out of reach.
    """
    account = dict(accountant=accountant, sample_rate=sample_rate, steps=steps, delta=delta)
    directory = cache_dir()
    key = calibration_key(target_epsilon=target_epsilon, **account)
    path = None if directory is None else _entry_path(directory, key)
    cached = None if path is None else _read_entry(path, key)
    if cached is not None:
        return cached
    noise = calibrate_noise(target_epsilon=target_epsilon, **account)
    # The search's last accepted probe was this noise: composed_epsilon's memo answers without the accountant.
    epsilon = epsilon_spent(noise_multiplier=noise, **account)
    if path is not None:
        try:
            write_json_atomic(path, {"key": key, "noise_multiplier": noise, "epsilon": epsilon})
        except OSError as error:
            log.debug("noise calibration not cached at %s: %s", path, error)
    return noise, epsilon
