"""Config validation: each bad input is one line naming the key and the fix, raised before data or models exist."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import typing

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, make_config
from dptrain.validation import validate
from dptrain.validation.keys import RANGES, check_known_keys, numeric_keys, schema_keys
from dptrain.errors import UserError
from dptrain.privacy import plan_privacy
from dptrain import pipeline
from dptrain.training import target


def _error(cfg) -> str:
    with pytest.raises(UserError) as caught:
        validate(cfg)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("privacy.target_epsilon=0", "privacy.target_epsilon=0"),
        ("privacy.target_epsilon=-1", "privacy.target_epsilon=-1"),
        ("privacy.delta=0", "privacy.delta=0"),
        ("privacy.delta=-1e-5", "privacy.delta=-1e-05"),
        ("privacy.delta=0.01", "(0, 1/n)"),
        ("dataset.name=imagenet", "dataset"),
        ("model.name=transformer", "model=transformer is unknown"),
        ("privacy.accountant=moments", "privacy.accountant=moments is unknown"),
        ("train.batch_size=100000", "train.batch_size=100000"),
        ("privacy.max_grad_norm=0", "privacy.max_grad_norm=0"),
        ("privacy.max_grad_norm=-1", "privacy.max_grad_norm=-1"),
        ("privacy.noise_multiplier=1.0 privacy.target_epsilon=inf", "conflicts with the non-private baseline"),
        ("privacy.target_epsilon=null", "privacy.target_epsilon=null needs privacy.noise_multiplier"),
        ("train.device=tpu", "train.device=tpu"),
        ("privacy.grad_sample_mode=ghost privacy.clipping=per_layer", "flat clipping only"),
        ("privacy.grad_sample_mode=bk privacy.clipping=per_layer", "grad_sample_mode=bk supports flat clipping only"),
    ],
)
def test_bad_value_is_one_line_naming_the_key(tiny_config, override, expected):
    message = _error(tiny_config(*override.split()))
    assert expected in message


def test_delta_at_least_one_over_n_names_n_and_suggests_a_delta(tiny_config):
    message = _error(tiny_config("privacy.delta=0.5"))
    assert "n=575" in message and "privacy.delta=1e-4" in message


def test_image_model_on_tabular_data_is_rejected(tiny_config):
    assert "needs image input" in _error(tiny_config("dataset=breast_cancer", "model=cnn"))


@pytest.mark.parametrize("override", ["model.skip=true", "model.pool_to=2"])
def test_the_cnn_head_options_on_another_model_are_refused_not_ignored(tiny_config, override):
    assert "model=mlp would ignore them" in _error(tiny_config("model=mlp", override))


def test_unknown_dataset_lists_the_choices(tiny_config):
    message = _error(tiny_config("dataset.name=imagenet"))
    assert "digits" in message and "csv" in message


def test_csv_path_that_does_not_exist(tiny_config, tmp_path):
    message = _error(tiny_config("dataset=csv", f"dataset.path={tmp_path / 'missing.csv'}", "dataset.target=y"))
    assert "dataset.path" in message and "missing.csv" in message


def test_csv_without_the_named_target_column(tiny_config, tmp_path):
    table = tmp_path / "table.csv"
    table.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(50)))
    message = _error(tiny_config("dataset=csv", f"dataset.path={table}", "dataset.target=outcome"))
    assert "dataset.target" in message and "outcome" in message and "label" in message


def test_csv_without_the_named_sensitive_column(tiny_config, tmp_path):
    table = tmp_path / "table.csv"
    table.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(50)))
    message = _error(
        tiny_config("dataset=csv", f"dataset.path={table}", "dataset.target=label", "dataset.sensitive=race")
    )
    assert "dataset.sensitive" in message and "race" in message


def test_noise_multiplier_that_overspends_the_target_is_rejected_with_the_needed_noise(tiny_config):
    cfg = tiny_config("privacy.noise_multiplier=0.3", "privacy.target_epsilon=1")
    info, sizes = validate(cfg)
    with pytest.raises(UserError, match=r"spends epsilon .* above privacy.target_epsilon=1.0: set noise_multiplier >= "):
        plan_privacy(cfg.privacy, members=sizes.members, batch_size=cfg.train.batch_size, epochs=cfg.train.epochs)


def test_noise_multiplier_within_the_target_is_used_as_given(tiny_config):
    cfg = tiny_config("privacy.noise_multiplier=5.0", "privacy.target_epsilon=3")
    _, sizes = validate(cfg)
    plan = plan_privacy(cfg.privacy, members=sizes.members, batch_size=cfg.train.batch_size, epochs=cfg.train.epochs)
    assert plan.noise_multiplier == 5.0 and plan.planned_epsilon < 3


def test_validation_fails_before_any_data_is_loaded(tiny_config, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("data was loaded before the config was validated")

    monkeypatch.setattr(target, "load", no_loading)
    with pytest.raises(UserError, match="privacy.max_grad_norm"):
        pipeline.train(tiny_config("privacy.max_grad_norm=0"), tmp_path)
    with pytest.raises(UserError, match="privacy.noise_multiplier"):
        pipeline.train(tiny_config("privacy.noise_multiplier=0.2", "privacy.target_epsilon=0.5"), tmp_path)


def test_the_default_config_is_valid(tiny_config):
    info, sizes = validate(tiny_config())
    assert info.name == "digits" and sizes.members == sizes.non_members > 0


# Every numeric key finite and in range (issue 12 item 2), checked before anything else.


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # Hung in Opacus' RDP analysis.
        ("privacy.noise_multiplier=inf", "privacy.noise_multiplier=inf must be finite and positive"),
        # Crashed after training writing metrics.json ("Out of range float values are not JSON compliant").
        ("train.lr=inf", "train.lr=inf must be finite and positive"),
        ("privacy.max_grad_norm=inf", "privacy.max_grad_norm=inf must be finite and positive"),
        ("train.weight_decay=nan", "train.weight_decay=nan is not a number; it must be at least 0"),
        ("train.momentum=1", "train.momentum=1.0 must be in [0, 1)"),
        ("privacy.target_epsilon=nan", "privacy.target_epsilon=nan is not a number; it must be positive or inf"),
        ("privacy.target_epsilon=-inf", "privacy.target_epsilon=-inf must be positive or inf"),
        ("privacy.delta=inf", "privacy.delta=inf must be finite and in (0, 1)"),
        ("aggregator.tau=inf", "aggregator.tau=inf must be finite and positive"),
        ("attack.noise_std=nan", "attack.noise_std=nan is not a number"),
        ("audit.mia.rmia_offline_a=1.5", "audit.mia.rmia_offline_a=1.5 must be in [0, 1]"),
        ("model.hidden=[64,0]", "model.hidden=[64, 0]: each entry must be at least 1"),
        # Seeds (issue 12 item 9): dataset.seed=-1 crashed in splits.py, train.seed=-1 was accepted.
        ("dataset.seed=-1", "dataset.seed=-1 must be in [0, 4294967296)"),
        ("train.seed=-1", "train.seed=-1 must be in [0, 4294967296)"),
        ("audit.seed=4294967296", "audit.seed=4294967296 must be in [0, 4294967296)"),
    ],
)
def test_non_finite_and_out_of_range_values_are_one_line_naming_the_range(tiny_config, override, expected):
    assert _error(tiny_config(override)).startswith(expected)


@pytest.mark.parametrize(
    "override",
    [
        "privacy.target_epsilon=inf", "train.weight_decay=0", "dataset.seed=4294967295", "train.seed=0",
        "train.momentum=0.9",
    ],
)
def test_values_at_the_edges_of_their_ranges_are_accepted(tiny_config, override):
    validate(tiny_config(override))


def test_every_numeric_key_of_the_schema_has_a_range_and_every_range_a_key():
    assert set(numeric_keys()) == set(RANGES)
    assert {"train.lr", "aggregator.f", "model.hidden", "audit.mia.bootstrap"} <= set(RANGES)


def _schema_types() -> dict[str, type]:
    """Each numeric key's element type: int or float."""
    types = {}
    for key, hint in schema_keys():
        while typing.get_args(hint):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        types[key] = hint
    return types


def _bad_values(key: str) -> list:
    """nan and the infinities the key does not admit (float keys), and values just past each finite bound."""
    admissible, kind = RANGES[key], _schema_types()[key]
    values = [float("nan"), -math.inf] + ([] if admissible.infinite else [math.inf]) if kind is float else []
    if admissible.low > -math.inf:
        values.append(admissible.low if admissible.low_open else admissible.low - 1)
    if admissible.high < math.inf:
        values.append(admissible.high if admissible.high_open else admissible.high + 1)
    return [kind(v) if math.isfinite(v) else v for v in values]


SWEEP = [(key, value) for key in sorted(RANGES) for value in _bad_values(key)]


@pytest.fixture(scope="module")
def default_config():
    return make_config(*TINY)


@pytest.mark.parametrize(("key", "value"), SWEEP, ids=[f"{key}={value}" for key, value in SWEEP])
def test_every_numeric_key_refuses_nan_inf_and_out_of_range_values(default_config, key, value):
    cfg = copy.deepcopy(default_config)
    is_list = typing.get_origin(dict(schema_keys())[key]) is list
    OmegaConf.update(cfg, key, [value] if is_list else value)
    message = _error(cfg)
    assert message.startswith(f"{key}=") and "must be" in message


# Unknown keys (issue 12 item 3): `+key=value` is how Hydra's own error says to add a key.


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "+privacy.target_epsilom=0.5",
            "unknown config key privacy.target_epsilom (did you mean privacy.target_epsilon?)",
        ),
        ("+audit.mia.bootstraps=5", "unknown config key audit.mia.bootstraps (did you mean audit.mia.bootstrap?)"),
        ("+train.target_epsilon=1", "(did you mean privacy.target_epsilon?)"),
        ("+qwerty=1", "unknown config key qwerty: fix the spelling"),
    ],
)
def test_unknown_keys_added_with_plus_are_refused_naming_the_closest_key(override, expected):
    assert expected in _error(make_config(*TINY, override))


def test_the_cli_refuses_a_misspelt_plus_key_with_one_line_before_training(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dptrain", "train", "+privacy.target_epsilom=0.5", "audit=none", "train.epochs=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "dptrain: error: unknown config key privacy.target_epsilom (did you mean privacy.target_epsilon?): "
        "fix the spelling (`dptrain train --cfg job` prints every key)"
    ]
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.parametrize(
    "experiment", ["epsilon_sweep", "robustness_matrix", "best_logreg", "best_cnn", "pretrained_cnn"]
)
def test_the_experiment_overlays_hold_only_known_keys(experiment):
    check_known_keys(make_config(f"experiment={experiment}"))


# Launcher (issue 12 item 5): no more processes than the devices that run them, unless forced.


def test_more_gloo_processes_than_cores_are_refused_unless_oversubscribed(tiny_config):
    cores = len(os.sched_getaffinity(0))
    overrides = (f"launcher.nproc_per_node={cores + 1}", "launcher.backend=gloo")
    message = _error(tiny_config(*overrides))
    assert message == (
        f"launcher.nproc_per_node={cores + 1} exceeds the {cores} CPU cores available here: use at most {cores}, "
        f"or launcher.oversubscribe=true to start {cores + 1} processes anyway"
    )
    validate(tiny_config(*overrides, "launcher.oversubscribe=true"))


def test_the_ranks_a_launcher_started_do_not_refuse_themselves(tiny_config, monkeypatch):
    # The spawned workers validate the same config: the processes already exist, so no cap applies there.
    workers = len(os.sched_getaffinity(0)) + 1
    monkeypatch.setenv("WORLD_SIZE", str(workers))
    monkeypatch.setenv("RANK", "1")
    validate(tiny_config(f"launcher.nproc_per_node={workers}", "launcher.backend=gloo"))


def test_nccl_never_runs_more_processes_than_gpus(tiny_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    message = _error(tiny_config("launcher.nproc_per_node=2", "launcher.backend=nccl", "launcher.oversubscribe=true"))
    assert message.startswith("launcher.nproc_per_node=2 exceeds the 1 GPU(s) here")


# Robust rules at or beyond half Byzantine (issue 12 item 6, issue 11 finding 9).


@pytest.mark.parametrize("aggregator", ["median", "geometric_median", "centered_clipping"])
def test_robust_rules_refuse_half_byzantine_clients_and_accept_one_fewer(tiny_config, aggregator):
    federated = ("federation=fedavg", "federation.clients=10", f"aggregator={aggregator}", "attack=sign_flip")
    message = _error(tiny_config(*federated, "attack.byzantine=5"))
    assert f"{aggregator} needs n > 2f (n=10, f=5)" in message
    validate(tiny_config(*federated, "attack.byzantine=4"))


def test_three_byzantine_of_four_clients_are_refused_for_the_median(tiny_config):
    message = _error(tiny_config("federation=fedavg", "federation.clients=4", "aggregator=median", "attack=ipm",
                                 "attack.byzantine=3"))
    assert "median needs n > 2f (n=4, f=3)" in message
