"""Trigger-set watermarking (Adi et al. 2018): keys trained with the members and counted by the privacy
plan, and ``dptrain verify run_dir=<owner> model=<suspect>``'s binomial test."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from conftest import QUIET, TINY, in_process
from dptrain.data import InputUnits
from dptrain.errors import UserError
from dptrain.training.centralized import training_size
from dptrain.training.recipes import recipe_for
from dptrain.validation import validate
from dptrain.watermark import TriggerSet, draw_trigger_set, watermark_test

# Small enough for the default tier, large enough that an MLP memorizes the 20 keys' labels.
SMALL = ("model=mlp", "privacy=none", "train.epochs=8", "train.batch_size=32", "dataset.max_members=100",
         "train.checkpoint=false")
WATERMARKED = ("train.watermark.enabled=true", "train.watermark.count=20")


def _binomial_tail(n: int, k: int, p: Fraction) -> float:
    """P[X >= k] for X ~ Binomial(n, p), in exact rational arithmetic."""
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


@pytest.mark.parametrize("n, k, classes", [(20, 7, 4), (100, 28, 10), (100, 10, 10), (50, 0, 2), (30, 30, 3)])
def test_the_p_value_is_the_binomial_tail_at_chance(n, k, classes):
    keys = TriggerSet(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), classes)
    check = watermark_test(k, keys)
    assert check.p_value == pytest.approx(_binomial_tail(n, k, Fraction(1, classes)), rel=1e-9)
    assert check.accuracy == k / n and check.chance == 1 / classes


def test_keys_are_seeded_noise_within_each_pixels_range_with_labels_over_every_class():
    low, high = torch.full((1, 4, 4), -0.5), torch.full((1, 4, 4), 0.5)
    units = InputUnits(scale=torch.ones(1, 4, 4), low=low, high=high)
    keys = draw_trigger_set(500, units, 10, seed=3)
    assert keys.inputs.shape == (500, 1, 4, 4) and keys.labels.shape == (500,)
    assert bool(((keys.inputs >= low) & (keys.inputs <= high)).all())
    assert set(keys.labels.tolist()) == set(range(10))
    assert torch.equal(draw_trigger_set(500, units, 10, seed=3).inputs, keys.inputs)
    assert not torch.equal(draw_trigger_set(500, units, 10, seed=4).labels, keys.labels)


def test_the_privacy_plan_counts_the_keys_as_training_records(tiny_config):
    plain = tiny_config("privacy.noise_multiplier=1.0", "privacy.target_epsilon=null")
    marked = tiny_config("privacy.noise_multiplier=1.0", "privacy.target_epsilon=null", "train.watermark.enabled=true")
    assert training_size(marked, 575) == training_size(plain, 575) + 100
    # digits' 575 members at batch 128 take ceil(575 / 128) = 5 steps an epoch; with the 100 keys
    # ceil(675 / 128) = 6, and the sampling rate is one batch's share of an epoch.
    plans = [recipe_for(cfg).plan(cfg, validate(cfg)[1]) for cfg in (plain, marked)]
    assert [plan.sample_rate for plan in plans] == [1 / 5, 1 / 6]
    assert plans[1].steps == 6 * marked.train.epochs


@pytest.mark.parametrize(
    "overrides, says",
    [
        (("dataset=breast_cancer",), "is not image data"),
        (("federation=fedavg",), "centralized recipe only"),
        (("train.watermark.count=0",), "train.watermark.count=0"),
    ],
)
def test_a_watermark_the_recipe_cannot_train_is_refused(tiny_config, overrides, says):
    with pytest.raises(UserError, match=says):
        validate(tiny_config(*WATERMARKED, *overrides))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """A watermarked owner run and an independently trained run of the same architecture (another seed)."""
    folder = tmp_path_factory.mktemp("watermark")
    owner, independent = folder / "owner", folder / "independent"
    assert in_process("train", *TINY, *SMALL, *WATERMARKED, f"hydra.run.dir={owner}", *QUIET) == 0
    assert in_process("train", *TINY, *SMALL, "train.seed=1", f"hydra.run.dir={independent}", *QUIET) == 0
    return owner, independent


def _p_value(out: str) -> float:
    return float(next(line for line in out.splitlines() if line.startswith("p-value")).split()[1])


def test_the_watermarked_model_carries_the_watermark_and_its_metrics_record_it(runs, cli):
    owner, _ = runs
    status, out, _, _ = cli("verify", f"run_dir={owner}", f"model={owner / 'model.pt'}")
    assert status == 0 and _p_value(out) < 1e-6 and "watermark FOUND" in out
    record = json.loads((owner / "metrics.json").read_text())["watermark"]
    assert record["keys"] == 20 and record["p_value"] == pytest.approx(_p_value(out), rel=1e-2)


def test_an_independently_trained_model_does_not(runs, cli):
    # Under the null the p-value exceeds 0.05 with probability about 0.95: this pins the seeds' outcome
    # (0 of 20 keys agree, p = 1, when written), while a model that learnt the keys gives p < 1e-6.
    owner, independent = runs
    status, out, _, _ = cli("verify", f"run_dir={owner}", f"model={independent / 'model.pt'}")
    assert status == 1 and _p_value(out) > 0.05 and "watermark not found" in out


def test_the_summary_shows_the_watermark_of_a_watermarked_run_only(runs):
    from dptrain.training.metrics import RunMetrics
    from dptrain.views.summary import format_summary

    owner, independent = (RunMetrics.from_dict(json.loads((run / "metrics.json").read_text())) for run in runs)
    assert "of 20 keys learnt, p-value" in format_summary(owner, None, runs[0])
    assert "keys learnt" not in format_summary(independent, None, runs[1])


def test_a_run_without_a_watermark_records_none(runs):
    assert "watermark" not in json.loads((runs[1] / "metrics.json").read_text())


def test_keys_changed_after_training_are_refused(runs, tmp_path, cli):
    import shutil

    owner = Path(shutil.copytree(runs[0], tmp_path / "owner"))
    keys = torch.load(owner / "watermark.pt", weights_only=True)
    keys["labels"] = (keys["labels"] + 1) % keys["num_classes"]
    torch.save(keys, owner / "watermark.pt")
    status, _, errors, _ = cli("verify", f"run_dir={owner}", f"model={runs[1] / 'model.pt'}")
    assert status == 2 and "the key set was changed after training" in errors[0]


@pytest.mark.parametrize(
    "suspect, extra, says",
    [
        ("logreg", (), "does not fit the owner run's model"),
        ("missing", (), "does not exist"),
        ("independent", ("verify.alpha=0",), "verify.alpha=0.0 must be in (0, 1)"),
        ("independent", ("verify.alpha=x",), "verify.alpha=x is not a number"),
    ],
)
def test_a_suspect_or_threshold_that_cannot_be_tested_is_one_line_with_status_2(
    runs, tmp_path, cli, suspect, extra, says
):
    owner, independent = runs
    path = {"independent": independent / "model.pt", "missing": tmp_path / "none.pt", "logreg": tmp_path / "l.pt"}[suspect]
    torch.save({"linear.weight": torch.zeros(10, 64), "linear.bias": torch.zeros(10)}, tmp_path / "l.pt")
    status, out, errors, _ = cli("verify", f"run_dir={owner}", f"model={path}", *extra)
    assert status == 2 and not out and says in errors[0]


def test_a_run_trained_without_a_watermark_cannot_test_a_suspect(runs, cli):
    status, _, errors, _ = cli("verify", f"run_dir={runs[1]}", f"model={runs[0] / 'model.pt'}")
    assert status == 2 and "watermark.pt does not exist" in errors[0]
