"""The wheel carries the config tree and every subpackage, so `dptrain train` works after a plain install."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_config_tree_and_all_modules(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("dptrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in (ROOT / "conf").rglob("*.yaml"):
        assert f"dptrain/conf/{config.relative_to(ROOT / 'conf').as_posix()}" in names
    for module in (ROOT / "dptrain").rglob("*.py"):
        assert module.relative_to(ROOT).as_posix() in names
