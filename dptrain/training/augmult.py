"""Augmentation multiplicity (``train.augmult``): every example of a batch becomes K augmented views, and
DP-SGD clips the mean of its views' gradients (De et al. 2022, "Unlocking High-Accuracy Differentially
Private Image Classification through Scale", section 3.1).

Each example still contributes one clipped gradient to the noised sum, so the sensitivity, the noise and
the accountant's (noise multiplier, sample rate, steps) are those of K = 1: epsilon is unchanged. The
views are random translations by up to ``train.augment_shift`` pixels (zero padding and a random crop, De
et al.'s pad-and-crop) and, with ``train.augment_flip``, random horizontal flips.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dptrain.config import Config
from dptrain.errors import UserError
from dptrain.seeds import Stream, derived_seed

# The modes whose per-example gradients sit in ``p.grad_sample`` between the backward pass and the step,
# where the views can be averaged. Ghost and book-keeping clipping take the norms of the rows' gradients
# inside the backward pass, so they would clip each view: refused.
VIEW_AVERAGING_MODES = ("auto", "hooks", "functorch")


def random_translation(shift: int, flip: bool, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (N, C, H, W) -> views``: each image moved by (dy, dx) drawn uniformly from
    {-shift, ..., shift}^2 (pixels moved in from outside the image are 0) and, with ``flip``, mirrored
    left to right with probability 1/2; one independent draw per image from ``generator`` (on the CPU)."""

    def augment(images: torch.Tensor) -> torch.Tensor:
        n, _, height, width = images.shape
        offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).to(images.device)
        mirrored = torch.rand(n, generator=generator).to(images.device) < 0.5 if flip else None
        padded = nn.functional.pad(images, (shift, shift, shift, shift))
        # Crop each padded image at its own offset: a window starting at `shift` is the image itself.
        rows = offsets[:, :1] + torch.arange(height, device=images.device)
        cols = offsets[:, 1:] + torch.arange(width, device=images.device)
        views = padded[torch.arange(n, device=images.device)[:, None, None, None],
                       torch.arange(images.shape[1], device=images.device)[None, :, None, None],
                       rows[:, None, :, None], cols[:, None, None, :]]  # fmt: skip
        if mirrored is not None:
            views = torch.where(mirrored[:, None, None, None], views.flip(-1), views)
        return views

    return augment


class ViewAveraging:
    """K views per example, and their per-example gradients averaged before the optimizer clips.

    ``expand`` turns a batch of B examples into B * K rows, example i's views in rows i K, ..., i K + K - 1,
    each ``augment`` of a copy of the example. After the backward pass of the mean loss over those rows,
    ``average`` replaces each parameter's per-view gradients ``p.grad_sample`` (B K, ...) by their mean over
    each example's views (B, ...): DP-SGD then clips and sums one gradient per example. Opacus scales the
    per-row gradients of a mean loss back to each row's own loss, so example i's gradient is that of
    (1 / K) sum_k loss(view_ik). Without privacy the mean loss over the rows already is the mean over
    examples of that, and ``average`` has nothing to do.
    """

    def __init__(self, multiplicity: int, augment: Callable[[torch.Tensor], torch.Tensor]):
        self.multiplicity = multiplicity
        self.augment = augment

    def expand(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.multiplicity
        return self.augment(inputs.repeat_interleave(k, dim=0)), labels.repeat_interleave(k, dim=0)

    def average(self, model: nn.Module) -> None:
        """Average ``model``'s per-view gradients over each example's views (a no-op for a plain module)."""
        for parameter in model.parameters():
            per_view = getattr(parameter, "grad_sample", None)
            if per_view is None:
                continue
            if not isinstance(per_view, torch.Tensor):
                # A list means backward passes were accumulated without a step: the views of an example
                # could straddle two of them. make_private forbids that; this guards the invariant.
                raise RuntimeError("train.augmult: per-example gradients of several backward passes")
            parameter.grad_sample = per_view.unflatten(0, (-1, self.multiplicity)).mean(dim=1)


def view_averaging(cfg: Config, rank: int, epoch: int) -> ViewAveraging | None:
    """The run's ``ViewAveraging`` for one epoch (None when ``train.augmult`` is 1): views drawn from the
    AUGMULT stream of ``train.seed``, per rank and epoch, so a resumed run draws what the uninterrupted
    one would."""
    train = cfg.train
    if train.augmult == 1:
        return None
    generator = torch.Generator().manual_seed(derived_seed(train.seed, Stream.AUGMULT, rank, epoch))
    return ViewAveraging(train.augmult, random_translation(train.augment_shift, train.augment_flip, generator))


def check_augmult(cfg: Config, modality: str, input_shape, world: int) -> None:
    """Refuse, in one line each, ``train.augmult`` settings that cannot run soundly: views need images
    (C, H, W) and a shift smaller than them; the per-view gradients must be averaged before clipping,
    which ghost and book-keeping clipping do not allow; federated clients and several processes train
    outside ``train_model``'s loop, adversarial training would craft its examples from the views, and the
    white-box implementation audit trains the mechanism without views, so it would not test their
    averaging."""
    train = cfg.train
    if train.augmult == 1:
        return
    key = f"train.augmult={train.augmult}"
    if modality != "image" or len(input_shape) != 3:
        raise UserError(
            f"{key} augments images (translations, flips) and dataset={cfg.dataset.name} is a table: there is no "
            "meaningful augmentation of its records, use train.augmult=1"
        )
    if train.augment_shift >= min(input_shape[1:]):
        raise UserError(
            f"train.augment_shift={train.augment_shift} moves the {input_shape[1]}x{input_shape[2]} images of "
            f"dataset={cfg.dataset.name} out of view: use at most {min(input_shape[1:]) - 1} (e.g. 1 for digits, 4 for cifar10)"
        )
    mode = cfg.privacy.grad_sample_mode
    if mode not in VIEW_AVERAGING_MODES:
        raise UserError(
            f"{key} with privacy.grad_sample_mode={mode}: {mode} clipping clips each view's gradient, not the mean "
            "of an example's views; use privacy.grad_sample_mode=auto (hooks or functorch then), hooks or functorch"
        )
    if cfg.federation.name != "none":
        raise UserError(f"{key} augments the centralized recipe's batches: use federation=none or train.augmult=1")
    if world > 1:
        raise UserError(f"{key} runs in one process: use launcher.nproc_per_node=1 or train.augmult=1")
    if train.adversarial != "none":
        raise UserError(
            f"{key} with train.adversarial={train.adversarial}: adversarial training of augmented views is not "
            "supported, use one of the two"
        )
    if cfg.audit.whitebox.enabled:
        raise UserError(
            f"{key} with audit.whitebox.enabled=true: the implementation audit trains DP-SGD without views, so it "
            "would not test their averaging; use train.augmult=1 to audit the mechanism, or another audit"
        )
