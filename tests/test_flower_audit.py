"""``dptrain.flower.audit.audit_global_model``: dptrain's LOSS attack and attribute inference on any
trained model, without flwr: AUC as scikit-learn computes it, leakage where the model memorised its
members and none where it never saw them, and one clear line for each bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import TensorDataset

from dptrain.audit.results import AttributeInferenceResult, AuditReport, Skipped
from dptrain.data.dataset import SensitiveAttribute
from dptrain.errors import UserError
from dptrain.flower.audit import audit_global_model

FEATURES, CLASSES, N = 8, 4, 40


def _records(seed: int, n: int = N) -> TensorDataset:
    # Random labels: a model can only fit them by memorising records, so membership is all it learns.
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, FEATURES, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator))


def _memorised(records: TensorDataset) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    x, y = records.tensors
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def test_loss_auc_is_roc_auc_of_negative_cross_entropy():
    torch.manual_seed(1)
    model = torch.nn.Linear(FEATURES, CLASSES)
    members, non_members = _records(1), _records(2)
    report = audit_global_model(model, members, non_members, n_bootstrap=20)

    def negative_loss(records):
        x, y = records.tensors
        with torch.no_grad():
            log_p = model(x).double().log_softmax(dim=1)
        return log_p[torch.arange(len(y)), y].numpy()

    expected = roc_auc_score([1] * N + [0] * N, list(negative_loss(members)) + list(negative_loss(non_members)))
    assert isinstance(report, AuditReport)
    assert report.mia["loss"].auc == pytest.approx(expected, abs=1e-12)
    assert (report.members, report.non_members, report.mia["loss"].n_members) == (N, N, N)
    assert report.aia == Skipped("no sensitive attribute given (sensitive=None)")


def test_memorised_members_are_found_and_unseen_records_are_not():
    members, non_members = _records(3), _records(4)
    memorised = audit_global_model(_memorised(members), members, non_members, n_bootstrap=200).mia["loss"]
    assert memorised.auc > 0.85 and memorised.auc_ci.low > 0.75
    unseen = audit_global_model(_memorised(_records(8)), members, non_members, n_bootstrap=200).mia["loss"]
    assert unseen.auc_ci.low < 0.5 < unseen.auc_ci.high


def test_attribute_inference_guesses_the_value_the_model_fits_best_on_members_and_non_members():
    members, non_members, population = _records(6), _records(7), _records(11, 60)
    parts = (members, non_members, population)
    # Column 0 becomes a binary sensitive attribute: the attacker writes 0 or 1 into it.
    codes = torch.cat([(part.tensors[0][:, 0] > 0).long() for part in parts])
    for part, part_codes in zip(parts, torch.split(codes, [len(p) for p in parts])):
        part.tensors[0][:, 0] = part_codes.float()
    sensitive = SensitiveAttribute("sign", [0], torch.tensor([[0.0], [1.0]]), ["negative", "positive"], codes)
    report = audit_global_model(
        _memorised(members), members, non_members, population=population, sensitive=sensitive, n_bootstrap=20
    )
    aia = report.aia
    assert isinstance(aia, AttributeInferenceResult)
    assert (aia.n_members, aia.n_nonmembers, aia.n_population) == (N, N, 60)
    assert aia.value_names == ["negative", "positive"]
    model = _memorised(members)
    for part, group in ((members, aia.members), (non_members, aia.nonmembers)):
        # The attack by hand: write each candidate value into column 0 and keep the one of lower loss.
        x, y = part.tensors
        losses = []
        for value in (0.0, 1.0):
            candidate = x.clone()
            candidate[:, 0] = value
            with torch.no_grad():
                losses.append(torch.nn.functional.cross_entropy(model(candidate), y, reduction="none"))
        guesses = torch.stack(losses, dim=1).argmin(dim=1)
        assert group.attack.accuracy == pytest.approx((guesses == x[:, 0].long()).double().mean().item())
    assert aia.leakage["accuracy"] == pytest.approx(
        aia.members.advantage["accuracy"] - aia.nonmembers.advantage["accuracy"]
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"members": (torch.zeros(0, FEATURES), torch.zeros(0, dtype=torch.long))}, "members holds 0 records: the audit needs at least 2"),
        ({"non_members": (torch.zeros(3, FEATURES + 1), torch.zeros(3, dtype=torch.long))}, "non_members records have shape (9,)"),
        ({"members": (torch.zeros(3, FEATURES), torch.zeros(2, dtype=torch.long))}, "members: 3 feature rows but 2 labels"),
        ({"members": (torch.zeros(3, FEATURES), torch.zeros(3))}, "labels must be integer class indices"),
        ({"non_members": (torch.zeros(3, FEATURES), torch.full((3,), CLASSES))}, "labels must lie in [0, 4)"),
        ({"members": [torch.zeros(3, FEATURES)]}, "members must be a TensorDataset or a pair of tensors"),
        ({"attacks": ("loss", "rmia")}, "attacks ['rmia'] need reference models"),
        ({"sensitive": SensitiveAttribute("s", [0], torch.tensor([[0.0], [1.0]]), ["a", "b"], torch.zeros(80))}, "needs population records"),
    ],
)
def test_bad_input_is_one_clear_line(change, message):
    arguments = {"model": torch.nn.Linear(FEATURES, CLASSES), "members": _records(9), "non_members": _records(10)}
    arguments.update(change)
    with pytest.raises(UserError) as error:
        audit_global_model(arguments.pop("model"), arguments.pop("members"), arguments.pop("non_members"), **arguments)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_example_flower_app_audits_its_final_global_model(tmp_path):
    """examples/flower_audit_simulation.py: FedAvg under the Simulation Engine (about 22 s on 2 cores),
    then the ServerApp's audit of the final global model, written as an audit.json."""
    pytest.importorskip("flwr")
    path = tmp_path / "audit.json"
    example = Path(__file__).resolve().parents[1] / "examples" / "flower_audit_simulation.py"
    subprocess.run([sys.executable, str(example), str(path)], check=True, capture_output=True, timeout=600)
    report = AuditReport.from_dict(json.loads(path.read_text()))
    loss = report.mia["loss"]
    assert (loss.n_members, loss.n_nonmembers) == (450, 450)
    # Non-private FedAvg on digits leaks a little: 0.548 [0.510, 0.586] when measured.
    assert loss.auc_ci.low > 0.5
