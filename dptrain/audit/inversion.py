"""The model inversion audit: reconstruct what each class looks like from the trained model alone, and
ask whether the reconstruction is a training record rather than the class's average.

Reconstruction (Fredrikson et al. 2015, "Model Inversion Attacks that Exploit Confidence Information",
MI-Face): gradient descent on the input of a class's cost, ``-log p_c(x)`` (``log_softmax``) or MI-Face's
``1 - p_c(x)`` (``mi_face``), plus ``tv_weight`` times the image's total variation and ``l2_weight``
times its squared distance to the prior, from the prior (the population's mean image, black, or
uniform noise), each step clamped to valid pixels. The attack works in pixels in [0, 1] (the data's
units, ``InputUnits``), whatever normalization the model's features carry.

Scoring (ours): a reconstruction r of class c is a *leak* when it is closer (L2, pixels) to some
member of class c than to every audited non-member of class c (d_member < d_non) and than to the
members' class mean (d_member < d_mean): it resembles one training record, not the class in general
nor an unseen record of it. When r does not depend on which of the class's records are members (no
leakage), its nearest audited record is a member with probability m_c / (m_c + n_c) (members and
non-members are a random split of the same distribution), so ``chance``, the mean of that over the
scored classes, bounds the expected leak rate of a model that leaks nothing: the leak event is
contained in the nearest-is-member event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from dptrain.audit.results import InversionAudit
from dptrain.data.dataset import InputUnits
from dptrain.privacy.engine import unwrap

PRIORS = ("mean", "zeros", "noise")
COSTS = ("log_softmax", "mi_face")


@dataclass(frozen=True)
class InversionImages:
    """What the TensorBoard grid shows, in pixels (k, C, H, W), one row per scored class: each class's
    reconstruction, its members' mean and its nearest member."""

    reconstructions: torch.Tensor
    class_means: torch.Tensor
    nearest_members: torch.Tensor


def to_pixels(features: torch.Tensor, units: InputUnits) -> torch.Tensor:
    """Features as pixels in [0, 1]: one pixel moves feature i by ``units.scale[i]`` from ``units.low[i]``."""
    return (features - units.low) / units.scale


def to_features(pixels: torch.Tensor, units: InputUnits) -> torch.Tensor:
    return units.low + pixels * units.scale


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Per image (N, C, H, W), the anisotropic total variation: the sum of absolute differences between
    vertically and horizontally neighbouring pixels (Rudin et al. 1992; Mahendran & Vedaldi 2015's prior)."""
    vertical = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().sum(dim=(1, 2, 3))
    horizontal = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().sum(dim=(1, 2, 3))
    return vertical + horizontal


def class_cost(logits: torch.Tensor, classes: torch.Tensor, cost: str) -> torch.Tensor:
    """Per row, the cost of class ``classes[i]`` that the reconstruction descends: ``-log p_c`` or ``1 - p_c``."""
    log_p = torch.log_softmax(logits, dim=1).gather(1, classes[:, None]).squeeze(1)
    if cost == "log_softmax":
        return -log_p
    if cost == "mi_face":
        return 1 - log_p.exp()
    raise ValueError(f"unknown inversion cost {cost!r}: choose one of {', '.join(COSTS)}")


def invert(
    model: nn.Module,
    classes: Sequence[int],
    prior: torch.Tensor,
    units: InputUnits,
    steps: int,
    lr: float,
    tv_weight: float,
    l2_weight: float,
    cost: str,
) -> torch.Tensor:
    """One reconstruction per class in ``classes``, in pixels (k, *input shape): ``steps`` steps of
    plain gradient descent (MI-Face's update, step ``lr`` in pixels) from ``prior`` (pixels, one image
    or one per class) on ``class_cost + tv_weight * TV + l2_weight * ||x - prior||^2``, each step
    clamped to [0, 1]. The classes' reconstructions share no pixel, so one batched step is each
    class's own step. ``model`` is in eval mode with its parameters' gradients left untouched."""
    device = next(model.parameters()).device
    targets = torch.as_tensor(list(classes), device=device)
    units = InputUnits(*(t.to(device) for t in (units.scale, units.low, units.high)))
    start = prior.to(device).expand(len(targets), *prior.shape[-len(units.scale.shape) :]).clone()
    pixels = start.clone()
    for _ in range(steps):
        pixels.requires_grad_(True)
        objective = class_cost(model(to_features(pixels, units)), targets, cost)
        if tv_weight:
            objective = objective + tv_weight * total_variation(pixels.reshape(len(targets), -1, *pixels.shape[-2:]))
        if l2_weight:
            objective = objective + l2_weight * (pixels - start).pow(2).flatten(1).sum(dim=1)
        (gradient,) = torch.autograd.grad(objective.sum(), pixels)
        pixels = (pixels.detach() - lr * gradient).clamp(0, 1)
    return pixels.detach()


def inversion_scores(
    reconstructions: torch.Tensor,
    classes: Sequence[int],
    members: torch.Tensor,
    member_labels: torch.Tensor,
    non_members: torch.Tensor,
    nonmember_labels: torch.Tensor,
    prior: str,
) -> tuple[InversionAudit, torch.Tensor, torch.Tensor]:
    """Score reconstructions (one per class of ``classes``, pixels) against the audited records (pixels)
    as the module says; every class needs at least one member and one non-member. Returns the audit,
    the members' class means and each reconstruction's nearest member (both pixels, for the figure)."""
    flat = reconstructions.flatten(1).double()
    member_distance, nonmember_distance, mean_distance, chances = [], [], [], []
    means, nearest = [], []
    for row, c in zip(flat, classes):
        own = members[member_labels == c].flatten(1).double()
        unseen = non_members[nonmember_labels == c].flatten(1).double()
        if not len(own) or not len(unseen):
            raise ValueError(f"class {c} has {len(own)} members and {len(unseen)} non-members: each needs one or more")
        to_members = torch.linalg.vector_norm(own - row, dim=1)
        member_distance.append(float(to_members.min()))
        nonmember_distance.append(float(torch.linalg.vector_norm(unseen - row, dim=1).min()))
        mean = own.mean(dim=0)
        mean_distance.append(float(torch.linalg.vector_norm(mean - row)))
        chances.append(len(own) / (len(own) + len(unseen)))
        means.append(mean.float())
        nearest.append(own[to_members.argmin()].float())
    nearer = [d < n for d, n in zip(member_distance, nonmember_distance)]
    leaks = [near and d < m for near, d, m in zip(nearer, member_distance, mean_distance)]
    audit = InversionAudit(
        classes=list(classes),
        member_distance=member_distance,
        nonmember_distance=nonmember_distance,
        mean_distance=mean_distance,
        leak_rate=sum(leaks) / len(leaks),
        nearest_member_rate=sum(nearer) / len(nearer),
        chance=sum(chances) / len(chances),
        prior=prior,
        members=len(members),
        non_members=len(non_members),
    )
    shape = reconstructions.shape[1:]
    return audit, torch.stack(means).reshape(-1, *shape), torch.stack(nearest).reshape(-1, *shape)


def prior_image(name: str, population: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The reconstruction's start and L2 centre, pixels of one input's shape: the mean image of the
    attacker's ``population`` records (pixels; records the model never trained on), black, or
    uniform noise drawn from ``generator``."""
    shape = population.shape[1:]
    if name == "mean":
        return population.mean(dim=0)
    if name == "zeros":
        return torch.zeros(shape)
    if name == "noise":
        return torch.rand(shape, generator=generator)
    raise ValueError(f"unknown inversion prior {name!r}: choose one of {', '.join(PRIORS)}")


def inversion_audit(
    model: nn.Module,
    classes: Sequence[int],
    population: torch.Tensor,
    members: tuple[torch.Tensor, torch.Tensor],
    non_members: tuple[torch.Tensor, torch.Tensor],
    units: InputUnits,
    prior: str,
    cost: str,
    steps: int,
    lr: float,
    tv_weight: float,
    l2_weight: float,
    seed: int,
) -> tuple[InversionAudit, InversionImages]:
    """Invert ``model`` for each of ``classes`` (``invert``, from ``prior_image`` of the ``population``
    features) and score the reconstructions against the audited ``members`` and ``non_members``
    (features, labels). Inputs are features as the model reads them; everything reported is pixels."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    start = prior_image(prior, to_pixels(population, units), torch.Generator().manual_seed(seed))
    reconstructions = invert(model, classes, start, units, steps, lr, tv_weight, l2_weight, cost).cpu()
    model.train(was_training)
    audit, means, nearest = inversion_scores(
        reconstructions,
        classes,
        to_pixels(members[0], units),
        members[1],
        to_pixels(non_members[0], units),
        non_members[1],
        prior,
    )
    return audit, InversionImages(reconstructions, means, nearest)
