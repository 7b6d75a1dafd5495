"""Validation of ``federation.engine``: the Flower engine's install, backend and resources, checked
before any training (a Simulation Engine whose ClientApps cannot be placed waits forever)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

from dptrain.config import Config
from dptrain.errors import UserError

ENGINES = ("builtin", "flower")
# The Flower release the engine is written and tested against (its Message API changed across 1.x).
FLOWER_SERIES = "1.42"
INSTALL = 'pip install "dptrain[flower]"'


def validate_engine(cfg: Config, cores: int) -> None:
    """Refuse, in one line each: an unknown engine; the Flower engine without a federation, without
    flwr 1.42 and its simulation extra, on a backend other than ray, or with ClientApp resources that
    this machine (``cores`` usable CPU cores, its GPUs) cannot give one ClientApp."""
    federation = cfg.federation
    if federation.engine not in ENGINES:
        raise UserError(f"unknown federation.engine {federation.engine!r}; choose one of: {', '.join(ENGINES)}")
    if federation.engine == "builtin":
        return
    if federation.name == "none":
        raise UserError("federation.engine=flower runs a federation: add federation=fedavg")
    if importlib.util.find_spec("flwr") is None:
        raise UserError(f"federation.engine=flower needs Flower, which is not installed: {INSTALL}")
    version = importlib.metadata.version("flwr")
    if not version.startswith(FLOWER_SERIES + "."):
        raise UserError(f"federation.engine=flower needs flwr {FLOWER_SERIES}.x, found {version}: {INSTALL}")
    flower = federation.flower
    if flower.backend != "ray":
        raise UserError(
            f"federation.flower.backend={flower.backend}: flwr {FLOWER_SERIES}'s Simulation Engine has one backend, ray"
        )
    if importlib.util.find_spec("ray") is None:
        raise UserError(f"federation.engine=flower needs Flower's simulation extra (ray): {INSTALL}")
    # Ray never places a ClientApp that asks for more than the machine has: the run would wait forever.
    if flower.client_cpus > cores:
        raise UserError(
            f"federation.flower.client_cpus={flower.client_cpus} exceeds the {cores} usable CPU cores: lower it"
        )
    gpus = torch.cuda.device_count()
    if flower.client_gpus > gpus:
        raise UserError(f"federation.flower.client_gpus={flower.client_gpus} exceeds the {gpus} GPUs here: lower it")

