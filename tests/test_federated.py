"""The federated recipe end to end: partitions, FedAvg under Byzantine clients, robust aggregation,
sample- and user-level DP accounting, the backdoor metric, resume, and the audit's members."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import TensorDataset

from conftest import interrupt_at_round, same_weights
from dptrain import pipeline
from dptrain.audit import reference
from dptrain.errors import UserError
from dptrain.models import build_model
from dptrain.privacy import epsilon_spent
from dptrain.poisoning import stamp_trigger
from dptrain.privacy.crosscheck import pld_epsilon
from dptrain.robust import build_attack
from dptrain.tracking.artifacts import METRICS_KEYS
from dptrain.training.metrics import RunMetrics
from dptrain.training import clients, federated
from dptrain.validation import validate
from dptrain.training.target import load_data

# Ten clients, eight rounds of all of them, no DP: about a second on a 2-core CPU.
FED = (
    "federation=fedavg",
    "federation.clients=10",
    "federation.rounds=8",
    "train.batch_size=32",
    "privacy.target_epsilon=inf",
)


@pytest.fixture(autouse=True)
def one_thread():
    # The models have a few hundred parameters: intra-op threads only add synchronization.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fed_config(tiny_config):
    return lambda *overrides: tiny_config(*FED, *overrides)


def _metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> list[float]:
    return [event.value for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """FedAvg on digits without attack or DP, shared by the schema and TensorBoard tests."""
    from conftest import TINY, make_config

    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("fedavg")
    metrics = pipeline.train(make_config(*TINY, *FED), run_dir)[0].to_dict()
    return run_dir, metrics


def test_iid_and_dirichlet_partitions_give_every_member_to_exactly_one_client(fed_config):
    labels = np.repeat(np.arange(10), 40)
    for partition in ("iid", "dirichlet"):
        cfg = fed_config(f"federation.partition={partition}", "federation.alpha=0.1")
        parts = clients.partition_members(cfg, len(labels), labels)
        assert len(parts) == 10 and np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    iid = clients.partition_members(fed_config(), len(labels), labels)
    dirichlet = fed_config("federation.partition=dirichlet", "federation.alpha=0.1")
    skewed = clients.partition_members(dirichlet, len(labels), labels)
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    classes = lambda parts: np.mean([len(np.unique(labels[part])) for part in parts])  # noqa: E731
    assert classes(skewed) < 0.6 * classes(iid)


def test_the_clients_train_on_the_partition_of_the_members(fed_config, tmp_path):
    cfg = fed_config("federation.partition=dirichlet", "federation.rounds=1")
    metrics = pipeline.train(cfg, tmp_path)[0].to_dict()
    _, sizes = validate(cfg)
    labels = federated.member_labels(cfg)
    parts = clients.partition_members(cfg, sizes.members, labels)
    assert metrics["client_sizes"] == [len(p) for p in parts]
    assert sum(metrics["client_sizes"]) == metrics["members"] == metrics["honest_members"]
    assert metrics["audited_members"] <= metrics["honest_members"]
    # Each client holds exactly the member records at its positions of the partition.
    data, _, _ = load_data(cfg, tmp_path, reuse_split=True)
    plan = federated.plan(cfg, sizes)
    built = federated.build_clients(data.members, data.num_classes, parts, plan, build_attack(cfg.attack, cfg.train.seed))
    for client, part in zip(built, parts):
        assert all(torch.equal(mine, whole[part]) for mine, whole in zip(client.data.tensors, data.members.tensors))


def test_fedavg_without_attack_reaches_the_centralized_accuracy_range_on_digits(clean_run):
    _, metrics = clean_run
    assert metrics["test_accuracy"] > 0.85 and metrics["epsilon"] is None


def test_metrics_json_keeps_the_results_schema_and_adds_the_federated_fields(clean_run):
    run_dir, metrics = clean_run
    assert _metrics(run_dir) == metrics == RunMetrics.from_dict(metrics).to_dict()
    assert set(METRICS_KEYS) <= set(metrics)
    assert (metrics["rounds"], metrics["clients"], metrics["byzantine"]) == (8, 10, 0)
    assert (metrics["aggregator"], metrics["pre"], metrics["dp_level"]) == ("mean", [], "sample")


def test_tensorboard_has_a_point_per_round_for_each_federated_scalar(clean_run):
    events = _events(clean_run[0])
    for tag in ("fed/test_accuracy", "fed/update_norm/honest", "fed/aggregation_seconds", "fed/client_loss"):
        assert [event.step for event in events.Scalars(tag)] == list(range(1, 9)), tag
    assert _scalars(events, "fed/test_accuracy")[-1] == pytest.approx(clean_run[1]["test_accuracy"])


@pytest.mark.parametrize("attack", [("attack=gaussian", "attack.noise_std=1e6"), ("attack=sign_flip", "attack.scale=1e6")])
@pytest.mark.parametrize("aggregator", ["mean", "median", "trimmed_mean"])
def test_huge_attackers_collapse_the_mean_while_median_and_trimmed_mean_hold(fed_config, tmp_path, aggregator, attack):
    cfg = fed_config(f"aggregator={aggregator}", *attack, "attack.byzantine=3")
    metrics = pipeline.train(cfg, tmp_path)[0].to_dict()
    if aggregator == "mean":
        assert metrics["test_accuracy"] < 0.3
    else:
        assert metrics["test_accuracy"] > 0.8
    events = _events(tmp_path)
    assert min(_scalars(events, "fed/update_norm/byzantine")) > 1e5
    assert max(_scalars(events, "fed/update_norm/honest")) < 1e3


def test_multi_krum_logs_whom_it_selected_and_the_byzantine_share_of_them(fed_config, tmp_path):
    cfg = fed_config("aggregator=multi_krum", "attack=alie", "attack.byzantine=2")
    metrics = pipeline.train(cfg, tmp_path)[0].to_dict()
    events = _events(tmp_path)
    fractions = _scalars(events, "fed/byzantine_selected_fraction")
    texts = [event.tensor_proto.string_val[0].decode() for event in events.Tensors("fed/selected/text_summary")]
    assert len(texts) == len(fractions) == 8
    byzantine = set(metrics["byzantine_clients"])
    for text, fraction in zip(texts, fractions):
        selected = json.loads(re.search(r"selected clients (\[[\d, ]*\])", text).group(1))
        assert len(selected) == 10 - 2
        assert fraction == pytest.approx(len(byzantine & set(selected)) / len(selected))
    assert metrics["byzantine_selected_fraction"] == pytest.approx(np.mean(fractions))


def test_krum_never_selects_a_huge_outlier(fed_config, tmp_path):
    cfg = fed_config("aggregator=krum", "attack=gaussian", "attack.noise_std=1e6", "attack.byzantine=3")
    metrics = pipeline.train(cfg, tmp_path)[0].to_dict()
    assert metrics["byzantine_selected_fraction"] == 0.0 and metrics["test_accuracy"] > 0.6


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("federation.dp_level=user", "aggregator=median", "privacy.target_epsilon=3"), "federation.dp_level=user"),
        (("aggregator=krum", "attack=alie", "attack.byzantine=4"), "krum needs n > 2f + 2 (n=10, f=4)"),
        (("aggregator=bulyan", "attack=alie", "attack.byzantine=2"), "bulyan needs n >= 4f + 3"),
        (("federation.clients=1",), "federation.clients=1 must be at least 2"),
        (("federation.clients=600",), "federation.clients=600 exceeds the 575 member records"),
        # RMIA's reference federations partition the 288 population records over the same clients.
        (("federation.clients=300", "audit=standard"), "clients on the 288 population records"),
        (("federation.clients_per_round=11",), "federation.clients_per_round=11"),
        (("attack=sign_flip", "attack.byzantine=10"), "attack.byzantine=10 must be in [0, federation.clients_per_round"),
        (("federation.partition=shards",), "federation.partition=shards is unknown"),
        (("federation.partition=dirichlet", "federation.alpha=0"), "federation.alpha=0.0 must be positive"),
        (("federation.dp_level=client",), "federation.dp_level=client is unknown"),
        (("attack.byzantine=2",), "attack.byzantine=2 with attack=none"),
        (
            ("federation.dp_level=user", "privacy.target_epsilon=3", "attack=mimic", "attack.byzantine=2"),
            "attack=mimic crafts its updates from the honest clients' unclipped ones",
        ),
    ],
)
def test_each_invalid_federation_fails_before_training_with_one_line(fed_config, tmp_path, overrides, expected):
    with pytest.raises(UserError) as error:
        pipeline.train(fed_config(*overrides), tmp_path)
    message = str(error.value)
    assert expected in message and "\n" not in message
    assert not (tmp_path / "split.json").exists()


def test_robust_rules_still_need_a_federation(tiny_config):
    with pytest.raises(UserError, match="aggregator=krum attack=none need several clients"):
        validate(tiny_config("aggregator=krum"))


def test_dp_fedavg_clips_each_update_and_divides_by_the_expected_client_count():
    updates = torch.tensor([[30.0, 40.0], [0.3, 0.4], [0.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    mean = federated.dp_fedavg(updates, expected_clients=4.0, clip=1.0, noise_multiplier=0.0, generator=generator)
    assert torch.allclose(mean, torch.tensor([0.6 + 0.3, 0.8 + 0.4]) / 4)
    noise = torch.stack(
        [federated.dp_fedavg(torch.zeros(0, 1000), 4.0, 2.0, 3.0, generator) for _ in range(20)]
    )
    assert noise.std().item() == pytest.approx(3.0 * 2.0 / 4.0, rel=0.05)


def test_user_level_epsilon_is_the_accountants_over_rounds_at_the_client_sampling_rate(fed_config, tmp_path):
    cfg = fed_config("federation.dp_level=user", "federation.clients_per_round=5", "privacy.target_epsilon=3")
    metrics = pipeline.train(cfg, tmp_path)[0].to_dict()
    assert (metrics["sample_rate"], metrics["steps"], metrics["max_grad_norm"]) == (0.5, 8, 1.0)
    expected = epsilon_spent(
        accountant="prv", noise_multiplier=metrics["noise_multiplier"], sample_rate=0.5, steps=8, delta=1e-5
    )
    assert metrics["epsilon"] == expected
    assert 0.99 * 3.0 <= metrics["epsilon"] <= 3.0
    rdp = epsilon_spent(
        accountant="rdp", noise_multiplier=metrics["noise_multiplier"], sample_rate=0.5, steps=8, delta=1e-5
    )
    assert _scalars(_events(tmp_path), "privacy/epsilon_rdp")[-1] == pytest.approx(rdp)
    # The independent PLD recomputation of the server's mechanism, and the reported epsilon covers it.
    assert metrics["epsilon_pld"] == pytest.approx(
        pld_epsilon([{"noise_multiplier": metrics["noise_multiplier"], "sample_rate": 0.5, "steps": 8}], 1e-5)
    )
    assert metrics["epsilon"] >= 0.99 * metrics["epsilon_pld"]


def test_user_level_samples_clients_independently_at_the_planned_rate(fed_config):
    cfg = fed_config("federation.dp_level=user", "federation.clients_per_round=3", "federation.rounds=400")
    schedule = clients.participation(cfg)
    assert schedule.mean() == pytest.approx(0.3, abs=0.02)
    assert len(set(schedule.sum(axis=1))) > 3


def test_sample_level_reports_the_largest_honest_client_epsilon_within_the_target(fed_config, tmp_path):
    # Each client of a Dirichlet partition needs its own calibration.
    cfg = fed_config(
        "privacy.target_epsilon=2",
        "federation.partition=dirichlet",
        "federation.clients_per_round=6",
        "attack=sign_flip",
        "attack.byzantine=2",
        "aggregator=trimmed_mean",
    )
    metrics = pipeline.train(cfg, tmp_path)[0].to_dict()
    epsilons = metrics["client_epsilons"]
    honest = [e for i, e in enumerate(epsilons) if i not in metrics["byzantine_clients"] and e is not None]
    assert metrics["epsilon"] == max(honest) == metrics["client_epsilons"][metrics["reported_client"]]
    # Each client's noise was calibrated to its own participation, so each spends almost all of it.
    assert all(0.99 * 2.0 <= e <= 2.0 for e in honest)
    assert 0.99 * metrics["epsilon_pld"] <= metrics["epsilon"]
    assert len(set(metrics["client_sizes"])) > 1
    recomputed = epsilon_spent(
        accountant="prv",
        noise_multiplier=metrics["noise_multiplier"],
        sample_rate=metrics["sample_rate"],
        steps=metrics["steps"],
        delta=1e-5,
    )
    assert recomputed == pytest.approx(metrics["epsilon"])
    mechanisms = metrics["client_mechanisms"]
    assert all(mechanisms[i] is None for i in metrics["byzantine_clients"])
    assert mechanisms[metrics["reported_client"]] == {k: metrics[k] for k in ("noise_multiplier", "sample_rate", "steps")}
    assert len({tuple(m.values()) for m in mechanisms if m is not None}) > 1


def test_backdoor_reports_the_success_rate_on_triggered_inputs_of_other_classes(fed_config, tmp_path):
    cfg = fed_config("attack=backdoor", "attack.byzantine=3", "attack.target_label=0")
    metrics = pipeline.train(cfg, tmp_path)[0].to_dict()
    model = build_model(cfg.model, (1, 8, 8), 10)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    test = federated.load_target(cfg, tmp_path).data.test
    inputs, labels = test.tensors
    others = labels != 0
    with torch.no_grad():
        triggered = stamp_trigger(inputs[others], cfg.attack.trigger_size, cfg.attack.trigger_value)
        predicted = model(triggered).argmax(dim=1)
    assert metrics["backdoor_success_rate"] == pytest.approx((predicted == 0).float().mean().item())
    assert 0 <= metrics["backdoor_success_rate"] <= 1 and metrics["test_accuracy"] > 0.5
    logged = _scalars(_events(tmp_path), "fed/backdoor_success_rate")
    assert logged[-1] == pytest.approx(metrics["backdoor_success_rate"])


def test_resume_after_an_interruption_matches_the_uninterrupted_run(fed_config, tmp_path, monkeypatch):
    overrides = (
        "privacy.target_epsilon=3",
        "federation.rounds=4",
        "federation.clients_per_round=6",
        "aggregator=centered_clipping",
        "attack=gaussian",
        "attack.byzantine=2",
    )
    uninterrupted = pipeline.train(fed_config(*overrides), tmp_path / "a")[0]

    interrupt_at_round(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(fed_config(*overrides), tmp_path / "b")
    assert not (tmp_path / "b" / "metrics.json").exists()
    monkeypatch.undo()

    resumed = pipeline.train(fed_config(*overrides, f"train.resume={tmp_path / 'b'}"), tmp_path / "b")[0]
    assert resumed.epsilon == uninterrupted.epsilon
    assert resumed.federation.client_epsilons == uninterrupted.federation.client_epsilons
    assert same_weights(tmp_path / "a", tmp_path / "b")


def test_audit_of_the_federated_model_takes_the_honest_records_as_members(fed_config, tmp_path):
    cfg = fed_config("audit=fast", "attack=sign_flip", "attack.byzantine=3", "aggregator=median")
    metrics, report = pipeline.train(cfg, tmp_path)
    metrics = metrics.to_dict()
    byzantine_records = sum(metrics["client_sizes"][i] for i in metrics["byzantine_clients"])
    assert metrics["honest_members"] == 575 - byzantine_records
    # Label stratification may leave out a few honest records, never add others.
    assert report.members == report.non_members == metrics["audited_members"] <= metrics["honest_members"]
    assert report.mia["loss"].n_members == metrics["audited_members"]
    assert json.loads((tmp_path / "audit.json").read_text())["members"] == metrics["audited_members"]
    assert pipeline.audit(cfg, tmp_path).members == metrics["audited_members"]


def test_clients_the_schedule_never_picked_are_no_members_of_the_audit(fed_config, tmp_path):
    cfg = fed_config("federation.dp_level=user", "federation.clients_per_round=2", "federation.rounds=2")
    plan = federated.plan(cfg, validate(cfg)[1])
    idle = np.flatnonzero(~plan.participation.any(axis=0))
    assert len(idle) > 0  # 2 rounds at rate 0.2 leave most of the 10 clients out
    metrics = pipeline.train(cfg, tmp_path)[0].to_dict()
    trained = sum(size for i, size in enumerate(metrics["client_sizes"]) if i not in idle)
    assert trained < metrics["members"]
    assert trained == metrics["honest_members"]
    assert len(federated.load_target(cfg, tmp_path).data.members) == metrics["audited_members"] <= trained


def test_honest_members_and_non_members_of_the_audit_are_disjoint_parts_of_the_split(fed_config, tmp_path):
    cfg = fed_config("attack=sign_flip", "attack.byzantine=3", "federation.rounds=1")
    pipeline.train(cfg, tmp_path)
    target = federated.load_target(cfg, tmp_path)
    split = target.data.split
    assert len(split.members) == len(split.non_members) == len(target.data.members) == len(target.data.non_members)
    assert not set(split.members) & set(split.non_members)
    assert isinstance(target.data.members, TensorDataset)


def _reference_calls(cfg, tmp_path, monkeypatch, scheme: str, count: int, min_in: int = 0):
    """Train ``count`` reference models of ``cfg``'s federated target in this process and return
    every ``train_federation`` call they made: (derived config, plan, records), with the target's plan."""
    target_plan = federated.plan(cfg, validate(cfg)[1])
    data, _, _ = load_data(cfg, tmp_path, reuse_split=False)
    calls, real = [], federated.train_federation

    def spy(derived, plan, records, **kwargs):
        calls.append((derived, plan, records))
        return real(derived, plan, records, **kwargs)

    monkeypatch.setattr(federated, "train_federation", spy)
    features, labels = (torch.cat(pair) for pair in zip(data.members.tensors, data.non_members.tensors))
    # Each audited record's first pixel is its index, so a test can tell where it went.
    features[:, 0, 0, 0] = torch.arange(len(features), dtype=features.dtype)
    audited = TensorDataset(features, labels)
    references = reference.train_references(
        cfg, target_plan, audited=audited, population=data.population, input_shape=data.input_shape,
        num_classes=data.num_classes, scheme=scheme, count=count, seed=0, workers=1, cache_dir=None, min_in=min_in,
    )
    return target_plan, data, calls, references


def test_a_user_level_targets_reference_is_a_dp_fedavg_federation_at_the_servers_noise(
    fed_config, tmp_path, monkeypatch
):
    cfg = fed_config(
        "federation.dp_level=user", "federation.clients_per_round=5", "federation.rounds=3",
        "privacy.target_epsilon=null", "privacy.noise_multiplier=1.5",
    )
    target, data, calls, _ = _reference_calls(cfg, tmp_path, monkeypatch, "population", 1)
    ((derived, plan, records),) = calls
    assert derived.federation == cfg.federation and derived.train.seed != cfg.train.seed
    # The server's DP-FedAvg step, one per round at q = 5 / 10, with the target's noise; clients train without.
    assert plan.dp_level == "user" and plan.private
    server, target_server = plan.guarantee, target.guarantee
    assert (server.noise_multiplier, server.sample_rate, server.steps) == (target_server.noise_multiplier, 0.5, 3) == (1.5, 0.5, 3)
    assert all(local is None or not local.private for local in plan.client_plans)
    assert torch.equal(records.tensors[0], data.population.tensors[0])


def test_a_sample_level_targets_reference_is_a_federation_of_clients_with_local_dp_sgd_plans(
    fed_config, tmp_path, monkeypatch
):
    # Batches of 64 hold every record of a client (q = 1), where RDP calibrates in milliseconds.
    cfg = fed_config(
        "federation.rounds=2", "privacy.target_epsilon=3", "privacy.accountant=rdp", "attack=sign_flip",
        "attack.byzantine=2", "aggregator=median", "train.batch_size=64",
    )
    _, data, calls, _ = _reference_calls(cfg, tmp_path, monkeypatch, "population", 1)
    ((derived, plan, records),) = calls
    assert (derived.aggregator, derived.attack, derived.federation) == (cfg.aggregator, cfg.attack, cfg.federation)
    assert plan.dp_level == "sample" and len(plan.byzantine) == 2
    assert sum(plan.client_sizes) == len(records) == len(data.population)
    # Each client of the reference federation runs DP-SGD planned for its own records, as the target's clients do.
    expected = clients.local_plans(derived, list(plan.client_sizes), plan.participation.sum(axis=0))
    assert list(plan.client_plans) == expected
    assert all(local.private and local.planned_epsilon <= 3 for local in plan.client_plans)


def test_lira_reference_federations_hold_each_record_in_half_their_sets_and_name_in_only_honest_trained_ones(
    fed_config, tmp_path, monkeypatch
):
    cfg = fed_config("federation.rounds=2", "attack=sign_flip", "attack.byzantine=3", "aggregator=median")
    _, data, calls, references = _reference_calls(cfg, tmp_path, monkeypatch, "halves", 4)
    audited_labels = torch.cat([data.members.tensors[1], data.non_members.tensors[1]])
    held = np.zeros(len(audited_labels), dtype=int)
    for j, (derived, plan, records) in enumerate(calls):
        parts = federated.client_partition(derived, records, plan)
        honest = federated.honest_trained(parts, plan)
        order = records.tensors[0][:, 0, 0, 0].long().numpy()
        assert torch.equal(audited_labels[order], records.tensors[1])
        held[order] += 1
        assert set(np.flatnonzero(references.audited_in[j])) == set(order[honest])
    assert (held == 2).all()
    in_counts = references.audited_in.sum(axis=0)
    assert in_counts.min() >= 1 and in_counts.max() <= 2
    # Asking for more IN models than any record can have is refused before a model trains.
    with pytest.raises(UserError, match="IN for fewer than 3 reference models"):
        _reference_calls(cfg, tmp_path / "again", monkeypatch, "halves", 4, min_in=3)
