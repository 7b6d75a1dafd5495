"""Byzantine attacks on updates: functions that craft the f Byzantine updates of a round from what
the attacker sees, and the registry ``attack=...`` selects (data poisoning lives in ``poisoning``).

Omniscient attacks see the round's honest updates, an (h, d) tensor; the others see only the
Byzantine clients' own updates, an (f, d) tensor. Every function returns an (f, d) tensor.

Conventions against ByzFL (``byzfl.attacks``): sign flip negates the attacker's own updates
(ByzFL negates the honest mean); ALIE adds z standard deviations, as ByzFL, but derives z from n
and f as the paper does (ByzFL fixes tau = 1.5) and uses the unbiased standard deviation; IPM's
epsilon defaults to the paper's 0.1 (ByzFL: 2.0); mimic picks its target from the round's top
principal direction (ByzFL takes a fixed index); min-max / min-sum solve for the largest gamma
in closed form (the paper searches by halving; ByzFL has neither). Flower ships no attacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable

import torch
from torch import Tensor

from dptrain.config import AttackConfig
from dptrain.errors import require
from dptrain.poisoning import backdoor, label_flip, stamp_trigger, targeted_label_flip
from dptrain.robust.primitives import (
    check_updates,
    pairwise_sq_distances,
    require_f,
    sq_distances_and_gram,
    sq_distances_to_mixture,
)

PERTURBATIONS = ("unit_vec", "sign", "std")
# A Byzantine client's share of its records that a backdoor triggers when attack.poison_fraction is null.
FEDERATED_POISON_FRACTION = 0.5


def _repeat(update: Tensor, f: int) -> Tensor:
    return update.unsqueeze(0).repeat(f, 1)


def sign_flip(own: Tensor, scale: float = 1.0) -> Tensor:
    """Each Byzantine client sends its own update negated and scaled, ``-scale * x_i``.

    Allen-Zhu, Ebrahimianghazani, Li, Alistarh, "Byzantine-Resilient Non-Convex Stochastic
    Gradient Descent", ICLR 2021 (scale 1, as ByzFL's SignFlipping). With f of n clients a
    scale above (n - f) / f turns the mean into an ascent direction. Not omniscient.
    """
    check_updates(own, "sign_flip")
    return -scale * own


def gaussian(own: Tensor, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Each Byzantine client sends ``N(mean, std^2 I)`` noise shaped like its own update.

    Blanchard et al., NeurIPS 2017 (the Gaussian Byzantine worker). Noise is drawn on CPU from
    ``generator`` so a seed gives the same attack on every device. Not omniscient. Precondition std >= 0.
    """
    check_updates(own, "gaussian")
    require(std >= 0, f"gaussian needs noise_std >= 0, got noise_std={std}")
    noise = torch.randn(own.shape, generator=generator, dtype=own.dtype)
    return (noise * std + mean).to(own.device)


def alie_z(n: int, f: int) -> float:
    """ALIE's z: ``s = floor(n/2 + 1) - f`` supporters needed, ``z = Phi^{-1}((n - s) / n)``.

    Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For Distributed
    Learning", NeurIPS 2019, Algorithm 1 (n counts all clients, Byzantine included).
    Precondition 1 <= f <= floor(n/2), so that 1 <= s < n.
    """
    require(
        1 <= f <= n // 2,
        f"alie needs 1 <= f <= floor(n/2) to derive z (n={n}, f={f}): set attack.z or change attack.byzantine",
    )
    supporters = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf((n - supporters) / n)


def alie(honest: Tensor, f: int, z: float | None = None) -> Tensor:
    """A little is enough: ``mu + z sigma`` per coordinate, mu and sigma the honest mean and
    (unbiased) standard deviation, sent by all f Byzantine clients.

    Baruch et al., NeurIPS 2019. ``z=None`` takes ``alie_z(h + f, f)``. The shift stays within the
    honest spread, so coordinate-wise and distance-based rules keep it. Omniscient.
    """
    h = check_updates(honest, "alie")
    require_f(f, "alie")
    if z is None:
        z = alie_z(h + f, f)
    std = honest.std(dim=0) if h > 1 else torch.zeros_like(honest[0])
    return _repeat(honest.mean(dim=0) + z * std, f)


def ipm(honest: Tensor, f: int, epsilon: float = 0.1) -> Tensor:
    """Inner product manipulation: all f Byzantine clients send ``-epsilon * mean(honest)``.

    Xie, Koyejo, Gupta, "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
    Manipulation", UAI 2020: a small epsilon makes the aggregate's inner product with the true
    gradient negative while staying close to the honest updates. Omniscient. Precondition epsilon > 0.
    """
    check_updates(honest, "ipm")
    require_f(f, "ipm")
    require(epsilon > 0, f"ipm needs ipm_epsilon > 0, got ipm_epsilon={epsilon}")
    return _repeat(-epsilon * honest.mean(dim=0), f)


def mimic(honest: Tensor, f: int, target: int | None = None) -> Tensor:
    """Mimic: all f Byzantine clients copy one honest update.

    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing",
    ICLR 2022. ``target=None`` copies the honest update farthest along the top principal direction
    of this round's honest updates, the one over-representing the most variance. The paper
    estimates that direction over warm-up rounds; this single-round variant reads it from the
    centred Gram matrix ``-1/2 J D J`` (D the pairwise squared distances): the projections of the
    centred updates on the top principal direction are proportional to its top eigenvector, so
    there is no (h, d) temporary. Omniscient.
    """
    h = check_updates(honest, "mimic")
    require_f(f, "mimic")
    if target is None:
        centring = torch.eye(h, dtype=torch.float64, device=honest.device) - 1.0 / h
        centred_gram = -0.5 * centring @ pairwise_sq_distances(honest) @ centring
        target = int(torch.linalg.eigh(centred_gram).eigenvectors[:, -1].abs().argmax())
    require(0 <= target < h, f"mimic needs 0 <= mimic_target < h (mimic_target={target}, h={h})")
    return _repeat(honest[target], f)


def model_replacement_scale(n: int, server_lr: float = 1.0) -> float:
    """Factor ``gamma = n / eta`` by which a backdoor attacker scales its update.

    Bagdasaryan et al. 2020: the server applies ``eta / n`` times the sum of n updates, so an
    update scaled by n / eta replaces the global model by the attacker's once the honest updates
    roughly cancel. Preconditions n >= 1, eta > 0.
    """
    require(n >= 1, f"model_replacement needs n >= 1 updates, got {n}")
    require(server_lr > 0, f"model_replacement needs server_lr > 0, got {server_lr}")
    return n / server_lr


def check_perturbation(kind: str) -> None:
    """min_max / min_sum perturbation directions are unit_vec, sign or std."""
    require(kind in PERTURBATIONS, f"unknown attack.perturbation {kind!r}; choose one of: {', '.join(PERTURBATIONS)}")


def _perturbation(honest: Tensor, kind: str, mean: Tensor) -> Tensor:
    check_perturbation(kind)
    if kind == "unit_vec":
        return -mean / torch.linalg.vector_norm(mean).clamp_min(torch.finfo(mean.dtype).tiny)
    if kind == "sign":
        return -torch.sign(mean)
    return -honest.std(dim=0) if honest.shape[0] > 1 else torch.zeros_like(mean)


def _shift_geometry(honest: Tensor, kind: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """For ``b + gamma p`` (b the honest mean, p the perturbation): b, p, the (h, h) distances,
    ``||b - x_i||^2`` and ``p . (b - x_i)``, all quadratic terms in float64."""
    mean = honest.mean(dim=0)
    direction = _perturbation(honest, kind, mean)
    dist, gram = sq_distances_and_gram(honest)
    h = honest.shape[0]
    to_mean = sq_distances_to_mixture(gram, torch.full((h,), 1.0 / h, dtype=dist.dtype, device=dist.device))
    # (b - x_i) . p on the differences: p . b - p . x_i would cancel when the updates share a large mean.
    along = ((mean - honest) @ direction).to(torch.float64)
    return mean, direction, dist, to_mean, along


def min_max(honest: Tensor, f: int, perturbation: str = "unit_vec") -> Tensor:
    """Min-max: ``b + gamma p`` with the largest gamma such that
    ``max_i ||b + gamma p - x_i|| <= max_{i,j} ||x_i - x_j||``, sent by all f Byzantine clients.

    Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
    Defenses for Federated Learning", NDSS 2021 (AGR-agnostic). b is the honest mean, p one of
    ``unit_vec`` (-b/||b||), ``sign`` (-sign b), ``std`` (-std of the honest updates). Each
    constraint is a quadratic ``a g^2 + 2 beta_i g + c_i <= 0`` with c_i <= 0, so the largest gamma
    is the smallest of the positive roots, computed exactly in float64 where the paper halves a
    step from gamma = 10 to a 1e-5 tolerance. Omniscient.
    """
    check_updates(honest, "min_max")
    require_f(f, "min_max")
    mean, direction, dist, to_mean, along = _shift_geometry(honest, perturbation)
    a = float(direction.to(torch.float64) @ direction.to(torch.float64))
    if a == 0.0:
        return _repeat(mean, f)
    c = (to_mean - dist.max()).clamp_max(0.0)
    root = (along.square() - a * c).sqrt()
    # The larger root without cancellation: -c / (beta + root) when beta > 0.
    gamma = torch.where(along > 0, -c / (along + root), (root - along) / a).min()
    return _repeat(mean + gamma.to(mean.dtype) * direction, f)


def min_sum(honest: Tensor, f: int, perturbation: str = "unit_vec") -> Tensor:
    """Min-sum: ``b + gamma p`` with the largest gamma such that
    ``sum_i ||b + gamma p - x_i||^2 <= max_i sum_j ||x_i - x_j||^2``, sent by all f Byzantine clients.

    Shejwalkar & Houmansadr, NDSS 2021. Since b is the mean, ``sum_i p . (b - x_i) = 0`` and the
    constraint gives ``gamma = sqrt((max_i sum_j D_ij - sum_i ||b - x_i||^2) / (h ||p||^2))``
    exactly. Omniscient.
    """
    h = check_updates(honest, "min_sum")
    require_f(f, "min_sum")
    mean, direction, dist, to_mean, _ = _shift_geometry(honest, perturbation)
    a = float(direction.to(torch.float64) @ direction.to(torch.float64))
    if a == 0.0:
        return _repeat(mean, f)
    slack = (dist.sum(dim=1).max() - to_mean.sum()).clamp_min(0.0)
    gamma = (slack / (h * a)).sqrt()
    return _repeat(mean + gamma.to(mean.dtype) * direction, f)


@dataclass(frozen=True)
class Attack:
    """What ``build_attack`` returns: the update-level attack, and the data-level part if any.

    ``attack(seen, n)`` gives the (f, d) Byzantine updates of a round in which the server
    aggregates n updates: ``seen`` is the honest updates (h, d) when ``omniscient`` (f = n - h), else
    the Byzantine clients' own updates (f, d). ``poison(inputs, labels, num_classes)`` is what
    Byzantine clients do to their training data (label_flip, backdoor), ``trigger(inputs)`` stamps
    test inputs to measure a backdoor's success; both None otherwise.
    """

    name: str
    omniscient: bool
    craft: Callable[[Tensor, int, int], Tensor]
    poison: Callable[[Tensor, Tensor, int], "tuple[Tensor, Tensor]"] | None = None
    trigger: Callable[[Tensor], Tensor] | None = None

    def __call__(self, seen: Tensor, n: int) -> Tensor:
        rows = check_updates(seen, self.name)
        f = n - rows if self.omniscient else rows
        require(f >= 0, f"{self.name} saw {rows} honest updates in a round of n={n} updates")
        if f == 0:
            return seen.new_empty(0, seen.shape[1])
        return self.craft(seen, f, n)


def byzantine_rows(attack: Attack, honest: Tensor, own: Tensor | None, n: int) -> Tensor:
    """The (n - h, d) updates the Byzantine clients (or ranks) send in a round (or step) of n updates,
    h of them the (h, d) ``honest`` ones; the one adversary of federated and robust data-parallel runs.

    An omniscient attack crafts them from the honest updates; in a round without any it has nothing
    to craft from and sends zero updates. Any other attack transforms ``own``, the Byzantine
    clients' own (n - h, d) updates (None for an omniscient attack: its clients need not train).
    Zero and empty (n = h) results take the dtype and device of ``honest``.
    """
    h, d = honest.shape
    require(h <= n, f"{attack.name} saw {h} honest updates in a round of n={n} updates")
    if h == n:
        return honest.new_empty(0, d)
    if attack.omniscient:
        return attack(honest, n) if h else honest.new_zeros(n - h, d)
    if own is None or own.shape != (n - h, d):
        shape = None if own is None else tuple(own.shape)
        raise ValueError(f"{attack.name} transforms the Byzantine clients' own ({n - h}, {d}) updates, got {shape}")
    return attack(own, n)


def _own(seen: Tensor, f: int, n: int) -> Tensor:
    return seen


def _none(cfg: AttackConfig, generator: torch.Generator, server_lr: float) -> Attack:
    return Attack("none", omniscient=False, craft=_own)


def _sign_flip(cfg: AttackConfig, generator: torch.Generator, server_lr: float) -> Attack:
    require(cfg.scale > 0, f"attack.scale must be > 0, got {cfg.scale}")
    return Attack("sign_flip", omniscient=False, craft=lambda own, f, n: sign_flip(own, cfg.scale))


def _gaussian(cfg: AttackConfig, generator: torch.Generator, server_lr: float) -> Attack:
    require(cfg.noise_std >= 0, f"attack.noise_std must be >= 0, got {cfg.noise_std}")

    def craft(own: Tensor, f: int, n: int) -> Tensor:
        return gaussian(own, cfg.noise_mean, cfg.noise_std, generator)

    return Attack("gaussian", omniscient=False, craft=craft)


def _alie(cfg: AttackConfig, generator: torch.Generator, server_lr: float) -> Attack:
    return Attack("alie", omniscient=True, craft=lambda honest, f, n: alie(honest, f, cfg.z))


def _ipm(cfg: AttackConfig, generator: torch.Generator, server_lr: float) -> Attack:
    require(cfg.ipm_epsilon > 0, f"attack.ipm_epsilon must be > 0, got {cfg.ipm_epsilon}")
    return Attack("ipm", omniscient=True, craft=lambda honest, f, n: ipm(honest, f, cfg.ipm_epsilon))


def _mimic(cfg: AttackConfig, generator: torch.Generator, server_lr: float) -> Attack:
    return Attack("mimic", omniscient=True, craft=lambda honest, f, n: mimic(honest, f, cfg.mimic_target))


def _min_max(cfg: AttackConfig, generator: torch.Generator, server_lr: float) -> Attack:
    check_perturbation(cfg.perturbation)
    return Attack("min_max", omniscient=True, craft=lambda honest, f, n: min_max(honest, f, cfg.perturbation))


def _min_sum(cfg: AttackConfig, generator: torch.Generator, server_lr: float) -> Attack:
    check_perturbation(cfg.perturbation)
    return Attack("min_sum", omniscient=True, craft=lambda honest, f, n: min_sum(honest, f, cfg.perturbation))


def _label_flip(cfg: AttackConfig, generator: torch.Generator, server_lr: float) -> Attack:
    return Attack(
        "label_flip",
        omniscient=False,
        craft=_own,
        poison=lambda inputs, labels, num_classes: (
            inputs,
            label_flip(labels, num_classes)
            if cfg.source_label is None
            else targeted_label_flip(labels, num_classes, cfg.source_label, cfg.target_label),
        ),
    )


def _backdoor(cfg: AttackConfig, generator: torch.Generator, server_lr: float) -> Attack:
    # null: a Byzantine client triggers half its records (centralized poisoning passes 1.0, its records being chosen).
    fraction = FEDERATED_POISON_FRACTION if cfg.poison_fraction is None else cfg.poison_fraction
    require(0 <= fraction <= 1, f"attack.poison_fraction must be in [0, 1], got {fraction}")
    require(cfg.trigger_size >= 1, f"attack.trigger_size must be >= 1, got {cfg.trigger_size}")
    require(server_lr > 0, f"backdoor model replacement needs federation.server_lr > 0, got {server_lr}")

    def craft(own: Tensor, f: int, n: int) -> Tensor:
        return own * model_replacement_scale(n, server_lr) if cfg.model_replacement else own

    def poison(inputs: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        require(
            0 <= cfg.target_label < num_classes,
            f"attack.target_label must be in [0, {num_classes}), got {cfg.target_label}",
        )
        return backdoor(
            inputs, labels, cfg.target_label, fraction, cfg.trigger_size, cfg.trigger_value, generator
        )

    return Attack(
        "backdoor",
        omniscient=False,
        craft=craft,
        poison=poison,
        trigger=lambda inputs: stamp_trigger(inputs, cfg.trigger_size, cfg.trigger_value),
    )


ATTACKS: dict[str, Callable[[AttackConfig, torch.Generator, float], Attack]] = {
    "none": _none,
    "sign_flip": _sign_flip,
    "label_flip": _label_flip,
    "gaussian": _gaussian,
    "alie": _alie,
    "ipm": _ipm,
    "mimic": _mimic,
    "min_max": _min_max,
    "min_sum": _min_sum,
    "backdoor": _backdoor,
}


def build_attack(cfg: AttackConfig, seed: int, server_lr: float = 1.0) -> Attack:
    """The attack ``cfg`` names; random draws (Gaussian noise, which inputs a backdoor poisons) come
    from ``seed``, and model replacement scales by n / ``server_lr``. Unknown names and
    out-of-range parameters raise a one-line UserError."""
    require(cfg.name in ATTACKS, f"unknown attack {cfg.name!r}; choose one of: {', '.join(ATTACKS)}")
    require(cfg.byzantine >= 0, f"attack.byzantine must be >= 0, got {cfg.byzantine}")
    return ATTACKS[cfg.name](cfg, torch.Generator().manual_seed(seed), server_lr)
