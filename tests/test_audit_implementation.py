"""The white-box implementation audit: its statistics and bounds against independent computations, the
probe canaries through every clipping mode, and the bug detector: deliberately broken DP-SGD
mechanisms (noise halved behind the accountant's back, clipping skipped, fixed batches in record
order) must be flagged with a lower bound above the reported epsilon, the correct one must not."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_config
from dptrain import pipeline
from dptrain.audit.canary import (
    _widest_window_means,
    correct_guess_survival,
    one_run_audit,
    one_run_epsilon,
    one_run_p_value,
    runs_epsilon,
    runs_p_value,
)
from dptrain.audit.implementation import AuditedMechanism, implementation_audit, run_mechanism
from dptrain.audit.probe import FILLER, REAL, probe_records
from dptrain.audit.results import Skipped
from dptrain.audit.whitebox import fixed_order_scores, gdp_epsilon, gdp_mu_estimate, poisson_scores
from dptrain.data import load, make_split, prepare
from dptrain.errors import UserError
from dptrain.privacy import ACCOUNTANTS
from dptrain.views.summary import format_summary
from dptrain.training import centralized
from dptrain.validation import validate

CPU = torch.device("cpu")


# --- the bound over independent runs -------------------------------------------------------------


def test_widest_window_means_match_trying_every_width():
    for r, q in [(1, 0.6), (10, 0.3), (60, 0.73), (200, 0.99), (500, 0.5)]:
        pmf = stats.binom.pmf(np.arange(r + 1), r, q)
        brute = [0.0] + [max(pmf[v - i : v].sum() / i for i in range(1, v + 1)) for v in range(1, r + 2)]
        assert _widest_window_means(pmf) == pytest.approx(brute, abs=1e-15)


def test_survival_is_the_running_minimum_of_the_one_run_p_values():
    m, r, epsilon, delta = 1000, 60, 2.0, 1e-5
    survival = correct_guess_survival(m, r, epsilon, delta)
    p_values = np.minimum.accumulate([one_run_p_value(m, r, v, epsilon, delta) for v in range(r + 1)])
    assert survival[: r + 1] == pytest.approx(np.minimum(1.0, p_values), abs=1e-15)
    assert survival[-1] == 0.0


def test_runs_p_value_is_the_tail_of_the_independent_sum_and_one_runs_is_the_one_run_p_value():
    m, r, epsilon, delta = 50, 10, 1.0, 1e-3
    assert runs_p_value(m, r, [7], epsilon, delta) == one_run_p_value(m, r, 7, epsilon, delta)
    pmf = -np.diff(correct_guess_survival(m, r, epsilon, delta))
    # Three runs by explicit enumeration of their counts.
    tail = sum(
        pmf[a] * pmf[b] * pmf[c] for a in range(r + 1) for b in range(r + 1) for c in range(r + 1) if a + b + c >= 22
    )
    assert runs_p_value(m, r, [7, 8, 7], epsilon, delta) == pytest.approx(tail, rel=1e-9)


def test_with_pure_dp_the_runs_bound_is_the_one_run_bound_of_their_pooled_guesses():
    # delta = 0: each run's count is dominated by a binomial, and their total by the pooled binomial.
    assert runs_epsilon(100, 40, [36, 38, 35], confidence=0.95) == pytest.approx(
        one_run_epsilon(300, 120, 109, confidence=0.95), abs=2e-4
    )


def test_runs_keep_the_delta_term_per_run_where_pooling_pays_it_for_every_canary():
    rng = np.random.default_rng(0)
    runs, m = 10, 1000
    included = rng.random(runs * m) < 0.5
    scores = included + rng.normal(0, 0.3, runs * m)
    labels = np.repeat(np.arange(runs), m)
    by_run = one_run_audit(scores, included, delta=1e-5, runs=labels)
    pooled = one_run_audit(scores, included, delta=1e-5)
    assert by_run.n_runs == runs and by_run.n_canaries == runs * m
    assert by_run.epsilon_lower_bound > pooled.epsilon_lower_bound + 1.0


def test_runs_bound_exceeds_the_true_epsilon_of_randomized_response_in_at_most_5_percent_of_trials():
    # Randomized response at epsilon 1 with delta 0 is the worst case the bound must hold against.
    epsilon, exceed = 1.0, 0
    for trial in range(200):
        rng = np.random.default_rng(trial)
        included = rng.random((4, 100)) < 0.5
        truthful = rng.random((4, 100)) < math.exp(epsilon) / (1 + math.exp(epsilon))
        correct = (included == truthful).sum(axis=1)  # every canary guessed: r = m
        exceed += runs_epsilon(100, 100, correct.tolist(), delta=1e-5) > epsilon
    assert exceed <= 10


def test_a_broken_fixed_count_is_rejected_with_one_line():
    with pytest.raises(ValueError, match="same number of canaries"):
        one_run_audit(np.zeros(5), np.ones(5, dtype=bool), runs=[0, 0, 0, 1, 1])


# --- the auditor's statistics and the estimate ---------------------------------------------------


def test_poisson_statistic_is_the_log_likelihood_ratio_of_the_subsampled_gaussian():
    rng = np.random.default_rng(0)
    x, q, sigma = rng.normal(0.3, 1.2, size=(7, 5)), 0.2, 1.3
    included = (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, 1, sigma)
    expected = np.log(included / stats.norm.pdf(x, 0, sigma)).sum(axis=0)
    assert poisson_scores(x, q, sigma) == pytest.approx(expected, rel=1e-10)
    full_batch = np.log(stats.norm.pdf(x, 1, sigma) / stats.norm.pdf(x, 0, sigma)).sum(axis=0)
    assert poisson_scores(x, 1.0, sigma) == pytest.approx(full_batch, rel=1e-10)


def test_fixed_order_statistic_sums_each_canary_over_its_own_batch_of_every_epoch():
    x = np.arange(12, dtype=float).reshape(6, 2)  # 3 epochs of 2 steps, 2 canaries
    scores = fixed_order_scores(x, np.array([1, 0]), steps_per_epoch=2, noise=2.0)
    # Canary 0 is in batch 1 (steps 1, 3, 5), canary 1 in batch 0 (steps 0, 2, 4).
    assert scores == pytest.approx([((2 + 6 + 10) - 1.5) / 4, ((1 + 5 + 9) - 1.5) / 4])


def test_gdp_estimate_recovers_mu_and_converts_it_by_dong_roth_su():
    rng = np.random.default_rng(0)
    mu = gdp_mu_estimate(rng.normal(1.0, 1, 200_000), rng.normal(0, 1, 200_000))
    assert mu == pytest.approx(1.0, abs=0.01)
    epsilon = gdp_epsilon(1.0, 1e-5)
    delta = stats.norm.cdf(-epsilon + 0.5) - math.exp(epsilon) * stats.norm.cdf(-epsilon - 0.5)
    assert delta == pytest.approx(1e-5, rel=1e-3)
    assert gdp_epsilon(0.0, 1e-5) == 0.0


# --- the probe through the real implementation ----------------------------------------------------

# digits, logistic regression, 200 members: a mechanism small enough to run many times in a test.
SMALL = ("train.progress=false", "audit=none", "dataset.max_members=200")


def _mechanism(*overrides: str, job: tuple[str, ...] = SMALL):
    cfg = make_config(*job, *overrides)
    _, sizes = validate(cfg)
    raw = load(cfg.dataset)
    data = prepare(raw, make_split(raw, cfg.dataset))
    plan = centralized.plan(cfg, sizes)
    return cfg, AuditedMechanism(plan, data.members, data.input_shape, data.num_classes, "centralized DP-SGD")


@pytest.mark.parametrize(
    "mode, clipping", [("hooks", "flat"), ("functorch", "flat"), ("ghost", "flat"), ("bk", "flat"), ("hooks", "per_layer")]
)
def test_probe_releases_one_clipped_norm_per_sampled_canary_and_nothing_else(mode, clipping):
    cfg, mechanism = _mechanism(
        f"privacy.grad_sample_mode={mode}", f"privacy.clipping={clipping}", "privacy.accountant=rdp",
        "privacy.target_epsilon=null", "privacy.noise_multiplier=1e-4", "train.batch_size=50", "train.epochs=3",
    )
    run = run_mechanism(cfg, mechanism, canaries=40, seed=1, device=CPU)
    assert run.x.shape == (mechanism.plan.steps, 40)
    # Exactly 0 or 1 clipped norm (a canary's unclipped gradient is 10 of them) up to the noise.
    assert np.abs(run.x - np.round(run.x)).max() < 0.01
    assert set(np.unique(np.round(run.x))) == {0.0, 1.0}
    assert np.all(np.round(run.x[:, ~run.included]) == 0)
    # Poisson sampling at q = 1/4: each included canary is in about a quarter of the 12 steps.
    assert np.round(run.x[:, run.included]).mean() == pytest.approx(0.25, abs=0.08)


def test_probe_gradients_of_many_canaries_under_hooks_are_computed_in_physical_batches(monkeypatch):
    import dptrain.audit.implementation as implementation

    # A budget of 41 x 7 floats: physical batches of 7 rows for 40 canaries, the logical ones unchanged.
    monkeypatch.setattr(implementation, "PROBE_GRADIENT_FLOATS", 41 * 7)
    physical = []
    make_private = implementation.make_private
    monkeypatch.setattr(
        implementation, "make_private", lambda **kw: physical.append(kw["max_physical_batch_size"]) or make_private(**kw)
    )
    cfg, mechanism = _mechanism(
        "privacy.grad_sample_mode=hooks", "privacy.accountant=rdp", "privacy.target_epsilon=null",
        "privacy.noise_multiplier=1e-4", "train.batch_size=50", "train.epochs=3",
    )
    run = run_mechanism(cfg, mechanism, canaries=40, seed=1, device=CPU)
    assert run.x.shape == (mechanism.plan.steps, 40) and np.abs(run.x - np.round(run.x)).max() < 0.01
    assert np.all(np.round(run.x[:, ~run.included]) == 0) and np.round(run.x[:, run.included]).max() == 1
    assert physical == [7]


def test_probe_records_fill_every_slot_whatever_the_coins():
    records = TensorDataset(torch.ones(3, 2), torch.tensor([4, 5, 6]))
    inputs, labels = probe_records(records, np.array([True, False, True]), size=8).tensors
    assert inputs[:, -1].tolist() == [REAL] * 3 + [0.0, FILLER, 2.0, FILLER, FILLER]
    assert inputs[3:, :-1].abs().sum() == 0 and labels.tolist() == [4, 5, 6, 0, 0, 0, 0, 0]


# --- the bug detector -------------------------------------------------------------------------------


def halve_noise(training):
    """Add half the noise; the accountant's step hook still reads the full noise multiplier."""
    optimizer = training.optimizer
    add_noise = optimizer.add_noise

    def quieter():
        sigma = optimizer.noise_multiplier
        optimizer.noise_multiplier = sigma / 2
        try:
            add_noise()
        finally:
            optimizer.noise_multiplier = sigma

    optimizer.add_noise = quieter


def skip_clipping(training):
    """Sum the per-example gradients unclipped (hooks and functorch clip in the optimizer, ghost in the
    model's clipping coefficients); the noise stays sized for the clipping norm."""
    optimizer = training.optimizer
    clip_and_accumulate = optimizer.clip_and_accumulate

    def unclipped():
        norm = optimizer.max_grad_norm
        optimizer.max_grad_norm = math.inf
        try:
            clip_and_accumulate()
        finally:
            optimizer.max_grad_norm = norm

    optimizer.clip_and_accumulate = unclipped
    if hasattr(training.model, "max_grad_norm"):
        training.model.max_grad_norm = math.inf


def fixed_batches(training):
    """The bug of issue 11: batches of the loader's size in record order, no Poisson sampling."""
    dataset = training.loader.dataset
    training.loader = DataLoader(dataset, batch_size=math.ceil(len(dataset) / len(training.loader)))


def _record(audit):
    """The record of a single-setting implementation audit."""
    (record,) = audit.records.values()
    return record


def _bound(tamper, *overrides):
    cfg, mechanism = _mechanism(*overrides)
    record = _record(implementation_audit(cfg, mechanism, mechanism.plan.planned_epsilon, CPU, tamper=tamper))
    return record.epsilon_lower_bound, record.accountant_epsilon, record


SKIP_CLIPPING_JOB = ("train.batch_size=20", "train.epochs=1", "privacy.target_epsilon=1", "audit.whitebox.canaries=5000")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_skipped_clipping_is_flagged(mode):
    bound, epsilon, result = _bound(skip_clipping, *SKIP_CLIPPING_JOB, f"privacy.grad_sample_mode={mode}")
    assert bound > 2 * epsilon and result.accountant_curve_rejected
    assert result.n_correct == result.n_guesses


def test_the_correct_mechanism_is_not_flagged_where_skipped_clipping_is():
    bound, epsilon, result = _bound(None, *SKIP_CLIPPING_JOB)
    assert bound < epsilon and not result.accountant_curve_rejected
    assert result.audit_run_epsilon == pytest.approx(epsilon)


FIXED_BATCHES_JOB = (
    "dataset.max_members=120", "train.batch_size=3", "train.epochs=2", "privacy.target_epsilon=0.5",
    "audit.whitebox.canaries=2000",
)


def test_fixed_batches_in_record_order_are_flagged_by_the_fixed_order_statistic():
    bound, epsilon, result = _bound(fixed_batches, *FIXED_BATCHES_JOB)
    assert bound > epsilon
    assert result.statistic == "fixed_order"


def test_the_correct_mechanism_is_not_flagged_where_fixed_batches_are():
    bound, epsilon, _ = _bound(None, *FIXED_BATCHES_JOB)
    assert bound < epsilon


# One run of 20 000 canaries: the f-DP bound sees noise halved at epsilon 2 (Steinke et al.'s needed
# 25 runs of 2000, its 2 m delta term growing with the canaries of a run).
HALVED_NOISE_JOB = (
    "dataset.max_members=100", "train.batch_size=10", "train.epochs=1", "privacy.target_epsilon=2",
    "audit.whitebox.canaries=20000",
)


def test_noise_halved_behind_the_accountants_back_is_flagged_in_one_run():
    bound, epsilon, result = _bound(halve_noise, *HALVED_NOISE_JOB)
    assert bound > epsilon and result.accountant_curve_rejected
    assert result.runs == 1 and result.accountant_epsilon == pytest.approx(2.0, rel=0.01)
    # The noise the guesses rule out lies between the accountant's and the half that ran.
    assert result.noise_multiplier / 2 < result.rejected_noise_multiplier < result.noise_multiplier


def test_the_correct_mechanism_is_not_flagged_where_halved_noise_is():
    bound, epsilon, result = _bound(None, *HALVED_NOISE_JOB)
    assert bound < epsilon and not result.accountant_curve_rejected


@pytest.mark.slow
@pytest.mark.parametrize("target", [1, 4, 8])
def test_one_run_of_the_shipped_audit_bounds_at_least_half_the_default_jobs_epsilon_and_never_above_it(target):
    # Issue 19's acceptance: digits, logistic regression, delta 1e-5, all iterates, one run.
    cfg, mechanism = _mechanism(
        "audit=implementation", f"privacy.target_epsilon={target}", job=("train.progress=false",)
    )
    (result,) = implementation_audit(cfg, mechanism, mechanism.plan.planned_epsilon, CPU).records.values()
    assert result.runs == 1 and result.canaries == 100_000
    assert 0.5 * result.accountant_epsilon <= result.epsilon_lower_bound <= result.accountant_epsilon


# --- the audit as a run stage ------------------------------------------------------------------------

WHITEBOX_RUN = ("train.epochs=1", "audit=implementation", "audit.whitebox.canaries=200", "audit.whitebox.runs=2")


def test_audit_json_summary_and_tensorboard_carry_both_settings(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics, report = pipeline.train(tiny_config(*WHITEBOX_RUN, "audit.whitebox.setting=both"), tmp_path)
    section = json.loads((tmp_path / "audit.json").read_text())["implementation"]
    assert section == report.implementation.to_dict() and section["setting"] == "both"
    assert set(section) == {"all_iterates", "final_model", "setting", "seconds"}
    records = report.implementation.records
    assert list(records) == ["all_iterates", "final_model"]
    for setting, record in records.items():
        assert record.setting == setting and record.canaries == 200 and record.runs == 2
        assert record.confidence == 0.95 and record.delta == metrics.delta
        assert 0 <= record.epsilon_lower_bound <= metrics.epsilon
        assert record.accountant_epsilon == record.audit_run_epsilon == pytest.approx(metrics.epsilon)
        assert record.mechanism == "centralized DP-SGD" and record.gdp_mu_estimate >= 0
        # The f-DP bound is the headline; Steinke et al.'s is beside it, on the same guesses' canaries.
        assert record.accountant_curve_rejected is False and record.n_tests == 2 * len(record.statistics)
        assert 0 <= record.steinke.epsilon_lower_bound <= metrics.epsilon
        assert record.n_guesses == 2 * (record.k_plus + record.k_minus) and record.k_plus == 2
    assert records["all_iterates"].statistics == ["poisson", "fixed_order"]
    summary = format_summary(metrics, report, tmp_path)
    assert "white-box    all iterates: eps lower bound" in summary and "final model" in summary
    assert "the accountant's curve not rejected), Steinke et al. " in summary
    assert "(not a bound); 2 run(s) x 200 canaries of centralized DP-SGD" in summary
    # Single numbers are HParams metrics (the run's tb/hparams record), not one-point charts.
    events = EventAccumulator(str(tmp_path / "tb" / "hparams"))
    events.Reload()
    all_iterates = records["all_iterates"]
    assert events.Scalars("trial/implementation/all_iterates/eps_lb")[-1].value == pytest.approx(
        all_iterates.epsilon_lower_bound
    )
    assert events.Scalars("trial/implementation/all_iterates/steinke_eps_lb")[-1].value == pytest.approx(
        all_iterates.steinke.epsilon_lower_bound
    )


def test_a_white_box_bound_above_the_accountants_epsilon_is_listed_under_warnings(tiny_config, tmp_path, monkeypatch):
    import dptrain.audit.run as audit_run

    audit = audit_run.implementation_audit

    def inflated(*args, **kwargs):
        result = audit(*args, **kwargs)
        records = {setting: dataclasses.replace(r, epsilon_lower_bound=9.0) for setting, r in result.records.items()}
        return dataclasses.replace(result, records=records)

    monkeypatch.setattr(audit_run, "implementation_audit", inflated)
    _, report = pipeline.train(tiny_config(*WHITEBOX_RUN, "audit.whitebox.runs=1"), tmp_path)
    assert report.implementation.records["all_iterates"].epsilon_lower_bound == 9.0
    assert len(report.warnings) == 1 and report.warnings[0].startswith("implementation (all_iterates): ")
    assert "9.000 exceeds the accountant's epsilon" in report.warnings[0]


def test_the_non_private_baseline_skips_the_implementation_audit_with_a_note(tiny_config, tmp_path):
    _, report = pipeline.train(tiny_config(*WHITEBOX_RUN, "privacy.target_epsilon=inf"), tmp_path)
    assert report.implementation == Skipped("the non-private baseline has no clipping norm or noise to audit")


def test_the_shipped_implementation_audit_is_one_run_of_100000_canaries_also_beside_any_level():
    for level in ("audit=implementation", "audit.whitebox.enabled=true"):
        whitebox = make_config(level).audit.whitebox
        assert (whitebox.runs, whitebox.canaries, whitebox.setting) == (1, 100_000, "all_iterates")


def test_the_white_box_audit_without_dp_accounting_fails_before_training_with_one_line(monkeypatch):
    from dptrain.privacy import crosscheck

    monkeypatch.setattr(crosscheck, "available", lambda: False)
    message = r'audit.whitebox needs the dp-accounting package .*: pip install "dptrain\[accounting\]"$'
    with pytest.raises(UserError, match=message):
        validate(make_config(*SMALL, "audit=implementation"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("audit.whitebox.canaries=1", "audit.whitebox.canaries=1 must be at least 2"),
        ("audit.whitebox.runs=0", "audit.whitebox.runs=0 must be at least 1"),
        ("audit.whitebox.setting=last_step", "audit.whitebox.setting=last_step is unknown"),
    ],
)
def test_a_bad_whitebox_setting_fails_before_training_with_one_line(override, message):
    with pytest.raises(UserError, match=message):
        validate(make_config(*SMALL, override))


def test_federated_runs_audit_the_worst_clients_mechanism_or_the_dp_fedavg_server(tiny_config, tmp_path):
    federated = ("federation=fedavg", "federation.clients=4", "federation.rounds=1", "train.batch_size=32")
    _, sample = pipeline.train(tiny_config(*WHITEBOX_RUN, *federated), tmp_path / "sample")
    _, user = pipeline.train(
        tiny_config(*WHITEBOX_RUN, *federated, "federation.dp_level=user", "federation.clients_per_round=2"),
        tmp_path / "user",
    )
    (sample_record,) = sample.implementation.records.values()
    (user_record,) = user.implementation.records.values()
    assert sample_record.mechanism.endswith("local DP-SGD (sample level)")
    assert user_record.mechanism == "DP-FedAvg server (user level)"
    for report, record in ((sample, sample_record), (user, user_record)):
        assert record.epsilon_lower_bound <= report.accountant_epsilon


def test_canary_clients_release_one_client_contribution_through_dp_fedavg_when_sampled():
    from dptrain.audit.canary_clients import CanaryClients
    from dptrain.privacy import PrivacyPlan
    from dptrain.training.federated import dp_fedavg

    plan = PrivacyPlan(True, "rdp", 1e-5, None, 1e-4, 2.0, 0.5, 1, 6, None)
    run = CanaryClients(plan, dp_fedavg, expected_clients=4.0, dimension=20_000).run(None, canaries=30, seed=0, device=CPU)
    # Random directions in 20 000 dimensions are nearly orthogonal: each projection is b + O(0.05).
    assert np.abs(run.x - np.round(run.x)).max() < 0.2
    assert np.all(np.round(run.x[:, ~run.included]) == 0)
    assert np.round(run.x[:, run.included]).mean() == pytest.approx(0.5, abs=0.2)


# --- the report ------------------------------------------------------------------------------------------


def test_lower_bound_panel_draws_the_white_box_bound_beside_the_black_box_ones():
    import matplotlib.pyplot as plt

    from conftest import make_audit_report

    from dptrain.audit.metrics import membership_metrics
    from dptrain.audit.results import ImplementationAudit, ImplementationRecord
    from dptrain.report.collect import RunRecord
    from dptrain.report.figures import EpsilonAxis, draw_lower_bound
    from dptrain.report.table import build_table

    def run(epsilon, bound):
        metrics = {"private": True, "test_accuracy": 0.9, "epsilon": epsilon, "delta": 1e-5, "noise_multiplier": 1.0,
                   "train_seconds": 1.0}
        record = ImplementationRecord(
            setting="all_iterates", epsilon_lower_bound=bound, confidence=0.95, delta=1e-5, accountant_epsilon=epsilon,
            audit_run_epsilon=epsilon, canaries=100, runs=1, included=50, statistic="poisson", statistics=["poisson"],
            n_guesses=2, n_correct=2, k_plus=1, k_minus=1, gdp_mu_estimate=None, epsilon_estimate=None,
            mechanism="centralized DP-SGD", noise_multiplier=1.0, sample_rate=0.1, steps=10,
        )
        audit = make_audit_report(
            level="implementation", accountant_epsilon=epsilon,
            mia={"loss": membership_metrics(np.arange(10.0), np.arange(10.0), n_bootstrap=10)},
            implementation=ImplementationAudit({"all_iterates": record}, seconds=1.0),
        )
        return RunRecord(None, f"{epsilon}", [f"privacy.target_epsilon={epsilon}"], metrics, audit)

    table = build_table([run(1.0, 0.57), run(4.0, 2.53)])
    assert [row["implementation.all_iterates.eps_lb"] for row in table.rows] == [0.57, 2.53]
    figure, axis = plt.subplots()
    draw_lower_bound(axis, table, EpsilonAxis([1.0, 4.0]))
    labels = axis.get_legend_handles_labels()[1]
    assert "white-box, all iterates" in labels and "loss" in labels and "y = x (accountant)" in labels
    line = axis.get_lines()[labels.index("white-box, all iterates")]
    assert list(line.get_ydata()) == [0.57, 2.53]
    plt.close(figure)


# --- every accountant and parallel mode (slow) --------------------------------------------------------



def _federated_client_mechanism(cfg):
    from dptrain.training import federated

    _, sizes = validate(cfg)
    plan = federated.plan(cfg, sizes)
    raw = load(cfg.dataset)
    data = prepare(raw, make_split(raw, cfg.dataset))
    client = plan.reported_client
    records = TensorDataset(*(t[: plan.client_sizes[client]] for t in data.members.tensors))
    return AuditedMechanism(plan.client_plans[client], records, data.input_shape, data.num_classes, "client")


def _ddp_rank(rank: int, world: int, port: int, overrides: tuple, out: str) -> None:
    import os

    from dptrain.training import launch

    os.environ.update(
        MASTER_ADDR="localhost", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    cfg, single = _mechanism("launcher.nproc_per_node=2", *overrides)
    with launch.process_group("gloo"):
        mechanism = AuditedMechanism(
            single.plan, single.records, single.input_shape, single.num_classes, "dpddp", distributed=True
        )
        results = [implementation_audit(cfg, mechanism, single.plan.planned_epsilon, CPU, tamper=t) for t in (None, skip_clipping)]
    if rank == 0:
        torch.save(results, out)


@pytest.mark.slow
@pytest.mark.parametrize("accountant", ACCOUNTANTS)  # every accountant dptrain reports
def test_every_mode_flags_skipped_clipping_and_passes_the_correct_mechanism(accountant, tmp_path):
    import torch.multiprocessing as mp

    from dptrain.audit.canary_clients import CanaryClients
    from dptrain.training import federated
    from dptrain.training.clients import clients_per_round
    from dptrain.training.launch import free_port

    job = (*SKIP_CLIPPING_JOB, f"privacy.accountant={accountant}")
    # Single process.
    cfg, mechanism = _mechanism(*job)
    single = [implementation_audit(cfg, mechanism, mechanism.plan.planned_epsilon, CPU, tamper=t) for t in (None, skip_clipping)]
    # DPDDP over two processes: every rank runs the audit runs.
    mp.spawn(_ddp_rank, args=(2, free_port(), job, str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    # Federated, sample level: the worst honest client's local DP-SGD.
    fed = make_config(*SMALL, *job, "federation=fedavg", "federation.clients=2", "federation.rounds=1")
    client = _federated_client_mechanism(fed)
    sample = [implementation_audit(fed, client, client.plan.planned_epsilon, CPU, tamper=t) for t in (None, skip_clipping)]
    for correct, broken in ([_record(audit) for audit in pair] for pair in (single, ddp, sample)):
        assert correct.epsilon_lower_bound < correct.accountant_epsilon
        assert broken.epsilon_lower_bound > broken.accountant_epsilon
    assert _record(ddp[0]).audit_run_epsilon == pytest.approx(_record(single[0]).audit_run_epsilon)
    # Federated, user level: DP-FedAvg's server step, and one that forgets its noise.
    user = make_config(
        *SMALL, *job, "federation=fedavg", "federation.clients=20", "federation.clients_per_round=2",
        "federation.rounds=10", "federation.dp_level=user",
    )
    _, sizes = validate(user)
    plan = federated.plan(user, sizes).guarantee

    def noiseless(updates, expected, clip, noise, generator):
        return federated.dp_fedavg(updates, expected, clip, 0.0, generator)

    for step, flagged in ((federated.dp_fedavg, False), (noiseless, True)):
        clients = CanaryClients(plan, step, clients_per_round(user), dimension=650)
        record = _record(implementation_audit(user, clients, plan.planned_epsilon, CPU))
        assert (record.epsilon_lower_bound > plan.planned_epsilon) is flagged
