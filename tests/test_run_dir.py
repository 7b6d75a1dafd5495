"""Run directories as one process's resource: fresh names, the lock, started runs, permissions, and
worker processes that end with their parent."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dptrain.errors import UserError
from dptrain.tracking.atomic import process_umask, write_text_atomic
from dptrain.tracking.run_dir import (
    PRIVATE_ARTIFACTS,
    RunLock,
    claim_fresh,
    discard_if_unstarted,
    refuse_started_run,
    restrict_umask,
    resume_hint,
)


def _python(script: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for a reaper has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_runs_started_together_from_one_time_stamped_name_each_get_their_own_directory(tmp_path):
    base = tmp_path / "outputs" / "2026-11-30" / "12-00-00"
    start = threading.Barrier(8)
    claimed: list[Path] = []

    def claim() -> None:
        start.wait()
        claimed.append(claim_fresh(base))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in claimed) == sorted(["12-00-00"] + [f"12-00-00-{k}" for k in range(1, 8)])
    assert all(p.is_dir() for p in claimed)


def test_a_second_writer_is_refused_with_the_holders_pid_until_the_holder_is_killed(tmp_path):
    holder = _python(
        f"""
        import time
        from dptrain.tracking.run_dir import RunLock
        lock = RunLock({str(tmp_path)!r})
        print("locked", flush=True)
        time.sleep(60)
        """
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = f"{tmp_path} is being written by another dptrain process \\(pid {holder.pid}\\)"
        with pytest.raises(UserError, match=busy):
            RunLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: no stale lock blocks the next run.
    with RunLock(tmp_path):
        pass


def test_a_new_run_into_a_started_run_is_refused_and_pointed_to_resume_only_when_there_is_a_checkpoint(tmp_path):
    refuse_started_run(tmp_path)
    (tmp_path / "split.json").write_text("{}")
    with pytest.raises(UserError, match="already holds a run \\(split.json\\): write this run elsewhere"):
        refuse_started_run(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(UserError, match=f"continue it with dptrain train train.resume={tmp_path}"):
        refuse_started_run(tmp_path)


def test_resume_is_suggested_only_where_a_checkpoint_exists(tmp_path):
    assert "train.resume" not in resume_hint(tmp_path) and "remove" not in resume_hint(tmp_path)
    (tmp_path / "split.json").write_text("{}")
    assert "train.resume" not in resume_hint(tmp_path) and f"remove {tmp_path}" in resume_hint(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert resume_hint(tmp_path) == f"continue from the last checkpoint with: dptrain train train.resume={tmp_path}"


def test_only_a_directory_holding_nothing_but_hydras_record_is_discarded(tmp_path):
    refused, started = tmp_path / "refused", tmp_path / "started"
    for run in (refused, started):
        (run / ".hydra").mkdir(parents=True)
        (run / "train.log").write_text("")
    (started / "split.json").write_text("{}")
    assert discard_if_unstarted(refused) and not refused.exists()
    assert not discard_if_unstarted(started) and (started / "split.json").exists()


def test_the_umask_is_read_without_being_changed(monkeypatch):
    expected = os.umask(0o022)
    os.umask(expected)

    def changed(_):
        raise AssertionError("os.umask changes the umask of every thread")

    monkeypatch.setattr(os, "umask", changed)
    assert process_umask() == expected


def test_atomic_writes_get_the_mode_the_umask_allows(tmp_path):
    previous = os.umask(0o027)
    try:
        path = write_text_atomic(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize(("setting", "mode"), [(None, 0o077), ("0", 0o022)])
def test_artifacts_are_owner_only_unless_relaxed(monkeypatch, setting, mode):
    if setting is None:
        monkeypatch.delenv(PRIVATE_ARTIFACTS, raising=False)
    else:
        monkeypatch.setenv(PRIVATE_ARTIFACTS, setting)
    previous = os.umask(0o022)
    try:
        restrict_umask()
        assert process_umask() == mode
    finally:
        os.umask(previous)


def test_pool_processes_end_at_once_when_their_parent_is_killed():
    parent = _python(
        """
        import os, time
        from dptrain.training.lifetime import child_pool
        pool = child_pool(2)
        futures = [pool.submit(time.sleep, 0.2) for _ in range(2)]
        [f.result() for f in futures]
        for _ in range(2):
            pool.submit(time.sleep, 60)
        print(*pool._processes, flush=True)
        time.sleep(60)
        """
    )
    children: list[int] = []
    try:
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 2 and all(_alive(pid) for pid in children)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 1.0
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in children), "pool processes outlived their parent by over 1 s"
    finally:
        parent.kill()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
