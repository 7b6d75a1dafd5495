"""Byzantine attacks and data poisoning: the published formulas, the constraints the optimized
attacks promise, the registry a config builds, and what poisoning does to a client's records."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dptrain.config import AttackConfig
from dptrain.errors import UserError
from dptrain.poisoning import backdoor, label_flip, stamp_trigger, targeted_label_flip
from dptrain.robust import (
    ATTACKS,
    alie,
    alie_z,
    build_attack,
    byzantine_rows,
    gaussian,
    ipm,
    mimic,
    min_max,
    min_sum,
    model_replacement_scale,
    sign_flip,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


def honest_updates(h: int = 12, d: int = 30, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(h, d, generator=generator, dtype=torch.float64) + torch.linspace(0, 1, d, dtype=torch.float64)


def config(name: str, **fields) -> AttackConfig:
    return OmegaConf.merge(OmegaConf.structured(AttackConfig), {"name": name, **fields})


# Update-level attacks.


def test_sign_flip_negates_the_attackers_own_updates():
    own = honest_updates(3)
    assert torch.equal(sign_flip(own), -own)


def test_gaussian_draws_seeded_noise_of_the_requested_moments():
    own = torch.zeros(2, 200_000)
    noise = gaussian(own, mean=1.0, std=3.0, generator=torch.Generator().manual_seed(0))
    again = gaussian(own, mean=1.0, std=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise, again) and noise.shape == own.shape
    assert abs(noise.mean().item() - 1.0) < 0.02 and abs(noise.std().item() - 3.0) < 0.02


# s = floor(n/2 + 1) - f supporters, z = Phi^{-1}((n - s) / n): 50, 12 -> Phi^{-1}(0.72).
@pytest.mark.parametrize("n, f, z", [(50, 12, 0.58284150727), (10, 2, 0.25334710314), (20, 4, 0.38532046641)])
def test_alie_z_follows_the_papers_formula(n, f, z):
    assert alie_z(n, f) == pytest.approx(z, abs=1e-10)


def test_alie_sends_the_honest_mean_plus_z_standard_deviations():
    honest = honest_updates()
    expected = honest.mean(dim=0) + alie_z(12 + 3, 3) * honest.std(dim=0)
    byzantine = alie(honest, f=3)
    assert byzantine.shape == (3, 30) and torch.allclose(byzantine, expected.expand(3, -1))
    assert torch.allclose(alie(honest, f=1, z=2.0)[0], honest.mean(dim=0) + 2.0 * honest.std(dim=0))


def test_alie_without_z_needs_f_at_most_half_of_n():
    with pytest.raises(UserError) as failure:
        alie_z(10, 6)
    message = str(failure.value)
    assert "\n" not in message and message.startswith("alie") and "f <= floor(n/2)" in message


def test_ipm_sends_minus_epsilon_times_the_honest_mean():
    honest = honest_updates()
    assert torch.allclose(ipm(honest, f=2, epsilon=0.5), (-0.5 * honest.mean(dim=0)).expand(2, -1))


def test_mimic_copies_the_requested_honest_update():
    honest = honest_updates()
    assert torch.equal(mimic(honest, f=2, target=4), honest[4].expand(2, -1))


def test_mimic_by_default_copies_the_update_farthest_along_the_top_principal_direction():
    direction = torch.linspace(-1, 1, 30, dtype=torch.float64)
    spread = torch.tensor([0.0, 0.3, -0.4, 0.2, -6.0, 0.1], dtype=torch.float64)
    noise = 0.01 * torch.randn(6, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    honest = spread[:, None] * direction + noise
    assert torch.equal(mimic(honest, f=1), honest[4][None])


@pytest.mark.parametrize("perturbation", ["unit_vec", "sign", "std"])
def test_min_max_stays_within_the_largest_honest_distance_and_reaches_it(perturbation):
    honest = honest_updates()
    byzantine = min_max(honest, f=2, perturbation=perturbation)
    largest_honest = torch.cdist(honest, honest).max()
    farthest = torch.cdist(byzantine[:1], honest).max()
    assert torch.equal(byzantine[0], byzantine[1])
    assert farthest <= largest_honest * (1 + 1e-9) and farthest >= largest_honest * (1 - 1e-6)


@pytest.mark.parametrize("perturbation", ["unit_vec", "sign", "std"])
def test_min_sum_stays_within_the_largest_honest_sum_of_squares_and_reaches_it(perturbation):
    honest = honest_updates()
    byzantine = min_sum(honest, f=1, perturbation=perturbation)
    budget = torch.cdist(honest, honest).square().sum(dim=1).max()
    spent = torch.cdist(byzantine, honest).square().sum()
    assert spent <= budget * (1 + 1e-9) and spent >= budget * (1 - 1e-6)


def test_min_max_moves_against_the_honest_mean():
    honest = honest_updates() + 5.0
    shift = min_max(honest, f=1)[0] - honest.mean(dim=0)
    assert shift @ honest.mean(dim=0) < 0


def test_unknown_perturbation_lists_the_choices():
    with pytest.raises(UserError, match="unknown attack.perturbation 'up'; choose one of: unit_vec, sign, std"):
        min_max(honest_updates(), f=1, perturbation="up")


# The registry a config builds.


def test_registry_holds_every_attack_the_design_names():
    design = {"none", "sign_flip", "label_flip", "gaussian", "alie", "ipm", "mimic", "min_max", "backdoor"}
    assert design <= set(ATTACKS)


@pytest.mark.parametrize("name", ["alie", "ipm", "mimic", "min_max", "min_sum"])
def test_omniscient_attacks_craft_n_minus_h_updates_from_the_honest_ones(name):
    attack = build_attack(config(name), seed=0)
    assert attack.omniscient and attack(honest_updates(12), n=15).shape == (3, 30)
    assert attack(honest_updates(12), n=12).shape == (0, 30)


@pytest.mark.parametrize("name", ["none", "sign_flip", "gaussian", "label_flip", "backdoor"])
def test_other_attacks_transform_the_byzantine_clients_own_updates(name):
    attack = build_attack(config(name), seed=0)
    own = honest_updates(3)
    crafted = attack(own, n=15)
    assert not attack.omniscient and crafted.shape == (3, 30)
    if name in ("none", "label_flip", "backdoor"):
        # Honest-looking updates: the harm of a data attack lies in the records it trained on.
        assert torch.equal(crafted, own)
    elif name == "sign_flip":
        assert torch.equal(crafted, -own)
    else:
        assert not torch.allclose(crafted, own)


# The one adversary: the Byzantine rows of a round (federated) or step (robust data parallelism).


def test_an_omniscient_adversary_crafts_the_byzantine_rows_from_the_honest_ones():
    honest = honest_updates(12)
    rows = byzantine_rows(build_attack(config("ipm", ipm_epsilon=0.5), seed=0), honest, None, n=15)
    assert torch.equal(rows, (-0.5 * honest.mean(dim=0)).expand(3, -1))


def test_an_omniscient_adversary_without_honest_rows_sends_zeros():
    nothing = torch.zeros(0, 30, dtype=torch.float64)
    rows = byzantine_rows(build_attack(config("alie"), seed=0), nothing, None, n=4)
    assert rows.dtype == torch.float64 and torch.equal(rows, torch.zeros(4, 30, dtype=torch.float64))


def test_any_other_adversary_transforms_the_byzantine_clients_own_rows():
    honest, own = honest_updates(12), honest_updates(3, seed=1)
    rows = byzantine_rows(build_attack(config("sign_flip", scale=2.0), seed=0), honest, own, n=15)
    assert torch.equal(rows, -2.0 * own)
    with pytest.raises(ValueError, match=r"own \(3, 30\) updates, got \(2, 30\)"):
        byzantine_rows(build_attack(config("sign_flip"), seed=0), honest, own[:2], n=15)


def test_a_round_without_byzantine_rows_gets_none_from_either_adversary():
    honest = honest_updates(12)
    for name, own in (("mimic", None), ("gaussian", honest[:0])):
        assert byzantine_rows(build_attack(config(name), seed=0), honest, own, n=12).shape == (0, 30)


def test_only_data_attacks_poison_records_and_only_backdoor_has_a_trigger():
    poisoners = {name for name in ATTACKS if build_attack(config(name), seed=0).poison is not None}
    triggers = {name for name in ATTACKS if build_attack(config(name), seed=0).trigger is not None}
    assert poisoners == {"label_flip", "backdoor"} and triggers == {"backdoor"}


def test_backdoor_model_replacement_scales_the_update_by_n_over_server_lr():
    own = honest_updates(2)
    plain = build_attack(config("backdoor"), seed=0, server_lr=0.5)
    replacing = build_attack(config("backdoor", model_replacement=True), seed=0, server_lr=0.5)
    assert torch.equal(plain(own, n=10), own) and torch.allclose(replacing(own, n=10), 20.0 * own)


def test_unknown_attack_lists_the_choices():
    with pytest.raises(UserError, match="unknown attack 'alei'; choose one of: none, sign_flip"):
        build_attack(config("alei"), seed=0)


def test_attack_seeing_more_honest_updates_than_the_round_holds_is_one_line():
    with pytest.raises(UserError, match=r"^ipm saw 12 honest updates in a round of n=10 updates$"):
        build_attack(config("ipm"), seed=0)(honest_updates(12), n=10)


@pytest.mark.parametrize("path", sorted((CONF / "attack").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_attack_config_merges_into_the_schema_and_builds(path):
    cfg = OmegaConf.merge(OmegaConf.structured(AttackConfig), OmegaConf.load(path))
    assert cfg.name == path.stem and build_attack(cfg, seed=0).name == path.stem


def test_every_attack_has_a_config_file():
    assert {p.stem for p in (CONF / "attack").glob("*.yaml")} == set(ATTACKS)


# Data poisoning.


def test_label_flip_maps_y_to_num_classes_minus_one_minus_y():
    assert label_flip(torch.tensor([0, 1, 9, 4]), num_classes=10).tolist() == [9, 8, 0, 5]


def test_targeted_label_flip_relabels_the_source_class_only_and_the_attack_uses_it():
    labels = torch.tensor([0, 1, 3, 1, 9])
    assert targeted_label_flip(labels, 10, source=1, target=7).tolist() == [0, 7, 3, 7, 9]
    _, poisoned = build_attack(config("label_flip", source_label=3, target_label=0), seed=0).poison(torch.zeros(5, 2), labels, 10)
    assert poisoned.tolist() == [0, 1, 0, 1, 9]
    with pytest.raises(UserError, match="two different classes in \\[0, 10\\), got 2 -> 2"):
        targeted_label_flip(labels, 10, source=2, target=2)


def test_label_flip_rejects_labels_outside_the_classes():
    with pytest.raises(UserError, match=r"label_flip needs labels in \[0, 3\), got \[0, 3\]"):
        label_flip(torch.tensor([0, 3]), num_classes=3)


def test_backdoor_triggers_and_relabels_the_requested_fraction_of_images():
    images, labels = torch.zeros(10, 3, 8, 8), torch.arange(10) % 4
    generator = torch.Generator().manual_seed(0)
    poisoned, relabelled = backdoor(
        images, labels, target_label=7, fraction=0.3, size=2, value=1.0, generator=generator
    )
    triggered = poisoned.flatten(1).amax(dim=1) > 0
    assert triggered.sum() == 3 and (relabelled[triggered] == 7).all()
    assert torch.equal(relabelled[~triggered], labels[~triggered])
    assert (poisoned[triggered][:, :, -2:, -2:] == 1.0).all() and poisoned[triggered].sum() == 3 * 3 * 4
    assert images.sum() == 0 and torch.equal(labels, torch.arange(10) % 4)


def test_backdoor_on_tabular_records_sets_the_last_features():
    rows, labels = torch.zeros(4, 6), torch.zeros(4, dtype=torch.long)
    poisoned, relabelled = backdoor(rows, labels, target_label=1, fraction=1.0, size=2, value=5.0)
    assert (poisoned[:, -2:] == 5.0).all() and (poisoned[:, :-2] == 0).all() and (relabelled == 1).all()


def test_backdoor_poisoning_is_reproducible_from_the_seed():
    images, labels = torch.randn(20, 1, 6, 6), torch.zeros(20, dtype=torch.long)
    attack = config("backdoor", poison_fraction=0.25, trigger_size=2)
    first = build_attack(attack, seed=4).poison(images, labels, 10)
    second = build_attack(attack, seed=4).poison(images, labels, 10)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_trigger_that_does_not_fit_is_one_line():
    with pytest.raises(UserError) as failure:
        stamp_trigger(torch.zeros(2, 1, 4, 4), size=5, value=1.0)
    assert "\n" not in str(failure.value) and "trigger_size must be in [1, 4]" in str(failure.value)


def test_model_replacement_scale_is_n_over_server_lr():
    assert model_replacement_scale(10, server_lr=0.5) == 20.0
