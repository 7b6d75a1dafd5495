"""The on-disk noise-calibration cache: a hit is exactly the calibration's answer, anything else is recomputed."""

from __future__ import annotations

import json

import pytest

from dptrain.config import PrivacyConfig
from dptrain.privacy import calibrate_noise, epsilon_spent, plan_privacy
from dptrain.privacy import calibration_cache
from dptrain.privacy.calibration_cache import CACHE_ENV, cache_dir, cached_calibration, calibration_key

# Full batches (q = 1), where RDP has a closed form: each calibration takes milliseconds.
ACCOUNT = dict(accountant="rdp", sample_rate=1.0, steps=10, delta=1e-5)
TARGET = 3.0


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return tmp_path


def _entries(directory):
    return sorted((directory / "calibrations").glob("*.json"))


def _no_accountant(monkeypatch):
    def refuse(**_):
        raise AssertionError("the accountant ran on a cache hit")

    monkeypatch.setattr(calibration_cache, "calibrate_noise", refuse)
    monkeypatch.setattr(calibration_cache, "epsilon_spent", refuse)


def test_a_warm_hit_returns_exactly_the_cold_calibration_without_searching(cache, monkeypatch):
    cold = cached_calibration(target_epsilon=TARGET, **ACCOUNT)
    expected = calibrate_noise(target_epsilon=TARGET, **ACCOUNT)
    assert cold == (expected, epsilon_spent(noise_multiplier=expected, **ACCOUNT))
    assert len(_entries(cache)) == 1
    _no_accountant(monkeypatch)
    assert cached_calibration(target_epsilon=TARGET, **ACCOUNT) == cold


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda entry: "{truncated",
        lambda entry: json.dumps({**entry, "noise_multiplier": "2.5"}),
        # Well-formed, but spending more than the target: the guarantee a hit must keep.
        lambda entry: json.dumps({**entry, "epsilon": TARGET * 1.5}),
        lambda entry: json.dumps({**entry, "key": {**entry["key"], "steps": 76}}),
        lambda entry: json.dumps({**entry, "noise_multiplier": float("nan")}),
    ],
    ids=["not-json", "string", "over-target", "other-key", "nan"],
)
def test_a_corrupt_entry_is_ignored_and_rewritten(cache, corrupt):
    cold = cached_calibration(target_epsilon=TARGET, **ACCOUNT)
    (path,) = _entries(cache)
    path.write_text(corrupt(json.loads(path.read_text())))
    assert cached_calibration(target_epsilon=TARGET, **ACCOUNT) == cold
    assert json.loads(path.read_text()) == {
        "key": calibration_key(target_epsilon=TARGET, **ACCOUNT),
        "noise_multiplier": cold[0],
        "epsilon": cold[1],
    }


def test_the_key_separates_accountants_targets_and_library_versions(cache, monkeypatch):
    cached_calibration(target_epsilon=TARGET, **ACCOUNT)
    cached_calibration(target_epsilon=TARGET, **{**ACCOUNT, "delta": 1e-6})
    cached_calibration(target_epsilon=2.0, **ACCOUNT)
    monkeypatch.setattr(calibration_cache.opacus, "__version__", "0.0-other")
    cached_calibration(target_epsilon=TARGET, **ACCOUNT)
    assert len(_entries(cache)) == 4


def test_off_disables_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_dir() is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "dptrain"


def test_the_plan_reads_its_noise_and_epsilon_from_a_hit(cache, monkeypatch):
    cfg = PrivacyConfig(target_epsilon=TARGET, accountant="rdp")
    cold = plan_privacy(cfg, members=100, batch_size=100, epochs=10)
    _no_accountant(monkeypatch)
    warm = plan_privacy(cfg, members=100, batch_size=100, epochs=10)
    assert warm == cold and (cold.sample_rate, cold.steps) == (1.0, 10)
