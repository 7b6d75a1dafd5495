"""Public pretraining (``train.pretrain=population``): the settings of the run that trains the model without
privacy on the population split (``dptrain.training.recipe.public_start`` runs it), the starting point of
DP-SGD fine-tuning on the members (Tramer & Boneh 2021, "Differentially Private Learning Needs Better
Features"; Li et al. 2022 and Mehta et al. 2023 on DP fine-tuning).

The population is disjoint from members, non-members and test (``dptrain.data.splits``) and is data
the guarantee does not cover: the audit's attacker holds it too. Pretraining reads only the population
and the config, never the members, so the public model is a constant of the private mechanism and the
accountant charges the fine-tuning steps alone (post-processing of nothing private).
"""

from __future__ import annotations

import copy
from typing import Sequence

from torch import nn

from dptrain.config import Config
from dptrain.errors import UserError
from dptrain.models import build_model
from dptrain.training.representations import output_layer

PRETRAIN_DATA = ("none", "population")
FINETUNE = ("full", "last_layer")


def pretrain_config(cfg: Config) -> Config:
    """``cfg`` for the pretraining run: the non-private baseline (``privacy.target_epsilon=inf``) for
    ``train.pretrain_epochs`` at ``train.pretrain_lr``, seeded by ``train.pretrain_seed`` (null:
    ``train.seed``), on clean inputs (no adversarial training, one view per example), no watermark,
    checkpoint or progress bar, and no pretraining of its own."""
    derived = copy.deepcopy(cfg)
    train = derived.train
    train.seed = cfg.train.seed if cfg.train.pretrain_seed is None else cfg.train.pretrain_seed
    train.pretrain_seed = None
    train.epochs = cfg.train.pretrain_epochs
    train.lr = cfg.train.pretrain_lr
    train.pretrain = "none"
    train.finetune = "full"
    train.resume = None
    train.checkpoint = False
    train.progress = False
    train.watermark.enabled = False
    train.adversarial = "none"
    train.augmult = 1
    derived.privacy.target_epsilon = float("inf")
    derived.privacy.noise_multiplier = None
    return derived


def freeze_for_finetuning(model: nn.Module, finetune: str) -> None:
    """``last_layer``: every parameter but those of the output layer (``output_layer``, the last
    ``nn.Linear`` of every zoo model) stops training; DP-SGD then clips and noises the output layer's
    per-example gradients alone. ``full``: nothing changes. Validation refuses ``last_layer`` for a
    model without an output layer."""
    if finetune != "last_layer":
        return
    head = output_layer(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in head.parameters():
        parameter.requires_grad_(True)


def pretrain_record(cfg: Config, population: int, private_records: int) -> dict | None:
    """``metrics.json``'s ``pretrain``: which data were public (the population, non-private pretraining)
    and which private (the members, DP-SGD fine-tuning, the only phase epsilon covers); None without
    pretraining."""
    if cfg.train.pretrain == "none":
        return None
    return {
        "public": cfg.train.pretrain,
        "public_records": population,
        "public_epochs": cfg.train.pretrain_epochs,
        "private": "members",
        "private_records": private_records,
        "finetune": cfg.train.finetune,
        "epsilon_covers": "fine-tuning on the private records only; the public data are assumed public",
    }


def check_pretrain(cfg: Config, world: int, input_shape: Sequence[int], num_classes: int) -> None:
    """Refuse, in one line each, pretraining settings that cannot run soundly: unknown names, last-layer
    fine-tuning without a public model or without an output layer (in the model the config builds for
    ``input_shape`` and ``num_classes``), and recipes other than the centralized one in one process
    (``world`` processes), whose clients or ranks would each need the public model."""
    train = cfg.train
    if train.pretrain not in PRETRAIN_DATA:
        raise UserError(f"train.pretrain={train.pretrain} is unknown: choose one of {', '.join(PRETRAIN_DATA)}")
    if train.finetune not in FINETUNE:
        raise UserError(f"train.finetune={train.finetune} is unknown: choose one of {', '.join(FINETUNE)}")
    if train.pretrain == "none":
        if train.finetune != "full":
            raise UserError(
                f"train.finetune={train.finetune} fine-tunes a pretrained model: set train.pretrain=population"
            )
        return
    if cfg.federation.name != "none" or world > 1:
        raise UserError(
            f"train.pretrain={train.pretrain} runs in the centralized recipe in one process: use federation=none "
            "and launcher.nproc_per_node=1"
        )
    if train.finetune == "last_layer" and output_layer(build_model(cfg.model, input_shape, num_classes)) is None:
        raise UserError(
            f"train.finetune=last_layer needs a model whose last layer is nn.Linear; model={cfg.model.name} has "
            "none: use train.finetune=full"
        )
