"""The ``dptrain`` command as a user runs it: help, Hydra overrides, multirun, errors, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["train.epochs=2", "train.progress=false", "audit=none"]


def dptrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "dptrain", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def test_console_script_is_installed_next_to_the_interpreter():
    assert (Path(sys.executable).parent / "dptrain").exists()


def test_help_lists_the_subcommands(tmp_path):
    result = dptrain("--help", cwd=tmp_path)
    assert result.returncode == 0 and "train" in result.stdout and "commands:" in result.stdout


def test_cfg_job_prints_the_composed_config_without_training(tmp_path):
    result = dptrain("train", "--cfg", "job", "privacy.target_epsilon=8", cwd=tmp_path)
    assert result.returncode == 0
    assert "target_epsilon: 8" in result.stdout and "name: digits" in result.stdout
    assert not (tmp_path / "outputs").exists()


def test_train_writes_artifacts_into_hydra_run_dir_and_prints_a_summary_with_the_audit(tmp_path):
    run_dir = tmp_path / "my-run"
    result = dptrain("train", "train.epochs=2", "train.progress=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and "epsilon" in result.stdout and str(run_dir) in result.stdout
    assert "rmia" in result.stdout and "eps lower bound" in result.stdout
    for name in ("metrics.json", "audit.json", "model.pt", "manifest.json", "split.json", ".hydra/config.yaml"):
        assert (run_dir / name).exists(), name
    again = dptrain("audit", f"run_dir={run_dir}", "audit=fast", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "loss" in again.stdout and json.loads((run_dir / "audit.json").read_text())["level"] == "fast"
    refused = dptrain("audit", f"run_dir={run_dir}", "train.lr=0.1", cwd=tmp_path)
    assert refused.returncode == 2 and "only audit=" in refused.stderr


def test_multirun_sweep_gives_one_run_per_epsilon_within_budget(tmp_path):
    sweep = tmp_path / "sweep"
    result = dptrain("train", "-m", "privacy.target_epsilon=1,3,inf", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").exists())
    assert len(runs) == 3
    metrics = {m["target_epsilon"]: m for m in (json.loads((p / "metrics.json").read_text()) for p in runs)}
    assert metrics[1.0]["epsilon"] <= 1.0 and metrics[3.0]["epsilon"] <= 3.0
    baseline = metrics[None]
    assert baseline["epsilon"] is None and baseline["noise_multiplier"] == 0.0 and baseline["max_grad_norm"] is None


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("privacy.target_epsilon=-1", "privacy.target_epsilon=-1"),
        ("train.batch_size=999999", "train.batch_size=999999"),
    ],
)
def test_user_error_is_one_line_without_traceback(tmp_path, override, fragment):
    result = dptrain("train", override, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("dptrain: error:")]
    assert len(errors) == 1 and fragment in errors[0]


def test_auditing_a_run_whose_config_holds_a_renamed_key_is_one_line(tmp_path):
    # Runs of an older dptrain recorded audit.mia.lira_fixed_variance, now audit.mia.lira_variance.
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("audit:\n  mia:\n    lira_fixed_variance: true\n")
    result = dptrain("audit", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("dptrain: error:")]
    assert "lira_fixed_variance" in error and "rename or remove that key" in error


def test_unknown_command_is_refused(tmp_path):
    result = dptrain("trian", cwd=tmp_path)
    assert result.returncode == 2 and "unknown command 'trian'" in result.stderr


def test_resume_continues_the_run_in_its_own_directory(tmp_path):
    run_dir = tmp_path / "run"
    assert dptrain("train", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    first = json.loads((run_dir / "metrics.json").read_text())
    result = dptrain("train", f"train.resume={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["epsilon"] == first["epsilon"]
    assert not (tmp_path / "outputs").exists()
    refused = dptrain("train", f"train.resume={run_dir}", "train.lr=0.1", cwd=tmp_path)
    assert refused.returncode == 2 and "drop train.lr=0.1" in refused.stderr
