"""Config validation: each bad input is one line naming the key and the fix, raised before data or models exist."""

from __future__ import annotations

import pytest

from dptrain.config import validate
from dptrain.errors import UserError
from dptrain.privacy import plan_privacy
from dptrain import pipeline
from dptrain.training import centralized


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

    monkeypatch.setattr(centralized, "load", no_loading)
    with pytest.raises(UserError, match="privacy.max_grad_norm"):
        pipeline.train(tiny_config("privacy.max_grad_norm=0"), tmp_path)
    with pytest.raises(UserError, match="privacy.noise_multiplier"):
        pipeline.train(tiny_config("privacy.noise_multiplier=0.2", "privacy.target_epsilon=0.5"), tmp_path)


def test_the_default_config_is_valid(tiny_config):
    info, sizes = validate(tiny_config())
    assert info.name == "digits" and sizes.members == sizes.non_members > 0
