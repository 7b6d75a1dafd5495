"""Shared helpers: compose a run config from overrides exactly as ``dptrain train`` would, run the CLI, and
build a small audit report."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from dptrain.audit.results import AuditReport, Skipped
from dptrain.config import register_configs

# A run small enough for a unit test: digits, logistic regression, two epochs, no audit.
TINY = ("train.epochs=2", "train.progress=false", "audit=none")


def make_config(*overrides: str):
    """The config ``dptrain train <overrides>`` would run with."""
    register_configs()
    with initialize_config_module(config_module="dptrain.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


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
