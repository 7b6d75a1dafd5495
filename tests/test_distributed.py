"""Several processes over torch.distributed (gloo on CPU): DP data parallelism, robust aggregation
across workers, parallel reference models, and a worker that dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import TINY, make_config
from dptrain import pipeline
from dptrain.config import recipe_hash
from dptrain.validation import validate
from dptrain.data import Split, load
from dptrain.errors import UserError
from dptrain.training import centralized, distributed, launch, recipe
from dptrain.training.checkpoint import Checkpoint


class Interrupted(Exception):
    """What a rank raises in place of an epoch, to leave a run after its last checkpoint."""


def _rank(
    rank: int, world: int, port: int, overrides: tuple, run_dir: str, out_dir: str, epochs: int | None, resume: bool
) -> None:
    """Train ``overrides`` as rank ``rank`` of ``world``; with ``epochs``, every rank stops after that
    many epochs of this call as an interrupted run would; with ``resume``, it continues from ``run_dir``."""
    os.environ.update(
        MASTER_ADDR="localhost", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    cfg = make_config(*overrides)
    if epochs is not None:
        real_epoch, calls = recipe.train_epoch, []

        def interrupted_epoch(*args, **kwargs):
            calls.append(1)
            if len(calls) > epochs:
                raise Interrupted
            return real_epoch(*args, **kwargs)

        recipe.train_epoch = interrupted_epoch
    with launch.process_group("gloo"):
        _, sizes = validate(cfg)
        plan = centralized.plan(cfg, sizes)
        checkpoint = Checkpoint.load(run_dir, recipe_hash(cfg)) if resume else None
        try:
            target = centralized.train_target(cfg, Path(run_dir), plan, None, checkpoint)
        except Interrupted:
            return
    audited = target.data.split
    torch.save(
        {
            "state": target.model.state_dict(),
            "epsilon": target.epsilon,
            "metrics": target.metrics.to_dict(),
            "audited": {"members": audited.members, "non_members": audited.non_members},
        },
        Path(out_dir) / f"rank{rank}.pt",
    )


def _train_on_ranks(
    world: int, overrides: tuple, tmp_path: Path, epochs: int | None = None, resume: bool = False
) -> list[dict]:
    """Train the target of ``overrides`` on ``world`` processes; every rank's model and numbers
    (none when ``epochs`` interrupts the run, see ``_rank``)."""
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = (world, launch.free_port(), overrides, str(run_dir), str(out_dir), epochs, resume)
    mp.spawn(_rank, args=args, nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world) if epochs is None]


def test_dpddp_ranks_take_every_step_end_identical_and_spend_the_single_process_epsilon(tmp_path):
    # A logical batch of 2 over 2 ranks: most per-rank batches are empty, and every rank must still take
    # all 30 planned steps (Opacus' distributed sampler skips empty ones and the ranks desynchronize).
    overrides = (*TINY, "dataset.max_members=60", "train.batch_size=2", "train.epochs=1")
    ranks = _train_on_ranks(2, overrides, tmp_path / "two")
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    single = pipeline.train(make_config(*overrides), tmp_path / "one")[0].to_dict()
    assert single["steps"] == 30
    metrics = ranks[0]["metrics"]
    assert metrics["parallel_mode"] == "dpddp" and metrics["world_size"] == 2
    for key in ("noise_multiplier", "sample_rate", "steps"):
        assert metrics[key] == single[key], key
    assert ranks[0]["epsilon"] == pytest.approx(single["epsilon"], rel=1e-12)


ROBUST = (*TINY, "train.epochs=8", "privacy.target_epsilon=8")


def test_three_robust_workers_with_a_byzantine_one_end_identical_within_their_budget(tmp_path):
    # The small version of the two slow tests below: the gathered median over three ranks, one of them
    # flipping its gradient's sign, every rank applying the same aggregate.
    overrides = (
        *TINY, "dataset.max_members=120", "train.batch_size=30", "aggregator=median", "attack=sign_flip",
        "attack.byzantine=1",
    )
    ranks = _train_on_ranks(3, overrides, tmp_path)
    assert all(torch.equal(ranks[0]["state"][k], r["state"][k]) for r in ranks for k in r["state"])
    metrics = ranks[0]["metrics"]
    assert metrics["parallel_mode"] == "robust" and metrics["world_size"] == 3
    assert 0 < metrics["epsilon"] <= 3.0 and metrics["test_accuracy"] > 0.2


@pytest.mark.slow
def test_median_over_four_workers_survives_a_sign_flipping_worker_that_breaks_the_mean(tmp_path):
    def accuracy(name: str, *overrides: str) -> float:
        ranks = _train_on_ranks(4, (*ROBUST, *overrides), tmp_path / name)
        assert all(torch.equal(ranks[0]["state"][k], r["state"][k]) for r in ranks for k in r["state"])
        assert ranks[0]["metrics"]["parallel_mode"] == "robust"
        return ranks[0]["metrics"]["test_accuracy"]

    attacked = ("attack=sign_flip", "attack.byzantine=1", "attack.scale=10")
    honest = accuracy("honest", "aggregator=median")
    median = accuracy("median", "aggregator=median", *attacked)
    mean = accuracy("mean", "aggregator=mean", *attacked)
    assert honest > 0.6
    assert median > honest - 0.15
    assert mean < median - 0.3


@pytest.mark.slow
def test_a_resumed_robust_run_with_a_stateful_aggregator_and_a_random_attack_matches_the_uninterrupted_run(tmp_path):
    # Centered clipping carries its centre from step to step; the Gaussian attack draws every step.
    overrides = (*ROBUST, "train.epochs=4", "aggregator=centered_clipping", "attack=gaussian", "attack.byzantine=1")
    uninterrupted = _train_on_ranks(3, overrides, tmp_path / "a")[0]
    _train_on_ranks(3, overrides, tmp_path / "b", epochs=2)
    assert not (tmp_path / "b" / "out" / "rank0.pt").exists()
    assert torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)["completed"] == 2
    resumed = _train_on_ranks(3, overrides, tmp_path / "b", resume=True)[0]
    for key, value in uninterrupted["state"].items():
        assert torch.equal(value, resumed["state"][key]), key
    assert resumed["epsilon"] == uninterrupted["epsilon"]


@pytest.mark.slow
def test_a_three_worker_audit_takes_exactly_the_honest_ranks_shards_as_members(tmp_path):
    # One rank of 3 plays Byzantine; 20 canaries give the honest ranks datasets of unequal size.
    overrides = (*ROBUST, "train.epochs=2", "aggregator=median", "attack=sign_flip", "attack.byzantine=1",
                 "audit.canaries.count=20", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0")
    ranks = _train_on_ranks(3, overrides, tmp_path)
    cfg = make_config(*overrides)
    split = Split.load(tmp_path / "run" / "split.json")
    (byzantine,) = distributed.byzantine_ranks(1, 3, cfg.train.seed)
    # Rank r trains members r, r + 3, ..., 191 of them; the 575 % 3 = 2 left over train nowhere.
    shards = {rank: split.members[rank::3][:191] for rank in range(3)}
    honest = np.sort(np.concatenate([shards[rank] for rank in range(3) if rank != byzantine]))
    leftovers = split.members[573:]
    audited = ranks[0]["audited"]
    assert np.array_equal(audited["members"], honest)
    assert not set(audited["members"]) & (set(shards[byzantine]) | set(leftovers))
    assert all(np.array_equal(r["audited"]["members"], honest) for r in ranks)
    labels = load(cfg.dataset).labels.numpy()
    assert len(audited["non_members"]) == len(honest) == ranks[0]["metrics"]["audited_members"]
    assert set(audited["non_members"]) <= set(split.non_members)
    assert np.array_equal(np.bincount(labels[audited["non_members"]]), np.bincount(labels[honest]))
    # `dptrain audit` derives the same set from the config and split.json.
    assert np.array_equal(centralized.load_target(cfg, tmp_path / "run").data.split.members, honest)
    assert 0 < ranks[0]["metrics"]["canaries_included"] < 20 and ranks[0]["epsilon"] > 0


def _workers_of(pid: int) -> list[int]:
    """Child processes of ``pid`` that run a spawned worker (not multiprocessing's resource tracker)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and "spawn_main" in cmdline:
            children.append(int(entry.name))
    return children


@pytest.mark.slow
def test_a_killed_worker_stops_the_run_with_its_rank_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "dptrain", "train", "launcher.nproc_per_node=2", "train.epochs=400", "audit=none",
        "train.progress=false", f"hydra.run.dir={run_dir}",
    ]
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.2)
    workers = _workers_of(launcher.pid)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=60)
    assert time.monotonic() - killed < 60
    assert launcher.returncode != 0
    error = [line for line in stderr.splitlines() if line.startswith("dptrain: error:")]
    assert len(error) == 1 and "rank" in error[0] and "train.resume" in error[0]
    assert not (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob(".*.tmp"))

    resumed = subprocess.run(
        [sys.executable, "-m", "dptrain", "train", f"train.resume={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 400 * 5
    assert 0.9 * 3.0 <= metrics["epsilon"] <= 3.0


def test_two_process_audit_trains_reference_models_on_both_ranks(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "dptrain", "train", "launcher.nproc_per_node=2", "train.epochs=2",
         "train.progress=false", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "parallel       2 processes: DP data parallelism" in result.stdout
    log = (run_dir / "train.log").read_text()
    assert "[rank 0]" in log and "rank 0 trains population reference models [0]" in log
    assert "[rank 1]" in log and "rank 1 trains population reference models [1]" in log
    report = json.loads((run_dir / "audit.json").read_text())
    single = pipeline.train(make_config("train.epochs=2", "train.progress=false"), tmp_path / "single")[1].to_dict()
    assert set(report) == set(single) and set(report["mia"]) == set(single["mia"]) == {"loss", "rmia"}
    assert set(report["mia"]["rmia"]) == set(single["mia"]["rmia"])


def test_the_non_private_baseline_splits_its_batch_over_workers_and_says_when_it_cannot():
    # Without noise there is nothing for DPDDP to add: the baseline takes the gathered path.
    cfg = make_config(*TINY, "launcher.nproc_per_node=4", "privacy.target_epsilon=inf", "train.batch_size=2")
    with pytest.raises(UserError, match=r"train.batch_size=2 is split over 4 workers: use at least 4"):
        validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # ALIE derives z from the 4 workers and 3 attackers: undefined, so refused before any worker starts.
        (("attack=alie", "attack.byzantine=3", "aggregator=mean"), "alie needs 1 <= f <= floor(n/2)"),
        (("aggregator=krum", "attack=sign_flip", "attack.byzantine=1"), "krum needs n > 2f + 2 (n=4, f=1)"),
        # Private with the mean would be DPDDP; Byzantine workers without an attack are refused on any path.
        (("attack.byzantine=1",), "attack.byzantine=1 with attack=none"),
    ],
)
def test_each_invalid_worker_setup_fails_before_training_with_one_line(overrides, expected):
    with pytest.raises(UserError) as error:
        validate(make_config(*TINY, "launcher.nproc_per_node=4", *overrides))
    assert expected in str(error.value) and "\n" not in str(error.value)
