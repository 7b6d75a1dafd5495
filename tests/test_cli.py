"""The ``dptrain`` command as a user runs it: help, Hydra overrides, multirun, errors, resume, run directories
(unique, locked, owner-only), exit statuses and bad files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUIET, TINY, in_process
from conftest import run_dptrain as dptrain


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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run (no audit) that ``dptrain train`` wrote, with a checkpoint."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert in_process("train", *TINY, f"hydra.run.dir={run_dir}", *QUIET) == 0
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


def test_a_run_directory_and_everything_in_it_is_owner_only(finished_run):
    entries = list(finished_run.rglob("*"))
    names = {p.relative_to(finished_run).as_posix() for p in entries}
    assert {".hydra/config.yaml", "split.json", "tb", ".lock"} <= names
    assert any(name.startswith("tb/events") for name in names)
    modes = {p.relative_to(finished_run).as_posix(): p.stat().st_mode & 0o777 for p in [finished_run, *entries]}
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != (0o700 if (finished_run / name).is_dir() else 0o600)}
    assert wrong == {}


def test_a_run_into_a_directory_another_process_writes_is_refused_before_hydra_writes_into_it(tmp_path, cli):
    from dptrain.tracking.run_dir import RunLock

    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    with RunLock(run_dir):
        status, _, errors, err = cli("train", *TINY, f"hydra.run.dir={run_dir}", *QUIET)
    assert status == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"dptrain: error: {run_dir} is being written by another dptrain process (pid {os.getpid()})")
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


@pytest.mark.slow
def test_two_processes_writing_one_named_directory_one_is_refused_and_the_others_run_is_intact(tmp_path):
    run_dir, release = tmp_path / "shared", tmp_path / "release"
    command = [sys.executable, "-m", "dptrain", "train", *TINY, f"hydra.run.dir={run_dir}"]
    # The first run waits in its first epoch until the second has been answered, however fast it trains.
    held = (
        "import sys, time, pathlib\n"
        "from dptrain.training import recipe\n"
        "from dptrain.cli import main\n"
        "real = recipe.train_epoch\n"
        "def held(*args, **kwargs):\n"
        f"    while not pathlib.Path({str(release)!r}).exists():\n"
        "        time.sleep(0.05)\n"
        "    return real(*args, **kwargs)\n"
        "recipe.train_epoch = held\n"
        "main(sys.argv[1:])\n"
    )
    first = subprocess.Popen(
        [sys.executable, "-c", held, *command[3:], "train.seed=1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    # The first holds the lock from before Hydra writes into the directory until it ends.
    while not (run_dir / ".lock").is_file() or not (run_dir / ".lock").read_text().strip():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = dptrain(*command[3:], "train.seed=2", cwd=tmp_path)
    release.touch()
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    errors = [line for line in second.stderr.splitlines() if line.startswith("dptrain: error:")]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert errors == [f"dptrain: error: {run_dir} is being written by another dptrain process (pid {first.pid}): "
                      "wait for it to end, or use another directory"]
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "seed: 1" in config and "seed: 2" not in config and manifest["seeds"]["train"] == 1


def test_a_new_run_into_a_finished_run_directory_is_refused_and_leaves_it_unchanged(finished_run, tmp_path, cli):
    run_dir = _copy(finished_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    status, _, errors, err = cli("train", *TINY, f"hydra.run.dir={run_dir}", *QUIET)
    assert status == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(
        f"dptrain: error: {run_dir} already holds a run (metrics.json, checkpoint.pt, split.json): write this run elsewhere"
    )
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_every_job_of_a_sweep_is_validated_before_the_first_one_runs(tmp_path, cli):
    sweep = tmp_path / "sweep"
    sweep_args = ("-m", "privacy.target_epsilon=3,-1,8", *TINY, f"hydra.sweep.dir={sweep}")
    status, _, errors, _ = cli("train", *sweep_args, *QUIET)
    assert status == 2 and len(errors) == 1
    assert "sweep job 2 of 3 (privacy.target_epsilon=-1) is invalid, so no job ran" in errors[0]
    assert not sweep.exists()


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("model=nope", "In 'config': Could not find 'model/nope': choose one of cnn, convnet, logreg, mlp, resnet"),
        ("privacy.target_epsilon=[1", "cannot parse the override 'privacy.target_epsilon=[1'"),
        ("train.epochs=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ],
)
def test_hydras_own_errors_are_one_line_with_exit_status_2(tmp_path, monkeypatch, cli, override, line):
    monkeypatch.chdir(tmp_path)
    status, _, errors, err = cli("train", override, *QUIET)
    assert status == 2 and len(errors) == 1 and line in errors[0], err
    assert "HYDRA_FULL_ERROR" not in err and not (tmp_path / "outputs").exists()


def test_audit_help_prints_the_usage(cli):
    status, out, errors, _ = cli("audit", "--help")
    assert status == 0 and not errors and out.startswith("usage: dptrain audit run_dir=<dir>")


@pytest.mark.parametrize(
    "override",
    [
        "privacy.target_epsilon=-1",  # refused by validation, before Hydra makes the directory
        "privacy.target_epsilon=0.0001",  # refused by noise calibration, after it
    ],
)
def test_a_refused_run_leaves_no_run_directory_behind(tmp_path, monkeypatch, cli, override):
    monkeypatch.chdir(tmp_path)
    status, _, errors, _ = cli("train", *TINY, override, *QUIET)
    assert status == 2 and len(errors) == 1
    assert not list(tmp_path.rglob(".hydra"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "missing": lambda path: path.unlink(),
    "empty": lambda path: path.write_bytes(b""),
    "truncated": _truncate,
    "random": lambda path: path.write_bytes(os.urandom(4096)),
}


def _pickled_module(path: Path) -> None:
    import torch

    torch.save(torch.nn.Linear(2, 2), path)


@pytest.mark.parametrize(
    ("name", "corrupt", "says"),
    [
        ("model.pt", CORRUPTIONS["missing"], "does not exist"),
        ("model.pt", CORRUPTIONS["empty"], "is empty"),
        ("model.pt", CORRUPTIONS["truncated"], "is truncated or not a PyTorch file"),
        ("model.pt", CORRUPTIONS["random"], "is truncated or not a PyTorch file"),
        ("model.pt", _pickled_module, "holds pickled objects besides tensors"),
        ("metrics.json", CORRUPTIONS["missing"], "does not exist"),
        ("metrics.json", CORRUPTIONS["truncated"], "is not readable JSON"),
        ("split.json", CORRUPTIONS["truncated"], "is not readable JSON"),
        (".hydra/config.yaml", CORRUPTIONS["missing"], "has no .hydra/config.yaml"),
        (".hydra/config.yaml", lambda path: path.write_text("train: [\n"), "is not a readable dptrain config"),
        (".hydra/config.yaml", lambda path: path.write_text("train:\n  lrr: 1\n"), "is not a readable dptrain config"),
    ],
)
def test_audit_of_a_run_with_a_bad_file_names_the_file_in_one_line(finished_run, tmp_path, cli, name, corrupt, says):
    run_dir = _copy(finished_run, tmp_path)
    corrupt(run_dir / name)
    status, _, errors, err = cli("audit", f"run_dir={run_dir}", "audit=fast")
    assert status == 2 and len(errors) == 1, err
    assert says in errors[0] and (str(run_dir / name) in errors[0] or f"run_dir={run_dir}" in errors[0])
    assert "Traceback" not in err and "weights_only" not in err


@pytest.mark.parametrize("how", ["empty", "truncated", "random"])
def test_resume_from_a_bad_checkpoint_names_the_file_in_one_line(finished_run, tmp_path, cli, how):
    run_dir = _copy(finished_run, tmp_path)
    CORRUPTIONS[how](run_dir / "checkpoint.pt")
    status, _, errors, err = cli("train", f"train.resume={run_dir}", *QUIET)
    assert status == 2 and len(errors) == 1, err
    assert errors[0].startswith(f"dptrain: error: {run_dir / 'checkpoint.pt'} is ")
    assert "Traceback" not in err and "weights_only" not in err


@pytest.mark.slow
def test_a_worker_killed_before_the_first_checkpoint_is_one_line_that_does_not_suggest_resuming(tmp_path):
    from test_distributed import _workers_of

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "dptrain", "train", "launcher.nproc_per_node=2", *TINY, f"hydra.run.dir={run_dir}"]
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(workers := _workers_of(launcher.pid)) < 2:
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.05)
    os.kill(max(workers), signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 1 and not (run_dir / "checkpoint.pt").exists()
    errors = [line for line in stderr.splitlines() if line.startswith("dptrain: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].startswith("dptrain: error: worker rank ") and "(killed by signal 9) of 2 failed" in errors[0]
    assert f"{run_dir} holds no checkpoint to resume from: start the run again" in errors[0]
    assert "train.resume" not in errors[0]
    assert "failed (exitcode: -9)" in (run_dir / "train.log").read_text()
