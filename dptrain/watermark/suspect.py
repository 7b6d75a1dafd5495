"""Testing a suspect model for an owner run's watermark (``dptrain verify run_dir=<owner> model=<suspect>``)."""

from __future__ import annotations

import json
from pathlib import Path

from dptrain.errors import UserError
from dptrain.models import build_model
from dptrain.tracking.artifacts import MANIFEST, file_sha256, load_state
from dptrain.watermark.binomial import WatermarkCheck, agreement, watermark_test
from dptrain.watermark.trigger_set import WATERMARK, read_trigger_set


def check_suspect(run_dir: str | Path, model_config, suspect: str | Path, alpha: float) -> WatermarkCheck:
    """The binomial test of the suspect state dict at ``suspect`` (loaded with ``weights_only=True``, so a
    crafted file runs no code) in the owner's architecture ``model_config`` on the owner run's keys.

    UserError (one line) when ``alpha`` is not in (0, 1), the key set is missing or differs from the digest
    the owner's manifest.json recorded at training time (keys chosen after seeing the suspect would make
    the test meaningless), or the suspect does not fit the owner's architecture."""
    if not 0 < alpha < 1:
        raise UserError(f"verify.alpha={alpha} must be in (0, 1), e.g. 1e-6")
    run_dir = Path(run_dir)
    keys = read_trigger_set(run_dir)
    if _recorded_digest(run_dir / MANIFEST, WATERMARK) not in (None, file_sha256(run_dir / WATERMARK)):
        raise UserError(
            f"{run_dir / WATERMARK} differs from the digest {MANIFEST} recorded for it: the key set was changed "
            "after training (dptrain verify run_dir=... names what else was)"
        )
    model = build_model(model_config, tuple(keys.inputs.shape[1:]), keys.num_classes)
    restore = "give a state dict saved from a model of the owner run's architecture"
    load_state(suspect, model, restore, whose="the owner run's model")
    return watermark_test(agreement(model, keys), keys, alpha)


def _recorded_digest(manifest: Path, name: str) -> str | None:
    """The digest ``manifest`` records for ``name``; None without a readable record (the record's own
    check, ``dptrain verify run_dir=...``, reports why)."""
    try:
        digests = json.loads(manifest.read_text()).get("digests", {})
    except (OSError, ValueError, AttributeError):
        return None
    return digests.get(name) if isinstance(digests, dict) else None
