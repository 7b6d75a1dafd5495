"""Checking a run directory against its ``manifest.json`` (``dptrain verify run_dir=...``): every artifact's
SHA-256, the data files the run read, and the manifest's digest of its own content.

A match proves consistency, not authenticity: whoever can edit the run directory can rewrite the manifest
to match. The SHA-256 of manifest.json itself (``RecordCheck.manifest_sha256``), published or kept
somewhere the run directory's writers cannot change, is what makes the record tamper-evident.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dptrain.errors import UserError
from dptrain.tracking.artifacts import (
    DATA_FILES,
    MANIFEST,
    SELF_DIGEST,
    artifact_digests,
    file_sha256,
    manifest_self_digest,
    read_json_object,
)


@dataclass(frozen=True)
class RecordCheck:
    """What ``check_run_record`` found. Artifact paths are relative to the run directory; data files are
    the absolute paths the run read them from.

    ``self_digest_matches`` is None for a manifest written before manifests digested themselves.
    ``data_absent`` lists data files not found at their recorded path (a run copied to another machine):
    they are not checked, and do not count as a mismatch. Data embedded in a package or generated from the
    config has no files; ``data_fingerprint``, the digest of the loaded tensors, identifies it.
    ``data_recorded`` is False for a manifest written before manifests recorded data files.
    """

    manifest_sha256: str
    data_fingerprint: str | None
    data_recorded: bool
    self_digest_matches: bool | None
    checked: int
    changed: tuple[str, ...]
    missing: tuple[str, ...]
    new: tuple[str, ...]
    data_checked: int
    data_changed: tuple[str, ...]
    data_absent: tuple[str, ...]

    @property
    def matches(self) -> bool:
        """True when every recorded digest matches, no artifact is missing or new, and the manifest's own
        digest (where it has one) matches its content."""
        return self.self_digest_matches is not False and not (
            self.changed or self.missing or self.new or self.data_changed
        )


def check_run_record(run_dir: str | Path) -> RecordCheck:
    """Recompute the digests ``run_dir``'s manifest.json records and compare; a UserError (one line) when
    ``run_dir`` is not a directory, has no manifest.json (not a finished dptrain run) or an unreadable one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run_dir={run_dir} is not a directory: give the directory of a finished dptrain run")
    path = run_dir / MANIFEST
    if not path.is_file():
        raise UserError(
            f"run_dir={run_dir} has no {MANIFEST}: it is not a finished dptrain run (an interrupted run gets one "
            "from dptrain audit)"
        )
    restore = "restore it from a copy of the run; without it the run cannot be verified"
    manifest = read_json_object(path, restore)
    recorded = manifest.get("digests")
    data = manifest.get(DATA_FILES)
    if not _digest_map(recorded) or not (data is None or _digest_map(data)):
        raise UserError(f"{path} has no digests of the run's files: {restore}")
    data = {} if data is None else data
    current = artifact_digests(run_dir)
    present = {name: Path(name) for name in data if Path(name).is_file()}
    own = manifest.get(SELF_DIGEST)
    return RecordCheck(
        manifest_sha256=file_sha256(path),
        data_fingerprint=manifest.get("data_fingerprint"),
        data_recorded=DATA_FILES in manifest,
        self_digest_matches=None if own is None else own == manifest_self_digest(manifest),
        checked=len(recorded),
        changed=tuple(sorted(name for name in recorded if name in current and current[name] != recorded[name])),
        missing=tuple(sorted(name for name in recorded if name not in current)),
        new=tuple(sorted(name for name in current if name not in recorded)),
        data_checked=len(present),
        data_changed=tuple(sorted(name for name, file in present.items() if file_sha256(file) != data[name])),
        data_absent=tuple(sorted(name for name in data if name not in present)),
    )


def _digest_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
