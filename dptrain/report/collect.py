"""Finding the runs below a directory and reading what each recorded: overrides, metrics, audit, manifest."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from dptrain.audit.results import AuditReport
from dptrain.errors import UserError
from dptrain.report.progress import sweep_jobs
from dptrain.tracking.artifacts import AUDIT, HYDRA_DIR, MANIFEST, METRICS, recorded_overrides

MULTIRUN = "multirun.yaml"


@dataclass
class RunRecord:
    """One run directory as the report sees it. ``missing`` names the result files a finished run
    has and this one lacks (or cannot parse); a run is complete when nothing is missing."""

    path: Path
    name: str
    overrides: list[str]
    metrics: dict | None
    audit: AuditReport | None
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass
class Sweep:
    """The runs below a directory, in job order, and what the directory says about the sweep that made them."""

    root: Path
    runs: list[RunRecord]
    command: str | None
    jobs: int | None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_audit(path: Path) -> AuditReport | None:
    """``audit.json`` at ``path``, None when it is absent, does not parse or is not an audit report."""
    content = _read_json(path)
    try:
        return None if content is None else AuditReport.from_dict(content)
    except ValueError:
        return None


def _audited(run_dir: Path) -> bool:
    """Whether the run's config asked for an audit, i.e. whether a finished run has ``audit.json``."""
    config = run_dir / HYDRA_DIR / "config.yaml"
    if not config.is_file():
        return True
    return OmegaConf.select(OmegaConf.load(config), "audit.name", default="none") != "none"


def read_run(run_dir: Path, name: str) -> RunRecord:
    """Read one run directory. The files are written atomically and ``manifest.json`` last, so a file
    that is absent means the run stopped before that stage; one that does not parse is reported too."""
    required = [METRICS, AUDIT, MANIFEST] if _audited(run_dir) else [METRICS, MANIFEST]
    contents = {}
    missing = []
    for file in required:
        contents[file] = (_read_audit if file == AUDIT else _read_json)(run_dir / file)
        if contents[file] is None:
            missing.append(file if not (run_dir / file).exists() else f"{file} (unreadable)")
    # A run trained with audit=none may have been audited since (``dptrain audit``).
    audit = contents[AUDIT] if AUDIT in contents else _read_audit(run_dir / AUDIT)
    return RunRecord(run_dir, name, recorded_overrides(run_dir), contents[METRICS], audit, missing)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _sweep_command(root: Path) -> tuple[str | None, int | None]:
    """The ``dptrain train -m ...`` command and job count recorded in ``root/multirun.yaml``, if ``root`` is a sweep."""
    path = root / MULTIRUN
    if not path.is_file():
        return None, None
    config = OmegaConf.load(path)
    command = shlex.join(["dptrain", "train", "-m", *map(str, config.hydra.overrides.task)])
    return command, sweep_jobs(config)


def find_runs(root: str | Path) -> Sweep:
    """Every run directory at or below ``root`` (a directory holding ``.hydra/``), sorted by path with
    numbers in numeric order, so a multirun's jobs come in job order.

    Raises ``UserError`` when ``root`` is not a directory or holds no run.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root} does not exist: give a multirun/<date>/<time> directory or a directory of runs")
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: give a multirun/<date>/<time> directory or a directory of runs")
    run_dirs = sorted(
        (hydra.parent for hydra in root.rglob(HYDRA_DIR) if hydra.is_dir()),
        key=lambda path: _natural_key(path.relative_to(root).as_posix()),
    )
    if not run_dirs:
        raise UserError(
            f"{root} holds no dptrain runs (no {HYDRA_DIR}/ directory below it): "
            "give a multirun/<date>/<time> directory or a directory of runs"
        )
    runs = [read_run(path, path.name if path == root else path.relative_to(root).as_posix()) for path in run_dirs]
    command, jobs = _sweep_command(root)
    return Sweep(root, runs, command, jobs)
