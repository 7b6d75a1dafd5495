"""The audit as a run stage: audit.json's schema, attacks, attribute inference, canaries, TensorBoard, caching,
and re-auditing: the audit history, the manifest a later audit completes, the report's audit columns."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dptrain import pipeline
from dptrain.audit.run import canary_guard, membership_guard
from dptrain.report.collect import read_run
from dptrain.report.table import build_table
from dptrain.views.summary import format_audit, format_summary

# Small enough for a test, big enough for the attacks to have something to measure.
AUDITED = ("train.epochs=3",)


def _report(run_dir):
    return json.loads((run_dir / "audit.json").read_text())


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory):
    from conftest import make_config

    run_dir = tmp_path_factory.mktemp("standard")
    metrics, report = pipeline.train(make_config("train.progress=false", *AUDITED), run_dir)
    return run_dir, metrics, report


def test_audit_json_has_each_attack_with_counts_and_intervals(standard_run):
    run_dir, metrics, typed = standard_run
    report = _report(run_dir)
    assert report == typed.to_dict()
    assert set(report["mia"]) == {"loss", "rmia"}
    for attack in report["mia"].values():
        assert set(attack["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
        assert attack["n_members"] == attack["n_nonmembers"] == metrics.members
        assert attack["auc_ci"]["low"] <= attack["auc"] <= attack["auc_ci"]["high"]
        bound = attack["epsilon_lower_bound"]
        assert bound["confidence"] == 0.95 and 0 <= bound["value"] <= metrics.epsilon
        assert bound["n_members"] + bound["n_calibration_members"] == metrics.members
    assert report["reference_models"]["count"] == 2 and report["reference_models"]["scheme"] == "population"
    assert report["aia"] == {"skipped": "dataset digits has no sensitive attribute"}
    assert report["warnings"] == []


def test_audit_lands_in_tensorboard_as_figures_text_and_hparams_metrics_not_one_point_charts(standard_run):
    run_dir, metrics, report = standard_run
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    # The run's own charts are the training curves: the audit's single numbers are not scalars there.
    assert not [tag for tag in tags["scalars"] if tag.startswith(("audit/", "hparams/"))]
    assert not tags["histograms"]
    # The first audit of the run, logged at step 1: the ROC, the overlaid score histograms, the text.
    for tag in ("audit/roc", "audit/scores"):
        assert [image.step for image in events.Images(tag)] == [1]
    (text,) = events.Tensors("audit/summary/text_summary")
    summary = text.tensor_proto.string_val[0].decode()
    assert text.step == 1 and "**Audit 1**" in summary and "`standard`" in summary
    assert "| rmia | " in summary and "Attribute inference skipped: dataset digits has no sensitive attribute" in summary
    hparams = EventAccumulator(str(run_dir / "tb" / "hparams"))
    hparams.Reload()
    for attack in ("loss", "rmia"):
        # 575 non-members cannot measure TPR at FPR 0.1%: audit.json says null and no metric is logged.
        assert report.mia[attack].tpr_at_fpr["0.001"] is None
        for metric in ("auc", "tpr@1%", "eps_lb"):
            (point,) = hparams.Scalars(f"trial/mia/{attack}/{metric}")
            assert point.step == 1
        assert hparams.Scalars(f"trial/mia/{attack}/auc")[0].value == pytest.approx(report.mia[attack].auc)
    assert hparams.Scalars("trial/accuracy/test")[0].value == pytest.approx(metrics.test_accuracy)


def test_reaudit_reuses_cached_reference_models_and_reproduces_the_numbers(standard_run):
    from conftest import make_config

    run_dir, _, first = standard_run
    again = pipeline.audit(make_config("train.progress=false", *AUDITED), run_dir)
    assert again.reference_models.reused_from_cache is True
    assert again.mia["rmia"].auc == pytest.approx(first.mia["rmia"].auc)


def test_lira_online_and_offline_with_reference_models_trained_in_two_processes(tiny_config, tmp_path):
    _, report = pipeline.train(
        tiny_config(
            "audit=thorough", "audit.mia.reference_models=4", "audit.canaries.count=0", "audit.workers=2",
            "audit.extraction.steps=10",
        ),
        tmp_path,
    )
    assert {"loss", "rmia", "lira_online", "lira_offline"} == set(report.mia)
    references = report.reference_models
    assert (references.count, references.scheme, references.reused_from_cache) == (4, "halves", False)
    assert all(0.0 <= m.auc <= 1.0 for m in report.mia.values())


# Few members, a wide MLP and many epochs: the non-private model memorises its members.
OVERFIT = (
    "train.progress=false", "model=mlp", "model.hidden=[256]", "train.lr=0.5", "train.batch_size=32",
    "train.epochs=60", "dataset.max_members=150", "audit.mia.attacks=[loss,rmia,lira]",
    "audit.mia.reference_models=4", "audit.canaries.count=0", "audit.workers=1",
)


def test_on_an_overfit_baseline_loss_leaks_and_rmia_and_lira_find_at_least_as_much(tmp_path):
    from conftest import make_config

    metrics, report = pipeline.train(make_config(*OVERFIT, "privacy.target_epsilon=inf"), tmp_path)
    assert metrics.train_accuracy == 1.0
    mia = report.mia
    assert mia["loss"].auc >= 0.6
    for attack in ("rmia", "lira_online", "lira_offline"):
        assert mia[attack].tpr_at_fpr["0.01"] >= mia["loss"].tpr_at_fpr["0.01"], attack


def test_at_epsilon_one_every_attack_is_near_chance_and_every_bound_below_epsilon(tmp_path):
    from conftest import make_config

    metrics, report = pipeline.train(make_config(*OVERFIT, "privacy.target_epsilon=1"), tmp_path)
    assert metrics.epsilon <= 1.0
    for attack, result in report.mia.items():
        assert 0.4 <= result.auc <= 0.6, attack
        assert result.epsilon_lower_bound.value <= metrics.epsilon, attack
    assert report.warnings == []


# A table where the group barely shows in the other features (imputation ~0.6): what an
# overfit model remembers about its members' group is then visible over imputation.
AIA = (
    "train.progress=false", "audit=fast", "dataset=synthetic", "dataset.n_samples=1000",
    "dataset.sensitive_correlation=0.6", "model=mlp", "model.hidden=[256]", "train.batch_size=32",
    "train.epochs=50", "train.lr=1.0",
)


def test_overfit_model_leaks_the_attribute_of_members_and_dp_shrinks_it(tmp_path):
    from conftest import make_config

    _, leaky = pipeline.train(make_config(*AIA, "privacy.target_epsilon=inf"), tmp_path / "baseline")
    _, private = pipeline.train(make_config(*AIA, "privacy.target_epsilon=1"), tmp_path / "dp")
    advantage = {name: r.aia.members.advantage["accuracy"] for name, r in (("leaky", leaky), ("dp", private))}
    assert advantage["leaky"] > leaky.aia.nonmembers.advantage["accuracy"]
    assert leaky.aia.leakage["accuracy"] > 0.02
    assert advantage["dp"] < advantage["leaky"] and private.aia.leakage["accuracy"] < leaky.aia.leakage["accuracy"]


def test_attribute_inference_runs_against_imputation_on_synthetic_data(tiny_config, tmp_path):
    _, report = pipeline.train(tiny_config("dataset=synthetic", "dataset.n_samples=1000", "audit=fast"), tmp_path)
    aia = report.aia
    assert aia.attribute == "group"
    for group in (aia.members, aia.nonmembers):
        for method in (group.attack, group.imputation):
            assert 0.0 <= method.accuracy <= 1.0
    assert aia.n_members == aia.n_nonmembers > 0
    assert aia.leakage["accuracy"] == pytest.approx(
        aia.members.advantage["accuracy"] - aia.nonmembers.advantage["accuracy"]
    )


def test_canaries_enter_training_by_coin_flip_and_give_a_one_run_bound(tiny_config, tmp_path):
    metrics, report = pipeline.train(tiny_config("audit=fast", "audit.canaries.count=40"), tmp_path)
    canary = report.canary
    assert canary.n_canaries == 40 and canary.n_included == metrics.centralized.canaries_included
    assert 0 < metrics.centralized.canaries_included < 40
    assert 0.0 <= canary.epsilon_lower_bound <= metrics.epsilon
    # The privacy plan counted the inserted canaries as training records.
    assert metrics.sample_rate == pytest.approx(1 / -(-(metrics.members + metrics.centralized.canaries_included) // 128))


def test_a_bound_above_the_accountant_epsilon_or_an_inverted_auc_is_flagged():
    warnings: list[str] = []
    membership_guard("loss", 0.7, 2.5, 1.0, warnings)
    membership_guard("rmia", 0.3, 0.0, 1.0, warnings)
    membership_guard("lira", 0.6, 0.5, 1.0, warnings)
    assert len(warnings) == 2
    assert "exceeds the accountant's epsilon" in warnings[0] and "below 0.4" in warnings[1]


def test_a_membership_bound_above_epsilon_is_suspicious_but_only_the_canary_bound_claims_a_bug():
    # A fixed-size member / non-member split plays replace-one, which add/remove DP bounds by ~2 epsilon.
    membership: list[str] = []
    membership_guard("loss", 0.7, 1.5, 1.0, membership)
    (warning,) = membership
    assert "replace-one" in warning and "no proof of a bug" in warning and "canary (one-run) bound" in warning
    assert "means a bug" not in warning
    canary: list[str] = []
    canary_guard("canary", 1.5, 1.0, canary)
    canary_guard("canary", 0.5, 1.0, canary)
    canary_guard("canary", 1.5, None, canary)
    assert canary == ["canary: epsilon lower bound 1.500 exceeds the accountant's epsilon 1.000; "
                      "this means a bug in training or in the audit"]


def test_summary_points_tensorboard_at_the_run_directory(standard_run):
    run_dir, metrics, report = standard_run
    # --logdir <run>/tb would name the run "." in TensorBoard; from the run directory it is "tb".
    assert format_summary(metrics, report, run_dir).splitlines()[-1] == f"tensorboard    tensorboard --logdir {run_dir}"


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """A tiny run audited at the end of training with audit=fast, to be re-audited (copied first)."""
    from conftest import make_config

    run_dir = tmp_path_factory.mktemp("fast") / "run"
    cfg = make_config("train.epochs=2", "train.progress=false", "audit=fast")
    pipeline.train(cfg, run_dir)
    return cfg, run_dir


def _audit_request(*overrides):
    from conftest import make_config

    return make_config(*overrides).audit


def test_every_audit_is_kept_in_the_history_and_audit_json_is_the_latest(fast_run, tmp_path):
    cfg, trained = fast_run
    run_dir = shutil.copytree(trained, tmp_path / "run")
    pipeline.audit(cfg, run_dir, _audit_request("audit=standard", "audit.mia.reference_models=1"))
    history = sorted((run_dir / "audits").iterdir())
    assert [re.fullmatch(r"\d{8}T\d{6}\.\d{3}Z-(\w+)\.json", path.name)[1] for path in history] == ["fast", "standard"]
    first, latest = (json.loads(path.read_text()) for path in history)
    assert set(first["mia"]) == {"loss"} and set(latest["mia"]) == {"loss", "rmia"}
    assert [first["history_file"], latest["history_file"]] == [f"audits/{path.name}" for path in history]
    assert _report(run_dir) == latest
    rows = build_table([read_run(run_dir, "run")]).rows
    assert [(row["audit_level"], row["audit_file"]) for row in rows] == [("standard", latest["history_file"])]


def test_audit_seconds_include_the_tensorboard_panels(fast_run, tmp_path, monkeypatch):
    import dptrain.views.panels

    cfg, trained = fast_run
    run_dir = shutil.copytree(trained, tmp_path / "run")
    draw_audit, drawn = dptrain.views.panels.draw_audit, []

    def slow_draw(*args, **kwargs):
        # Panels that take 0.5 s: audit_seconds, the audit stage's time, must count them.
        time.sleep(0.5)
        drawn.append(kwargs["step"])
        draw_audit(*args, **kwargs)

    monkeypatch.setattr(dptrain.views.panels, "draw_audit", slow_draw)
    report = pipeline.audit(cfg, run_dir)
    assert report.audit_seconds >= 0.5 and _report(run_dir)["audit_seconds"] == report.audit_seconds
    # Drawn before the audit is recorded, still at step n for the run's n-th audit.
    assert drawn == [2]


def test_an_audit_after_an_interrupted_one_completes_the_run_and_its_manifest(tmp_path, monkeypatch):
    from conftest import make_config

    import dptrain.audit.run

    def interrupted(*args, **kwargs):
        raise RuntimeError("killed during the audit")

    cfg = make_config("train.epochs=2", "train.progress=false", "audit=fast")
    with monkeypatch.context() as patch:
        patch.setattr(dptrain.audit.run, "run_audit", interrupted)
        with pytest.raises(RuntimeError, match="killed"):
            pipeline.train(cfg, tmp_path)
    assert read_run(tmp_path, "run").missing == ["audit.json", "manifest.json"]
    report = pipeline.audit(cfg, tmp_path)
    assert read_run(tmp_path, "run").complete
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["audits"] == [report.history_file] and manifest["written_after_interruption"] is True
    artifacts = {"audit.json", report.history_file, "metrics.json", "model.pt", "split.json", "checkpoint.pt"}
    assert artifacts <= set(manifest["digests"])
    for name, digest in manifest["digests"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest, name


def test_reauditing_updates_the_manifest_of_a_complete_run(fast_run, tmp_path):
    cfg, trained = fast_run
    run_dir = shutil.copytree(trained, tmp_path / "run")
    before = json.loads((run_dir / "manifest.json").read_text())
    report = pipeline.audit(cfg, run_dir)
    after = json.loads((run_dir / "manifest.json").read_text())
    # The training's record stays; the history and the digests follow the new audit.
    assert {k: after[k] for k in ("started_at", "finished_at", "config_hash", "data_fingerprint")} == {
        k: before[k] for k in ("started_at", "finished_at", "config_hash", "data_fingerprint")
    }
    assert after["audits"] == [*before["audits"], report.history_file] and "written_after_interruption" not in after
    assert after["digests"]["audit.json"] == hashlib.sha256((run_dir / "audit.json").read_bytes()).hexdigest()


def test_a_canary_audit_of_a_run_trained_without_canaries_says_why_it_has_no_bound(fast_run, tmp_path):
    cfg, trained = fast_run
    run_dir = shutil.copytree(trained, tmp_path / "run")
    report = pipeline.audit(cfg, run_dir, _audit_request("audit=fast", "audit.canaries.count=10"))
    reason = report.canary.reason
    assert "trained with audit.canaries.count=0" in reason and "inserted at training time" in reason
    assert f"canaries     skipped: {reason}" in format_audit(report)
    (row,) = build_table([read_run(run_dir, "run")]).rows
    assert row["canary.eps_lb"] is None
    # A run trained with no canaries and an audit that asks for none: nothing is missing, nothing to say.
    assert pipeline.audit(cfg, run_dir).canary is None


def test_reauditing_with_no_audit_is_refused(fast_run):
    from dptrain.errors import UserError

    cfg, run_dir = fast_run
    with pytest.raises(UserError, match="audit=none runs no audit"):
        pipeline.audit(cfg, run_dir, _audit_request("audit=none"))
