"""Parameter averaging (``train.ema``): the exponential moving average of DP-SGD's iterates, the model a
run returns (De et al. 2022, "Unlocking High-Accuracy Differentially Private Image Classification through
Scale", section 3.2; Polyak & Juditsky 1992).

Every iterate is already released by DP-SGD, and the average is a function of the iterates alone, so it
is post-processing: the accountant's epsilon covers it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from dptrain.config import Config
from dptrain.errors import UserError


class WeightAverage:
    """``average <- decay * average + (1 - decay) * theta`` after every optimizer step, over the floating
    parameters and buffers of ``model``; ``average`` starts at the model's weights before training."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.average = {name: value.detach().clone() for name, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                self.average[name].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
            else:
                self.average[name].copy_(value)

    def follow(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        """Update after every step ``optimizer`` takes (under Opacus, every real step of its inner optimizer:
        not the virtual steps of physical batches); returns the hook's handle."""
        inner = getattr(optimizer, "original_optimizer", optimizer)
        return inner.register_step_post_hook(lambda *_: self.update(model))


def check_averaging(cfg: Config) -> None:
    """Refuse, in one line each, ``train.ema`` settings that cannot run soundly: federated clients train
    outside ``train_model`` (the average would be silently missing), and a checkpoint holds the last
    iterate, not the average, so a resumed run could not continue it."""
    if cfg.train.ema is None:
        return
    if cfg.federation.name != "none":
        raise UserError(f"train.ema={cfg.train.ema} averages the centralized recipe's iterates: use federation=none")
    if cfg.train.resume is not None:
        raise UserError(
            f"train.ema={cfg.train.ema} with train.resume: checkpoints hold the last iterate, not the average; "
            "start the run again"
        )
