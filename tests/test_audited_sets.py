"""Which records an audit treats as members when only some of them trained the model (honest ranks of
robust data parallelism, honest clients of a federation), its label-stratified non-members, and
where canaries train: pure functions, no processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import TINY, make_config
from dptrain.config import PrivacyConfig
from dptrain.validation import validate
from dptrain.data import stratified_pairs
from dptrain.privacy import make_private, plan_privacy
from dptrain.training import centralized, federated, ranks
from dptrain.training.distributed import canary_ranks, honest_positions, shard_positions
from dptrain.training.loop import train_epoch
from dptrain.training.target import load_data


def test_honest_positions_are_the_honest_ranks_shards_without_the_byzantine_shard_or_the_leftovers():
    # 11 records over 3 ranks: shards of 3 (every third record), records 9 and 10 left over.
    assert shard_positions(11, 0, 3).tolist() == [0, 3, 6]
    assert shard_positions(11, 1, 3).tolist() == [1, 4, 7]
    assert shard_positions(11, 2, 3).tolist() == [2, 5, 8]
    assert honest_positions(11, 3, byzantine=[1]).tolist() == [0, 2, 3, 5, 6, 8]
    assert honest_positions(11, 3, byzantine=[]).tolist() == list(range(9))


def test_canaries_train_on_the_honest_ranks_in_turn_by_index():
    assert canary_ranks(7, 4, byzantine=[0, 2]).tolist() == [1, 3, 1, 3, 1, 3, 1]
    assert canary_ranks(5, 3, byzantine=[]).tolist() == [0, 1, 2, 0, 1]


def test_stratified_pairs_give_both_sides_the_same_label_histogram_and_keep_the_smaller_side_whole():
    members = np.array([0] * 6 + [1] * 2 + [2] * 3)
    non_members = np.array([0] * 4 + [1] * 5 + [2] * 3 + [3] * 2)
    chosen, others = stratified_pairs(members, non_members, np.random.default_rng(0))
    # Per class min(members, non-members): 4 zeros, 2 ones, 3 twos, no threes.
    assert np.bincount(members[chosen], minlength=4).tolist() == [4, 2, 3, 0]
    assert np.bincount(non_members[others], minlength=4).tolist() == [4, 2, 3, 0]
    assert np.array_equal(chosen, np.unique(chosen)) and np.array_equal(others, np.unique(others))
    # Where a side is the smaller one it is taken whole: every member of class 1 and 2, every class-0 non-member.
    assert set(np.flatnonzero(members != 0)) <= set(chosen)
    assert set(np.flatnonzero(non_members == 0)) <= set(others)


def _rank_training_sets(cfg, data, canaries, world: int, monkeypatch) -> list:
    sets = []
    for rank in range(world):
        monkeypatch.setattr(ranks, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(ranks, "world_size", lambda: world)
        sets.append(centralized.training_set(cfg, data, canaries))
    return sets


def test_each_canary_coin_adds_or_removes_exactly_that_canary_on_one_honest_rank(tmp_path, monkeypatch):
    # The one-run bound needs each coin to toggle one record and nothing else, whatever the other coins say.
    cfg = make_config(
        *TINY, "launcher.nproc_per_node=3", "launcher.oversubscribe=true", "aggregator=median", "attack=sign_flip",
        "attack.byzantine=1",
        "audit.canaries.count=12",
    )
    data, canaries, _ = load_data(cfg, tmp_path, reuse_split=False)
    byzantine = centralized.byzantine_ranks(1, 3, cfg.train.seed)
    before = _rank_training_sets(cfg, data, canaries, 3, monkeypatch)
    shard = len(shard_positions(len(data.members), 0, 3))
    slots = canary_ranks(12, 3, byzantine)
    for rank, records in enumerate(before):
        held = len(records) - shard
        assert held == (0 if rank in byzantine else int((canaries.included & (slots == rank)).sum()))
    flipped = next(i for i in range(12) if not canaries.included[i])
    canaries.included[flipped] = True
    after = _rank_training_sets(cfg, data, canaries, 3, monkeypatch)
    changed = [rank for rank in range(3) if len(after[rank]) != len(before[rank])]
    assert changed == [canary_ranks(12, 3, byzantine)[flipped]] and changed[0] not in byzantine
    rank = changed[0]
    inserted = canaries.dataset(data.population.tensors[0], data.split.population)
    x_before, x_after = before[rank].tensors[0], after[rank].tensors[0]
    assert len(x_after) == len(x_before) + 1
    # The new record is that canary; every record the rank held before it still holds.
    assert any(torch.equal(row, inserted.tensors[0][flipped]) for row in x_after)
    assert all(any(torch.equal(row, other) for other in x_after) for row in x_before)


def test_robust_plan_is_the_member_shard_whatever_the_canaries(monkeypatch):
    overrides = (
        *TINY, "launcher.nproc_per_node=3", "launcher.oversubscribe=true", "aggregator=median", "attack=sign_flip",
        "attack.byzantine=1",
        "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0",
    )
    monkeypatch.setattr(ranks, "world_size", lambda: 3)
    plain = make_config(*overrides)
    with_canaries = make_config(*overrides, "audit.canaries.count=40")
    sizes = validate(plain)[1]
    # 575 members: shards of 191 at a local batch of 128 // 3 = 42, so 5 steps per epoch.
    assert centralized.plan(plain, sizes) == centralized.plan(with_canaries, sizes)
    assert centralized.plan(plain, sizes).steps_per_epoch == 5


@pytest.mark.parametrize(
    "privacy", [PrivacyConfig(target_epsilon=None, noise_multiplier=1.0), PrivacyConfig(name="none")]
)
def test_a_worker_holding_a_few_records_more_than_planned_keeps_the_plans_rate_and_steps(privacy):
    # The plan is for 100 records in batches of 10; the worker also holds 7 canaries.
    plan = plan_privacy(privacy, members=100, batch_size=10, epochs=1)
    model = torch.nn.Linear(3, 2)
    training = make_private(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dataset=TensorDataset(torch.randn(107, 3), torch.randint(0, 2, (107,))), plan=plan, cfg=privacy,
        batch_size=10, max_physical_batch_size=None, sampling_generator=torch.Generator().manual_seed(0),
        noise_generator=torch.Generator().manual_seed(1),
    )
    assert len(training.loader) == 10
    train_epoch(training, torch.device("cpu"))
    if plan.private:
        assert training.ledger.history == [(1.0, 0.1, 10)]


FED = ("federation=fedavg", "federation.clients=10", "federation.rounds=2", "privacy.target_epsilon=inf")


def test_federated_audit_non_members_match_the_trained_members_label_histogram_under_dirichlet_skew(tmp_path):
    # Byzantine clients that hold few records of some classes skew the honest members' labels.
    cfg = make_config(
        *TINY, *FED, "federation.partition=dirichlet", "federation.alpha=0.3", "attack=sign_flip",
        "attack.byzantine=4", "aggregator=median",
    )
    plan = federated.plan(cfg, validate(cfg)[1])
    data, _, _ = load_data(cfg, tmp_path, reuse_split=False)
    parts = federated.client_partition(cfg, data.members, plan)
    honest = federated.honest_trained(parts, plan)
    audited = federated.audited_data(cfg, data, parts, plan)
    members = audited.members.tensors[1].numpy()
    non_members = audited.non_members.tensors[1].numpy()
    assert np.array_equal(np.bincount(members, minlength=10), np.bincount(non_members, minlength=10))
    # Every audited member is a trained-on honest record; the split's indices say the same.
    assert set(audited.split.members) <= set(data.split.members[honest])
    assert set(audited.split.non_members) <= set(data.split.non_members)
    # A random subset of the non-members (what the audit drew before) is far from the skewed members.
    skewed = np.bincount(data.members.tensors[1].numpy()[honest], minlength=10) / len(honest)
    overall = np.bincount(data.non_members.tensors[1].numpy(), minlength=10) / len(data.non_members)
    assert 0.5 * np.abs(skewed - overall).sum() > 0.03
