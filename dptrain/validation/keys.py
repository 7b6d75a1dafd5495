"""Every key of the config schema: unknown keys are refused naming the closest known one, and every
numeric key is checked against its admissible range in ``RANGES`` (finite unless the table says what
infinity means there). Runs first in ``validate``, before any value is used."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from functools import reduce
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from dptrain.config import Config
from dptrain.errors import UserError


@dataclass(frozen=True)
class Range:
    """The admissible values of one numeric key: bounds, each open or closed; +inf only with ``infinite``.

    nan is never admissible: it compares false with every bound and propagates into every number a run
    reports. ``fix`` is the hint the one-line error ends with.
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    infinite: bool = False
    fix: str = ""

    def admits(self, value: float) -> bool:
        if math.isnan(value) or (math.isinf(value) and not (self.infinite and value > 0)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def phrase(self) -> str:
        """The range in words: ``positive``, ``at least 2``, ``in [0, 1)``, ``a finite number``."""
        if self.low == 0 and self.low_open and self.high == math.inf:
            words = "positive"
        elif self.high == math.inf:
            words = f"at least {_number(self.low)}" if self.low > -math.inf else "a finite number"
        else:
            words = (
                f"in {'(' if self.low_open else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.high_open else ']'}"
            )
        return f"{words} or inf" if self.infinite else words


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def positive(fix: str = "", infinite: bool = False) -> Range:
    return Range(low=0, low_open=True, infinite=infinite, fix=fix)


def at_least(low: float, fix: str = "") -> Range:
    return Range(low=low, fix=fix)


def within(low: float, high: float, ends: str = "[]", fix: str = "") -> Range:
    """``ends`` is the interval's brackets, e.g. ``"[)"`` for low <= value < high."""
    return Range(low=low, high=high, low_open=ends[0] == "(", high_open=ends[1] == ")", fix=fix)


ANY_FINITE = Range()
# Seeds feed NumPy's default_rng / SeedSequence (non-negative only), torch.manual_seed and the 32-bit
# derived streams of dptrain/seeds.py: [0, 2**32) is what all of them accept.
SEED = within(0, 2**32, "[)", "use a seed from 0 to 4294967295")

# One entry per int / float key of ``Config``: ``check_ranges`` walks the schema and raises for a
# numeric key missing here, so a new key cannot be added without its range. Bounds that depend on
# other keys (batch size below the record count, delta below 1/n, byzantine below the clients of a
# round) are checked in ``validate``.
RANGES: dict[str, Range] = {
    "dataset.n_samples": at_least(1),
    "dataset.n_features": at_least(1),
    "dataset.n_classes": at_least(2),
    "dataset.sensitive_correlation": within(0, 1),
    "dataset.seed": SEED,
    "dataset.test_fraction": within(0, 1, "()"),
    "dataset.population_fraction": within(0, 1, "()"),
    "dataset.max_members": at_least(2, "or null for no cap"),
    "dataset.max_categories": at_least(1, "a one-hot column may have this many values"),
    "dataset.min_class_records": at_least(1, "every class of the target needs this many records"),
    "model.hidden": at_least(1),
    "model.channels": at_least(1),
    "model.width": at_least(1),
    "model.blocks": at_least(1),
    "model.groups": at_least(1),
    "model.scattering_j": at_least(1, "or null for the default scale"),
    "model.pool_to": at_least(1, "or null for a 2x2 max-pool per block"),
    "privacy.target_epsilon": positive("use a value like 1 or 8, or inf for the non-private baseline", infinite=True),
    "privacy.delta": within(0, 1, "()", "use e.g. 1e-5, below 1/n for n training records"),
    "privacy.noise_multiplier": positive("use privacy.target_epsilon=inf for no noise"),
    "privacy.max_grad_norm": positive("it is the per-example clipping norm C, e.g. 1.0"),
    "train.epochs": at_least(1),
    "train.batch_size": at_least(1),
    "train.max_physical_batch_size": at_least(1, "or null to use the whole batch"),
    "train.lr": positive("e.g. train.lr=0.1"),
    "train.momentum": within(0, 1, "[)"),
    "train.weight_decay": at_least(0),
    "train.seed": SEED,
    "train.adversarial_eps": positive("a budget in the data's units, e.g. 0.1 for pixels in [0, 1]"),
    "train.adversarial_steps": at_least(1, "e.g. 7"),
    "train.trades_beta": positive("TRADES' weight of the robust term; the paper uses 6"),
    "train.watermark.count": at_least(1, "e.g. 100 keys"),
    "train.pretrain_epochs": at_least(1, "epochs of non-private training on the population"),
    "train.pretrain_lr": positive("e.g. train.pretrain_lr=0.1"),
    "train.pretrain_seed": SEED,
    "train.ema": within(0, 1, "()", "the average's decay per step, e.g. 0.9, or null for none"),
    "train.augmult": at_least(1, "augmented views per example, 1 for none"),
    "train.augment_shift": at_least(0, "pixels a view may move, e.g. 1 for digits"),
    "federation.clients": at_least(2, "a federation needs several clients"),
    "federation.rounds": at_least(1),
    "federation.clients_per_round": at_least(1, "or null for every client in every round"),
    "federation.local_epochs": at_least(1),
    "federation.alpha": positive("small alpha skews the clients' labels, large approaches IID"),
    "federation.server_lr": positive("the server adds server_lr times the aggregate, e.g. 1.0"),
    "federation.flower.client_cpus": positive("CPU cores each Flower ClientApp reserves, e.g. 1"),
    "federation.flower.client_gpus": at_least(0, "GPUs (or a share of one) each Flower ClientApp reserves"),
    "aggregator.f": at_least(0, "or null for attack.byzantine"),
    "aggregator.m": at_least(1, "or null for n - f"),
    "aggregator.nu": positive("Weiszfeld's smoothing, e.g. 1e-6"),
    "aggregator.tol": at_least(0),
    "aggregator.max_iter": at_least(1),
    "aggregator.tau": positive("centered clipping's radius, e.g. 10"),
    "aggregator.iterations": at_least(1),
    "aggregator.bucket_size": at_least(1),
    "aggregator.clip_threshold": positive("drop clipping from aggregator.pre to leave updates unclipped"),
    "attack.byzantine": at_least(0),
    "attack.scale": positive(),
    "attack.noise_mean": ANY_FINITE,
    "attack.noise_std": at_least(0),
    "attack.z": Range(fix="or null to derive z from n and f"),
    "attack.ipm_epsilon": positive(),
    "attack.mimic_target": at_least(0, "or null for the most extreme honest client"),
    "attack.target_label": at_least(0),
    "attack.source_label": at_least(0, "or null to flip every label"),
    "attack.poison_fraction": within(0, 1, fix="or null with attack.poison_count"),
    "attack.poison_count": at_least(0, "or null with attack.poison_fraction"),
    "attack.trigger_size": at_least(1),
    "attack.trigger_value": ANY_FINITE,
    "audit.mia.reference_models": at_least(0),
    "audit.mia.rmia_gamma": positive(),
    "audit.mia.rmia_offline_a": within(0, 1),
    "audit.mia.bootstrap": at_least(1),
    "audit.canaries.count": at_least(0),
    "audit.whitebox.canaries": at_least(2, "the bound guesses on canaries, e.g. 100000"),
    "audit.whitebox.runs": at_least(1, "the number of separate audit trainings, e.g. 1"),
    "audit.evasion.budgets_linf": positive("a budget in pixels (images) or standard deviations (tables), e.g. 0.1"),
    "audit.evasion.budgets_l2": positive("a budget in pixels (images) or standard deviations (tables), e.g. 1.0"),
    "audit.evasion.steps": at_least(1, "PGD's steps, e.g. 20"),
    "audit.evasion.restarts": at_least(1, "PGD's random restarts, e.g. 2"),
    "audit.evasion.n": at_least(1, "the test records attacked, e.g. 500"),
    "audit.extraction.queries": at_least(1, "a query budget, e.g. 1000"),
    "audit.extraction.decimals": at_least(0, "the decimals rounded answers keep, e.g. 2"),
    "audit.extraction.steps": at_least(1, "the surrogate's training steps, e.g. 200"),
    "audit.gradient_inversion.clients": at_least(1, "the clients whose updates are attacked, e.g. 8"),
    "audit.gradient_inversion.records": at_least(1, "each attacked client's records (its local batch), e.g. 1"),
    "audit.gradient_inversion.steps": at_least(1, "the optimization attack's steps, e.g. 1000"),
    "audit.gradient_inversion.tv_weight": at_least(0, "the total-variation prior's weight, e.g. 1e-4"),
    "audit.gradient_inversion.restarts": at_least(1, "the optimization attack's random starts, e.g. 1"),
    "audit.inversion.classes": at_least(0, "a class index, e.g. 3"),
    "audit.inversion.steps": at_least(1, "the reconstruction's gradient steps, e.g. 200"),
    "audit.inversion.lr": positive("the step in pixels, e.g. 0.1"),
    "audit.inversion.tv_weight": at_least(0, "the total-variation weight, e.g. 0.01"),
    "audit.inversion.l2_weight": at_least(0, "the weight of the squared distance to the prior, e.g. 0.01"),
    "defense.remove_fraction": within(0, 0.5, "()", "the share of each class removed, e.g. 0.1"),
    "defense.squeeze_bits": within(1, 8, fix="the bits kept per pixel, e.g. 4"),
    "defense.median_kernel": within(2, 5, fix="the median window's side in pixels, e.g. 2"),
    "defense.cluster_threshold": within(0, 0.5, "(]", "the largest share of a class its smaller cluster may hold, e.g. 0.35"),
    "defense.silhouette_threshold": within(-1, 1, "[)", "the silhouette a flagged class must exceed, e.g. 0.31"),
    "defense.neighbours": at_least(1, "the nearest members whose labels vote, e.g. 10"),
    "audit.confidence": within(0, 1, "()", "e.g. 0.95"),
    "audit.seed": SEED,
    "audit.workers": at_least(1, "or null for one per two cores"),
    "launcher.nproc_per_node": at_least(1),
}


def schema_keys(schema: type = Config, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every leaf key of the dataclass ``schema`` as (dotted key, type hint), nested groups flattened."""
    for name, hint in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(hint):
            yield from schema_keys(hint, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", hint


def _is_numeric(hint: object) -> bool:
    """int or float, optionally Optional or a List of them (bool is its own type in the schema)."""
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, list):
        return len(arguments) == 1 and _is_numeric(arguments[0])
    return hint in (int, float)


def numeric_keys() -> list[str]:
    """The dotted keys of every int / float field of ``Config`` (Optional and List ones included)."""
    return [key for key, hint in schema_keys() if _is_numeric(hint)]


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys the schema does not have, naming the closest known key (difflib): Hydra refuses an
    unknown key only without ``+``, and ``+privacy.target_epsilom=0.5`` would otherwise train at the
    default epsilon and store the typo."""
    if not isinstance(cfg, DictConfig):
        return  # a Config instance holds exactly the schema's keys
    known = [key for key, _ in schema_keys()]
    # Hydra's own node rides along in a config composed for a run (or a sweep job): not dptrain's keys.
    tree = {name: node for name, node in OmegaConf.to_container(cfg, resolve=False).items() if name != "hydra"}
    unknown = [key for key in _leaf_keys(tree) if key not in known]
    if not unknown:
        return
    described = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        described.append(f"{key} (did you mean {close[0]}?)" if close else key)
    raise UserError(
        f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(described)}: "
        "fix the spelling (`dptrain train --cfg job` prints every key)"
    )


def _leaf_keys(tree: dict, prefix: str = "") -> Iterator[str]:
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def check_ranges(cfg: Config) -> None:
    """Refuse the first numeric key outside its ``RANGES`` entry with one line: the key, the value, the
    range and the fix. null passes where the schema allows it; list keys are checked entry by entry.

    Walks the schema, not the table: a numeric key without a range is a dptrain bug, raised at once.
    """
    for key in numeric_keys():
        if key not in RANGES:
            raise RuntimeError(f"config key {key} has no admissible range: add it to RANGES in {__name__}")
        admissible = RANGES[key]
        value = reduce(getattr, key.split("."), cfg)
        if value is None:
            continue
        scalar = isinstance(value, (int, float))
        entries = [value] if scalar else list(value)
        if all(admissible.admits(entry) for entry in entries):
            continue
        if not scalar:
            message = f"{key}={entries}: each entry must be {admissible.phrase()}"
        elif math.isnan(value):
            message = f"{key}=nan is not a number; it must be {admissible.phrase()}"
        elif math.isinf(value) and not admissible.infinite:
            message = f"{key}={value} must be finite and {admissible.phrase()}"
        else:
            message = f"{key}={value} must be {admissible.phrase()}"
        raise UserError(f"{message}: {admissible.fix}" if admissible.fix else message)
