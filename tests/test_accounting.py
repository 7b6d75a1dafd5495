"""Soundness of every reported epsilon: independent recomputation with dp-accounting's PLD accountant,
the sampler taking exactly the planned steps, a DP-SGD step computed by hand, and the ledger's guards."""

from __future__ import annotations

import logging

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from opacus.accountants import create_accountant
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from conftest import TINY, full_batch_dp_training, hand_dp_step, make_config
from dptrain import pipeline
from dptrain.config import ModelConfig
from dptrain.errors import UserError
from dptrain.models import build_model
from dptrain.privacy import epsilon_spent
from dptrain.privacy import crosscheck
from dptrain.privacy.engine import PoissonBatches
from dptrain.privacy.ledger import PrivacyLedger
from dptrain.validation import validate

DELTA = 1e-5


def _pld(noise: float, rate: float, steps: int, delta: float = DELTA) -> float:
    """dp-accounting's PLD epsilon, written out here rather than through dptrain's wrapper."""
    accountant = PLDAccountant(value_discretization_interval=1e-4)
    step = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, steps))
    return accountant.get_epsilon(delta)


# (noise multiplier, sample rate, steps): the default job, its DPDDP and reference-model variants, a
# full batch (q = 1, as a CSV population smaller than the batch gives), DP-FedAvg's client sampling
# over rounds, a many-step small-q run, and the low-noise regime where RDP is loosest.
GRID = [
    (2.6456, 0.2, 75),
    (0.657, 1 / 93, 93),
    (1.1, 1.0, 10),
    (3.34, 0.5, 20),
    (0.8, 1 / 93, 930),
    (5.0, 0.01, 3000),
    (0.6, 0.05, 200),
]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("noise, rate, steps", GRID)
def test_every_reported_epsilon_is_at_least_the_independent_pld_epsilon(accountant, noise, rate, steps):
    reported = epsilon_spent(accountant=accountant, noise_multiplier=noise, sample_rate=rate, steps=steps, delta=DELTA)
    assert reported >= (1 - crosscheck.TOLERANCE) * _pld(noise, rate, steps)


@pytest.mark.parametrize(
    "target, rate, steps, spent", [(3.0, 0.2, 75, 3.19), (3.0, 1 / 3, 30, 3.22), (8.0, 0.2, 75, 8.72)]
)
def test_gdp_under_reports_so_it_is_refused(target, rate, steps, spent):
    # The noise Opacus' GDP accountant calibrates for the target spends more, by PLD.
    gdp = create_accountant("gdp")
    low, high = 0.1, 50.0
    while high - low > 1e-6:
        middle = (low + high) / 2
        gdp.history = [(middle, rate, steps)]
        low, high = (low, middle) if gdp.get_epsilon(DELTA) <= target else (middle, high)
    assert _pld(high, rate, steps) == pytest.approx(spent, abs=0.05) and spent > 1.05 * target
    with pytest.raises(UserError, match="privacy.accountant=gdp .* under-reports epsilon"):
        validate(make_config(*TINY, "privacy.accountant=gdp"))


def test_shuffled_fixed_batches_are_refused_for_a_private_run():
    with pytest.raises(UserError, match="privacy.poisson_sampling=false .* not cover"):
        validate(make_config(*TINY, "privacy.poisson_sampling=false"))
    validate(make_config(*TINY, "privacy.poisson_sampling=false", "privacy.target_epsilon=inf"))


@pytest.mark.parametrize("batches", [93, 99, 105, 117, 186])
def test_the_sampler_takes_the_planned_steps_where_opacus_takes_one_less(batches):
    rate = 1.0 / batches
    assert len(list(UniformWithReplacementSampler(num_samples=400, sample_rate=rate))) == batches - 1
    assert len(list(PoissonBatches(400, rate, batches, torch.Generator()))) == batches


def test_a_run_whose_batch_count_opacus_truncates_spends_exactly_its_plan(tmp_path):
    # 372 members at batch 4: q = 1/93, which Opacus' sampler would run as 92 steps.
    metrics = pipeline.train(
        make_config(*TINY, "dataset.max_members=372", "train.batch_size=4", "train.epochs=1"), tmp_path
    )[0]
    assert metrics.steps == 93 and metrics.sample_rate == 1 / 93
    assert metrics.epsilon == epsilon_spent(
        accountant="prv", noise_multiplier=metrics.noise_multiplier, sample_rate=1 / 93, steps=93, delta=DELTA
    )
    assert metrics.epsilon >= (1 - crosscheck.TOLERANCE) * metrics.epsilon_pld
    assert metrics.epsilon_pld == pytest.approx(_pld(metrics.noise_multiplier, 1 / 93, 93), rel=1e-9)


def test_dpddp_ranks_share_the_records_and_yield_every_step_empty_or_not():
    generator = lambda rank: torch.Generator().manual_seed(rank)  # noqa: E731
    draws = [list(PoissonBatches(7, 0.1, 50, generator(rank), rank=rank, world=2)) for rank in range(2)]
    assert all(len(batches) == 50 for batches in draws)
    assert any(batch == [] for batch in draws[0]) and any(batch == [] for batch in draws[1])
    seen = [set().union(*map(set, batches)) for batches in draws]
    assert seen[0] <= {0, 2, 4, 6} and seen[1] <= {1, 3, 5}


def test_bookkeeping_clipping_over_dpddp_is_refused():
    with pytest.raises(UserError, match="grad_sample_mode=bk over 2 workers .DPDDP. is not supported"):
        validate(make_config(*TINY, "launcher.nproc_per_node=2", "privacy.grad_sample_mode=bk"))


def test_per_layer_clipping_over_dpddp_needs_hooks():
    with pytest.raises(UserError, match="per_layer over 2 workers .* needs privacy.grad_sample_mode=hooks"):
        validate(
            make_config(
                *TINY, "launcher.nproc_per_node=2", "privacy.clipping=per_layer", "privacy.grad_sample_mode=functorch"
            )
        )


@pytest.mark.parametrize(
    "mode, clipping",
    [("hooks", "flat"), ("functorch", "flat"), ("ghost", "flat"), ("bk", "flat"), ("hooks", "per_layer"), ("functorch", "per_layer")],
)
def test_one_dp_sgd_step_equals_the_step_computed_by_hand(mode, clipping):
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(6, 3, generator=generator) * torch.tensor([[0.1], [0.3], [1.0], [3.0], [10.0], [0.05]])
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="logreg"), (3,), 2).double()
    weight, bias = (p.detach().clone() for p in model.parameters())
    training = full_batch_dp_training(
        model, inputs.double(), labels, noise=0.7, clip=1.0, lr=0.5, noise_seed=11, grad_sample_mode=mode,
        clipping=clipping,
    )  # fmt: skip
    for batch_inputs, batch_labels in training.loader:
        training.optimizer.zero_grad()
        training.loss_fn(training.model(batch_inputs), batch_labels).backward()
        training.optimizer.step()
    expected = hand_dp_step(
        weight, bias, inputs.double(), labels, 1.0, clipping == "per_layer", 0.7, torch.Generator().manual_seed(11), 0.5
    )
    for got, want in zip(training.standard_model().parameters(), expected):
        assert torch.allclose(got.detach(), want.to(got.dtype), rtol=1e-5, atol=1e-7)
    assert training.ledger.history == [(0.7, 1.0, 1)]


def test_the_ledger_restores_its_charges_and_its_guard_fires_on_a_missed_or_extra_step():
    ledger = PrivacyLedger("prv", DELTA, planned_steps=3, target_epsilon=None)
    for _ in range(2):
        ledger.charge(1.2, 0.1)
    restored = PrivacyLedger("prv", DELTA, planned_steps=3)
    restored.load_state_dict(ledger.state_dict())
    assert restored.history == [(1.2, 0.1, 2)] and restored.epsilon() == ledger.epsilon() > 0
    with pytest.raises(RuntimeError, match="charged 2 steps .* the plan was 3 steps"):
        restored.check_spent("training")
    restored.charge(1.2, 0.1, steps=2)
    with pytest.raises(RuntimeError, match="charged 4 steps"):
        restored.check_spent("training")
    with pytest.raises(UserError, match="accounted with 'prv', this run with 'rdp'"):
        PrivacyLedger("rdp", DELTA, planned_steps=3).load_state_dict(ledger.state_dict())


def test_the_final_guard_refuses_an_epsilon_above_the_target():
    ledger = PrivacyLedger("prv", DELTA, planned_steps=10, target_epsilon=0.5)
    ledger.charge(0.5, 0.5, steps=10)
    with pytest.raises(RuntimeError, match="within 0.5"):
        ledger.check_spent("training")


def test_a_reported_epsilon_below_pld_is_flagged(caplog):
    with caplog.at_level(logging.WARNING):
        assert crosscheck.cross_check(0.995, 1.0, "training") == 1.0
        assert not caplog.records
        crosscheck.cross_check(0.95, 1.0, "training")
    assert "below dp-accounting's PLD epsilon" in caplog.records[0].getMessage()


def test_requiring_the_pld_check_without_dp_accounting_is_a_user_error(monkeypatch):
    monkeypatch.setattr(crosscheck, "available", lambda: False)
    with pytest.raises(UserError, match='pip install "dptrain\\[accounting\\]"'):
        validate(make_config(*TINY, "privacy.pld_check=true"))
    assert crosscheck.pld_check_enabled(None) is False
