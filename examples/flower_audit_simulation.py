"""A plain Flower app (FedAvg over 3 clients on scikit-learn's digits) whose ServerApp audits its final
global model with ``dptrain.flower.audit.audit_global_model``; the simulation lets it see the records.

    python examples/flower_audit_simulation.py [audit.json]

Members are exactly the 3 clients' partitions (all clients are honest here); non-members are as many
digits no client holds. Non-private local training, so the audit should find leakage.
"""

from __future__ import annotations

import json
import sys

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from dptrain.flower.audit import audit_global_model

CLIENTS, PER_CLIENT, ROUNDS, LOCAL_EPOCHS = 3, 150, 10, 5

torch.set_num_threads(1)
digits = load_digits()
order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
features = torch.tensor(digits.data, dtype=torch.float32)[order] / 16
labels = torch.tensor(digits.target)[order]
members = TensorDataset(features[: CLIENTS * PER_CLIENT], labels[: CLIENTS * PER_CLIENT])
non_members = TensorDataset(features[CLIENTS * PER_CLIENT : 2 * CLIENTS * PER_CLIENT], labels[CLIENTS * PER_CLIENT : 2 * CLIENTS * PER_CLIENT])


def new_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


client = ClientApp()


@client.train()
def train(message: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    part = int(context.node_config["partition-id"])
    x, y = (t[part * PER_CLIENT : (part + 1) * PER_CLIENT] for t in members.tensors)
    model = new_model()
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(LOCAL_EPOCHS):
        for batch in torch.randperm(PER_CLIENT).split(16):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": PER_CLIENT})})
    return Message(content=content, reply_to=message)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    model = new_model()
    result = FedAvg(fraction_evaluate=0.0).start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=ROUNDS)
    model.load_state_dict(result.arrays.to_torch_state_dict())
    report = audit_global_model(model, members, non_members)
    loss = report.mia["loss"]
    print(
        f"LOSS attack on {loss.n_members} members / {loss.n_nonmembers} non-members: AUC {loss.auc:.3f} "
        f"[{loss.auc_ci.low:.3f}, {loss.auc_ci.high:.3f}], TPR@FPR=0.01 {loss.tpr_at_fpr['0.01']:.3f}, "
        f"epsilon lower bound {loss.epsilon_lower_bound.value:.3f}"
    )
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as file:
            json.dump(report.to_dict(), file, indent=2)


if __name__ == "__main__":
    run_simulation(server, client, num_supernodes=CLIENTS, backend_config={"client_resources": {"num_cpus": 1}})
