"""The audit as a run stage: audit.json's schema, attacks, attribute inference, canaries, TensorBoard, caching."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dptrain import pipeline
from dptrain.audit.run import SCORE_BINS, _canary_guard, _guard

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
    run_dir, metrics, report = standard_run
    assert _report(run_dir) == report
    assert set(report["mia"]) == {"loss", "rmia"}
    for attack in report["mia"].values():
        assert set(attack["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}
        assert attack["n_members"] == attack["n_nonmembers"] == metrics["members"]
        assert attack["auc_ci"]["low"] <= attack["auc"] <= attack["auc_ci"]["high"]
        bound = attack["epsilon_lower_bound"]
        assert bound["confidence"] == 0.95 and 0 <= bound["value"] <= metrics["epsilon"]
        assert bound["n_members"] + bound["n_calibration_members"] == metrics["members"]
    assert report["reference_models"]["count"] == 2 and report["reference_models"]["scheme"] == "population"
    assert report["aia"] == {"skipped": "dataset digits has no sensitive attribute"}
    assert report["warnings"] == []


def test_audit_lands_in_tensorboard_with_scalars_roc_histograms_text_and_hparams(standard_run):
    events = EventAccumulator(str(standard_run[0] / "tb"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for attack in ("loss", "rmia"):
        for metric in ("auc", "tpr@1%", "eps_lb"):
            assert f"audit/mia/{attack}/{metric}" in tags["scalars"]
        # 575 non-members cannot measure TPR at FPR 0.1%: audit.json says null and no scalar is drawn.
        assert standard_run[2]["mia"][attack]["tpr_at_fpr"]["0.001"] is None
        assert f"audit/mia/{attack}/tpr@0.1%" not in tags["scalars"]
        assert f"hparams/audit/mia/{attack}/auc" in tags["scalars"]
        members, non_members = (
            events.Histograms(f"audit/scores/{attack}/{group}")[0].histogram_value for group in ("members", "non_members")
        )
        assert members.num == non_members.num == standard_run[1]["members"]
        # Both on the same edges, so TensorBoard shows them on one scale.
        assert len(set(members.bucket_limit) | set(non_members.bucket_limit)) <= SCORE_BINS + 1
    assert "audit/roc" in tags["images"]
    assert "audit/summary/text_summary" in tags["tensors"]


def test_reaudit_reuses_cached_reference_models_and_reproduces_the_numbers(standard_run):
    from conftest import make_config

    run_dir, _, first = standard_run
    again = pipeline.audit(make_config("train.progress=false", *AUDITED), run_dir)
    assert again["reference_models"]["reused_from_cache"] is True
    assert again["mia"]["rmia"]["auc"] == pytest.approx(first["mia"]["rmia"]["auc"])


def test_lira_online_and_offline_with_reference_models_trained_in_two_processes(tiny_config, tmp_path):
    _, report = pipeline.train(
        tiny_config("audit=thorough", "audit.mia.reference_models=4", "audit.canaries.count=0", "audit.workers=2"),
        tmp_path,
    )
    assert {"loss", "rmia", "lira_online", "lira_offline"} == set(report["mia"])
    assert report["reference_models"] == {
        "count": 4, "scheme": "halves", "train_seconds": report["reference_models"]["train_seconds"], "reused_from_cache": False,
    }
    assert all(0.0 <= m["auc"] <= 1.0 for m in report["mia"].values())


# Few members, a wide MLP and many epochs: the non-private model memorises its members.
OVERFIT = (
    "train.progress=false", "model=mlp", "model.hidden=[256]", "train.lr=0.5", "train.batch_size=32",
    "train.epochs=60", "dataset.max_members=150", "audit.mia.attacks=[loss,rmia,lira]",
    "audit.mia.reference_models=4", "audit.canaries.count=0", "audit.workers=1",
)


def test_on_an_overfit_baseline_loss_leaks_and_rmia_and_lira_find_at_least_as_much(tmp_path):
    from conftest import make_config

    metrics, report = pipeline.train(make_config(*OVERFIT, "privacy.target_epsilon=inf"), tmp_path)
    assert metrics["train_accuracy"] == 1.0
    mia = report["mia"]
    assert mia["loss"]["auc"] >= 0.6
    for attack in ("rmia", "lira_online", "lira_offline"):
        assert mia[attack]["tpr_at_fpr"]["0.01"] >= mia["loss"]["tpr_at_fpr"]["0.01"], attack


def test_at_epsilon_one_every_attack_is_near_chance_and_every_bound_below_epsilon(tmp_path):
    from conftest import make_config

    metrics, report = pipeline.train(make_config(*OVERFIT, "privacy.target_epsilon=1"), tmp_path)
    assert metrics["epsilon"] <= 1.0
    for attack, result in report["mia"].items():
        assert 0.4 <= result["auc"] <= 0.6, attack
        assert result["epsilon_lower_bound"]["value"] <= metrics["epsilon"], attack
    assert report["warnings"] == []


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
    advantage = {name: r["aia"]["members"]["advantage"]["accuracy"] for name, r in (("leaky", leaky), ("dp", private))}
    assert advantage["leaky"] > leaky["aia"]["nonmembers"]["advantage"]["accuracy"]
    assert leaky["aia"]["leakage"]["accuracy"] > 0.02
    assert advantage["dp"] < advantage["leaky"] and private["aia"]["leakage"]["accuracy"] < leaky["aia"]["leakage"]["accuracy"]


def test_attribute_inference_runs_against_imputation_on_synthetic_data(tiny_config, tmp_path):
    _, report = pipeline.train(tiny_config("dataset=synthetic", "dataset.n_samples=1000", "audit=fast"), tmp_path)
    aia = report["aia"]
    assert aia["attribute"] == "group"
    for group in ("members", "nonmembers"):
        for method in ("attack", "imputation"):
            assert 0.0 <= aia[group][method]["accuracy"] <= 1.0
    assert aia["n_members"] == aia["n_nonmembers"] > 0
    assert aia["leakage"]["accuracy"] == pytest.approx(
        aia["members"]["advantage"]["accuracy"] - aia["nonmembers"]["advantage"]["accuracy"]
    )


def test_canaries_enter_training_by_coin_flip_and_give_a_one_run_bound(tiny_config, tmp_path):
    metrics, report = pipeline.train(tiny_config("audit=fast", "audit.canaries.count=40"), tmp_path)
    canary = report["canary"]
    assert canary["n_canaries"] == 40 and canary["n_included"] == metrics["canaries_included"]
    assert 0 < metrics["canaries_included"] < 40
    assert 0.0 <= canary["epsilon_lower_bound"] <= metrics["epsilon"]
    # The privacy plan counted the inserted canaries as training records.
    assert metrics["sample_rate"] == pytest.approx(1 / -(-(metrics["members"] + metrics["canaries_included"]) // 128))


def test_a_bound_above_the_accountant_epsilon_or_an_inverted_auc_is_flagged():
    warnings: list[str] = []
    _guard("loss", 0.7, 2.5, 1.0, warnings)
    _guard("rmia", 0.3, 0.0, 1.0, warnings)
    _guard("lira", 0.6, 0.5, 1.0, warnings)
    assert len(warnings) == 2
    assert "exceeds the accountant's epsilon" in warnings[0] and "below 0.4" in warnings[1]


def test_a_membership_bound_above_epsilon_is_suspicious_but_only_the_canary_bound_claims_a_bug():
    # A fixed-size member / non-member split plays replace-one, which add/remove DP bounds by ~2 epsilon.
    membership: list[str] = []
    _guard("loss", 0.7, 1.5, 1.0, membership)
    (warning,) = membership
    assert "replace-one" in warning and "no proof of a bug" in warning and "canary (one-run) bound" in warning
    assert "means a bug" not in warning
    canary: list[str] = []
    _canary_guard(1.5, 1.0, canary)
    _canary_guard(0.5, 1.0, canary)
    _canary_guard(1.5, None, canary)
    assert canary == ["canary: one-run epsilon lower bound 1.500 exceeds the accountant's epsilon 1.000; "
                      "this means a bug in training or in the audit"]
