from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from dptrain.audit.attribute import (
    attribute_inference_audit,
    candidate_losses,
    fit_imputation,
    infer_attribute,
)


@dataclass
class StandInAttribute:
    """The fields of dptrain.data.SensitiveAttribute that attribute inference reads."""

    name: str
    columns: list[int]
    values: torch.Tensor
    value_names: list[str]
    codes: torch.Tensor


def _memorizing_setup(n: int = 600, seed: int = 0):
    """Records: one-hot attribute (3 values) in columns 0-2, 4 other features, binary label.

    The attribute is correlated with the other features (imputation gets it right
    about 2/3 of the time). The "model" has memorised its members: it is confident
    in a member's label only with the member's true attribute value, and is
    uninformative (uniform logits) on everything else.
    """
    generator = torch.Generator().manual_seed(seed)
    others = torch.randn(n, 4, generator=generator)
    codes = torch.argmax(others[:, :3] + 0.8 * torch.randn(n, 3, generator=generator), dim=1)
    x = torch.cat([torch.nn.functional.one_hot(codes, 3).float(), others], dim=1)
    y = torch.randint(0, 2, (n,), generator=generator)
    order = torch.randperm(n, generator=generator).numpy()
    members, nonmembers, population = order[: n // 3], order[n // 3 : 2 * n // 3], order[2 * n // 3 :]
    member_x, member_y = x[members], y[members]

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        distance = torch.cdist(batch, member_x, compute_mode="donot_use_mm_for_euclid_dist")
        nearest = distance.argmin(dim=1)
        exact = distance.gather(1, nearest[:, None]).squeeze(1) < 1e-6
        logits = torch.zeros(batch.shape[0], 2)
        logits[exact, member_y[nearest[exact]]] = 8.0
        return logits

    attribute = StandInAttribute(
        name="group", columns=[0, 1, 2], values=torch.eye(3), value_names=["a", "b", "c"], codes=codes
    )
    return logits_fn, x, y, attribute, members, nonmembers, population


def test_attack_on_a_memorizing_model_beats_imputation_on_members_only():
    logits_fn, x, y, attribute, members, nonmembers, population = _memorizing_setup()
    result = attribute_inference_audit(
        logits_fn, x, y, attribute, members=members, nonmembers=nonmembers, population=population
    )
    assert result.members.attack.accuracy == 1.0
    assert 0.45 < result.members.imputation.accuracy < 0.9
    assert result.members.advantage["accuracy"] > 0.1
    assert result.nonmembers.advantage["accuracy"] <= 0.0
    assert result.leakage["mcc"] > 0.3 and result.leakage["balanced_accuracy"] > 0.1


def test_prior_weighted_rule_falls_back_on_the_most_common_value_where_the_model_is_indifferent():
    logits_fn, x, y, attribute, members, nonmembers, population = _memorizing_setup()
    result = attribute_inference_audit(
        logits_fn, x, y, attribute, members=members, nonmembers=nonmembers, population=population,
        rule="confidence_prior",
    )
    most_common = np.bincount(attribute.codes[population].numpy(), minlength=3).argmax()
    expected = np.mean(attribute.codes[nonmembers].numpy() == most_common)
    assert result.nonmembers.attack.accuracy == pytest.approx(expected)
    assert result.members.attack.accuracy == 1.0


def test_result_is_strict_json_with_counts():
    logits_fn, x, y, attribute, members, nonmembers, population = _memorizing_setup(n=150)
    result = attribute_inference_audit(
        logits_fn, x, y, attribute, members=members, nonmembers=nonmembers, population=population
    )
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert (data["n_members"], data["n_nonmembers"], data["n_population"]) == (50, 50, 50)
    assert data["members"]["attack"]["n"] == 50
    assert set(data["leakage"]) == {"accuracy", "balanced_accuracy", "mcc"}


def test_candidate_losses_overwrite_the_flattened_columns_of_shaped_inputs():
    x = torch.zeros(6, 2, 3)
    attribute = StandInAttribute(
        name="flag", columns=[4], values=torch.tensor([[0.0], [1.0]]), value_names=["off", "on"],
        codes=torch.ones(6, dtype=torch.long),
    )

    def logits_fn(batch: torch.Tensor) -> torch.Tensor:
        assert batch.shape[1:] == (2, 3)
        flag = batch.reshape(batch.shape[0], -1)[:, 4]
        return torch.stack([torch.zeros_like(flag), 5.0 * flag], dim=1)

    losses = candidate_losses(logits_fn, x, torch.ones(6, dtype=torch.long), attribute, batch_size=4)
    assert losses.shape == (6, 2)
    assert np.all(infer_attribute(losses) == 1)


def test_infer_attribute_rejects_unknown_rule_and_missing_prior():
    with pytest.raises(ValueError, match="unknown rule"):
        infer_attribute(np.zeros((2, 2)), rule="vote")
    with pytest.raises(ValueError, match="prior"):
        infer_attribute(np.zeros((2, 2)), rule="confidence_prior")


def test_imputation_predicts_the_only_value_seen_in_the_population():
    attribute = StandInAttribute(
        name="g", columns=[0], values=torch.tensor([[0.0], [1.0]]), value_names=["a", "b"],
        codes=torch.zeros(4, dtype=torch.long),
    )
    impute = fit_imputation(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), np.zeros(4), attribute, 2)
    assert impute(torch.randn(3, 3), torch.zeros(3, dtype=torch.long)).tolist() == [[1.0, 0.0]] * 3


def test_imputation_prior_follows_imputation_where_the_model_is_indifferent_and_the_model_where_it_is_sure():
    losses = np.array([[0.5, 0.5], [0.01, 9.0]])
    imputed = np.array([[0.2, 0.8], [0.2, 0.8]])
    assert infer_attribute(losses, rule="imputation_prior", prior=imputed).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"prior of shape \(2, 2\)"):
        infer_attribute(losses, rule="imputation_prior", prior=np.array([0.5, 0.5]))


def test_overlapping_record_sets_are_rejected():
    logits_fn, x, y, attribute, members, nonmembers, population = _memorizing_setup(n=60)
    with pytest.raises(ValueError, match="disjoint"):
        attribute_inference_audit(
            logits_fn, x, y, attribute, members=members, nonmembers=members, population=population
        )


def test_a_sensitive_column_with_one_value_is_skipped_with_a_note(tiny_config, tmp_path):
    from dptrain import pipeline
    from dptrain.audit.results import Skipped
    from dptrain.views.summary import format_audit

    table = tmp_path / "one_site.csv"
    table.write_text("x,site,y\n" + "".join(f"{i * 0.1:.1f},lyon,{i % 2}\n" for i in range(200)))
    cfg = tiny_config(
        "dataset=csv", f"dataset.path={table}", "dataset.target=y", "dataset.sensitive=site", "audit=fast",
        "train.batch_size=32", "train.epochs=1",
    )  # fmt: skip
    _, report = pipeline.train(cfg, tmp_path / "run")
    assert report.aia == Skipped(
        "dataset.sensitive=site has the single value 'lyon' on the members, non-members and population: "
        "nothing to infer"
    )
    assert "attribute    skipped: dataset.sensitive=site has the single value 'lyon'" in format_audit(report)
