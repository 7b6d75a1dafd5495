"""The extraction audit: Tramer et al.'s equation solving against known logistic parameters, the output
interfaces, the attacker's queries, the surrogate's fidelity, audit.json and the refused settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.audit.extraction import (
    answers,
    attacker_queries,
    equation_solving_audit,
    extraction_audit,
    solve_softmax_regression,
)
from dptrain.audit.results import AuditReport, EquationSolving, ExtractionAudit, ExtractionCurve
from dptrain.config import ModelConfig
from dptrain.errors import UserError
from dptrain.validation import validate


def test_equation_solving_recovers_a_synthetic_softmax_regression_from_d_plus_one_queries():
    rng = np.random.default_rng(3)
    d, k = 12, 4
    weights, biases = rng.normal(size=(k, d)), rng.normal(size=k)
    asked = []

    def probabilities_of(x):
        asked.append(len(x))
        return softmax(x @ weights.T + biases, axis=1)

    w, b = solve_softmax_regression(probabilities_of, d, np.random.default_rng(0))
    assert asked == [d + 1]
    truth = np.hstack([weights[1:] - weights[:1], (biases[1:] - biases[:1])[:, None]])
    error = np.linalg.norm(np.hstack([w, b[:, None]]) - truth) / np.linalg.norm(truth)
    assert error < 1e-4


def test_equation_solving_recovers_only_the_identifiable_differences_of_a_logreg_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 5))
    shifted = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 5))
    with torch.no_grad():
        # The same shift of every class's weights: identical answers, identical differences.
        shifted[1].weight.copy_(model[1].weight + torch.randn(1, 18))
        shifted[1].bias.copy_(model[1].bias + 2.0)
    for target in (model, shifted):
        result = equation_solving_audit(target, (2, 3, 3), seed=1)
        assert result.queries == 19 and result.relative_error < 1e-4


def test_the_interfaces_answer_probabilities_the_top_label_or_rounded_renormalized_probabilities():
    logits = torch.log(torch.tensor([[0.62, 0.27, 0.11], [0.2, 0.5, 0.3]]))
    assert torch.allclose(answers(logits, "probabilities", 2), torch.tensor([[0.62, 0.27, 0.11], [0.2, 0.5, 0.3]]))
    assert answers(logits, "label", 2).tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    # One decimal: 0.62, 0.27, 0.11 -> 0.6, 0.3, 0.1 (sum 1.0); 0.2, 0.5, 0.3 unchanged.
    assert torch.allclose(answers(logits, "rounded", 1), torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]))
    # No decimals: 0.62 -> 1, the rest 0; a row whose every probability rounds to 0 tells nothing: uniform.
    flat = torch.log(torch.tensor([[0.34, 0.33, 0.33]]))
    assert answers(logits, "rounded", 0)[0].tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(answers(flat, "rounded", 0), torch.full((1, 3), 1 / 3))


def test_queries_are_the_attackers_records_then_mixup_points_between_two_of_them():
    records = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    few = attacker_queries(records, 2, torch.Generator().manual_seed(0))
    assert len(few) == 2 and all(any(torch.equal(q, r) for r in records) for q in few)
    many = attacker_queries(records, 50, torch.Generator().manual_seed(0))
    assert sorted(map(tuple, many[:3].tolist())) == sorted(map(tuple, records.tolist()))
    # Mixup of two corners of the simplex stays on an edge of it: coordinates in [0, 1], sum <= 1.
    mixed = many[3:]
    assert len(mixed) == 47 and (mixed >= 0).all() and (mixed.sum(dim=1) <= 1 + 1e-6).all()


# 200 Adam steps: 1 to 2 s on a busy 2-core machine, far more when its threads are oversubscribed.
@pytest.mark.slow
def test_a_surrogate_from_answers_agrees_with_the_target_and_fidelity_is_agreement_not_accuracy():
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]]))
        model[1].bias.zero_()
    attacker, x_test = torch.randn(200, 2, generator=generator), torch.randn(300, 2, generator=generator)
    # Every test label differs from the target's prediction: a surrogate that agrees with the target
    # is wrong wherever it agrees, so accuracy <= 1 - fidelity.
    y_test = (model(x_test).argmax(dim=1) + 1) % 3
    curves = extraction_audit(
        model, attacker, TensorDataset(x_test, y_test), ModelConfig(name="logreg"), 3, [200],
        ["probabilities", "label"], 2, 100, torch.device("cpu"), seed=0,
    )  # fmt: skip
    for output, floor in (("probabilities", 0.97), ("label", 0.9)):
        curve = curves[output]
        assert curve.queries == [200] and curve.n == 300 and curve.attacker_records == 200
        assert curve.fidelity[0] >= floor and curve.surrogate_accuracy[0] <= 1 - curve.fidelity[0] + 1e-6


def test_the_extraction_audit_is_on_at_thorough_and_off_at_fast_and_standard():
    from conftest import make_config

    assert make_config("audit=thorough").audit.extraction.enabled
    assert not make_config().audit.extraction.enabled and not make_config("audit=fast").audit.extraction.enabled


def test_extraction_refuses_a_non_positive_budget_and_an_unknown_interface_with_one_line():
    from conftest import make_config

    for override, message in [
        ("audit.extraction.queries=[100,0]", r"audit.extraction.queries=\[100, 0\]: each entry must be at least 1"),
        ("audit.extraction.queries=[-5]", "audit.extraction.queries=.*each entry must be at least 1"),
        ("audit.extraction.queries=[1000,100]", "increasing order"),
        ("audit.extraction.queries=[]", "increasing order"),
        ("audit.extraction.output=[probabilities,logits]", "audit.extraction.output=logits is unknown: choose one of"),
        ("audit.extraction.output=[]", "audit.extraction.output is empty"),
        ("audit.extraction.decimals=-1", "audit.extraction.decimals=-1 must be at least 0"),
    ]:
        with pytest.raises(UserError, match=message) as refused:
            validate(make_config("audit.extraction.enabled=true", override))
        assert "\n" not in str(refused.value)


CURVE = ExtractionCurve(
    queries=[100, 1000], fidelity=[0.8, 0.95], surrogate_accuracy=[0.75, 0.9], n=50, attacker_records=30
)


def test_audit_json_carries_extraction_per_interface_and_equation_solving_and_reads_them_back():
    from conftest import make_audit_report

    section = ExtractionAudit({"probabilities": CURVE}, EquationSolving(queries=65, relative_error=1e-12))
    written = make_audit_report(extraction=section).to_dict()
    assert written["extraction"]["probabilities"] == {
        "queries": [100, 1000], "fidelity": [0.8, 0.95], "surrogate_accuracy": [0.75, 0.9], "n": 50, "attacker_records": 30,
    }  # fmt: skip
    assert written["extraction"]["equation_solving"] == {"queries": 65, "relative_error": 1e-12}
    assert AuditReport.from_dict(written).extraction == section
    off = make_audit_report().to_dict()
    del off["extraction"]  # an audit.json written before the extraction audit existed
    assert AuditReport.from_dict(off).extraction is None


def test_the_summary_the_headline_metrics_and_the_report_read_fidelity_at_the_middle_budget():
    from conftest import make_audit_report

    from dptrain.report.table import threat_columns
    from dptrain.views.panels import headline_metrics
    from dptrain.views.summary import format_audit

    report = make_audit_report(extraction=ExtractionAudit({"label": CURVE}, EquationSolving(65, 2e-13)))
    text = format_audit(report)
    assert "extraction   label         fidelity (surrogate accuracy) 0.800 (0.750) @ 100, 0.950 (0.900) @ 1000" in text
    assert "relative error 2.0e-13 of w_k - w_0, b_k - b_0 from 65 probability queries" in text
    assert headline_metrics(report)["extraction/label/fidelity@1000"] == 0.95
    assert threat_columns(report) == {
        "extraction.label.fidelity@1000": 0.95, "extraction.equation_solving.relative_error": 2e-13,
    }  # fmt: skip
    assert "extraction" not in format_audit(make_audit_report())


@pytest.mark.slow
def test_digits_non_private_1k_probability_queries_reach_fidelity_0_9_and_labels_need_more(tmp_path):
    """Issue 15's acceptance on the default job's data and model (logistic regression), without DP."""
    from conftest import make_config

    from dptrain import pipeline

    cfg = make_config(
        "privacy=none", "audit=fast", "train.progress=false", "audit.extraction.enabled=true",
        "audit.extraction.queries=[100,1000]",
    )  # fmt: skip
    _, report = pipeline.train(cfg, tmp_path)
    probabilities, label = report.extraction.curves["probabilities"], report.extraction.curves["label"]
    assert probabilities.fidelity[1] >= 0.9
    assert label.fidelity[1] < probabilities.fidelity[1] and label.fidelity[0] < probabilities.fidelity[0]
    solving = report.extraction.equation_solving
    assert solving.queries == 65 and solving.relative_error < 1e-4
