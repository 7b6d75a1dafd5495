"""The audit's result types and audit.json: what a real audit writes is its report's ``to_dict``, reads back
through ``AuditReport.from_dict`` to the same report, keeps the documented key names, and files written
before later keys existed still read, render and land in the report's table."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dptrain import pipeline
from dptrain.audit.results import AuditReport, ImplementationAudit, Skipped
from dptrain.report.collect import read_run
from dptrain.report.table import build_table
from dptrain.views.panels import audit_text, headline_metrics
from dptrain.views.summary import format_audit


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A small audit with every part: LOSS, attribute inference, canaries, both white-box settings and
    the evasion and extraction audits."""
    from conftest import make_config

    run_dir = tmp_path_factory.mktemp("audited")
    cfg = make_config(
        "train.epochs=2", "train.progress=false", "dataset=synthetic", "dataset.n_samples=600", "audit=fast",
        "audit.canaries.count=40", "audit.whitebox.enabled=true", "audit.whitebox.canaries=100",
        "audit.whitebox.runs=1", "audit.whitebox.setting=both", "audit.evasion.enabled=true", "audit.evasion.n=50",
        "audit.evasion.steps=3", "audit.evasion.restarts=1", "audit.extraction.enabled=true",
        "audit.extraction.queries=[20,50]", "audit.extraction.steps=5",
    )  # fmt: skip
    _, report = pipeline.train(cfg, run_dir)
    return run_dir, report


def test_audit_json_is_the_reports_to_dict_and_reads_back_to_the_same_report(audited):
    run_dir, report = audited
    written = json.loads((run_dir / "audit.json").read_text())
    assert written == report.to_dict()
    assert AuditReport.from_dict(written) == report
    assert written == json.loads((run_dir / report.history_file).read_text())
    # Every part ran: nothing in the round trip is a trivial None or skip.
    assert set(report.mia) == {"loss"} and not isinstance(report.aia, Skipped)
    assert report.canary.n_canaries == 40 and list(report.implementation.records) == ["all_iterates", "final_model"]
    assert set(report.evasion) == {"fgsm_linf", "pgd_linf", "fgsm_l2", "pgd_l2"}
    assert set(report.extraction.curves) == {"probabilities", "label"}


# audit.json's key names (docs/guide/outputs.md): a field renamed in a to_dict changes a documented format.
REPORT_KEYS = {
    "level", "accountant_epsilon", "delta", "confidence", "members", "non_members", "mia", "aia", "canary",
    "implementation", "evasion", "extraction", "gradient_inversion", "inversion", "reference_models", "warnings", "audit_seconds", "audited_at", "history_file",
}
MEMBERSHIP_KEYS = {
    "auc", "auc_ci", "tpr_at_fpr", "tpr_at_fpr_ci", "advantage", "epsilon_lower_bound", "n_members", "n_nonmembers",
    "n_bootstrap",
}
INTERVAL_KEYS = {"low", "high", "confidence"}
EPSILON_BOUND_KEYS = {
    "value", "confidence", "delta", "threshold", "true_positives", "false_positives", "n_members", "n_nonmembers",
    "tpr_lower", "fpr_upper", "n_calibration_members", "n_calibration_nonmembers",
}
AIA_KEYS = {
    "attribute", "value_names", "rule", "members", "nonmembers", "leakage", "n_members", "n_nonmembers", "n_population",
}
AIA_GROUP_KEYS = {"attack", "imputation", "advantage"}
AIA_SCORE_KEYS = {"accuracy", "balanced_accuracy", "mcc", "n"}
CANARY_KEYS = {
    "epsilon_lower_bound", "confidence", "delta", "n_canaries", "n_included", "n_excluded", "n_guesses", "n_correct",
    "k_plus", "k_minus", "n_candidates", "n_runs",
}
IMPLEMENTATION_KEYS = {
    "setting", "epsilon_lower_bound", "confidence", "delta", "accountant_epsilon", "audit_run_epsilon", "canaries",
    "runs", "included", "rejected_noise_multiplier", "accountant_curve_rejected", "statistic", "statistics",
    "n_guesses", "n_correct", "k_plus", "k_minus", "n_tests", "steinke", "gdp_mu_estimate", "epsilon_estimate",
    "mechanism", "noise_multiplier", "sample_rate", "steps",
}
STEINKE_KEYS = {"epsilon_lower_bound", "statistic", "n_guesses", "n_correct", "k_plus", "k_minus", "n_candidates"}
REFERENCE_KEYS = {"count", "scheme", "train_seconds", "reused_from_cache"}
EVASION_KEYS = {"budgets", "robust_accuracy", "clean_accuracy", "n", "defense"}
EXTRACTION_KEYS = {"queries", "fidelity", "surrogate_accuracy", "n", "attacker_records"}


def test_audit_json_keeps_its_documented_key_names(audited):
    run_dir, _ = audited
    written = json.loads((run_dir / "audit.json").read_text())
    assert set(written) == REPORT_KEYS
    loss = written["mia"]["loss"]
    assert set(loss) == MEMBERSHIP_KEYS and set(loss["auc_ci"]) == INTERVAL_KEYS
    assert set(loss["tpr_at_fpr"]) == set(loss["tpr_at_fpr_ci"]) == {"0.001", "0.01", "0.1"}
    assert set(loss["tpr_at_fpr_ci"]["0.01"]) == INTERVAL_KEYS
    assert set(loss["epsilon_lower_bound"]) == EPSILON_BOUND_KEYS
    aia = written["aia"]
    assert set(aia) == AIA_KEYS and set(aia["members"]) == set(aia["nonmembers"]) == AIA_GROUP_KEYS
    assert set(aia["members"]["attack"]) == set(aia["nonmembers"]["imputation"]) == AIA_SCORE_KEYS
    assert set(aia["leakage"]) == set(aia["members"]["advantage"]) == {"accuracy", "balanced_accuracy", "mcc"}
    assert set(written["canary"]) == CANARY_KEYS
    section = written["implementation"]
    assert set(section) == {"all_iterates", "final_model", "setting", "seconds"} and section["setting"] == "both"
    for setting in ("all_iterates", "final_model"):
        assert set(section[setting]) == IMPLEMENTATION_KEYS and section[setting]["setting"] == setting
        assert set(section[setting]["steinke"]) == STEINKE_KEYS
    assert written["reference_models"] is None
    assert set(written["evasion"]) == {"fgsm_linf", "pgd_linf", "fgsm_l2", "pgd_l2"}
    assert all(set(curve) == EVASION_KEYS and curve["n"] == 50 for curve in written["evasion"].values())
    extraction = written["extraction"]
    assert set(extraction) == {"probabilities", "label", "equation_solving"}
    assert set(extraction["label"]) == EXTRACTION_KEYS and extraction["label"]["queries"] == [20, 50]
    assert set(extraction["equation_solving"]) == {"queries", "relative_error"}


def test_parts_that_did_not_run_are_null_or_skipped_with_the_reason():
    from conftest import make_audit_report

    report = make_audit_report(
        accountant_epsilon=None, delta=None, aia=Skipped("dataset digits has no sensitive attribute"),
        canary=Skipped("no canaries"), implementation=Skipped("the non-private baseline has no clipping norm or noise to audit"),
    )  # fmt: skip
    written = report.to_dict()
    assert written["aia"] == {"skipped": "dataset digits has no sensitive attribute"}
    assert written["canary"] == {"skipped": "no canaries"}
    assert written["implementation"] == {"skipped": "the non-private baseline has no clipping norm or noise to audit"}
    # Not yet recorded: no history file, as run_audit returns it.
    assert "history_file" not in written and written["accountant_epsilon"] is None
    assert AuditReport.from_dict(json.loads(json.dumps(written))) == report
    assert AuditReport.from_dict({**written, "canary": None, "implementation": None}).canary is None


# An audit.json of a run audited before the implementation audit, the audit history and multi-run canaries
# existed, beside one whose white-box record predates the f-DP bound (no steinke, no rejected curve).
OLD_MEMBERSHIP = {
    "auc": 0.55, "auc_ci": {"low": 0.5, "high": 0.6, "confidence": 0.95},
    "tpr_at_fpr": {"0.001": None, "0.01": 0.02, "0.1": 0.15},
    "tpr_at_fpr_ci": {"0.001": None, "0.01": {"low": 0.0, "high": 0.05, "confidence": 0.95},
                      "0.1": {"low": 0.1, "high": 0.2, "confidence": 0.95}},
    "advantage": 0.08,
    "epsilon_lower_bound": {
        "value": 0.25, "confidence": 0.95, "delta": 1e-5, "threshold": -0.3, "true_positives": 40,
        "false_positives": 20, "n_members": 288, "n_nonmembers": 288, "tpr_lower": 0.1, "fpr_upper": 0.1,
        "n_calibration_members": 287, "n_calibration_nonmembers": 287,
    },
    "n_members": 575, "n_nonmembers": 575, "n_bootstrap": 1000,
}  # fmt: skip
OLD_AUDIT = {
    "level": "standard", "accountant_epsilon": 3.0, "delta": 1e-5, "confidence": 0.95, "members": 575,
    "non_members": 575, "mia": {"loss": OLD_MEMBERSHIP},
    "aia": {"skipped": "dataset digits has no sensitive attribute"},
    "canary": {
        "epsilon_lower_bound": 0.4, "confidence": 0.95, "delta": 1e-5, "n_canaries": 100, "n_included": 52,
        "n_excluded": 48, "n_guesses": 20, "n_correct": 17, "k_plus": 10, "k_minus": 10, "n_candidates": 6,
    },
    "reference_models": {"count": 2, "scheme": "population", "train_seconds": 3.5, "reused_from_cache": False},
    "warnings": [], "audit_seconds": 4.5,
}  # fmt: skip
OLD_IMPLEMENTATION = {
    "setting": "all_iterates", "epsilon_lower_bound": 0.9, "confidence": 0.95, "delta": 1e-5,
    "accountant_epsilon": 3.0, "audit_run_epsilon": 3.0, "canaries": 2000, "runs": 2, "included": 1990,
    "statistic": "poisson", "statistics": ["poisson", "fixed_order"], "n_guesses": 40, "n_correct": 36,
    "k_plus": 10, "k_minus": 10, "n_candidates": 12, "gdp_mu_estimate": 0.8, "epsilon_estimate": 2.1,
    "mechanism": "centralized DP-SGD", "noise_multiplier": 1.1, "sample_rate": 0.2, "steps": 10, "seconds": 12.0,
}  # fmt: skip


def test_an_audit_json_written_before_later_keys_reads_with_those_parts_absent():
    report = AuditReport.from_dict(OLD_AUDIT)
    assert report.implementation is None and report.audited_at is None and report.history_file is None
    assert report.canary.n_runs == 1 and report.canary.n_correct == 17
    assert report.mia["loss"].epsilon_lower_bound.value == 0.25 and report.mia["loss"].tpr_at_fpr_ci["0.001"] is None
    metrics = headline_metrics(report)
    assert metrics["mia/loss/eps_lb"] == 0.25 and metrics["canary/eps_lb"] == 0.4
    assert "canaries     one-run eps lower bound 0.400 (17 of 20 guesses right, 100 canaries)" in format_audit(report)


def test_an_implementation_record_from_before_the_f_dp_bound_reads_without_its_steinke_bound():
    report = AuditReport.from_dict({**OLD_AUDIT, "implementation": OLD_IMPLEMENTATION})
    assert isinstance(report.implementation, ImplementationAudit) and report.implementation.seconds == 12.0
    record = report.implementation.records["all_iterates"]
    assert record.epsilon_lower_bound == 0.9 and record.steinke is None and record.accountant_curve_rejected is None
    # The re-audit's HParams record lists the earlier audit's metrics: the old record has no Steinke bound.
    assert {key for key in headline_metrics(report) if key.startswith("implementation/")} == {
        "implementation/all_iterates/eps_lb", "implementation/all_iterates/eps_estimate",
    }


def test_the_report_table_reads_old_and_current_audit_json(tmp_path, audited):
    run_dir, report = audited
    old = tmp_path / "old"
    (old / ".hydra").mkdir(parents=True)
    (old / "audit.json").write_text(json.dumps({**OLD_AUDIT, "implementation": OLD_IMPLEMENTATION}))
    rows = {row["run"]: row for row in build_table([read_run(old, "old"), read_run(run_dir, "new")]).rows}
    # Audits written before the history was kept name audit.json itself.
    assert (rows["old"]["audit_level"], rows["old"]["audit_file"]) == ("standard", "audit.json")
    assert rows["old"]["mia.loss.eps_lb"] == 0.25 and rows["old"]["implementation.all_iterates.eps_lb"] == 0.9
    assert rows["old"]["canary.eps_lb"] == 0.4 and rows["old"]["implementation.final_model.eps_lb"] is None
    new = rows["new"]
    assert new["audit_file"] == report.history_file and new["canary.eps_lb"] == report.canary.epsilon_lower_bound
    assert new["aia.leakage"] == report.aia.leakage["accuracy"]
    assert new["implementation.final_model.eps_lb"] == report.implementation.records["final_model"].epsilon_lower_bound
    # The evasion audit's robust accuracy at the middle of the default budgets (0.1 pixels, 1.0 for L2).
    assert new["evasion.pgd_linf@0.1"] == report.evasion["pgd_linf"].robust_accuracy[2]
    assert new["evasion.fgsm_l2@1"] == report.evasion["fgsm_l2"].robust_accuracy[2]
    assert rows["old"]["evasion.pgd_linf@0.1"] is None


def test_an_audit_json_that_is_not_an_audit_report_is_reported_unreadable(tmp_path):
    (tmp_path / ".hydra").mkdir()
    for name in ("metrics.json", "manifest.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "audit.json").write_text('{"level": "fast"}')
    run = read_run(tmp_path, "run")
    assert run.missing == ["audit.json (unreadable)"] and run.audit is None
    with pytest.raises(ValueError, match="not an audit report: no 'accountant_epsilon' key"):
        AuditReport.from_dict({"level": "fast"})


def test_the_sinks_render_the_typed_report(audited):
    run_dir, report = audited
    text = audit_text(report, 1)
    assert "| loss | " in text and "| attribute `group` |" in text and "Canaries: one-run epsilon lower bound" in text
    assert text.count("white-box    ") == 2
    metrics = headline_metrics(report)
    assert metrics["aia/leakage"] == report.aia.leakage["accuracy"]
    assert metrics["implementation/final_model/steinke_eps_lb"] == (
        report.implementation.records["final_model"].steinke.epsilon_lower_bound
    )
    assert metrics["evasion/pgd_l2@1"] == report.evasion["pgd_l2"].robust_accuracy[2]
    assert text.count("evasion      ") == 4 and format_audit(report).count("evasion      ") == 4
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "audit/evasion" in events.Tags()["images"]  # robust accuracy against the budget
