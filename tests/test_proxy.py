"""Tuning on a proxy (``train.proxy=population``): the proxy trains on half of the population split and
validates on the other half, never reading a member; it keeps the members' sample rate, steps and
noise-to-batch ratio (hand-computed here); refused combinations fail validation; the report never takes
a proxy run for a member run; the proxy search picks the grid point by its mean over seeds and prices the
member-side search (recomputed with dp-accounting)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import TensorDataset

from conftest import TINY, make_config
from dptrain import pipeline
from dptrain.data import SplitSizes, load, make_split, prepare
from dptrain.errors import UserError
from dptrain.report.collect import RunRecord
from dptrain.report.proxy_search import proxy_search, proxy_search_markdown
from dptrain.report.selection import select
from dptrain.report.table import build_table
from dptrain.report.tuning import ORDERS
from dptrain.training import proxy, recipe
from dptrain.training.metrics import RunMetrics
from dptrain.validation import validate
from dptrain.views.summary import format_summary

# Fixed noise (no calibration), so the proxy's noise is a hand-computable multiple of it.
PROXY = (*TINY, "train.proxy=population", "train.threads=1", "privacy.target_epsilon=null",
         "privacy.noise_multiplier=2.3", "privacy.grad_sample_mode=hooks", "privacy.pld_check=false")  # fmt: skip


@pytest.fixture(scope="module")
def proxy_run(tmp_path_factory):
    """One tiny proxy run on digits, with the records the recipe handed to ``train_model``."""
    run_dir = tmp_path_factory.mktemp("proxy")
    trained_on = []
    original = proxy.train_model

    def spy(cfg, train_set, **kwargs):
        trained_on.append(train_set.tensors[0].clone())
        return original(cfg, train_set, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(proxy, "train_model", spy)
        pipeline.train(make_config(*PROXY), run_dir)
    read = lambda name: json.loads((run_dir / name).read_text())  # noqa: E731
    return run_dir, read("metrics.json"), read("split.json"), read("proxy.json"), trained_on


def test_the_proxy_trains_on_half_the_population_and_validates_on_the_other_half(proxy_run):
    _, metrics, split, parts, trained_on = proxy_run
    train, validation = set(parts["train"]), set(parts["validation"])
    # digits: 288 population records, cut 144 / 144; together exactly the population, apart from the rest.
    assert len(train) == len(validation) == 144 and not train & validation
    assert train | validation == set(split["population"])
    for part in ("members", "non_members", "test"):
        assert not (train | validation) & set(split[part])
    # The one model trained saw exactly the population records at the "train" indices, in the split's order.
    data = load(make_config(*PROXY).dataset)
    prepared = prepare(data, make_split(data, make_config(*PROXY).dataset))
    rows = np.searchsorted(split["population"], parts["train"])
    assert len(trained_on) == 1
    assert torch.equal(trained_on[0], prepared.population.tensors[0][torch.from_numpy(rows)])
    assert metrics["epsilon"] is None and metrics["audited_members"] == 144
    assert metrics["proxy"]["train_records"] == 144 and metrics["proxy"]["validation_records"] == 144
    assert 0.0 < metrics["proxy"]["validation_accuracy"] <= 1.0


def test_the_proxy_run_logs_no_epsilon_curve_to_tensorboard(proxy_run):
    # Its records are public and nothing is accounted: an epsilon curve would read as the members' spend.
    events = EventAccumulator(str(proxy_run[0] / "tb"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "test/accuracy", "privacy/noise_multiplier"} <= scalars
    assert "privacy/epsilon_rdp" not in scalars


def test_the_proxy_split_is_the_same_for_every_training_seed(proxy_run):
    _, _, split, parts, _ = proxy_run
    train, validation = proxy.proxy_positions(len(split["population"]), dataset_seed=0)
    assert np.array_equal(np.asarray(split["population"])[train], parts["train"])
    assert np.array_equal(np.asarray(split["population"])[validation], parts["validation"])


def test_the_proxy_keeps_the_members_sample_rate_steps_and_noise_to_batch_ratio(proxy_run):
    # Members 575 at batch 128: ceil(575 / 128) = 5 steps per epoch, rate 1/5, 2 epochs = 10 steps; Opacus
    # divides the noisy sum by int(575 / 5) = 115 on the members, int(144 / 5) = 28 on the proxy.
    plan = proxy.proxy_plan(make_config(*PROXY), SplitSizes(members=575, non_members=575, population=288, test=359))
    assert plan.sample_rate == 0.2 and plan.steps_per_epoch == 5 and plan.steps == 10
    assert plan.noise_multiplier == pytest.approx(2.3 * 28 / 115)
    assert plan.planned_epsilon is None
    recorded = proxy_run[1]["proxy"]
    assert recorded["members_noise_multiplier"] == 2.3
    assert recorded["noise_to_batch"] == pytest.approx(2.3 / 115)
    assert proxy_run[1]["noise_multiplier"] == pytest.approx(2.3 * 28 / 115)


def test_opacus_adds_the_same_noise_to_the_proxy_s_averaged_gradient_as_to_the_members(one_thread):
    # Opacus' DPOptimizer adds N(0, (noise_multiplier * C)^2) to the clipped sum and divides by its
    # expected_batch_size: the averaged gradient's noise is noise_multiplier * C / expected_batch_size.
    cfg = make_config(*PROXY)
    sizes = SplitSizes(members=575, non_members=575, population=288, test=359)
    noise = {}
    for records, plan in ((575, proxy.members_plan(cfg, sizes)), (144, proxy.proxy_plan(cfg, sizes))):
        data = TensorDataset(torch.randn(records, 64), torch.randint(0, 10, (records,)))
        training = recipe.private_training(
            cfg, nn.Linear(64, 10), data, plan, batch_size=128, sampling=torch.Generator(), noise=torch.Generator()
        )
        optimizer = training.optimizer
        noise[records] = optimizer.noise_multiplier * optimizer.max_grad_norm / optimizer.expected_batch_size
    assert noise[144] == pytest.approx(noise[575], rel=1e-12) and noise[575] == pytest.approx(2.3 / 115)


def test_the_run_summary_says_the_proxy_read_no_member_and_what_it_imitates(proxy_run):
    run_dir, metrics, *_ = proxy_run
    text = format_summary(RunMetrics.from_dict(metrics), None, run_dir)
    assert text.startswith(f"validation     {metrics['proxy']['validation_accuracy']:.4f} on the proxy's 144")
    assert "ASSUMED PUBLIC: no member read, nothing accounted" in text
    assert "noise multiplier 2.300 there, 0.560 here" in text and "epsilon 0." not in text.split("imitates")[0]


@pytest.mark.parametrize(
    "override, refusal",
    [
        ("train.pretrain=population", "also trains on the population"),
        ("audit=fast", "would audit members"),
        ("train.watermark.enabled=true", "adds keys"),
        ("attack=label_flip", "poisoning and sanitization"),
        ("privacy.noise_multiplier=null privacy.target_epsilon=inf", "non-private baseline"),
        ("federation=fedavg", "centralized recipe in one process"),
        ("train.proxy=members", "is unknown"),
    ],
)
def test_refused_proxy_settings_fail_validation_with_one_line(override, refusal):
    with pytest.raises(UserError, match=refusal):
        validate(make_config(*PROXY, *override.split()))


def test_a_proxy_too_small_for_the_members_rate_is_refused():
    # 575 members at batch 16: 36 steps per epoch; 7 proxy records at rate 1/36 expect no record per batch.
    sizes = SplitSizes(members=575, non_members=575, population=14, test=359)
    with pytest.raises(UserError, match="expected batch below one record"):
        proxy.proxy_plan(make_config(*PROXY, "train.batch_size=16"), sizes)


def _proxy_record(name: str, lr: str, seed: int, validation: float) -> RunRecord:
    metrics = {
        "test_accuracy": 0.5, "epsilon": None, "delta": 1e-5, "noise_multiplier": 0.5, "private": True,
        "train_seconds": 1.0,
        "proxy": {"data": "population", "validation_accuracy": validation, "members_noise_multiplier": 2.0,
                  "sample_rate": 0.2, "steps": 50},
    }  # fmt: skip
    overrides = ["model=logreg", f"train.lr={lr}", f"train.seed={seed}", "train.proxy=population", "audit=none"]
    return RunRecord(Path(name), name, overrides, metrics, None)


# Point 0.5 has the best single run (0.95), point 1 the best mean (0.80 against 0.70).
SEARCH = [
    _proxy_record("0", "0.5", 0, 0.95),
    _proxy_record("1", "0.5", 1, 0.45),
    _proxy_record("2", "1", 0, 0.80),
    _proxy_record("3", "1", 1, 0.80),
]


def test_the_report_shows_proxy_runs_and_refuses_to_select_among_them():
    table = build_table(SEARCH)
    assert [row["proxy"] for row in table.rows] == ["population"] * 4
    assert [row["validation_accuracy"] for row in table.rows] == [0.95, 0.45, 0.80, 0.80]
    assert all(row["epsilon"] is None for row in table.rows)
    with pytest.raises(UserError, match="trained on a proxy"):
        select(table, SEARCH, "test_accuracy", maximize=True)


def test_the_proxy_search_picks_the_best_mean_and_prices_the_member_side_search():
    search = proxy_search(SEARCH)
    assert search.best.overrides == ("model=logreg", "train.lr=1", "audit=none")
    assert search.best.mean == pytest.approx(0.80) and search.member_runs == 4
    # The member-side search ran the members' mechanism 4 times: 200 steps, by dp-accounting's RDP.
    accountant = RdpAccountant(orders=list(ORDERS))
    step = dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(2.0))
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, 4 * 50))
    assert search.composition_epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=0.02)
    text = proxy_search_markdown(search, "final", {"test_accuracy": 0.9, "epsilon": 1.5, "noise_multiplier": 2.0,
                                                   "sample_rate": 0.2, "steps": 50})  # fmt: skip
    assert "| 1.50 |" in text and f"| {search.composition_epsilon:.2f} |" in text
    with pytest.raises(UserError, match="not a private run on the members"):
        proxy_search_markdown(search, "final", SEARCH[0].metrics)


def test_the_proxy_search_refuses_a_run_on_the_members():
    member = RunRecord(Path("4"), "4", ["train.lr=1"], {**SEARCH[0].metrics, "proxy": None}, None)
    with pytest.raises(UserError, match="did not train on a proxy"):
        proxy_search([*SEARCH, member])


@pytest.mark.slow
def test_tune_recipe_on_a_proxy_trains_the_choice_once_on_the_members(tmp_path):
    script = Path(__file__).parent.parent / "scripts" / "tune_recipe.py"
    out = tmp_path / "tune"
    result = subprocess.run(
        [sys.executable, str(script), "train.epochs=2 privacy.target_epsilon=1", "--proxy", "population",
         "--grid", "train.lr=0.5,1", "--seeds", "0,1", "--out", str(out)],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    final = json.loads((out / "final" / "metrics.json").read_text())
    assert "proxy" not in final and final["epsilon"] <= 1.0
    proxies = [json.loads(p.read_text()) for p in sorted((out / "proxy").glob("*/metrics.json"))]
    assert len(proxies) == 4 and all(m["proxy"]["members_target_epsilon"] == 1.0 for m in proxies)
    assert f"| {final['epsilon']:.2f} |" in result.stdout and (out / "tuning.md").read_text().strip() in result.stdout
