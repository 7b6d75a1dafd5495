"""Robust aggregators and pre-aggregators: known answers, invariances, robustness to outliers,
preconditions, and the pipeline a config builds."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dptrain import pipeline
from dptrain.config import AggregatorConfig, recipe_hash
from dptrain.errors import UserError
from dptrain.robust import (
    AGGREGATORS,
    NNM,
    PRE_AGGREGATORS,
    AggregationFailed,
    Bucketing,
    CenteredClipping,
    StaticClipping,
    bucketing,
    build_aggregator,
    bulyan,
    bulyan_select,
    centered_clipping,
    geometric_median,
    krum,
    krum_select,
    mean,
    median,
    multi_krum,
    nnm,
    pairwise_sq_distances,
    static_clipping,
    trimmed_mean,
)
from dptrain.robust.preaggregators import bucketing_matrix, nnm_matrix
from dptrain.robust.primitives import sq_distances_and_gram, sq_distances_to_mixture
from dptrain.training import federated
from dptrain.training.checkpoint import Checkpoint
from dptrain.training.clients import LocalUpdate

CONF = Path(__file__).resolve().parents[1] / "conf"


def column(*values: float) -> torch.Tensor:
    """n one-dimensional updates."""
    return torch.tensor(values, dtype=torch.float64)[:, None]


def rules(f: int) -> dict:
    """Every rule as (n, d) -> (d,), tolerating f; centered clipping around zero with tau = 1."""
    return {
        "mean": mean,
        "median": median,
        "trimmed_mean": partial(trimmed_mean, f=f),
        "krum": partial(krum, f=f),
        "multi_krum": partial(multi_krum, f=f),
        "geometric_median": partial(geometric_median, tol=1e-12, max_iter=500),
        "bulyan": partial(bulyan, f=f),
        "centered_clipping": lambda x: centered_clipping(x, torch.zeros_like(x[0]), tau=1.0, iterations=3),
    }


# Known answers on hand-made inputs.


def test_mean_is_the_unweighted_average():
    assert torch.equal(mean(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])), torch.tensor([3.0, 5.0]))


def test_median_is_coordinate_wise_and_averages_the_middle_pair_for_even_n():
    assert torch.equal(median(torch.tensor([[1.0, 10.0], [2.0, 30.0], [100.0, 20.0]])), torch.tensor([2.0, 20.0]))
    assert torch.equal(median(column(1, 2, 3, 10)), torch.tensor([2.5], dtype=torch.float64))


def test_trimmed_mean_drops_f_values_per_side_per_coordinate():
    updates = torch.tensor([[1.0, 40.0], [2.0, 30.0], [3.0, 20.0], [100.0, -50.0]])
    assert torch.equal(trimmed_mean(updates, f=1), torch.tensor([2.5, 25.0]))


def test_krum_scores_over_n_minus_f_minus_2_neighbours():
    # With n - f - 2 = 2 neighbours the update 1.0 wins; ByzFL's n - f - 1 = 3 would pick 1.1.
    updates = column(0.0, 1.0, 1.1, 5.0, 5.05)
    assert torch.equal(krum(updates, f=1), torch.tensor([1.0], dtype=torch.float64))


def test_multi_krum_averages_the_m_best_scored_and_reports_them():
    updates = column(0.0, 0.1, 0.3, 0.35, 5.0, 100.0)
    assert krum_select(updates, f=1, m=2).tolist() == [1, 2]
    assert torch.allclose(multi_krum(updates, f=1, m=2), torch.tensor([0.2], dtype=torch.float64))


def test_krum_breaks_ties_towards_the_lower_index():
    assert krum_select(column(0.0, 0.0, 0.0, 0.0, 9.0), f=1).tolist() == [0]


def test_geometric_median_of_a_square_is_its_centre():
    corners = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(geometric_median(corners), torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_geometric_median_in_one_dimension_is_the_median():
    assert torch.allclose(geometric_median(column(0, 1, 10), tol=1e-12, max_iter=1000), column(1)[0], atol=1e-4)


def test_bulyan_selects_by_repeated_krum_then_averages_around_the_median():
    updates = column(0, 1, 2, 3, 4, 100, -100)
    assert bulyan_select(updates, f=1).tolist() == [2, 1, 3, 0, 4]
    assert torch.equal(bulyan(updates, f=1), torch.tensor([2.0], dtype=torch.float64))


def test_bulyan_averages_the_beta_values_closest_to_the_median_not_a_trimmed_mean():
    # Kept: 0, 0.9, 1, 5, 6 (median 1). The beta = 3 closest to 1 are 0, 0.9, 1; a trimmed mean
    # of the kept values would average 0.9, 1, 5 instead.
    updates = column(0, 0.9, 1, 5, 6, 100, -100)
    assert sorted(bulyan_select(updates, f=1).tolist()) == [0, 1, 2, 3, 4]
    assert torch.allclose(bulyan(updates, f=1), column(1.9 / 3)[0])


def test_centered_clipping_clips_each_difference_to_tau():
    updates = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(centered_clipping(updates, torch.zeros(2), tau=1.0), torch.tensor([0.3, 0.4]))


def test_centered_clipping_recentres_on_its_previous_aggregate_and_checkpoints_it():
    first, second = torch.tensor([[3.0, 4.0]]), torch.tensor([[6.0, 8.0]])
    rule = CenteredClipping(f=0, tau=1.0)
    assert torch.allclose(rule(first).value, torch.tensor([0.6, 0.8]))
    resumed = CenteredClipping(f=0, tau=1.0)
    resumed.load_state_dict(rule.state_dict())
    assert torch.allclose(rule(second).value, torch.tensor([1.2, 1.6]))
    assert torch.allclose(resumed(second).value, torch.tensor([1.2, 1.6]))


def test_centered_clipping_state_rejects_what_it_did_not_write():
    with pytest.raises(UserError, match=r"^centered_clipping state must have exactly the keys \['centre'\]"):
        CenteredClipping(f=0, tau=1.0).load_state_dict({"momentum": torch.zeros(2)})


def test_nnm_mixes_each_update_with_its_n_minus_f_nearest_neighbours():
    assert torch.equal(nnm(column(0, 1, 10), f=1), column(0.5, 0.5, 5.5))


def test_nnm_equals_the_gathering_reference_without_building_it():
    updates = torch.randn(9, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    neighbours = torch.cdist(updates, updates).topk(9 - 3, dim=1, largest=False).indices
    reference = updates[neighbours].mean(dim=1)  # the (n, n - f, d) array nnm avoids
    assert torch.allclose(nnm(updates, f=3), reference)
    mixing = nnm_matrix(updates, f=3)
    assert mixing.shape == (9, 9) and (mixing > 0).sum(dim=1).eq(6).all() and mixing.diagonal().gt(0).all()


def test_bucketing_averages_seeded_random_buckets_of_s_updates():
    updates = torch.arange(5.0)[:, None]
    out = bucketing(updates, bucket_size=2, generator=torch.Generator().manual_seed(3))
    again = bucketing(updates, bucket_size=2, generator=torch.Generator().manual_seed(3))
    mixing = bucketing_matrix(5, 2, torch.Generator().manual_seed(3))
    assert out.shape == (3, 1) and torch.equal(out, again) and torch.allclose(out, mixing @ updates)
    partitions = {tuple(map(tuple, (bucketing_matrix(12, 3, torch.Generator().manual_seed(s)) > 0).tolist())) for s in range(5)}
    assert len(partitions) > 1
    assert sorted((mixing > 0).sum(dim=1).tolist()) == [1, 2, 2] and (mixing > 0).sum(dim=0).eq(1).all()
    assert torch.allclose((mixing > 0).sum(dim=1).to(out.dtype) @ out[:, 0], updates.sum())


def test_static_clipping_bounds_norms_and_keeps_small_updates():
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    assert torch.allclose(static_clipping(updates, threshold=1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))


# Invariances.


@pytest.mark.parametrize("name", list(rules(2)))
def test_rules_are_permutation_invariant(name):
    updates = torch.randn(11, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    aggregate = rules(2)[name]
    permuted = updates[torch.randperm(11, generator=torch.Generator().manual_seed(2))]
    assert torch.allclose(aggregate(permuted), aggregate(updates), atol=1e-9)


@pytest.mark.parametrize("name", [n for n in rules(2) if n != "centered_clipping"])
def test_rules_are_translation_equivariant(name):
    updates = torch.randn(11, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shift = torch.linspace(-3.0, 7.0, 6, dtype=torch.float64)
    aggregate = rules(2)[name]
    assert torch.allclose(aggregate(updates + shift), aggregate(updates) + shift, atol=1e-7)


def test_centered_clipping_is_translation_equivariant_with_its_centre():
    updates = torch.randn(11, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    centre, shift = torch.randn(6, dtype=torch.float64), torch.full((6,), 5.0, dtype=torch.float64)
    moved = centered_clipping(updates + shift, centre + shift, tau=0.5, iterations=2)
    assert torch.allclose(moved, centered_clipping(updates, centre, tau=0.5, iterations=2) + shift)


def test_nnm_is_translation_equivariant_row_by_row():
    updates = torch.randn(9, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(nnm(updates + 3.0, f=2), nnm(updates, f=2) + 3.0)


# Robustness: f < n / 2 updates replaced by huge outliers.

N = 15
# The most outliers of 15 each rule is tested against. The geometric median's bias grows like
# h / (h - f): at f = 7 it leaves the per-coordinate box (see the next-but-one test), so 5 here.
TOLERATED_F = {
    "median": 7,
    "trimmed_mean": 7,
    "geometric_median": 5,
    "krum": 6,
    "multi_krum": 6,
    "bulyan": 3,
    "centered_clipping": 7,
}


def with_outliers(f: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    honest = torch.randn(N - f, 5, generator=torch.Generator().manual_seed(seed))
    return honest, torch.cat([honest, torch.full((f, 5), 1e6)])


@pytest.mark.parametrize("name", list(TOLERATED_F))
def test_robust_rules_stay_within_the_honest_range_under_huge_outliers(name):
    f = TOLERATED_F[name]
    honest, updates = with_outliers(f)
    aggregate = rules(f)[name](updates)
    assert (aggregate >= honest.min(dim=0).values - 1e-4).all() and (aggregate <= honest.max(dim=0).values + 1e-4).all()


def test_geometric_median_stays_near_the_honest_updates_with_f_just_below_n_over_2():
    honest, updates = with_outliers(7)
    radius = torch.linalg.vector_norm(honest - honest.mean(dim=0), dim=1).max()
    assert torch.linalg.vector_norm(geometric_median(updates) - honest.mean(dim=0)) < 2 * radius


def test_mean_leaves_the_honest_range_under_one_outlier():
    honest, updates = with_outliers(1)
    assert (mean(updates) > honest.max(dim=0).values).all()


# Numerics, dtypes, devices.


def test_pairwise_distances_survive_a_large_common_offset():
    noise = torch.randn(12, 20_000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    exact = torch.cdist(noise, noise).square()
    off = ~torch.eye(12, dtype=torch.bool)
    approx = pairwise_sq_distances((noise + 1e3).to(torch.float32))
    assert ((approx - exact).abs()[off] / exact[off]).max() < 1e-4


def test_distances_to_a_mixture_stay_exact_when_far_rows_carry_tiny_weights():
    # Weiszfeld's weights on rows at 1e20 are ~1e-21: from the pairwise distances alone the near
    # rows' distances cancelled to 0 (geometric median then returned ~14 for rows within ~3).
    honest = torch.randn(9, 4, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    updates = torch.cat([honest, torch.full((2, 4), 1e20, dtype=torch.float64)])
    weights = torch.tensor([(1 - 1e-21) / 9] * 9 + [5e-22] * 2, dtype=torch.float64)
    exact = (updates - weights @ updates).square().sum(dim=1)
    _, gram = sq_distances_and_gram(updates)
    assert torch.allclose(sq_distances_to_mixture(gram, weights), exact, rtol=1e-9)


@pytest.mark.parametrize("name", list(rules(2)))
def test_rules_keep_the_input_dtype_and_agree_across_precisions(name):
    updates = torch.randn(11, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    aggregate = rules(2)[name]
    single = aggregate(updates.to(torch.float32))
    assert single.dtype == torch.float32 and aggregate(updates).dtype == torch.float64
    assert torch.allclose(single.double(), aggregate(updates), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(rules(2)))
def test_rules_agree_on_cuda(name):
    updates = torch.randn(11, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    aggregate = rules(2)[name]
    on_gpu = aggregate(updates.cuda())
    assert on_gpu.device.type == "cuda" and torch.allclose(on_gpu.cpu(), aggregate(updates), atol=1e-9)


def test_malformed_updates_are_a_value_error():
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        median(torch.zeros(3))
    with pytest.raises(ValueError, match="float32 or float64"):
        median(torch.zeros(3, 2, dtype=torch.int64))


# Preconditions: one line naming the rule and the condition.


@pytest.mark.parametrize(
    "call, rule, condition",
    [
        (lambda: krum(torch.zeros(4, 2), f=1), "krum", "n > 2f + 2"),
        (lambda: multi_krum(torch.zeros(4, 2), f=1), "multi_krum", "n > 2f + 2"),
        (lambda: multi_krum(torch.zeros(6, 2), f=1, m=7), "multi_krum", "1 <= m <= n"),
        (lambda: bulyan(torch.zeros(6, 2), f=1), "bulyan", "n >= 4f + 3"),
        (lambda: trimmed_mean(torch.zeros(4, 2), f=2), "trimmed_mean", "n > 2f"),
        (lambda: trimmed_mean(torch.zeros(4, 2), f=-1), "trimmed_mean", "f >= 0"),
        (lambda: nnm(torch.zeros(4, 2), f=2), "nnm", "n > 2f"),
        (lambda: geometric_median(torch.zeros(4, 2), nu=0.0), "geometric_median", "nu > 0"),
        (lambda: centered_clipping(torch.zeros(4, 2), torch.zeros(2), tau=0.0), "centered_clipping", "tau > 0"),
        (lambda: bucketing(torch.zeros(4, 2), bucket_size=0), "bucketing", "bucket_size >= 1"),
        (lambda: static_clipping(torch.zeros(4, 2), threshold=0.0), "clipping", "clip_threshold > 0"),
    ],
)
def test_precondition_failures_are_one_clear_line(call, rule, condition):
    with pytest.raises(UserError) as failure:
        call()
    message = str(failure.value)
    assert "\n" not in message and message.startswith(rule) and condition in message


# The pipeline a config builds.


def config(name: str, **fields) -> AggregatorConfig:
    return OmegaConf.merge(OmegaConf.structured(AggregatorConfig), {"name": name, **fields})


def test_registry_holds_the_rules_design_names():
    assert set(AGGREGATORS) == {
        "mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "bulyan", "centered_clipping"
    }


# Each rule's config, with non-default parameters that change its answer here, and the pure function
# it must equal, with f = 2 (the geometric median's tol and max_iter cannot both bind in one case).
RULE_CASES = [
    ("mean", {}, lambda x: (mean(x), None)),
    ("median", {}, lambda x: (median(x), None)),
    ("trimmed_mean", {}, lambda x: (trimmed_mean(x, 2), None)),
    ("krum", {}, lambda x: (krum(x, 2), krum_select(x, 2))),
    ("multi_krum", {"m": 3}, lambda x: (multi_krum(x, 2, m=3), krum_select(x, 2, m=3))),
    ("geometric_median", {"nu": 2.0, "tol": 0.05}, lambda x: (geometric_median(x, nu=2.0, tol=0.05), None)),
    ("geometric_median", {"max_iter": 2}, lambda x: (geometric_median(x, max_iter=2), None)),
    ("bulyan", {}, lambda x: (bulyan(x, 2), bulyan_select(x, 2))),
    (
        "centered_clipping",
        {"tau": 0.3, "iterations": 2},
        lambda x: (centered_clipping(x, torch.zeros_like(x[0]), tau=0.3, iterations=2), None),
    ),
]


def test_every_rule_has_a_case_for_its_object():
    assert {name for name, _, _ in RULE_CASES} == set(AGGREGATORS)


@pytest.mark.parametrize("name, fields, reference", RULE_CASES, ids=[f"{n}-{'-'.join(f)}" for n, f, _ in RULE_CASES])
def test_each_rule_object_returns_its_pure_functions_aggregate_and_selection(name, fields, reference):
    updates = torch.randn(11, 6, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    rule = AGGREGATORS[name].from_config(config(name, **fields), f=2)
    assert rule.name == name and rule.f == 2
    value, selected = rule(updates)
    expected_value, expected_selected = reference(updates)
    assert torch.equal(value, expected_value)
    assert (selected is None) == (expected_selected is None)
    if selected is not None:
        assert torch.equal(selected, expected_selected)


def test_each_pre_aggregator_object_returns_its_pure_functions_rows_and_their_members():
    updates = torch.randn(9, 4, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    assert set(PRE_AGGREGATORS) == {"nnm", "bucketing", "clipping"}
    mixed, members = NNM(f=2)(updates)
    assert torch.equal(mixed, nnm(updates, f=2)) and members is None
    clipped, members = StaticClipping(threshold=0.5)(updates)
    assert torch.equal(clipped, static_clipping(updates, 0.5)) and members is None
    buckets, members = Bucketing(bucket_size=2, generator=torch.Generator().manual_seed(4))(updates)
    mixing = bucketing_matrix(9, 2, torch.Generator().manual_seed(4), updates.dtype)
    assert torch.equal(buckets, bucketing(updates, 2, torch.Generator().manual_seed(4)))
    assert torch.equal(members, mixing > 0) and Bucketing(2, torch.Generator()).rows_out(9) == 5


def test_a_rule_refuses_on_call_the_n_its_f_does_not_allow():
    # Checked on every call, not only by check(n) before training: 4 updates cannot outvote f = 2.
    with pytest.raises(UserError, match=r"^median needs n > 2f \(n=4, f=2\)"):
        build_aggregator(config("median"), f=2, seed=0)(torch.randn(4, 3))


def test_a_resumed_bucketing_draws_the_buckets_the_uninterrupted_one_would():
    updates = torch.randn(10, 3, generator=torch.Generator().manual_seed(18))
    uninterrupted = Bucketing(2, torch.Generator().manual_seed(5))
    uninterrupted(updates)
    resumed, fresh = Bucketing(2, torch.Generator().manual_seed(6)), Bucketing(2, torch.Generator().manual_seed(6))
    resumed.load_state_dict(uninterrupted.state_dict())
    expected = uninterrupted(updates)
    assert torch.equal(resumed(updates).members, expected.members)
    assert not torch.equal(fresh(updates).members, expected.members)


@pytest.mark.parametrize(
    "make, state, message",
    [
        (lambda: AGGREGATORS["median"](f=1), {"centre": None}, r"^median state must have exactly the keys \[\]"),
        (
            lambda: CenteredClipping(f=1, tau=1.0),
            {"centre": torch.zeros(2, 2)},
            r"^centered_clipping state 'centre' must be None or a 1-D floating tensor",
        ),
        (
            lambda: Bucketing(2, torch.Generator()),
            {"generator": torch.zeros(3, dtype=torch.uint8)},
            r"^bucketing state 'generator' must be a CPU generator's state",
        ),
        (lambda: NNM(f=1), [], r"^nnm state must have exactly the keys \[\], got list"),
        (
            lambda: build_aggregator(config("krum"), f=1, seed=0),
            build_aggregator(config("median"), f=1, seed=0).state_dict(),
            r"^aggregator state is for \['median'\], not \['krum'\]",
        ),
        (
            # The layout before rules were objects: one generator beside the rule's state.
            lambda: build_aggregator(config("median", pre=["bucketing"]), f=1, seed=0),
            {"name": "median", "rule": {}, "generator": torch.Generator().get_state()},
            r"^aggregator state must have exactly the keys \['pipeline', 'pre', 'rule'\]",
        ),
    ],
    ids=["stateless", "centre", "generator", "not-a-dict", "other-rule", "old-layout"],
)
def test_loading_a_state_the_object_did_not_write_is_refused_in_one_line(make, state, message):
    with pytest.raises(UserError, match=message) as failure:
        make().load_state_dict(state)
    assert "\n" not in str(failure.value) and "start the run again" in str(failure.value)


def test_unknown_names_list_the_choices():
    with pytest.raises(UserError, match="unknown aggregator 'krumm'; choose one of: mean, median"):
        build_aggregator(config("krumm"), f=1, seed=0)
    with pytest.raises(UserError, match="unknown pre-aggregator 'mix'; choose one of: nnm, bucketing, clipping"):
        build_aggregator(config("mean", pre=["mix"]), f=1, seed=0)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"name": "centered_clipping", "tau": -1.0}, "centered_clipping needs tau > 0"),
        ({"name": "geometric_median", "max_iter": 0}, "geometric_median needs max_iter >= 1"),
        ({"name": "multi_krum", "m": 0}, "multi_krum needs m >= 1 or null"),
        ({"name": "mean", "pre": ["bucketing"], "bucket_size": 0}, "bucketing needs bucket_size >= 1"),
        ({"name": "mean", "pre": ["clipping"], "clip_threshold": 0.0}, "clipping needs clip_threshold > 0"),
    ],
)
def test_out_of_range_parameters_fail_at_build(fields, message):
    with pytest.raises(UserError, match=message):
        build_aggregator(config(**fields), f=1, seed=0)


def test_check_reports_the_rule_precondition_after_bucketing():
    aggregator = build_aggregator(config("krum", pre=["bucketing"], bucket_size=2), f=2, seed=0)
    aggregator.check(14)  # 7 buckets > 2f + 2
    with pytest.raises(UserError, match=r"^krum needs n > 2f \+ 2 \(n=6, f=2\)"):
        aggregator.check(12)


def test_pipeline_applies_pre_aggregators_in_order_then_the_rule():
    updates = torch.randn(10, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    aggregator = build_aggregator(config("median", pre=["clipping", "nnm"], clip_threshold=0.5), f=2, seed=0)
    assert torch.allclose(aggregator(updates).value, median(nnm(static_clipping(updates, 0.5), f=2)))


def test_krum_after_nnm_reports_the_selected_client():
    updates = torch.cat([torch.randn(8, 4, generator=torch.Generator().manual_seed(9)), torch.full((2, 4), 1e6)])
    result = build_aggregator(config("krum", pre=["nnm"]), f=2, seed=0)(updates)
    assert result.selected.numel() == 1 and result.selected.item() < 8


def test_multi_krum_after_bucketing_reports_the_members_of_the_selected_buckets():
    updates = torch.randn(12, 4, generator=torch.Generator().manual_seed(10))
    result = build_aggregator(config("multi_krum", pre=["bucketing"], m=2), f=1, seed=0)(updates)
    # The same seed draws the same buckets: recompute them and the two Multi-Krum picks among them.
    buckets = bucketing_matrix(12, 2, torch.Generator().manual_seed(0), updates.dtype)
    picked = krum_select(buckets @ updates, 1, 2)
    expected = (buckets[picked] > 0).any(dim=0).nonzero().flatten()
    assert torch.equal(result.selected.sort().values, expected)


def test_multi_krum_m_above_the_bucketed_count_fails_before_training():
    aggregator = build_aggregator(config("multi_krum", pre=["bucketing"], m=9), f=1, seed=0)
    with pytest.raises(UserError, match=r"multi_krum averages aggregator.m=9 of the 6 updates it receives"):
        aggregator.check(12)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_non_finite_rows_are_dropped_and_the_rest_aggregated_with_the_same_f(name):
    honest = torch.randn(13, 4, generator=torch.Generator().manual_seed(12))
    poisoned = torch.cat([honest[:4], torch.full((1, 4), float("inf")), honest[4:], torch.full((1, 4), float("nan"))])
    pre = ["nnm"] if name == "median" else []
    result = build_aggregator(config(name, pre=pre), f=2, seed=0)(poisoned)
    # A dropped row may have been honest: the 13 finite rows may still hold 2 Byzantine ones.
    reference = build_aggregator(config(name, pre=pre), f=2, seed=0)(honest)
    assert torch.isfinite(result.value).all()
    assert torch.allclose(result.value, reference.value)
    if result.selected is not None:
        # Indices refer to the rows as sent: the honest rows after the inf one moved up by one.
        rows = torch.tensor([0, 1, 2, 3, *range(5, 14)])
        assert torch.equal(result.selected, rows[reference.selected])


def test_an_honest_nan_row_does_not_lower_f_for_the_byzantine_rows():
    # Issue 11 finding 8: n = 7, f = 2, one honest NaN row and two Byzantine rows at 1e6. Counting the
    # NaN row against f trimmed one value per side and returned about 2.5e5 per coordinate.
    honest = torch.randn(4, 3, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    updates = torch.cat([honest, torch.full((1, 3), float("nan")), torch.full((2, 3), 1e6)])
    aggregate = build_aggregator(config("trimmed_mean"), f=2, seed=0)(updates).value
    assert (aggregate >= honest.min(dim=0).values).all() and (aggregate <= honest.max(dim=0).values).all()


@pytest.mark.parametrize(
    ("name", "n", "non_finite", "condition"),
    [
        ("trimmed_mean", 5, 1, "trimmed_mean needs n > 2f (n=4, f=2)"),
        ("krum", 7, 1, "krum needs n > 2f + 2 (n=6, f=2)"),
        ("median", 5, 5, "median needs n > 2f (n=0, f=2)"),
        ("mean", 5, 5, "mean needs at least one update, got n=0"),
    ],
)
def test_too_few_finite_rows_for_the_precondition_fail_the_round_with_one_line(name, n, non_finite, condition):
    updates = torch.randn(n, 3, generator=torch.Generator().manual_seed(15))
    updates[:non_finite] = float("nan")
    with pytest.raises(AggregationFailed) as failure:
        build_aggregator(config(name), f=2, seed=0)(updates)
    message = str(failure.value)
    assert isinstance(failure.value, UserError) and "\n" not in message
    assert f"{non_finite} of {n} updates had non-finite entries" in message and condition in message
    assert "lower train.lr" in message


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "geometric_median", "centered_clipping"])
@pytest.mark.parametrize("n", [4, 10])
def test_rules_claiming_robustness_need_fewer_than_half_byzantine(name, n):
    aggregator = build_aggregator(config(name), f=n // 2 - 1, seed=0)
    aggregator.check(n)
    with pytest.raises(UserError) as failure:
        build_aggregator(config(name), f=n // 2, seed=0).check(n)
    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"{name} needs n > 2f (n={n}, f={n // 2})")


def test_the_mean_claims_no_robustness_and_runs_under_any_f():
    build_aggregator(config("mean"), f=9, seed=0).check(10)


def test_a_federated_round_left_without_enough_finite_updates_stops_the_run_after_its_last_checkpoint(
    tiny_config, tmp_path, monkeypatch
):
    cfg = tiny_config(
        "federation=fedavg", "federation.clients=4", "federation.rounds=3", "train.batch_size=32",
        "privacy.target_epsilon=inf", "aggregator=median", "attack=sign_flip", "attack.byzantine=1",
    )
    real_update, calls = federated.local_update, []

    def diverging_in_round_two(*args, **kwargs):
        # Four clients train per round: calls 5 and 6 are two of round two's.
        update = real_update(*args, **kwargs)
        calls.append(1)
        return LocalUpdate(torch.full_like(update.delta, float("nan")), update.loss) if len(calls) in (5, 6) else update

    monkeypatch.setattr(federated, "local_update", diverging_in_round_two)
    with pytest.raises(AggregationFailed, match=r"^2 of 4 updates had non-finite entries .* median needs n > 2f \(n=2, f=1\)"):
        pipeline.train(cfg, tmp_path)
    assert Checkpoint.load(tmp_path, recipe_hash(cfg)).completed == 1
    assert not (tmp_path / "metrics.json").exists()


def test_huge_finite_outliers_do_not_overflow_the_distances():
    honest = torch.randn(9, 4, generator=torch.Generator().manual_seed(13))
    updates = torch.cat([honest, torch.full((2, 4), 1e20)])
    for rule in (partial(geometric_median, tol=1e-12, max_iter=500), partial(krum, f=2), partial(multi_krum, f=2)):
        out = rule(updates)
        assert torch.isfinite(out).all() and out.abs().max() < 10


def test_pipeline_state_resumes_buckets_and_centre():
    updates = torch.randn(9, 4, generator=torch.Generator().manual_seed(11))
    cfg = config("centered_clipping", pre=["bucketing"], tau=0.5)
    original = build_aggregator(cfg, f=1, seed=3)
    original(updates)
    resumed = build_aggregator(cfg, f=1, seed=99)
    resumed.load_state_dict(original.state_dict())
    assert torch.equal(resumed(updates).value, original(updates).value)


@pytest.mark.parametrize("path", sorted((CONF / "aggregator").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_aggregator_config_merges_into_the_schema_and_builds(path):
    cfg = OmegaConf.merge(OmegaConf.structured(AggregatorConfig), OmegaConf.load(path))
    assert cfg.name == path.stem
    aggregator = build_aggregator(cfg, f=1, seed=0)
    assert aggregator(torch.randn(9, 3)).value.shape == (3,)


def test_every_rule_has_a_config_file():
    assert {p.stem for p in (CONF / "aggregator").glob("*.yaml")} == set(AGGREGATORS)


def test_hydra_composes_the_aggregator_and_attack_groups(tiny_config):
    cfg = tiny_config("aggregator=bulyan", "aggregator.pre=[nnm]", "attack=min_max", "attack.byzantine=2")
    assert cfg.aggregator.name == "bulyan" and list(cfg.aggregator.pre) == ["nnm"]
    assert cfg.attack.name == "min_max" and cfg.attack.perturbation == "unit_vec" and cfg.attack.byzantine == 2
