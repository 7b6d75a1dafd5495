"""Training on a proxy (``train.proxy=population``): a run of the recipe on records the guarantee does not
cover, for tuning without spending the members' budget (Sander et al. 2023, "TAN without a burn: Scaling
laws of DP-SGD", section 4: tune at small scale at a fixed noise-to-batch ratio, then train once).

The population split is disjoint from members, non-members and test and is treated as public
(``dptrain.data.splits``, ``train.pretrain``). A proxy run splits it in two by a seeded permutation
(``dataset.seed``, so every grid point and seed of a search shares the split): the first half trains,
the second half is the validation set the search selects on. The proxy imitates the members' mechanism
as Sander et al. recommend: the members' sample rate and steps (so its epochs too), and the members'
noise-to-batch ratio, sigma' / B' = sigma / B, where B is what DP-SGD divides the noisy sum by (Opacus'
expected batch, ``int(records * sample_rate)``), so the averaged gradient carries the same noise
(standard deviation sigma * C / B) as on the members. The proxy reads no member, so it spends none of
their budget; its own epsilon (on public records, at a smaller sigma') is not accounted.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np

from dptrain.config import Config
from dptrain.data import SplitData, SplitSizes, subset
from dptrain.errors import UserError
from dptrain.privacy import PrivacyPlan
from dptrain.privacy.plan import is_private, plan_mechanism, plan_privacy
from dptrain.seeds import Stream, derived_seed
from dptrain.tracking.artifacts import save_model, write_metrics
from dptrain.tracking.atomic import write_json_atomic
from dptrain.tracking.tensorboard import TensorBoardLog
from dptrain.training.loop import evaluate
from dptrain.training.metrics import CentralizedMetrics
from dptrain.training.recipe import resolve_device, train_model
from dptrain.training.target import TargetRun, run_metrics

PROXY_DATA = ("none", "population")
PROXY = "proxy.json"


def proxy_sizes(population: int) -> tuple[int, int]:
    """(training, validation) records of the proxy: the population's first half, and the rest."""
    return population // 2, population - population // 2


def proxy_positions(population: int, dataset_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions into the population split (sorted) of the proxy's training and validation records: a
    permutation seeded by ``dataset.seed`` alone, cut at ``proxy_sizes``; each part sorted."""
    order = np.random.default_rng(derived_seed(dataset_seed, Stream.PROXY)).permutation(population)
    train, _ = proxy_sizes(population)
    return np.sort(order[:train]), np.sort(order[train:])


def members_plan(cfg: Config, sizes: SplitSizes) -> PrivacyPlan:
    """The plan the members' run of this recipe would have (validation has refused canaries and watermark
    keys with a proxy, so the members are all its records)."""
    return plan_privacy(cfg.privacy, members=sizes.members, batch_size=cfg.train.batch_size, epochs=cfg.train.epochs)


def expected_batch(records: int, sample_rate: float) -> int:
    """What Opacus divides DP-SGD's noisy sum by: ``int(len(dataset) * sample_rate)``."""
    return int(records * sample_rate)


def proxy_noise(members: PrivacyPlan, member_records: int, proxy_records: int) -> float:
    """sigma' = sigma * B' / B with B, B' the expected batches of the members and the proxy at the members'
    sample rate: the same noise-to-batch ratio (Sander et al. 2023)."""
    rate = members.sample_rate
    return members.noise_multiplier * expected_batch(proxy_records, rate) / expected_batch(member_records, rate)


def proxy_plan(cfg: Config, sizes: SplitSizes) -> PrivacyPlan:
    """The proxy's plan: the members' sample rate, steps per epoch and steps at ``proxy_noise``, not
    accounted (its records are public; ``plan_mechanism``'s ``accounted=False``). Raises a UserError when
    the proxy's expected batch at that rate is below one record."""
    members = members_plan(cfg, sizes)
    records = proxy_sizes(sizes.population)[0]
    if expected_batch(records, members.sample_rate) < 1:
        raise UserError(
            f"train.proxy={cfg.train.proxy}: the proxy's {records} records at the members' sample rate "
            f"{members.sample_rate:.4g} make an expected batch below one record: raise dataset.population_fraction "
            "or train.batch_size"
        )
    privacy = copy.deepcopy(cfg.privacy)
    privacy.noise_multiplier = proxy_noise(members, sizes.members, records)
    privacy.target_epsilon = None
    return plan_mechanism(
        privacy,
        sample_rate=members.sample_rate,
        steps=members.steps,
        steps_per_epoch=members.steps_per_epoch,
        schedule=f"{members.steps} steps at sample rate {members.sample_rate:.4g}",
        length_key="train.epochs",
        accounted=False,
    )


def check_proxy(cfg: Config, world: int) -> None:
    """Refuse, in one line each, proxy settings that cannot run soundly: unknown names; public pretraining
    (it trains on the population too, so the proxy's validation half would be in the starting model);
    an audit (it would audit members the model never saw), canaries, watermark keys, poisoning or
    sanitization (they add or edit training records the proxy does not have); the non-private baseline
    (there is no noise to imitate, nor a budget to save); recipes other than the centralized one in one
    process; resuming (``proxy_plan`` refuses a population too small for the members' sample rate)."""
    train = cfg.train
    if train.proxy not in PROXY_DATA:
        raise UserError(f"train.proxy={train.proxy} is unknown: choose one of {', '.join(PROXY_DATA)}")
    if train.proxy == "none":
        return
    name = f"train.proxy={train.proxy}"
    refusals = [
        (train.pretrain != "none",
         f"train.pretrain={train.pretrain} also trains on the population: use train.pretrain=none"),
        (cfg.audit.name != "none",
         f"audit={cfg.audit.name} would audit members the proxy never trained on: use audit=none"),
        (cfg.audit.canaries.count > 0, "audit.canaries.count must be 0: canaries join the members' training"),
        (train.watermark.enabled, "train.watermark.enabled=true adds keys to the members' training: disable it"),
        (cfg.attack.name != "none" or cfg.defense.sanitize != "none",
         "poisoning and sanitization edit the members' training: use attack=none and defense.sanitize=none"),
        (not is_private(cfg.privacy), "the non-private baseline spends no budget: tune it on the members"),
        (cfg.federation.name != "none" or world > 1,
         "the proxy runs the centralized recipe in one process: use federation=none and launcher.nproc_per_node=1"),
        (train.resume is not None, "train.resume: start the proxy run again"),
    ]  # fmt: skip
    for refused, why in refusals:
        if refused:
            raise UserError(f"{name}: {why}")


def record_proxy(run_dir: Path, data: SplitData, train: np.ndarray, validation: np.ndarray) -> Path:
    """Write ``proxy.json`` atomically: the dataset indices (canonical order) the proxy trained and validated on."""
    population = data.split.population
    return write_json_atomic(
        run_dir / PROXY, {"train": population[train].tolist(), "validation": population[validation].tolist()}
    )


def proxy_record(
    cfg: Config, members: PrivacyPlan, plan: PrivacyPlan, sizes: SplitSizes, validation_accuracy: float
) -> dict:
    """``metrics.json``'s ``proxy``: what the proxy trained on, its validation accuracy (what a search
    selects on), and the members' mechanism it imitates (sigma, sample rate, steps and the epsilon the
    members' run would spend: what a search on the members pays per run)."""
    train, validation = proxy_sizes(sizes.population)
    return {
        "data": cfg.train.proxy,
        "train_records": train,
        "validation_records": validation,
        "validation_accuracy": validation_accuracy,
        "members_records": sizes.members,
        "members_noise_multiplier": members.noise_multiplier,
        "members_epsilon": members.planned_epsilon,
        "members_target_epsilon": members.target_epsilon,
        "sample_rate": plan.sample_rate,
        "steps": plan.steps,
        "noise_to_batch": plan.noise_multiplier / expected_batch(train, plan.sample_rate),
        "epsilon_covers": "nothing: the proxy trains on population records, assumed public; no member is read",
    }


def train_proxy_target(
    cfg: Config, run_dir: Path, plan: PrivacyPlan, tb: TensorBoardLog | None, data: SplitData, fingerprint: str
) -> TargetRun:
    """Train ``cfg``'s recipe on the proxy under ``plan`` (``proxy_plan``) and write ``proxy.json``,
    ``model.pt`` and ``metrics.json``: train accuracy on the proxy's training records, test accuracy on
    the test split, ``proxy.validation_accuracy`` on the validation half, and ``epsilon`` null."""
    sizes = data.split.sizes
    train, validation = proxy_positions(sizes.population, cfg.dataset.seed)
    record_proxy(run_dir, data, train, validation)
    records, held_out = subset(data.population, train), subset(data.population, validation)
    trained = train_model(
        cfg, records, input_shape=data.input_shape, num_classes=data.num_classes, plan=plan, eval_set=data.test,
        tb=tb, run_dir=run_dir, units=data.units, accounted=False,
    )  # fmt: skip
    device = resolve_device(cfg.train.device)
    proxy = dataclasses.replace(data, members=records)
    _, validation_accuracy = evaluate(trained.model, held_out, device)
    record = proxy_record(cfg, members_plan(cfg, sizes), plan, sizes, validation_accuracy)
    metrics = run_metrics(
        trained.model, plan, None, None, data, proxy, device,
        train_seconds=trained.train_seconds, wall_seconds=trained.wall_seconds,
        replaced_modules=trained.replaced_modules, threads=trained.threads, grad_sample=trained.grad_sample,
        centralized=CentralizedMetrics(epochs=cfg.train.epochs, canaries_included=0, proxy=record),
    )  # fmt: skip
    save_model(run_dir, trained.model.state_dict())
    write_metrics(run_dir, metrics.to_dict())
    return TargetRun(trained.model, proxy, plan, plan, None, None, metrics, device, fingerprint)
