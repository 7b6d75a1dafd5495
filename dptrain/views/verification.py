"""The console lines of ``dptrain verify``: the run record's check and the watermark test."""

from __future__ import annotations

from pathlib import Path

from dptrain.tracking.artifacts import MANIFEST
from dptrain.tracking.verify import RecordCheck
from dptrain.watermark import WatermarkCheck


def format_record_check(check: RecordCheck, run_dir: Path) -> str:
    """One line per kind of mismatch, naming each file, then the verdict; the manifest's SHA-256 first, to
    publish (a match only proves the files agree with a manifest that could itself have been rewritten)."""
    lines = [f"{'manifest':<15}{run_dir / MANIFEST} sha256 {check.manifest_sha256}"]
    if check.self_digest_matches is None:
        lines.append(f"{'':<15}(written before manifests recorded their own digest: edits to it go unnoticed)")
    elif not check.self_digest_matches:
        lines.append(f"{'manifest edited':<15}its content no longer matches its self_digest")
    lines.append(f"{'artifacts':<15}{check.checked} recorded")
    for label, names in (("changed", check.changed), ("missing", check.missing), ("new", check.new)):
        if names:
            lines.append(f"{label:<15}{', '.join(names)}")
    data = f"{check.data_checked} checked"
    if not check.data_recorded:
        data = "not recorded (a manifest written before manifests recorded data files)"
    elif not (check.data_checked or check.data_absent):
        data = f"none read from files (embedded or generated data: fingerprint {check.data_fingerprint})"
    if check.data_absent:
        data += f", {len(check.data_absent)} not found here and not checked: {', '.join(check.data_absent)}"
    lines.append(f"{'data files':<15}{data}")
    if check.data_changed:
        lines.append(f"{'data changed':<15}{', '.join(check.data_changed)}")
    if check.matches:
        lines.append(f"{'verdict':<15}every file matches the manifest")
    else:
        lines.append(f"{'verdict':<15}the run directory does NOT match its manifest")
    return "\n".join(lines)


def format_watermark_check(check: WatermarkCheck, suspect: Path) -> str:
    """The suspect's agreement with the secret labels, chance, the binomial p-value and the verdict."""
    verdict = "watermark FOUND" if check.found else "watermark not found"
    return "\n".join(
        [
            f"{'suspect':<15}{suspect}",
            f"{'keys':<15}{check.matches} of {check.keys} agree with the secret labels "
            f"(accuracy {check.accuracy:.3f}, chance {check.chance:.3f})",
            f"{'p-value':<15}{check.p_value:.3g} (one-sided binomial test against chance)",
            f"{'verdict':<15}{verdict} at verify.alpha={check.alpha:g}",
        ]
    )
