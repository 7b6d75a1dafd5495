"""The gradient inversion audit: the closed-form inversion of a linear first layer, iDLG's label, the
optimization attack on a small network, the scores against hand-computed values, the audit on a
federated config (raw and DP-SGD updates), audit.json, and the refused settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dptrain.audit.gradient_inversion import (
    analytic_inversion,
    gradient_inversion_audit,
    idlg_label,
    optimization_inversion,
    reconstruction_scores,
)
from dptrain.audit.results import AuditReport, GradientInversionResult
from dptrain.data import load, make_split, prepare
from dptrain.data.dataset import InputUnits
from dptrain.errors import UserError
from dptrain.models import build_model
from dptrain.training.federated import plan as federated_plan
from dptrain.validation import validate


def _pixel_units(shape) -> InputUnits:
    return InputUnits(scale=torch.ones(shape), low=torch.zeros(shape), high=torch.ones(shape))


def test_a_linear_layer_with_bias_gives_its_one_record_back_exactly_after_one_or_several_sgd_steps():
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    x, y = torch.rand(1, 12), torch.tensor([3])
    start = [p.detach().clone() for p in layer.parameters()]
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for steps in (1, 2, 3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(layer(x), y).backward()
        optimizer.step()
        # The server's view: the update read as a gradient, -delta / (lr * steps).
        weight, bias = (-(p.detach() - s) / (0.5 * steps) for p, s in zip(layer.parameters(), start))
        assert torch.allclose(analytic_inversion(weight, bias), x[0], atol=1e-5)


def test_idlg_reads_the_label_of_one_record_from_the_output_bias_gradient():
    torch.manual_seed(1)
    layer = nn.Linear(6, 10)
    x = torch.randn(1, 6)
    for label in range(10):
        layer.zero_grad()
        nn.functional.cross_entropy(layer(x), torch.tensor([label])).backward()
        assert idlg_label(layer.bias.grad) == label


def test_the_optimization_attack_reconstructs_one_record_of_a_small_cnn_by_its_gradient():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x, y = torch.rand(1, 1, 4, 4), torch.tensor([1])
    gradient = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    units = _pixel_units((1, 4, 4))
    reconstructed = optimization_inversion(model, list(gradient), y, units, 300, 0.0, 1, torch.Generator().manual_seed(0))
    start = torch.rand((1, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    # A wrong objective leaves the random start where it was: MSE ~ 1/6 for two uniform images.
    assert ((reconstructed - x) ** 2).mean() < 0.01 < ((start - x) ** 2).mean()


def test_scores_are_mse_and_psnr_in_data_units_after_matching_a_shuffled_batch_to_its_records():
    # Features are 2 * pixel - 1: data units are half a feature unit.
    units = InputUnits(scale=torch.full((4,), 2.0), low=torch.full((4,), -1.0), high=torch.ones(4))
    members = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, 1.0, 1.0]])
    # Reconstructions of members 1 and 2 in the wrong order, each off by 0.2 features = 0.1 pixels everywhere.
    reconstructed = torch.stack([members[2] + 0.2, members[1] - 0.2])
    mse, psnr, nearest = reconstruction_scores(reconstructed, members, torch.tensor([1, 2]), units)
    assert mse == pytest.approx([0.01, 0.01])
    assert psnr == pytest.approx([20.0, 20.0])
    assert nearest.tolist() == [True, True]
    # Halfway between members 0 and 1 (pixels 0.25 and 0.75 from them): its nearest is member 0, not 1.
    _, _, nearest = reconstruction_scores(torch.full((1, 4), -0.5), members, torch.tensor([1]), units)
    assert nearest.tolist() == [False]


@pytest.fixture(scope="module")
def digits_federation():
    from conftest import make_config

    def audit(*overrides):
        cfg = make_config(
            "federation=fedavg", "model=mlp", "audit.gradient_inversion.enabled=true",
            "audit.gradient_inversion.clients=3", *overrides,
        )  # fmt: skip
        sizes = validate(cfg)[1]
        data = load(cfg.dataset)
        split = prepare(data, make_split(data, cfg.dataset))
        torch.manual_seed(0)
        model = build_model(cfg.model, split.input_shape, split.num_classes)
        run_plan = federated_plan(cfg, sizes)
        return gradient_inversion_audit(cfg, run_plan, model, split.members, split.units, torch.device("cpu"), seed=0)

    return audit


def test_a_raw_one_record_update_is_inverted_exactly_and_dp_sgd_noise_defeats_it(digits_federation):
    raw = digits_federation("privacy=none")
    assert raw.method == "analytic" and raw.update == "raw" and raw.clients == 3
    assert raw.nearest_member_is_true == [True] * 3 and raw.label_recovered == [True] * 3
    assert min(raw.psnr) > 60
    # dp_level=user: local training is plain SGD; DP-FedAvg clips and noises at the server, after it saw the update.
    user = digits_federation("privacy.noise_multiplier=1.0", "privacy.target_epsilon=null", "federation.dp_level=user")
    assert user.update == "raw" and min(user.psnr) > 60
    noisy = digits_federation("privacy.noise_multiplier=1.0", "privacy.target_epsilon=null")
    assert noisy.update == "dp_sgd" and noisy.noise_multiplier == 1.0
    assert max(noisy.psnr) < 20 and noisy.member_match_rate < 1


def _result() -> GradientInversionResult:
    return GradientInversionResult(
        method="analytic", clients=3, records=1, local_steps=1, update="raw", noise_multiplier=None,
        max_grad_norm=None, mse=[0.0, 0.01, 0.04], psnr=[math.inf, 20.0, 10 * math.log10(25)],
        nearest_member_is_true=[True, True, False], nearest_client_record_is_true=None, members=50,
        label_recovered=[True, True, False], seconds=0.1,
    )  # fmt: skip


def test_gradient_inversion_round_trips_through_audit_json_with_an_exact_reconstruction():
    from conftest import make_audit_report

    data = make_audit_report(gradient_inversion=_result()).to_dict()
    part = data["gradient_inversion"]
    # audit.json's documented key names (docs/guide/outputs.md).
    assert set(part) == {
        "method", "clients", "records", "local_steps", "update", "noise_multiplier", "max_grad_norm", "mse", "psnr",
        "nearest_member_is_true", "nearest_client_record_is_true", "members", "label_recovered", "seconds",
        "member_match_rate", "member_match_chance",
    }  # fmt: skip
    assert part["psnr"][:2] == [None, 20.0] and part["member_match_rate"] == 2 / 3 and part["member_match_chance"] == 0.02
    assert AuditReport.from_dict(data).gradient_inversion == _result()


def test_summary_hparams_and_report_show_the_match_rate_and_the_median_mse():
    from conftest import make_audit_report

    from dptrain.report.collect import RunRecord
    from dptrain.report.table import build_table
    from dptrain.views.panels import headline_metrics
    from dptrain.views.summary import format_audit

    report = make_audit_report(gradient_inversion=_result())
    assert "nearest member is the record 2/3 (chance 1/50); median MSE 0.01, PSNR 20.0 dB; iDLG labels 2/3" in (
        format_audit(report)
    )
    metrics = headline_metrics(report)
    assert metrics["gradient_inversion/match_rate"] == 2 / 3 and metrics["gradient_inversion/median_mse"] == 0.01
    metrics_json = {"private": False, "test_accuracy": 0.9, "epsilon": None, "delta": None, "noise_multiplier": 0.0,
                    "train_seconds": 1.0}  # fmt: skip
    (row,) = build_table([RunRecord(None, "run", [], metrics_json, report)]).rows
    assert row["gradient_inversion.match_rate"] == 2 / 3 and row["gradient_inversion.median_mse"] == 0.01


@pytest.mark.parametrize(
    "overrides, message",
    [
        ((), r"attacks a federated client's update to the server: use federation=fedavg"),
        (("federation=fedavg", "dataset=breast_cancer"), r"dataset=breast_cancer is a table"),
        (("federation=fedavg", "train.optimizer=adam"), r"true of SGD without weight decay only"),
        (("federation=fedavg", "audit.gradient_inversion.records=0"), r"audit.gradient_inversion.records=0"),
        (("federation=fedavg", "audit.gradient_inversion.records=600"), r"attacks clients \* records = 4800 members"),
    ],
)
def test_gradient_inversion_refuses_what_it_cannot_invert_with_one_line(overrides, message):
    from conftest import make_config

    with pytest.raises(UserError, match=message) as refused:
        validate(make_config("audit.gradient_inversion.enabled=true", *overrides))
    assert "\n" not in str(refused.value)


def test_the_gradient_inversion_audit_is_off_at_every_level():
    from conftest import make_config

    for level in ("fast", "standard", "thorough"):
        assert not make_config(f"audit={level}").audit.gradient_inversion.enabled
