"""Reference models for membership attacks, trained by the run's own recipe (``train_model``) with a
derived config, in parallel processes where cores allow, cached in the run directory."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.config import recipe_hash
from dptrain.models import build_model
from dptrain.privacy import PrivacyPlan
from dptrain.tracking.atomic import save_torch_atomic, write_json_atomic
from dptrain.training import ranks
from dptrain.training.lifetime import child_pool

log = logging.getLogger(__name__)

# "population": every model trains on the population, so every audited record is OUT
# (offline attacks). "halves": each audited record is IN for exactly half of the
# models (Carlini et al. 2022's assignment), which online LiRA needs.
SCHEMES = ("population", "halves")
CACHE = "reference_models"


@dataclass
class ReferenceModels:
    """``models[j]`` trained on its own data; ``audited_in[j, i]``: model j trained on audited record i."""

    scheme: str
    models: list[nn.Module]
    audited_in: np.ndarray
    seconds: float
    cached: bool


def reference_config(cfg, plan: PrivacyPlan, seed: int):
    """The target's recipe for a reference model: same model, batch, epochs, clipping and noise, another seed.

    The noise multiplier is fixed to the target's (rather than re-calibrated to
    the reference data's size) so each step is the same mechanism the target ran.
    """
    derived = copy.deepcopy(cfg)
    derived.train.seed = seed
    derived.train.resume = None
    derived.train.checkpoint = False
    derived.train.progress = False
    if plan.private:
        derived.privacy.noise_multiplier = plan.noise_multiplier
        derived.privacy.target_epsilon = None
    return derived


def halves_assignment(count: int, audited: int, seed: int) -> np.ndarray:
    """(count, audited) bools with every column holding exactly count / 2 Trues, uniformly at random."""
    order = np.argsort(np.random.default_rng(seed).random((count, audited)), axis=0)
    return order < count // 2


def _train_one(cfg, train_set: TensorDataset, input_shape, num_classes, threads: int, gpu: int | None = None) -> dict:
    from dptrain.training.recipe import train_model

    torch.set_num_threads(threads)
    if gpu is not None:
        # A spawned process starts on GPU 0; it trains on its parent rank's GPU.
        torch.cuda.set_device(gpu)
    trained = train_model(cfg, train_set, input_shape=input_shape, num_classes=num_classes)
    return {key: value.cpu() for key, value in trained.model.state_dict().items()}


def default_workers(count: int) -> int:
    """One process per two cores (each keeps two threads), never more than there are models."""
    return max(1, min(count, (os.cpu_count() or 1) // 2))


def train_references(
    cfg,
    plan: PrivacyPlan,
    *,
    audited: TensorDataset,
    population: TensorDataset,
    input_shape,
    num_classes: int,
    scheme: str,
    count: int,
    seed: int,
    workers: int,
    cache_dir: Path | None,
) -> ReferenceModels:
    """Train (or load from ``cache_dir``) ``count`` reference models under ``scheme``.

    Precondition: ``population`` excludes canaries and every record of the
    target's training set. In a multi-process run every rank calls this: rank r
    trains models r, r + world, ... and rank 0 gathers the state dicts (the other
    ranks get no models), so the audit's wall time falls with the number of
    workers. A cache is reused only when scheme, count, seed and recipe hash all
    match, so a later ``dptrain audit`` never mixes models of another recipe into
    its attacks.
    """
    n = len(audited)
    audited_in = halves_assignment(count, n, seed) if scheme == "halves" else np.zeros((count, n), dtype=bool)
    key = {"scheme": scheme, "count": count, "seed": seed, "recipe": recipe_hash(cfg)}
    directory = None if cache_dir is None else cache_dir / CACHE / f"{scheme}-{count}"
    if directory is not None and (directory / "index.json").is_file():
        if json.loads((directory / "index.json").read_text()) == key:
            # Only rank 0 attacks: the other ranks of a multi-process run need no models.
            models = []
            for j in range(count if ranks.is_main() else 0):
                model = build_model(cfg.model, input_shape, num_classes)
                model.load_state_dict(torch.load(directory / f"model_{j}.pt", weights_only=True))
                models.append(model)
            log.info("reusing %d %s reference models from %s", count, scheme, directory)
            return ReferenceModels(scheme, models, audited_in, 0.0, cached=True)

    features, labels = audited.tensors
    jobs = []
    for j in range(count):
        train_set = population if scheme == "population" else TensorDataset(features[audited_in[j]], labels[audited_in[j]])
        jobs.append((reference_config(cfg, plan, seed * 1000 + j + 1), train_set, tuple(input_shape), num_classes))
    started = time.perf_counter()
    rank, world = ranks.rank(), ranks.world_size()
    # In a multi-process run each rank trains every world-th model and rank 0 gathers them.
    mine = list(range(rank, count, world))
    workers = min(workers, len(mine))
    log.info("rank %d trains %s reference models %s in %d process(es)", rank, scheme, mine, max(workers, 1))
    if workers > 1:
        from dptrain.training.recipe import resolve_device

        threads = max(1, torch.get_num_threads() // workers)
        gpu = torch.cuda.current_device() if resolve_device(cfg.train.device).type == "cuda" else None
        with child_pool(workers) as pool:
            trained = list(
                pool.map(_train_one, *zip(*(jobs[j] for j in mine)), [threads] * len(mine), [gpu] * len(mine))
            )
    else:
        trained = [_train_one(*jobs[j], threads=torch.get_num_threads()) for j in mine]
    parts = ranks.gather_to_main(dict(zip(mine, trained)))
    seconds = time.perf_counter() - started
    if parts is None:
        # Another rank of a multi-process run: rank 0 attacks, so its models are all it needs.
        return ReferenceModels(scheme, [], audited_in, seconds, cached=False)
    states = {j: state for part in parts for j, state in part.items()}

    models = []
    for j in range(count):
        model = build_model(cfg.model, input_shape, num_classes)
        model.load_state_dict(states[j])
        models.append(model)
        if directory is not None:
            save_torch_atomic(directory / f"model_{j}.pt", states[j])
    if directory is not None:
        write_json_atomic(directory / "index.json", key)
    return ReferenceModels(scheme, models, audited_in, seconds, cached=False)
