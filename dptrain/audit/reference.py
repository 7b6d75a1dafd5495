"""Reference models for membership attacks, trained by the run's own recipe (``train_model``, or
``train_federation`` for a federated target) with a derived config: the zoo's small models all at
once as one stacked model (``dptrain.training.stacked``), others in parallel processes where cores
allow; cached in the run directory."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.config import recipe_hash
from dptrain.data import subset
from dptrain.errors import UserError
from dptrain.models import build_model
from dptrain.seeds import Stream, derived_seed
from dptrain.tracking.atomic import save_torch_atomic, write_json_atomic
from dptrain.training import ranks
from dptrain.training.lifetime import child_pool
from dptrain.training.recipes import recipe_for
from dptrain.training.stacked import train_stacked, unstackable
from dptrain.training.threads import core_share, recorded_threads, thread_count

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


def _federated(cfg) -> bool:
    return cfg.federation.name == "fedavg"


def halves_assignment(count: int, audited: int, seed: int) -> np.ndarray:
    """(count, audited) bools with every column holding exactly count / 2 Trues, uniformly at random."""
    order = np.argsort(np.random.default_rng(seed).random((count, audited)), axis=0)
    return order < count // 2


def federated_halves(cfgs: list, labels: np.ndarray, seed: int) -> tuple[list[np.ndarray], list, np.ndarray]:
    """LiRA's assignment for reference federations ``cfgs`` (an even count) over audited records
    with ``labels``: each model's training set (audited positions, in order), its plan, and
    ``audited_in`` (True where the record sits with an honest client that trains).

    Models 2t and 2t + 1 split every class into complementary halves, so each record is in half of
    the training sets and each set's label histogram is known before its records are chosen. A
    federation's partition, Byzantine clients and schedule depend on that histogram and its seed
    alone (``planned_federation``), so the positions its honest, trained clients will hold are known
    too: each model puts there the records of its half that are IN for the fewest models so far
    (ties broken at random), which spreads the IN models evenly over the records, and the rest on
    its Byzantine and never-scheduled clients, where they do not reach the model honestly (OUT).
    """
    from dptrain.training.federated import planned_federation

    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    audited_in = np.zeros((len(cfgs), len(labels)), dtype=bool)
    orders, plans = [], []
    for pair in range(len(cfgs) // 2):
        shuffled = [rng.permutation(np.flatnonzero(labels == label)) for label in classes]
        for side in (0, 1):
            j = 2 * pair + side
            halves = [np.array_split(records, [len(records) // 2])[side] for records in shuffled]
            plan, honest = planned_federation(cfgs[j], np.repeat(classes, [len(half) for half in halves]))
            order = np.concatenate(halves)
            start = 0
            for half in halves:
                slots = np.arange(start, start + len(half))
                start += len(half)
                on_honest = np.isin(slots, honest)
                ranked = half[np.lexsort((rng.random(len(half)), audited_in.sum(axis=0)[half]))]
                chosen = ranked[: on_honest.sum()]
                order[slots[on_honest]], order[slots[~on_honest]] = chosen, ranked[len(chosen) :]
                audited_in[j, chosen] = True
            orders.append(order)
            plans.append(plan)
    return orders, plans, audited_in


def _train_group(jobs: list[tuple], gpu: int | None = None) -> list[dict]:
    """The state dicts of reference models ``jobs`` (config, training set, input shape, classes, plan), at
    the intra-op threads their ``cfg.train.threads`` sets: trained together as one stacked model
    (``dptrain.training.stacked``) where their config allows, else one by one by the target's recipe
    (``train_reference``, under the plan for a federated target)."""
    from dptrain.training.recipe import resolve_device

    if gpu is not None:
        # A spawned process starts on GPU 0; it trains on its parent rank's GPU.
        torch.cuda.set_device(gpu)
    cfg, _, input_shape, num_classes, _ = jobs[0]
    device = resolve_device(cfg.train.device)
    if unstackable(cfg) is None:
        # train_model sets its threads itself; the stacked loop is not train_model.
        torch.set_num_threads(thread_count(cfg.train.threads) or torch.get_num_threads())
        states = train_stacked(
            [job[0] for job in jobs], [job[1] for job in jobs], input_shape=input_shape, num_classes=num_classes,
            device=device,
        )  # fmt: skip
        return [{key: value.cpu() for key, value in state.items()} for state in states]
    models = [
        recipe_for(cfg).train_reference(cfg, plan, train_set, input_shape=input_shape, num_classes=num_classes, device=device)
        for cfg, train_set, input_shape, num_classes, plan in jobs
    ]
    return [{key: value.cpu() for key, value in model.state_dict().items()} for model in models]


def default_workers(count: int, cfg=None) -> int:
    """One process when ``cfg``'s models train stacked; else one per two cores of this process's share
    (``core_share``: a rank's, in a multi-process run), never more than there are models."""
    if cfg is not None and unstackable(cfg) is None:
        return 1
    return max(1, min(count, core_share() // 2))


def reference_threads(target_threads: int | None, workers: int) -> int:
    """Intra-op threads of each reference model: the target's (they train the same model at the same
    batch, so ``train.threads=auto``'s choice holds for them: ``recorded_threads``), at most each of
    ``workers`` pool processes' share of the cores."""
    threads = recorded_threads(target_threads)
    return min(threads, core_share(workers)) if workers > 1 else threads


def train_references(
    cfg,
    plan,
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
    min_in: int = 0,
    target_threads: int | None = None,
) -> ReferenceModels:
    """Train (or load from ``cache_dir``) ``count`` reference models under ``scheme``; ``plan`` is the
    target's recipe plan (``dptrain.training.recipes``), handed back to the recipe.

    A federated target's reference models are federations of the same recipe
    (the recipe's ``reference_config`` and ``train_reference``) over the population or, for
    "halves", ``federated_halves``. Unless every audited record is IN for at least
    ``min_in`` models, a UserError says so before any model trains.
    Precondition: ``population`` excludes canaries and every record of the
    target's training set. In a multi-process run every rank calls this: rank r
    trains models r, r + world, ... and rank 0 gathers the state dicts (the other
    ranks get no models), so the audit's wall time falls with the number of
    workers. A cache is reused only when scheme, count, seed and recipe hash all
    match, so a later ``dptrain audit`` never mixes models of another recipe into
    its attacks. Each model trains at ``reference_threads(target_threads, workers)`` intra-op threads.
    """
    n = len(audited)
    recipe = recipe_for(cfg)
    cfgs = [recipe.reference_config(cfg, plan, derived_seed(seed, Stream.REFERENCE, j)) for j in range(count)]
    plans: list = [None] * count
    if scheme == "population":
        audited_in = np.zeros((count, n), dtype=bool)
    elif _federated(cfg):
        orders, plans, audited_in = federated_halves(cfgs, audited.tensors[1].numpy(), derived_seed(seed, Stream.REFERENCE))
    else:
        audited_in = halves_assignment(count, n, derived_seed(seed, Stream.REFERENCE))
        orders = [np.flatnonzero(row) for row in audited_in]
    short = int((audited_in.sum(axis=0) < min_in).sum())
    if short:
        raise UserError(
            f"audit.mia.reference_models={count}: {short} audited records are IN for fewer than {min_in} reference "
            "models (records a reference federation gives its Byzantine or never-scheduled clients do not reach "
            "its model): raise audit.mia.reference_models"
        )
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

    if scheme == "population" and _federated(cfg):
        from dptrain.training.federated import planned_federation

        plans = [planned_federation(derived, population.tensors[1].numpy())[0] for derived in cfgs]
    train_sets = [population if scheme == "population" else subset(audited, orders[j]) for j in range(count)]
    jobs = [(cfgs[j], train_sets[j], tuple(input_shape), num_classes, plans[j]) for j in range(count)]
    started = time.perf_counter()
    rank, world = ranks.rank(), ranks.world_size()
    # In a multi-process run each rank trains every world-th model and rank 0 gathers them.
    mine = list(range(rank, count, world))
    workers = min(workers, len(mine))
    threads = reference_threads(target_threads, workers)
    for derived in cfgs:
        derived.train.threads = str(threads)
    stacked = unstackable(cfg) is None
    # Stacked: each process trains one stack of models; one by one: each model is a task of the pool.
    groups = [list(part) for part in np.array_split(mine, max(workers, 1))] if stacked else [[j] for j in mine]
    groups = [group for group in groups if group]
    log.info(
        "rank %d trains %s reference models %s %s in %d process(es) at %d thread(s) each",
        rank, scheme, mine, "stacked" if stacked else "one by one", max(workers, 1), threads,
    )  # fmt: skip
    if workers > 1:
        from dptrain.training.recipe import resolve_device

        gpu = torch.cuda.current_device() if resolve_device(cfg.train.device).type == "cuda" else None
        with child_pool(workers) as pool:
            trained_groups = list(pool.map(_train_group, [[jobs[j] for j in group] for group in groups], [gpu] * len(groups)))
    else:
        trained_groups = [_train_group([jobs[j] for j in group]) for group in groups]
    trained = [state for group in trained_groups for state in group]
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
