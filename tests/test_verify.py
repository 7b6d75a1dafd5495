"""``dptrain verify run_dir=...``: a run directory checked against the SHA-256 digests in its manifest.json."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import QUIET, TINY, in_process


@pytest.fixture(scope="module")
def owner_run(tmp_path_factory) -> Path:
    """A finished tiny run on a CSV file (``<run>.csv`` beside the run directory)."""
    folder = tmp_path_factory.mktemp("owner")
    table = folder / "run.csv"
    table.write_text("a,b,y\n" + "".join(f"{i % 7},{(i * 3) % 5},{i % 2}\n" for i in range(120)))
    data = ("dataset=csv", f"dataset.path={table}", "dataset.target=y", "train.batch_size=16")
    assert in_process("train", *TINY, *data, f"hydra.run.dir={folder / 'run'}", *QUIET) == 0
    return folder / "run"


@pytest.fixture
def run_copy(owner_run, tmp_path) -> Path:
    return Path(shutil.copytree(owner_run, tmp_path / "copy"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lines(out: str) -> dict[str, str]:
    """The printed lines by their label (the first 15 columns)."""
    return {line[:15].strip(): line[15:] for line in out.splitlines()}


def test_an_untouched_run_matches_and_prints_the_manifests_own_sha256(run_copy, cli):
    status, out, errors, _ = cli("verify", f"run_dir={run_copy}")
    assert status == 0 and not errors
    lines = _lines(out)
    assert lines["manifest"].endswith(f"sha256 {_sha256(run_copy / 'manifest.json')}")
    assert "changed" not in lines and "missing" not in lines and "new" not in lines
    assert lines["verdict"] == "every file matches the manifest" and lines["data files"] == "1 checked"


@pytest.mark.parametrize("name", ["model.pt", "metrics.json", "split.json"])
def test_one_flipped_byte_is_named_as_changed(run_copy, cli, name):
    path = run_copy / name
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))
    status, out, _, _ = cli("verify", f"run_dir={run_copy}")
    lines = _lines(out)
    assert status == 1 and lines["changed"] == name
    assert "missing" not in lines and "new" not in lines
    assert "does NOT match" in lines["verdict"]


def test_a_deleted_artifact_is_missing_and_an_added_file_is_new(run_copy, cli):
    (run_copy / "split.json").unlink()
    (run_copy / "tb" / "extra.bin").write_bytes(b"\0")
    status, out, _, _ = cli("verify", f"run_dir={run_copy}")
    lines = _lines(out)
    assert status == 1 and lines["missing"] == "split.json" and lines["new"] == "tb/extra.bin"


def test_a_manifest_edited_to_match_a_replaced_model_fails_its_own_digest(run_copy, cli):
    model = run_copy / "model.pt"
    model.write_bytes(model.read_bytes() + b"\0")
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["digests"]["model.pt"] = _sha256(model)
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    status, out, _, _ = cli("verify", f"run_dir={run_copy}")
    lines = _lines(out)
    assert status == 1 and "manifest edited" in lines and "changed" not in lines


def test_the_csv_a_run_read_is_recorded_by_its_digest_and_checked(owner_run, cli):
    table = owner_run.parent / "run.csv"
    manifest = json.loads((owner_run / "manifest.json").read_text())
    assert manifest["data_files"] == {str(table.resolve()): _sha256(table)}
    original = table.read_bytes()
    try:
        table.write_bytes(original.replace(b"6,", b"5,", 1))
        status, out, _, _ = cli("verify", f"run_dir={owner_run}")
        assert status == 1 and _lines(out)["data changed"] == str(table.resolve())
        table.unlink()
        status, out, _, _ = cli("verify", f"run_dir={owner_run}")
        assert status == 0 and "0 checked, 1 not found here and not checked" in _lines(out)["data files"]
    finally:
        table.write_bytes(original)


def test_embedded_data_is_named_by_its_fingerprint(run_copy, cli):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["data_files"] = {}
    del manifest["self_digest"]
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    status, out, _, _ = cli("verify", f"run_dir={run_copy}")
    lines = _lines(out)
    assert status == 0 and f"fingerprint {manifest['data_fingerprint']}" in lines["data files"]
    assert "edits to it go unnoticed" in out


def test_a_manifest_from_before_data_files_were_recorded_says_so(run_copy, cli):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    del manifest["data_files"], manifest["self_digest"]
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    status, out, _, _ = cli("verify", f"run_dir={run_copy}")
    assert status == 0 and _lines(out)["data files"].startswith("not recorded")


def _no_manifest(run_dir: Path) -> None:
    (run_dir / "manifest.json").unlink()


def _garbled_manifest(run_dir: Path) -> None:
    (run_dir / "manifest.json").write_text('{"digests": {')


def _manifest_without_digests(run_dir: Path) -> None:
    (run_dir / "manifest.json").write_text('{"host": "h"}')


@pytest.mark.parametrize(
    "spoil, says",
    [
        (_no_manifest, "has no manifest.json: it is not a finished dptrain run"),
        (_garbled_manifest, "is not readable JSON"),
        (_manifest_without_digests, "has no digests of the run's files"),
    ],
)
def test_a_directory_that_is_not_a_verifiable_run_is_one_line_with_status_2(run_copy, cli, spoil, says):
    spoil(run_copy)
    status, out, errors, err = cli("verify", f"run_dir={run_copy}")
    assert status == 2 and not out and len(err.splitlines()) == 1 and says in errors[0]


@pytest.mark.parametrize(
    "args, says",
    [
        (("run_dir=/no/such/dir",), "is not a directory"),
        ((), "needs run_dir="),
        (("run_dir=.", "audit=fast"), "not audit=fast"),
    ],
)
def test_bad_arguments_are_one_line_with_status_2(cli, args, says):
    status, out, errors, _ = cli("verify", *args)
    assert status == 2 and not out and says in errors[0]
