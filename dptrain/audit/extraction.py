"""The extraction audit: a black-box attacker with a query budget steals the trained model through its
prediction interface, and for logistic regression solves for its parameters exactly.

Surrogate extraction (Tramer et al. 2016; Papernot et al. 2017; Orekondy et al. 2019,
"Knockoff Nets"): the attacker queries the target on records it owns (the population split, never
members or non-members), past those on mixup points between two of them (Zhang et al. 2018: a
stand-in for Papernot et al.'s Jacobian-based synthetic queries that needs no gradient of the
target), reads the answers through one output interface and trains a surrogate of the target's
architecture on them, non-privately. Scored on the test split by fidelity (argmax agreement with the
target) and accuracy.

Equation solving (Tramer et al. 2016, "Stealing Machine Learning Models via Prediction APIs"): a
softmax regression's log-probability differences are affine in the input,
log p_k(x) - log p_0(x) = (w_k - w_0)·x + (b_k - b_0), so d + 1 probability answers at affinely
independent inputs determine them by one linear solve. Only those differences are identifiable:
adding one vector to every class's weights leaves every answer unchanged.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.audit.results import EquationSolving, ExtractionCurve
from dptrain.config import ModelConfig
from dptrain.models import build_model
from dptrain.privacy.engine import unwrap

OUTPUTS = ("probabilities", "label", "rounded")
# The surrogate's optimizer: Adam at this rate for the configured steps on batches of this size,
# the same number of steps at every budget so that only the answers differ between budgets.
SURROGATE_LR = 3e-2
SURROGATE_BATCH = 128
BATCH = 1024


def answers(logits: torch.Tensor, output: str, decimals: int) -> torch.Tensor:
    """What the prediction interface ``output`` returns for ``logits``, as a distribution over classes
    the surrogate is trained to match: the softmax (``probabilities``), the one-hot top-1 label
    (``label``), or the softmax rounded to ``decimals`` and renormalized (``rounded``; a row that
    rounds to all zeros tells the attacker nothing and becomes uniform)."""
    probabilities = torch.softmax(logits.double(), dim=1)
    if output == "probabilities":
        return probabilities.float()
    if output == "label":
        return nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).float()
    if output == "rounded":
        rounded = torch.round(probabilities, decimals=decimals)
        total = rounded.sum(dim=1, keepdim=True)
        uniform = torch.full_like(rounded, 1.0 / rounded.shape[1])
        return torch.where(total > 0, rounded / total.clamp_min(1e-300), uniform).float()
    raise ValueError(f"unknown output interface {output!r}: choose one of {', '.join(OUTPUTS)}")


def attacker_queries(records: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` query inputs: the attacker's ``records`` in a random order, then (past them) mixup
    points ``lam * a + (1 - lam) * b`` of two random records with ``lam ~ U(0, 1)``. A convex
    combination of valid inputs is valid (pixels stay in range)."""
    order = records[torch.randperm(len(records), generator=generator)[:count]]
    extra = count - len(order)
    if extra <= 0:
        return order
    first, second = (torch.randint(len(records), (extra,), generator=generator) for _ in range(2))
    lam = torch.rand((extra,) + (1,) * (records.dim() - 1), generator=generator)
    return torch.cat([order, lam * records[first] + (1 - lam) * records[second]])


def train_surrogate(
    model_cfg: ModelConfig,
    input_shape: Sequence[int],
    num_classes: int,
    queries: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    device: torch.device,
    seed: int,
) -> nn.Module:
    """A fresh ``model_cfg`` model trained non-privately for ``steps`` Adam steps to match ``targets``
    (distributions over classes) on ``queries`` by cross-entropy with soft labels, which for one-hot
    targets is the ordinary cross-entropy with hard labels."""
    # A forked CPU generator: the surrogate's initialization leaves the process's CPU RNG as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        surrogate = build_model(model_cfg, input_shape, num_classes).to(device)
    optimizer = torch.optim.Adam(surrogate.parameters(), lr=SURROGATE_LR)
    generator = torch.Generator().manual_seed(seed)
    queries, targets = queries.to(device), targets.to(device)
    surrogate.train()
    for _ in range(steps):
        batch = torch.randint(len(queries), (min(SURROGATE_BATCH, len(queries)),), generator=generator).to(device)
        optimizer.zero_grad(set_to_none=True)
        log_probabilities = torch.log_softmax(surrogate(queries[batch]), dim=1)
        loss = -(targets[batch] * log_probabilities).sum(dim=1).mean()
        loss.backward()
        optimizer.step()
    return surrogate.eval()


@torch.no_grad()
def _logits(model: nn.Module, inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``model``'s logits on unlabeled ``inputs`` (``training.loop.predict`` needs labeled records)."""
    return torch.cat([model(part.to(device)).cpu() for part in inputs.split(BATCH)])


def extraction_audit(
    model: nn.Module,
    attacker: torch.Tensor,
    test: TensorDataset,
    model_cfg: ModelConfig,
    num_classes: int,
    budgets: Sequence[int],
    outputs: Sequence[str],
    decimals: int,
    steps: int,
    device: torch.device,
    seed: int,
) -> dict[str, ExtractionCurve]:
    """Per output interface, the fidelity and test accuracy of a surrogate trained on each budget's
    (query, answer) pairs (``attacker_queries`` of the ``attacker`` records, seeded by ``seed``). Each
    budget's queries are the first of the largest budget's: an attacker who asks more adds to what
    the smaller budget asked instead of drawing afresh."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    x_test, y_test = test.tensors
    target_labels = _logits(model, x_test, device).argmax(dim=1)
    queries = attacker_queries(attacker, max(budgets), torch.Generator().manual_seed(seed))
    logits = _logits(model, queries, device)
    input_shape = tuple(attacker.shape[1:])
    curves = {}
    for output in outputs:
        replies = answers(logits, output, decimals)
        fidelity, accuracy = [], []
        for budget in budgets:
            surrogate = train_surrogate(
                model_cfg, input_shape, num_classes, queries[:budget], replies[:budget], steps, device, seed
            )
            predicted = _logits(surrogate, x_test, device).argmax(dim=1)
            fidelity.append(float((predicted == target_labels).float().mean()))
            accuracy.append(float((predicted == y_test).float().mean()))
        curves[output] = ExtractionCurve(
            queries=list(budgets),
            fidelity=fidelity,
            surrogate_accuracy=accuracy,
            n=len(y_test),
            attacker_records=len(attacker),
        )
    model.train(was_training)
    return curves


def solve_softmax_regression(
    probabilities_of: Callable[[np.ndarray], np.ndarray], dimension: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Tramer et al.'s equation-solving attack on a softmax regression with ``dimension`` inputs, from
    ``dimension + 1`` queries: standard normal inputs (affinely independent with probability 1).
    ``probabilities_of`` maps an (n, d) array of inputs to the (n, K) probability answers.

    Returns ``(weights, biases)`` of shapes (K - 1, d) and (K - 1,): w_k - w_0 and b_k - b_0 for
    k = 1..K-1, the identifiable parameters, exact up to the answers' precision.
    """
    queries = rng.standard_normal((dimension + 1, dimension))
    log_answers = np.log(probabilities_of(queries))
    differences = log_answers[:, 1:] - log_answers[:, :1]
    system = np.hstack([queries, np.ones((dimension + 1, 1))])
    solution = np.linalg.solve(system, differences)
    return solution[:-1].T, solution[-1]


def equation_solving_audit(model: nn.Module, input_shape: Sequence[int], seed: int) -> EquationSolving:
    """``solve_softmax_regression`` on a trained logistic regression (``model=logreg``: one
    ``nn.Linear`` on the flattened input), queried as a black box but in float64: its float32
    parameters are exact in float64, so the answers are the model's own probabilities to double
    precision. Reports the relative Frobenius error of the recovered (w_k - w_0, b_k - b_0) against
    the model's own; None when an answer underflowed to probability 0 (logits over ~700 apart), where
    its logarithm, and so the solve, is undefined."""
    exact = copy.deepcopy(unwrap(model)).double().eval()
    device = next(exact.parameters()).device

    def probabilities_of(inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            batch = torch.from_numpy(inputs).reshape(len(inputs), *input_shape).to(device)
            return torch.softmax(exact(batch), dim=1).cpu().numpy()

    dimension = math.prod(input_shape)
    weights, biases = solve_softmax_regression(probabilities_of, dimension, np.random.default_rng(seed))
    linear = next(module for module in exact.modules() if isinstance(module, nn.Linear))
    w, b = linear.weight.detach().cpu().numpy(), linear.bias.detach().cpu().numpy()
    truth = np.hstack([w[1:] - w[:1], (b[1:] - b[:1])[:, None]])
    recovered = np.hstack([weights, biases[:, None]])
    error = float(np.linalg.norm(recovered - truth) / np.linalg.norm(truth))
    return EquationSolving(queries=dimension + 1, relative_error=error if math.isfinite(error) else None)
