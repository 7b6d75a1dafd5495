"""Attribute inference (Jayaraman & Evans 2022) against an imputation baseline that has no model access.

The attacker knows a record's other features and its label, queries the model with
each candidate value of the sensitive attribute and keeps the one the model fits
best. The baseline imputes the attribute from the same knowledge with a classifier
fitted on population records. Leakage is how much more the attack beats imputation
on members than on non-members.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from dptrain.audit.membership import compute_signals
from dptrain.audit.results import AttributeGroup, AttributeInferenceResult, AttributeScores

RULES = ("loss", "confidence_prior", "imputation_prior")


class SensitiveAttributeLike(Protocol):
    """What attribute inference needs of ``dptrain.data.SensitiveAttribute``.

    ``columns``: indices into the flattened feature vector that hold the encoding;
    ``values``: (k, len(columns)) encodings of the k candidate values;
    ``value_names``: their names; ``codes``: (N,) index of each record's true value.
    """

    name: str
    columns: Sequence[int] | torch.Tensor
    values: torch.Tensor
    value_names: Sequence[str]
    codes: torch.Tensor | np.ndarray


def _columns(attribute: SensitiveAttributeLike) -> torch.Tensor:
    return torch.as_tensor(attribute.columns, dtype=torch.long).reshape(-1)


def _codes(attribute: SensitiveAttributeLike) -> np.ndarray:
    return np.asarray(torch.as_tensor(attribute.codes), dtype=np.int64).reshape(-1)


def candidate_losses(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    attribute: SensitiveAttributeLike,
    *,
    batch_size: int = 1024,
) -> np.ndarray:
    """Cross-entropy of each record with its attribute set to each candidate value: (N, k).

    Column ``attribute.columns`` of the flattened x is overwritten with
    ``attribute.values[j]`` for candidate j; the model is queried without gradients
    and the loss comes from ``compute_signals``, the signal every attack shares.
    """
    columns = _columns(attribute)
    values = torch.as_tensor(attribute.values)
    if values.ndim != 2 or values.shape[1] != columns.numel():
        raise ValueError(f"attribute.values must have shape (k, {columns.numel()}), got {tuple(values.shape)}")
    losses = np.empty((x.shape[0], values.shape[0]))
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            batch = x[start : start + batch_size]
            flat = batch.reshape(batch.shape[0], -1)
            for j in range(values.shape[0]):
                candidate = flat.clone()
                candidate[:, columns] = values[j].to(dtype=flat.dtype, device=flat.device)
                logits = logits_fn(candidate.reshape(batch.shape))
                losses[start : start + batch.shape[0], j] = compute_signals(logits, y[start : start + batch_size]).loss
    return losses


def infer_attribute(candidate_loss: np.ndarray, *, rule: str = "loss", prior: np.ndarray | None = None) -> np.ndarray:
    """The attacker's guess of each record's attribute code from its (N, k) candidate losses.

    ``loss``: argmin_j loss_j, the value under which the model fits the record best
    (Yeom et al. 2018; Jayaraman & Evans 2022). ``confidence_prior``: argmax_j
    p_y(x with value j) * prior_j (Fredrikson et al. 2014), i.e. argmax -loss_j + log prior_j,
    with ``prior`` the (k,) value frequencies, which falls back on the most common value
    where the model is indifferent. ``imputation_prior``: the same posterior with a
    per-record prior (N, k), the imputation model's P(value | other features, label): the
    attacker combines what the data distribution says with what the model says, so it
    matches imputation where the model adds nothing and beats it where the model
    remembers the record.
    """
    losses = np.asarray(candidate_loss, dtype=np.float64)
    if rule == "loss":
        return np.argmin(losses, axis=1)
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    expected = (losses.shape[1],) if rule == "confidence_prior" else losses.shape
    if prior is None or np.shape(prior) != expected:
        raise ValueError(f"rule {rule!r} needs a prior of shape {expected}")
    with np.errstate(divide="ignore"):
        return np.argmax(-losses + np.log(np.asarray(prior, dtype=np.float64)), axis=1)


def _imputation_features(x: torch.Tensor, y: torch.Tensor, columns: torch.Tensor, n_classes: int) -> np.ndarray:
    flat = x.detach().cpu().reshape(x.shape[0], -1).to(torch.float64).numpy()
    others = np.delete(flat, columns.numpy(), axis=1)
    labels = np.eye(n_classes)[y.detach().cpu().long().numpy()]
    return np.hstack([others, labels])


def fit_imputation(
    x: torch.Tensor, y: torch.Tensor, codes: np.ndarray, attribute: SensitiveAttributeLike, n_classes: int, *, seed: int = 0
) -> Callable[[torch.Tensor, torch.Tensor], np.ndarray]:
    """Imputation baseline: multinomial logistic regression (standardised inputs) from the
    other features and the one-hot label to the attribute code, fitted on population records.

    Returns ``probabilities(x, y) -> (N, k)`` over all k attribute values (a value
    absent from the population gets 0); the imputed code is the argmax. With a single
    value in the population it puts all mass on it (no classifier fits one class).
    """
    columns = _columns(attribute)
    codes = np.asarray(codes, dtype=np.int64)
    n_values = int(torch.as_tensor(attribute.values).shape[0])
    if np.unique(codes).size == 1:
        constant = np.eye(n_values)[int(codes[0])]
        return lambda x_new, y_new: np.tile(constant, (x_new.shape[0], 1))
    # scikit-learn is imported where attribute inference runs: most runs' datasets have no sensitive
    # attribute, and its import costs a default job 0.1-0.3 s.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    model.fit(_imputation_features(x, y, columns, n_classes), codes)

    def probabilities(x_new: torch.Tensor, y_new: torch.Tensor) -> np.ndarray:
        full = np.zeros((x_new.shape[0], n_values))
        full[:, model.classes_] = model.predict_proba(_imputation_features(x_new, y_new, columns, n_classes))
        return full

    return probabilities


def _scores(true_codes: np.ndarray, predicted: np.ndarray) -> AttributeScores:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, matthews_corrcoef  # as in fit_imputation

    return AttributeScores(
        accuracy=float(accuracy_score(true_codes, predicted)),
        balanced_accuracy=float(balanced_accuracy_score(true_codes, predicted)),
        mcc=float(matthews_corrcoef(true_codes, predicted)),
        n=int(true_codes.size),
    )


def _advantage(attack: AttributeScores, imputation: AttributeScores) -> dict[str, float]:
    return {
        metric: getattr(attack, metric) - getattr(imputation, metric)
        for metric in ("accuracy", "balanced_accuracy", "mcc")
    }


def attribute_inference_audit(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    attribute: SensitiveAttributeLike,
    *,
    members: np.ndarray,
    nonmembers: np.ndarray,
    population: np.ndarray,
    prior: np.ndarray | None = None,
    rule: str = "loss",
    batch_size: int = 1024,
    seed: int = 0,
) -> AttributeInferenceResult:
    """Attribute inference attack vs. imputation, on members and on non-members.

    ``x`` (N, ...), ``y`` (N,) and ``attribute.codes`` (N,) are aligned;
    ``members``, ``nonmembers`` and ``population`` are disjoint index arrays into
    them. The attack (``infer_attribute`` with ``rule``) queries ``logits_fn`` with
    each candidate value; the baseline (``fit_imputation``) learns from the
    population only. ``prior`` defaults to the attribute's value frequencies on the
    population (``imputation_prior`` uses the baseline's per-record probabilities
    instead). Guarantee: the baseline never sees members or non-members, so an
    advantage that is larger on members than on non-members (positive ``leakage``)
    is information the model carries about its training records.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    codes = _codes(attribute)
    n_values = int(torch.as_tensor(attribute.values).shape[0])
    if codes.shape[0] != x.shape[0] or y.shape[0] != x.shape[0]:
        raise ValueError(f"x ({x.shape[0]}), y ({y.shape[0]}) and attribute.codes ({codes.shape[0]}) must align")
    groups = {
        "members": np.asarray(members, dtype=np.int64),
        "nonmembers": np.asarray(nonmembers, dtype=np.int64),
        "population": np.asarray(population, dtype=np.int64),
    }
    for name, idx in groups.items():
        if idx.ndim != 1 or idx.size == 0:
            raise ValueError(f"{name} must be a non-empty 1-D index array")
    if np.unique(np.concatenate(list(groups.values()))).size != sum(idx.size for idx in groups.values()):
        raise ValueError("members, nonmembers and population must be disjoint sets of distinct indices")
    if prior is None:
        prior = np.bincount(codes[groups["population"]], minlength=n_values) / groups["population"].size
    n_classes = int(y.max().item()) + 1

    population_idx = torch.as_tensor(groups["population"])
    impute = fit_imputation(
        x[population_idx], y[population_idx], codes[groups["population"]], attribute, n_classes, seed=seed
    )
    results = {}
    for name in ("members", "nonmembers"):
        idx = torch.as_tensor(groups[name])
        true_codes = codes[groups[name]]
        imputed = impute(x[idx], y[idx])
        guesses = infer_attribute(
            candidate_losses(logits_fn, x[idx], y[idx], attribute, batch_size=batch_size),
            rule=rule,
            prior=imputed if rule == "imputation_prior" else prior,
        )
        attack = _scores(true_codes, guesses)
        imputation = _scores(true_codes, np.argmax(imputed, axis=1))
        results[name] = AttributeGroup(attack=attack, imputation=imputation, advantage=_advantage(attack, imputation))

    return AttributeInferenceResult(
        attribute=attribute.name,
        value_names=[str(v) for v in attribute.value_names],
        rule=rule,
        members=results["members"],
        nonmembers=results["nonmembers"],
        leakage={
            metric: results["members"].advantage[metric] - results["nonmembers"].advantage[metric]
            for metric in results["members"].advantage
        },
        n_members=int(groups["members"].size),
        n_nonmembers=int(groups["nonmembers"].size),
        n_population=int(groups["population"].size),
    )
