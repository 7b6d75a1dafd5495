"""The Flower engine (``federation.engine=flower``) and ``RobustStrategy``: the same rounds as the
builtin engine, the same accounting, and one clear line for each setup it cannot run.

The equivalence tests deliver the engine's Messages to its ClientApp in this process (``InProcessGrid``),
exercising the messages, the ClientApp and the server's side without starting Ray; others run
``dptrain train`` under Flower's Simulation Engine and a deployment. All of them train (3 to 300 s on
2 shared cores) and are slow; the default tier checks validation and ``RobustStrategy``'s arithmetic."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from dptrain.data import load, make_split, prepare
from dptrain.errors import UserError
from dptrain.training import federated
from dptrain.validation.engine import validate_engine

FED = ("federation=fedavg", "federation.clients=3", "federation.rounds=2", "model=logreg", "aggregator=median")
NON_PRIVATE = ("privacy=none",)
# An explicit noise multiplier: no calibration, so the test stays fast.
PRIVATE = ("privacy.target_epsilon=null", "privacy.noise_multiplier=1.0", "train.batch_size=32")


@pytest.fixture
def flower_task(monkeypatch):
    """The task identity Flower's runtime gives a ServerApp process, which every new Message reads."""
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, key, value)


class InProcessGrid:
    """A Flower Grid stand-in: each Message goes to the ClientApp of its node, in this process, one
    SuperNode per partition id; replies come back in reverse order (the engine must key them by client)."""

    def __init__(self, app, clients: int) -> None:
        self.app, self.partitions = app, {1000 + i: i for i in range(clients)}

    def get_node_ids(self):
        return list(self.partitions)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Context, RecordDict

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            config = {"partition-id": self.partitions[node], "num-partitions": len(self.partitions)}
            context = Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})
            replies.append(self.app(message, context))
        return replies[::-1]


AGGREGATE = federated.FederatedServer._aggregate


def _rounds(cfg, monkeypatch, flower: bool):
    """Train the federation of ``cfg`` on one engine; return each round's aggregate and the federation."""
    aggregates = []

    def recording(self, updates):
        aggregation = AGGREGATE(self, updates)
        aggregates.append(aggregation[0].clone())
        return aggregation

    monkeypatch.setattr(federated.FederatedServer, "_aggregate", recording)
    local_training = None
    if flower:
        from dptrain.flower.engine import GridTraining, client_app

        app = client_app(lambda context: cfg)
        local_training = GridTraining(InProcessGrid(app, cfg.federation.clients), cfg.federation.clients)
    raw = load(cfg.dataset)
    data = prepare(raw, make_split(raw, cfg.dataset))
    plan = federated.federation_plan(cfg, len(data.members), data.members.tensors[1].numpy())
    run = federated.train_federation(
        cfg, plan, data.members, input_shape=data.input_shape, num_classes=data.num_classes,
        device=torch.device("cpu"), units=data.units, local_training=local_training,
    )  # fmt: skip
    return aggregates, run


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["alie", "label_flip"])
def test_flower_rounds_equal_the_builtin_engines_without_noise(tiny_config, monkeypatch, flower_task, attack):
    """ALIE is crafted at the server from the honest replies, label flipping by the Byzantine client
    on its own records: either way both engines aggregate the same updates in every round."""
    cfg = tiny_config(*FED, *NON_PRIVATE, f"attack={attack}", "attack.byzantine=1")
    builtin, _ = _rounds(cfg, monkeypatch, flower=False)
    flower, _ = _rounds(cfg, monkeypatch, flower=True)
    assert len(builtin) == len(flower) == 2
    for ours, theirs in zip(builtin, flower):
        assert ours.norm() > 0
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_flower_private_run_charges_each_clients_ledger_as_the_builtin_engine(tiny_config, monkeypatch, flower_task):
    """The ClientApp charges the client's own accountant and sends its state back: the server's record
    of every client's DP-SGD steps, and so every epsilon, equals the builtin engine's."""
    cfg = tiny_config(*FED, *PRIVATE, "attack=alie", "attack.byzantine=1")
    builtin_aggregates, builtin = _rounds(cfg, monkeypatch, flower=False)
    flower_aggregates, flower = _rounds(cfg, monkeypatch, flower=True)
    ours, theirs = builtin.server, flower.server
    histories = [[None if c.ledger is None else c.ledger.state_dict() for c in s.clients] for s in (ours, theirs)]
    assert histories[0] == histories[1]
    # Every honest client trained in both rounds, one local epoch each: b = ceil(n / 32) Poisson steps
    # per round at rate 1 / b (the plan's batches of 32 over b * 32 records), noise 1.0.
    for client in (c for c in theirs.clients if not c.byzantine):
        batches = math.ceil(len(client.data) / 32)
        assert [tuple(block) for block in client.ledger.history] == [(1.0, 1 / batches, 2 * batches)]
    assert theirs.client_epsilons() == ours.client_epsilons()
    assert theirs.check_spent() == ours.check_spent() > 0
    for a, b in zip(builtin_aggregates, flower_aggregates):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_flower_dp_fedavg_adds_the_builtin_engines_server_noise(tiny_config, monkeypatch, flower_task):
    """dp_level=user: Poisson-sampled clients (a round may send no message), clipping and Gaussian noise
    at the server: the same noisy aggregate each round, the same server ledger (one step per round)."""
    cfg = tiny_config(*FED[:-1], "federation.dp_level=user", "federation.clients_per_round=2",
                      "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0")  # fmt: skip
    builtin_aggregates, builtin = _rounds(cfg, monkeypatch, flower=False)
    flower_aggregates, flower = _rounds(cfg, monkeypatch, flower=True)
    assert flower.server.ledger.history == builtin.server.ledger.history == [(1.0, 2 / 3, 2)]
    assert len(flower_aggregates) == len(builtin_aggregates) == 2
    for a, b in zip(builtin_aggregates, flower_aggregates):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def _validation_config(tiny_config, *overrides):
    return tiny_config(*FED, *NON_PRIVATE, "federation.engine=flower", *overrides)


def test_flower_engine_without_flwr_is_refused_in_one_line(tiny_config, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    with pytest.raises(UserError, match=r'needs Flower, which is not installed: pip install "dptrain\[flower\]"'):
        validate_engine(_validation_config(tiny_config), cores=2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("federation.engine=spark",), "unknown federation.engine 'spark'; choose one of: builtin, flower"),
        (("federation.flower.backend=mp",), "federation.flower.backend=mp: flwr 1.42's Simulation Engine has one"),
        (("federation.flower.client_cpus=3",), "client_cpus=3.0 exceeds the 2 usable CPU cores"),
    ],
)
def test_flower_engine_setups_it_cannot_run_are_refused(tiny_config, overrides, message):
    pytest.importorskip("flwr")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_engine(_validation_config(tiny_config, *overrides), cores=2)


def test_flower_engine_needs_a_federation(tiny_config):
    with pytest.raises(UserError, match="federation.engine=flower runs a federation: add federation=fedavg"):
        validate_engine(tiny_config("federation.engine=flower"), cores=2)


def _replies(strategy, global_arrays, locals_):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    strategy._global = global_arrays.to_torch_state_dict()
    replies = []
    for i, local in enumerate(locals_):
        request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=10 + i, message_type="train")
        content = RecordDict({"arrays": ArrayRecord(torch_state_dict=local), "metrics": MetricRecord({"num-examples": 1})})
        replies.append(Message(content, reply_to=request))
    return replies


def test_robust_strategy_takes_the_coordinatewise_median_of_updates(flower_task):
    """Flower's replies are models; the strategy aggregates their updates from the global model it sent:
    median over 5 replies, one of them Byzantine (f=1), checked against NumPy's median."""
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord

    from dptrain.flower import RobustStrategy

    rng = np.random.default_rng(0)
    start = {"w": torch.tensor(rng.normal(size=(2, 3)), dtype=torch.float32), "b": torch.zeros(2)}
    locals_ = [{k: v + torch.tensor(rng.normal(size=v.shape), dtype=torch.float32) for k, v in start.items()} for _ in range(4)]
    locals_.append({k: v + 1e6 for k, v in start.items()})
    strategy = RobustStrategy("median", f=1, server_lr=0.5)
    arrays, metrics = strategy.aggregate_train(1, _replies(strategy, ArrayRecord(torch_state_dict=start), locals_))
    result = arrays.to_torch_state_dict()
    for key in start:
        updates = np.stack([(local[key] - start[key]).numpy() for local in locals_])
        expected = start[key].numpy() + 0.5 * np.median(updates, axis=0)
        np.testing.assert_allclose(result[key].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert metrics["updates"] == 5


def test_robust_strategy_refuses_a_round_below_krums_precondition(flower_task):
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord

    from dptrain.flower import RobustStrategy

    start = {"w": torch.zeros(3)}
    strategy = RobustStrategy("krum", f=1)
    replies = _replies(strategy, ArrayRecord(torch_state_dict=start), [{"w": torch.ones(3) * i} for i in range(4)])
    with pytest.raises(UserError, match=r"krum needs n > 2f \+ 2 \(n=4, f=1\)"):
        strategy.aggregate_train(1, replies)


@pytest.mark.slow
def test_dptrain_train_on_the_simulation_engine_matches_the_builtin_run(tmp_path):
    """``dptrain train federation.engine=flower`` under Ray: the run directory the builtin engine writes,
    the same model to float tolerance and the same epsilon."""
    pytest.importorskip("flwr")
    from conftest import run_dptrain

    common = [*FED, "attack=alie", "attack.byzantine=1", *PRIVATE, "audit=none", "train.progress=false"]
    runs = {}
    for engine in ("builtin", "flower"):
        result = run_dptrain("train", *common, f"federation.engine={engine}", f"hydra.run.dir={engine}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[engine] = tmp_path / engine
    metrics = {engine: json.loads((run / "metrics.json").read_text()) for engine, run in runs.items()}
    assert metrics["flower"]["epsilon"] == metrics["builtin"]["epsilon"] > 0
    assert metrics["flower"]["client_epsilons"] == metrics["builtin"]["client_epsilons"]
    models = {engine: torch.load(run / "model.pt", weights_only=True) for engine, run in runs.items()}
    for key, value in models["builtin"].items():
        torch.testing.assert_close(models["flower"][key], value, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in runs["flower"].iterdir()) == sorted(p.name for p in runs["builtin"].iterdir())


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(condition, seconds: float, what: str) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)


@pytest.mark.slow
def test_examples_flower_app_runs_on_a_superlink_with_three_supernodes(tmp_path):
    """Deployment on loopback, insecure (TLS is for real machines): a SuperLink, 3 SuperNodes holding
    partitions 0, 1, 2, and ``flwr run examples/flower_app`` for 2 private rounds, which writes the run
    directory with each client's epsilon."""
    pytest.importorskip("flwr")
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    port = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    app = tmp_path / "app"
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "flower_app", app)
    logs, processes = [], []

    def start(*command: str):
        log = open(tmp_path / f"process{len(processes)}.log", "w")
        logs.append(log)
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path))

    def flwr(*args: str, timeout: float = 60):
        return subprocess.run([str(bin_dir / "flwr"), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)

    try:
        start(str(bin_dir / "flower-superlink"), "--insecure", "--port", str(port), "--disable-runtime-dependency-installation")
        _wait_for(lambda: flwr("ls", "local-test").returncode == 0, 120, "the SuperLink")
        for partition in range(3):
            start(
                str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--node-config", f"partition-id={partition} num-partitions=3", "--port", str(_free_port()),
            )  # fmt: skip
        superlink_log = tmp_path / "process0.log"
        _wait_for(lambda: superlink_log.read_text().count("Activated node") >= 3, 120, "3 SuperNodes")
        run_dir = tmp_path / "run"
        overrides = (
            "federation=fedavg federation.clients=3 federation.rounds=2 model=logreg aggregator=median "
            "privacy.target_epsilon=3 audit=none train.progress=false"
        )
        result = flwr(
            "run", str(app), "local-test", "--stream",
            "--run-config", f"overrides='{overrides}' run-dir='{run_dir}'", timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        _wait_for(lambda: (run_dir / "manifest.json").exists(), 60, "the run directory")
    finally:
        for process in processes[::-1]:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        for log in logs:
            log.close()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["rounds"] == 2 and metrics["clients"] == 3
    assert len(metrics["client_epsilons"]) == 3 and 0 < metrics["epsilon"] <= 3


@pytest.mark.slow
def test_robust_strategy_in_a_flower_simulation_keeps_a_byzantine_client_out():
    """RobustStrategy("krum", f=1, pre=["nnm"]) driving a plain Flower ServerApp under the Simulation
    Engine: clients 1..4 move every coordinate by 1.01..1.04, client 0 by 1000. NNM replaces each honest
    update by the mean of the 4 honest ones (1.025) and the Byzantine one by (1000 + 1.04 + 1.03 + 1.02) / 4;
    Krum picks 1.025, so after 2 rounds every coordinate is 2.05."""
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from dptrain.flower import RobustStrategy

    final = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):
        strategy = RobustStrategy("krum", f=1, pre=["nnm"], min_train_nodes=5, min_available_nodes=5, fraction_evaluate=0.0)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_state_dict={"w": torch.zeros(4)}), num_rounds=2)
        final.update(result.arrays.to_torch_state_dict())

    client = ClientApp()

    @client.train()
    def train(message, context):
        # Imported here: ArrayRecord.to_torch_state_dict needs torch imported in the ClientApp's process.
        import torch as client_torch

        partition = int(context.node_config["partition-id"])
        shift = client_torch.tensor(1000.0 if partition == 0 else 1.0 + 0.01 * partition)
        w = message.content["arrays"].to_torch_state_dict()["w"] + shift
        content = RecordDict({"arrays": ArrayRecord(torch_state_dict={"w": w}), "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=message)

    run_simulation(server, client, num_supernodes=5, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    torch.testing.assert_close(final["w"], torch.full((4,), 2.05), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_flower_run_resumed_after_an_interruption_matches_the_uninterrupted_builtin_run(
    tiny_config, tmp_path, monkeypatch, flower_task
):
    """The whole pipeline on the Flower recipe (over an in-process grid, as a deployed ServerApp runs it):
    interrupted before round 3 and resumed, it spends what the uninterrupted builtin run spends, neither
    forgetting nor repeating a client's steps (their ledgers travel back from the checkpoint to the
    clients), and ends at its model."""
    from conftest import interrupt_at_round

    from dptrain import pipeline
    from dptrain.flower.engine import client_app, deployed_on

    overrides = (*FED, *PRIVATE, "federation.rounds=3", "attack=alie", "attack.byzantine=1")
    builtin = pipeline.train(tiny_config(*overrides), tmp_path / "builtin")[0]

    def on_flower(*more: str):
        cfg = tiny_config(*overrides, "federation.engine=flower", *more)
        with deployed_on(InProcessGrid(client_app(lambda context: cfg), cfg.federation.clients)):
            return pipeline.train(cfg, tmp_path / "flower")[0]

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        interrupt_at_round(patch, 2)
        on_flower()
    resumed = on_flower(f"train.resume={tmp_path / 'flower'}")
    assert resumed.epsilon == builtin.epsilon > 0
    assert resumed.federation.client_epsilons == builtin.federation.client_epsilons
    models = [torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("builtin", "flower")]
    for key in models[0]:
        torch.testing.assert_close(models[1][key], models[0][key], rtol=1e-5, atol=1e-6)


def test_epsilon_mod_reports_the_epsilon_composed_over_the_rounds_a_node_trained(flower_task):
    """A ClientApp with a fresh Opacus accountant each round (100 DP-SGD steps, sigma 1.1, q 0.05): the
    mod reports RDP's epsilon of 100 steps after the first round and of 200 after the second (RDP
    composes additively, so two blocks of 100 equal one of 200), and passes other messages unchanged."""
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from opacus.accountants import RDPAccountant

    from dptrain.flower.mods import epsilon_mod, record_accountant

    def train(message, context):
        accountant = RDPAccountant()
        accountant.history = [(1.1, 0.05, 100)]
        record_accountant(context, accountant)
        return Message(RecordDict({"metrics": MetricRecord({"loss": 0.5})}), reply_to=message)

    def epsilon_of(steps: int) -> float:
        accountant = RDPAccountant()
        accountant.history = [(1.1, 0.05, steps)]
        return accountant.get_epsilon(1e-5)

    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    mod = epsilon_mod(delta=1e-5)

    def message(kind: str):
        return Message(RecordDict({"config": ConfigRecord()}), dst_node_id=7, message_type=kind)

    first, second = (mod(message("train"), context, train).content["metrics"] for _ in range(2))
    assert first["epsilon"] == pytest.approx(epsilon_of(100), rel=1e-9)
    assert second["epsilon"] == pytest.approx(epsilon_of(200), rel=1e-9) and second["epsilon"] > first["epsilon"]
    assert second["loss"] == 0.5
    query = mod(message("query"), context, lambda m, c: Message(RecordDict({"metrics": MetricRecord({})}), reply_to=m))
    assert "epsilon" not in query.content["metrics"]
