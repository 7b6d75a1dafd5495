"""Shared helpers: compose a run config from overrides exactly as ``dptrain train`` would."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

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
