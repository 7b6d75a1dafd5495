"""Each ``model=`` option carries its own training defaults (conf/model/<name>.yaml sets ``train.*`` keys),
below the command line and a named experiment, and per job in a sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.test_utils.test_utils import SweepTaskFunction
from omegaconf import OmegaConf

from conftest import make_config

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("path", sorted((CONF / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_model_file_sets_the_training_keys_it_names_and_train_default_the_rest(path):
    own = OmegaConf.load(path).get("train", {})
    composed = make_config(f"model={path.stem}")
    # convnet is the zoo's cnn with other defaults; every other file is named after its zoo model
    assert composed.model.name == {"convnet": "cnn"}.get(path.stem, path.stem)
    for key, value in OmegaConf.load(CONF / "train" / "default.yaml").items():
        assert composed.train[key] == own.get(key, value), key


def test_cnn_defaults_are_its_recipe_and_the_command_line_wins_over_them():
    cnn = make_config("model=cnn")
    model = cnn.model
    recipe = (cnn.train.lr, cnn.train.epochs, list(model.channels), model.groups, model.activation, model.zero_head)
    assert recipe == (0.5, 20, [2], 1, "elu", True) and (model.pool_to, model.skip) == (2, True)
    # logistic regression (the default job) keeps train/default.yaml's step
    assert make_config().train.lr == 1.0
    assert make_config("model=cnn", "train.lr=0.3").train.lr == 0.3


def test_an_experiment_wins_over_the_model_defaults_it_selects(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "probe.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: cnn\ntrain:\n  lr: 0.125\n"
    )
    probe = make_config(f"hydra.searchpath=[file://{tmp_path}]", "experiment=probe")
    assert probe.model.name == "cnn" and probe.train.lr == 0.125 and list(probe.model.channels) == [2]
    # pretrained_cnn pins the architecture its table was measured with, over the cnn's defaults
    pretrained = make_config("experiment=pretrained_cnn")
    model = pretrained.model
    assert (list(model.channels), model.groups, model.activation, model.pool_to, model.skip) == (
        [16, 32], 4, "tanh", None, False)
    assert pretrained.train.epochs == 15


def test_each_job_of_a_model_sweep_gets_its_own_model_defaults(tmp_path):
    """Through Hydra's basic sweeper, as ``dptrain train -m model=logreg,cnn`` runs it."""
    sweep = SweepTaskFunction()
    sweep.calling_file, sweep.calling_module = None, "dptrain.cli"
    sweep.config_path, sweep.config_name = "pkg://dptrain.conf", "config"
    sweep.overrides, sweep.temp_dir = ["model=logreg,cnn", "audit=none"], str(tmp_path)
    sweep.task_function = lambda cfg: (cfg.model.name, cfg.train.lr)
    with sweep:
        jobs = [job.return_value for batch in sweep.returns for job in batch]
    assert jobs == [("logreg", 1.0), ("cnn", 0.5)]


def test_the_cnn_default_is_logistic_regression_beside_average_pooled_convolution_features():
    """model=cnn's head reads the 64 pixels and then the 2 channels' 4x4 block means, computed here by hand."""
    from torch.nn import functional as F

    from dptrain.models import build_model

    model = build_model(make_config("model=cnn").model, (1, 8, 8), 10)
    # conv 2 * 9 + 2, GroupNorm 2 + 2, head (64 + 2 * 2 * 2) * 10 + 10: fewer than the old 8-channel cnn's 1386
    assert sum(p.numel() for p in model.parameters()) == 754
    torch.manual_seed(3)
    for p in model.parameters():  # away from the zero head and GroupNorm's unit affine, so every term shows
        torch.nn.init.normal_(p)
    x = torch.randn(5, 1, 8, 8)
    conv, norm, head = (m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.Linear)))
    z = F.elu(F.group_norm(F.conv2d(x, conv.weight, conv.bias, padding=1), 1, norm.weight, norm.bias))
    blocks = z.reshape(5, 2, 2, 4, 2, 4).mean(dim=(3, 5))  # channel, block row, row, block column, column
    expected = torch.cat([x.reshape(5, 64), blocks.reshape(5, 8)], dim=1) @ head.weight.T + head.bias
    torch.testing.assert_close(model(x), expected)
