"""Shared helpers: compose a run config from overrides exactly as ``dptrain train`` would, run the CLI,
build a small audit report, and one DP-SGD step computed by hand."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from dptrain.audit.results import AuditReport, Skipped
from dptrain.config import register_configs

# A run small enough for a unit test: digits, logistic regression, two epochs, no audit.
TINY = ("train.epochs=2", "train.progress=false", "audit=none")


@pytest.fixture(autouse=True, scope="session")
def calibration_cache(tmp_path_factory):
    """Noise calibrations are cached in this session's own directory, never in the user's cache; runs in
    subprocesses inherit it."""
    from dptrain.privacy.calibration_cache import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("dptrain-cache"))
    yield
    if before is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = before


def make_config(*overrides: str):
    """The config ``dptrain train <overrides>`` would run with."""
    register_configs()
    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def one_thread():
    """torch at one intra-op thread for the test: with two on the shared 2-core machine, a small model's
    step can stall for 0.15-0.25 s instead of taking a millisecond (timed races then take seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config():
    return lambda *overrides: make_config(*TINY, *overrides)


def run_dptrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``dptrain ARGS`` as a user runs it, in a fresh interpreter (Hydra's own short error reports)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "dptrain", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def make_audit_report(**parts) -> AuditReport:
    """A small audit report of a private run with no attack, attribute inference off and nothing else
    run; ``parts`` replace its fields (``mia``, ``implementation``, ...)."""
    report = AuditReport(
        level="fast", accountant_epsilon=1.0, delta=1e-5, confidence=0.95, members=10, non_members=10, mia={},
        aia=Skipped("audit.aia.enabled=false"), canary=None, implementation=None, reference_models=None, warnings=[],
        audit_seconds=0.1, audited_at="2025-01-01T00:00:00.000+00:00",
    )  # fmt: skip
    return dataclasses.replace(report, **parts)


def hand_dp_step(weight, bias, inputs, labels, clip: float, per_layer: bool, noise: float, generator, lr: float):
    """One DP-SGD step of softmax regression, by hand: per-example gradients of the cross-entropy
    (e x^T and e with e = softmax(Wx + b) - onehot(y)), each clipped to ``clip`` (per layer: each
    parameter to clip / sqrt(2)), summed, plus N(0, (noise * clip)^2) drawn per parameter in order,
    divided by the batch size, times lr (Abadi et al. 2016, Algorithm 1)."""
    errors = torch.softmax(inputs @ weight.T + bias, dim=1) - torch.nn.functional.one_hot(labels, weight.shape[0])
    grad_w = errors[:, :, None] * inputs[:, None, :]
    grad_b = errors
    norm_w = grad_w.flatten(1).norm(dim=1)
    norm_b = grad_b.norm(dim=1)
    if per_layer:
        factor_w = (clip / math.sqrt(2) / norm_w).clamp(max=1.0)
        factor_b = (clip / math.sqrt(2) / norm_b).clamp(max=1.0)
    else:
        factor_w = factor_b = (clip / torch.sqrt(norm_w**2 + norm_b**2)).clamp(max=1.0)
    sum_w = (grad_w * factor_w[:, None, None]).sum(dim=0)
    sum_b = (grad_b * factor_b[:, None]).sum(dim=0)
    sum_w = sum_w + torch.normal(0.0, noise * clip, size=sum_w.shape, generator=generator)
    sum_b = sum_b + torch.normal(0.0, noise * clip, size=sum_b.shape, generator=generator)
    return weight - lr * sum_w / len(labels), bias - lr * sum_b / len(labels)


def full_batch_dp_training(
    model, inputs, labels, *, noise: float, clip: float, lr: float, noise_seed: int = 0, **privacy
):
    """``model`` made private for one full-batch DP-SGD step (sample rate 1, one step) on ``inputs`` and
    ``labels`` by plain SGD at ``lr``: the setting of the hand-computed steps. ``privacy`` are further
    ``PrivacyConfig`` fields (``grad_sample_mode``, ``clipping``, ...); noise is drawn from ``noise_seed``."""
    from torch.utils.data import TensorDataset

    from dptrain.config import PrivacyConfig
    from dptrain.privacy import PrivacyPlan, make_private

    plan = PrivacyPlan(
        private=True, accountant="prv", delta=1e-5, target_epsilon=None, noise_multiplier=noise,
        max_grad_norm=clip, sample_rate=1.0, steps_per_epoch=1, steps=1, planned_epsilon=None,
    )  # fmt: skip
    return make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        dataset=TensorDataset(inputs, labels),
        plan=plan,
        cfg=PrivacyConfig(**privacy),
        batch_size=len(labels),
        max_physical_batch_size=None,
        sampling_generator=torch.Generator(),
        noise_generator=torch.Generator().manual_seed(noise_seed),
    )


def interrupt_at_epoch(monkeypatch, epoch: int) -> None:
    """Make this process's training raise KeyboardInterrupt (what Ctrl-C raises) when its ``epoch``-th
    epoch would start; ``monkeypatch.undo()`` lets the next run train again."""
    from dptrain.training import loop

    real, calls = loop.train_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("dptrain.training.recipe.train_epoch", interrupted)


def same_weights(run_a, run_b) -> bool:
    """Whether the two run directories' ``model.pt`` hold the same tensors, bit for bit."""
    a, b = (torch.load(Path(run) / "model.pt", weights_only=True) for run in (run_a, run_b))
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def interrupted_and_resumed(configure, overrides, tmp_path, monkeypatch, epoch: int) -> bool:
    """Train ``configure(*overrides)`` into ``tmp_path / "a"``; train it again into ``tmp_path / "b"``,
    interrupted when its ``epoch``-th epoch would start, and resume that run: whether the resumed run's
    weights are the uninterrupted run's, bit for bit."""
    from dptrain import pipeline

    pipeline.train(configure(*overrides), tmp_path / "a")
    interrupt_at_epoch(monkeypatch, epoch)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(configure(*overrides), tmp_path / "b")
    monkeypatch.undo()
    pipeline.train(configure(*overrides, f"train.resume={tmp_path / 'b'}"), tmp_path / "b")
    return same_weights(tmp_path / "a", tmp_path / "b")


def interrupt_at_round(monkeypatch, round_index: int) -> None:
    """Make this process's federated training raise KeyboardInterrupt when round ``round_index`` would
    start; ``monkeypatch.undo()`` lets the next run train again."""
    from dptrain.training import federated

    real = federated.FederatedServer.run_round

    def interrupted(self, index):
        if index == round_index:
            raise KeyboardInterrupt
        return real(self, index)

    monkeypatch.setattr(federated.FederatedServer, "run_round", interrupted)


def on_pixels(model, units):
    """``model`` fed pixels in [0, 1] (mapped to its units by ``low + scale * pixel``), in eval mode: the input
    attack libraries work on."""
    from torch import nn

    class Standardize(nn.Module):
        def forward(self, pixels):
            return units.low + units.scale * pixels

    return nn.Sequential(Standardize(), model).eval()


def to_pixels(x, units):
    """Inputs in the model's units as pixels in [0, 1]."""
    return ((x - units.low) / units.scale).clamp(0, 1)


@pytest.fixture(scope="session")
def digits_mlp():
    """An MLP trained briefly on digits as the model sees them (standardized pixels), in eval mode, with
    the first 200 test records and the data's units: a fixed model for the evasion tests."""
    from torch import nn

    from dptrain.config import DatasetConfig
    from dptrain.data import load, make_split, prepare

    cfg = DatasetConfig(name="digits")
    data = load(cfg)
    prepared = prepare(data, make_split(data, cfg))
    x, y = prepared.members.tensors[:2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    test_x, test_y = (t[:200] for t in prepared.test.tensors[:2])
    return model.eval(), test_x, test_y, prepared.units


# In-process runs leave the test process's logging alone.
QUIET = ("hydra/job_logging=none", "hydra/hydra_logging=none")


def in_process(*args: str) -> int:
    """``dptrain ARGS`` in this process (no interpreter start-up); its exit status. The process umask,
    which dptrain makes owner-only, and sys.argv are restored afterwards."""
    from dptrain.cli import main

    umask, argv = os.umask(0o022), sys.argv
    os.umask(umask)
    try:
        main(list(args))
    except SystemExit as exit:
        return exit.code
    finally:
        os.umask(umask)
        sys.argv = argv
    return 0


@pytest.fixture
def cli(capsys):
    """Run ``dptrain ARGS`` in this process; return (status, stdout, the ``dptrain: error:`` lines, stderr)."""

    def run(*args: str):
        status = in_process(*args)
        out, err = capsys.readouterr()
        return status, out, [line for line in err.splitlines() if line.startswith("dptrain: error:")], err

    return run
