"""Reliability of dptrain's runs as a user meets it: concurrent runs, a SIGKILL at every stage of a run
followed by its resume, and bad files. Prints one table row per command:

    case | exit code | message (first line) | artifacts intact

    python scripts/reliability.py [--workdir DIR]

Every command is its own ``python -m dptrain`` process on a tiny config (digits, logistic regression,
4 epochs, the standard audit with its 2 reference models trained in 2 pool processes). A kill at a stage
happens inside the process: ``--kill-at STAGE`` (this script's child mode) wraps the function that does
that stage so that the process SIGKILLs itself there (no clean-up, no flush: what an OOM kill or a power
cut leaves); the kill during the reference models comes from outside, once the pool processes run.
The same child mode holds a run in its first epoch (``hold:FILE``, until FILE exists), so that the
commands meant to meet a run while it trains do, however fast the machine.

"Artifacts intact" means: after a kill, every artifact present under its final name is complete (JSON
parses, ``model.pt`` / ``checkpoint.pt`` load with ``weights_only=True``); after a resume, ``metrics.json``,
``audit.json``'s numbers and ``model.pt`` equal those of the same run left uninterrupted; after a refused
command, no file of the run changed; after concurrent runs, each run directory holds one run (its
``.hydra/config.yaml`` seed is its ``manifest.json`` seed). A message containing "Traceback" is a failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = ("train.epochs=4", "train.progress=false", "audit=standard", "audit.workers=2")
QUICK = ("train.epochs=2", "train.progress=false", "audit=none")
# Compared between a resumed run and the uninterrupted one.
METRICS = ("epsilon", "steps", "noise_multiplier", "test_accuracy", "train_accuracy", "test_loss", "train_loss")


# --- child mode: run dptrain and SIGKILL this process at a stage -------------------------------------


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_call(module, name: str, call: int = 1) -> None:
    """SIGKILL this process on the ``call``-th call of ``module.name``."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            _die()
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


def _kill_inside_checkpoint_write(call: int) -> None:
    """SIGKILL this process halfway through writing the ``call``-th checkpoint's bytes."""
    import io

    import torch

    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        # write_atomic hands torch.save the temporary file's handle (named by its descriptor only).
        name = os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else str(f)
        if ".checkpoint.pt." in name:
            calls.append(1)
            if len(calls) == call:
                buffer = io.BytesIO()
                real(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                _die()
        return real(obj, f, *args, **kwargs)

    torch.save = save


def _hold_in_first_epoch(release: Path) -> None:
    """Keep this run in its first epoch (its run directory locked) until ``release`` exists."""
    from dptrain.training import recipe

    real = recipe.train_epoch

    def held(*args, **kwargs):
        deadline = time.monotonic() + 300
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return real(*args, **kwargs)

    recipe.train_epoch = held


def child(stage: str, argv: list[str]) -> None:
    from dptrain import pipeline
    from dptrain.audit import run as audit_run
    from dptrain.cli import main
    from dptrain.training import recipe, target

    if stage == "data":
        _kill_on_call(target, "load")
    elif stage.startswith("hold:"):
        _hold_in_first_epoch(Path(stage.removeprefix("hold:")))
    elif stage == "epoch-1":
        _kill_on_call(recipe, "train_epoch", 1)
    elif stage == "epoch-3":
        _kill_on_call(recipe, "train_epoch", 3)
    elif stage == "checkpoint":
        _kill_inside_checkpoint_write(2)
    elif stage == "audit":
        _kill_on_call(audit_run, "run_audit")
    elif stage == "manifest":
        _kill_on_call(pipeline, "write_manifest")
    main(argv)


# --- the driver --------------------------------------------------------------------------------------


class Result:
    def __init__(self, process: subprocess.CompletedProcess | subprocess.Popen, stdout: str, stderr: str):
        self.code = process.returncode
        self.stdout, self.stderr = stdout, stderr

    @property
    def message(self) -> str:
        if "Traceback" in self.stderr:
            return "TRACEBACK: " + next(line for line in self.stderr.splitlines() if "Traceback" in line)
        errors = [line for line in self.stderr.splitlines() if line.startswith("dptrain: error:")]
        if errors:
            return errors[0] if len(errors) == 1 else f"{len(errors)} error lines: {errors[0]}"
        if self.code == -signal.SIGKILL:
            return "(killed by SIGKILL: no output)"
        summary = [line for line in self.stdout.splitlines() if line.startswith(("test accuracy", "audit "))]
        return " ".join(summary[0].split()) if summary else "(no summary)"


def dptrain(*args: str, cwd: Path, kill_at: str | None = None) -> Result:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, "-m", "dptrain", *args]
    if kill_at is not None:
        command = [sys.executable, __file__, "--kill-at", kill_at, "--", *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    return Result(done, done.stdout, done.stderr)


def start(*args: str, cwd: Path, hold_until: Path | None = None) -> subprocess.Popen:
    """``dptrain *args`` in the background; with ``hold_until`` it stays in its first epoch until that file exists."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, "-m", "dptrain", *args]
    if hold_until is not None:
        command = [sys.executable, __file__, "--kill-at", f"hold:{hold_until}", "--", *args]
    return subprocess.Popen(
        command,
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def finish(process: subprocess.Popen) -> Result:
    stdout, stderr = process.communicate(timeout=900)
    return Result(process, stdout, stderr)


def spawned_children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` and that multiprocessing's spawn started."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and "spawn_main" in cmdline:
            children.append(int(entry.name))
    return children


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def files_complete(run_dir: Path) -> bool:
    """Every artifact present under its final name is complete."""
    import torch
    import yaml

    for path in run_dir.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".pt":
                torch.load(path, weights_only=True)
            elif path.suffix == ".yaml":
                yaml.safe_load(path.read_text())
        except Exception:
            return False
    return True


def digest(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of the run but the lock and the log (every command on a run appends to it)."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name not in (".lock", "train.log")
    }


def same_run(run_dir: Path, reference: Path) -> bool:
    """``run_dir`` ended with the uninterrupted ``reference`` run's metrics, audit numbers and model."""
    import torch

    try:
        metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
        audits = [json.loads((d / "audit.json").read_text())["mia"] for d in (run_dir, reference)]
        models = [torch.load(d / "model.pt", weights_only=True) for d in (run_dir, reference)]
    except (OSError, ValueError, KeyError):
        return False
    numbers = [{name: (m["auc"], m["epsilon_lower_bound"]["value"]) for name, m in audit.items()} for audit in audits]
    return (
        all(metrics[key] == expected[key] for key in METRICS)
        and numbers[0] == numbers[1]
        and models[0].keys() == models[1].keys()
        and all(torch.equal(models[0][k], models[1][k]) for k in models[0])
        and (run_dir / "manifest.json").is_file()
    )


def seeds_agree(run_dir: Path) -> bool:
    """``run_dir`` holds one run: its recorded config's train seed is its manifest's."""
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        manifest = json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return config.train.seed == manifest["seeds"]["train"] and (run_dir / "metrics.json").is_file()


def yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def concurrency(work: Path, rows: list) -> None:
    racers = [start("train", *QUICK, f"train.seed={seed}", cwd=work) for seed in (1, 2, 3)]
    results = [finish(p) for p in racers]
    dirs = sorted({line.split()[1] for r in results for line in r.stdout.splitlines() if line.startswith("artifacts")})
    rows.append(
        (
            "3 runs started at once, default directories",
            ",".join(str(r.code) for r in results),
            f"{len(dirs)} directories: " + ", ".join(Path(d).name for d in dirs),
            yes(len(dirs) == 3 and all(seeds_agree(Path(d)) for d in dirs)),
        )
    )

    shared = work / "shared"
    # The first run is held in its first epoch until both others have been answered: they meet it training.
    release = work / "release-shared"
    first = start("train", *QUICK, "train.seed=1", f"hydra.run.dir={shared}", cwd=work, hold_until=release)
    while first.poll() is None and not ((shared / ".lock").is_file() and (shared / ".lock").read_text().strip()):
        time.sleep(0.05)
    second = dptrain("train", *QUICK, "train.seed=2", f"hydra.run.dir={shared}", cwd=work)
    audit = dptrain("audit", f"run_dir={shared}", "audit=fast", cwd=work)
    release.touch()
    winner = finish(first)
    seed = json.loads((shared / "manifest.json").read_text())["seeds"]["train"] if winner.code == 0 else None
    intact = seeds_agree(shared) and seed == 1
    rows.append(("2 runs into one hydra.run.dir: the second", second.code, second.message, yes(intact)))
    rows.append(("dptrain audit of that run while it trains", audit.code, audit.message, yes(intact)))

    before = digest(shared)
    again = dptrain("train", *QUICK, f"hydra.run.dir={shared}", cwd=work)
    rows.append(("a new run into a finished run's directory", again.code, again.message, yes(digest(shared) == before)))

    runs = set((work / "outputs").rglob(".hydra"))
    unknown = dptrain("train", "model=nope", cwd=work)
    unchanged = set((work / "outputs").rglob(".hydra")) == runs
    rows.append(("an unknown config option (model=nope)", unknown.code, unknown.message, yes(unchanged)))

    sweep = work / "sweep"
    bad = dptrain("train", "-m", "privacy.target_epsilon=3,-1,8", *QUICK, f"hydra.sweep.dir={sweep}", cwd=work)
    rows.append(("a sweep with one invalid point", bad.code, bad.message, yes(not sweep.exists())))


def kills(work: Path, rows: list) -> None:
    reference = work / "uninterrupted"
    done = dptrain("train", *RUN, f"hydra.run.dir={reference}", cwd=work)
    rows.append(("the run, uninterrupted (reference)", done.code, done.message, yes(files_complete(reference))))
    stages = [
        ("data", "during data loading"),
        ("epoch-1", "in epoch 1, before the first checkpoint"),
        ("epoch-3", "in epoch 3, after two checkpoints"),
        ("checkpoint", "halfway through writing the 2nd checkpoint"),
        ("audit", "at the start of the audit"),
        ("references", "while the pool trains the reference models"),
        ("manifest", "before manifest.json"),
    ]
    for stage, when in stages:
        run_dir = work / f"kill-{stage}"
        args = ("train", *RUN, f"hydra.run.dir={run_dir}")
        if stage == "references":
            process = start(*args, cwd=work)
            while process.poll() is None and len(spawned_children(process.pid)) < 2:
                time.sleep(0.05)
            pool = spawned_children(process.pid)
            time.sleep(0.5)
            os.kill(process.pid, signal.SIGKILL)
            killed = finish(process)
            deadline = time.monotonic() + 5
            while any(alive(pid) for pid in pool) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = [pid for pid in pool if alive(pid)]
            message = f"{len(pool)} pool processes, " + (f"{len(left)} alive 5 s later" if left else "all ended with it")
            rows.append((f"SIGKILL {when}", killed.code, message, yes(files_complete(run_dir) and not left)))
        else:
            killed = dptrain(*args, cwd=work, kill_at=stage)
            rows.append((f"SIGKILL {when}", killed.code, killed.message, yes(files_complete(run_dir))))
        before = digest(run_dir)
        resumed = dptrain("train", f"train.resume={run_dir}", cwd=work)
        intact = same_run(run_dir, reference) if resumed.code == 0 else digest(run_dir) == before
        rows.append(("  then train.resume", resumed.code, resumed.message, yes(intact)))


def worker_kill(work: Path, rows: list) -> None:
    run_dir = work / "worker-killed"
    process = start("train", "launcher.nproc_per_node=2", *QUICK, f"hydra.run.dir={run_dir}", cwd=work)
    while process.poll() is None and len(spawned_children(process.pid)) < 2:
        time.sleep(0.05)
    workers = spawned_children(process.pid)
    if workers:
        os.kill(max(workers), signal.SIGKILL)
    result = finish(process)
    case = "2 workers, one SIGKILLed before the first checkpoint"
    rows.append((case, result.code, result.message, yes(files_complete(run_dir))))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD = {
    "missing": lambda path: path.unlink(),
    "empty": lambda path: path.write_bytes(b""),
    "truncated": _truncate,
    "random bytes": lambda path: path.write_bytes(os.urandom(4096)),
}


def bad_files(work: Path, rows: list) -> None:
    finished = work / "finished"
    dptrain("train", *QUICK, f"hydra.run.dir={finished}", cwd=work)
    cases = [(name, how, "audit") for name in ("model.pt",) for how in BAD]
    cases += [("checkpoint.pt", how, "resume") for how in BAD]
    cases += [(name, how, "audit") for name in ("metrics.json", "split.json") for how in ("missing", "truncated")]
    cases += [(".hydra/config.yaml", how, "audit") for how in ("missing", "truncated")]
    for name, how, command in cases:
        run_dir = work / f"bad-{name.replace('/', '_')}-{how.replace(' ', '_')}"
        shutil.copytree(finished, run_dir)
        BAD[how](run_dir / name)
        before = digest(run_dir)
        if command == "audit":
            result = dptrain("audit", f"run_dir={run_dir}", "audit=fast", cwd=work)
        else:
            result = dptrain("train", f"train.resume={run_dir}", cwd=work)
        rows.append((f"{command} with {name} {how}", result.code, result.message, yes(digest(run_dir) == before)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temporary directory, removed)")
    parser.add_argument("--kill-at", help=argparse.SUPPRESS)
    options, rest = parser.parse_known_args()
    if options.kill_at:
        child(options.kill_at, rest[1:] if rest[:1] == ["--"] else rest)
        return
    work = options.workdir or Path(tempfile.mkdtemp(prefix="dptrain-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list = []
    started = time.perf_counter()
    for part in (concurrency, kills, worker_kill, bad_files):
        part(work, rows)
    print("| case | exit code | message (first line) | artifacts intact |")
    print("|---|---|---|---|")
    for case, code, message, intact in rows:
        print(f"| {case} | {code} | {str(message).replace(str(work) + '/', '').replace('|', '/')} | {intact} |")
    print(f"\n{len(rows)} commands in {time.perf_counter() - started:.0f} s; failures: "
          f"{sum(1 for row in rows if row[3] != 'yes' or 'TRACEBACK' in str(row[2]))}")
    if options.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
