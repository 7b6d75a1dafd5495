"""Membership and attribute inference on a Flower app's final global model, for apps that can see the
honest clients' records (simulation): dptrain's own attacks and metrics, as ``audit.json`` reports them.

Any PyTorch classifier works; flwr is not needed.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.audit.attribute import SensitiveAttributeLike, attribute_inference_audit
from dptrain.audit.membership import compute_signals, loss_scores
from dptrain.audit.metrics import membership_metrics
from dptrain.audit.results import AttributeInferenceResult, AuditReport, Skipped
from dptrain.audit.run import membership_guard
from dptrain.errors import UserError, require
from dptrain.seeds import Stream, derived_seed
from dptrain.training.loop import predict

# RMIA and LiRA score a record against reference models that repeat the target's training mechanism;
# an arbitrary Flower app's mechanism (strategy, client training, DP) is unknown here.
ATTACKS = ("loss",)


def _records(records, name: str) -> TensorDataset:
    """``records`` ((x, y) tensors or a TensorDataset of them) as a TensorDataset, checked."""
    tensors = records.tensors if isinstance(records, TensorDataset) else records
    require(
        isinstance(tensors, (tuple, list)) and len(tensors) == 2 and all(isinstance(t, torch.Tensor) for t in tensors),
        f"{name} must be a TensorDataset or a pair of tensors (features, labels)",
    )
    x, y = tensors
    # The epsilon lower bound splits each set into a calibration and an evaluation half.
    require(x.ndim >= 1 and x.shape[0] >= 2, f"{name} holds {x.shape[0] if x.ndim else 0} records: the audit needs at least 2")
    require(y.ndim == 1, f"{name}: labels must have shape (n,), got {tuple(y.shape)}")
    require(not torch.is_floating_point(y), f"{name}: labels must be integer class indices, got {y.dtype}")
    require(x.shape[0] == y.shape[0], f"{name}: {x.shape[0]} feature rows but {y.shape[0]} labels")
    return TensorDataset(x, y)


def _aia(
    model: nn.Module,
    device: torch.device,
    parts: tuple[TensorDataset, TensorDataset, TensorDataset | None],
    sensitive: SensitiveAttributeLike | None,
    rule: str,
    seed: int,
) -> AttributeInferenceResult | Skipped:
    """Attribute inference on members and non-members against imputation fitted on the population."""
    members, non_members, population = parts
    if sensitive is None:
        return Skipped("no sensitive attribute given (sensitive=None)")
    require(population is not None, "attribute inference needs population records (population=...) to fit imputation")
    records = [members, non_members, population]
    x = torch.cat([part.tensors[0] for part in records])
    y = torch.cat([part.tensors[1] for part in records])
    codes = torch.as_tensor(sensitive.codes).reshape(-1)
    require(
        codes.numel() == x.shape[0],
        f"sensitive.codes has {codes.numel()} values but members, non_members and population hold {x.shape[0]} "
        "records: give one code per record, in that order",
    )
    if codes.unique().numel() < 2:
        # Attack and imputation would both be right every time: 1.000 vs 1.000 measures nothing.
        return Skipped(f"sensitive attribute {sensitive.name} takes a single value on every record: nothing to infer")
    m, n = len(members), len(members) + len(non_members)
    was_training = model.training
    model.eval()

    def logits_fn(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(inputs.to(device)).cpu()

    try:
        return attribute_inference_audit(
            logits_fn,
            x,
            y,
            sensitive,
            members=torch.arange(m).numpy(),
            nonmembers=torch.arange(m, n).numpy(),
            population=torch.arange(n, x.shape[0]).numpy(),
            rule=rule,
            seed=derived_seed(seed, Stream.ATTRIBUTE),
        )
    except ValueError as error:
        raise UserError(f"attribute inference: {error}") from None
    finally:
        model.train(was_training)


def audit_global_model(
    model: nn.Module,
    members,
    non_members,
    *,
    population=None,
    sensitive: SensitiveAttributeLike | None = None,
    attacks: Sequence[str] = ATTACKS,
    epsilon: float | None = None,
    delta: float = 0.0,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    aia_rule: str = "loss",
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> AuditReport:
    """Audit a trained classifier (a Flower app's final global model) with dptrain's membership and
    attribute inference; return the report whose ``to_dict()`` is an ``audit.json`` (docs/guide/outputs.md).

    ``members``, ``non_members`` and ``population`` are TensorDatasets (or (x, y) pairs) of features
    and integer labels. Membership: the LOSS attack (Yeom et al. 2018, score = -cross-entropy) with
    ``dptrain.audit.metrics.membership_metrics``: AUC and TPR at FPR 0.001 / 0.01 / 0.1 with
    percentile bootstrap intervals (``n_bootstrap`` replicates, level ``confidence``), the advantage,
    and the epsilon lower bound at ``delta`` (the app's delta; 0 for a non-private app) whose threshold
    is chosen on a calibration half. Only LOSS: RMIA and LiRA need reference models that repeat the
    app's training, which this helper cannot know (``dptrain train federation.engine=flower`` runs them).
    Attribute inference (Jayaraman & Evans 2022, ``dptrain.audit.attribute``) runs when ``sensitive``
    is given: its ``codes`` hold one value per record of members, non_members, population in that order,
    and the imputation baseline is fitted on the population only. ``epsilon``, the app's accountant
    epsilon if any, turns on the guard that flags a lower bound above it (``warnings``).

    Precondition (what makes the numbers mean membership): members are exactly the records the honest
    clients trained on; non-members (and population) are drawn from the same distribution and no
    client ever trained on them; members and non-members balanced. With one trained model the epsilon
    bound is a heuristic (replace-one game); a canary audit is the rigorous check. Bad input raises
    ``UserError`` with one line.
    """
    started = time.perf_counter()
    attacks = (attacks,) if isinstance(attacks, str) else tuple(attacks)
    unknown = [attack for attack in attacks if attack not in ATTACKS]
    require(
        not unknown,
        f"attacks {unknown} need reference models that repeat the app's training; audit_global_model runs "
        f"{', '.join(ATTACKS)} (dptrain train federation.engine=flower runs rmia and lira)",
    )
    require("loss" in attacks, f"attacks={list(attacks)} runs no attack: include 'loss'")
    require(n_bootstrap >= 1, f"n_bootstrap must be >= 1, got {n_bootstrap}")
    require(0 < confidence < 1, f"confidence must lie in (0, 1), got {confidence}")
    require(0 <= delta < 1, f"delta must lie in [0, 1), got {delta}")
    members = _records(members, "members")
    non_members = _records(non_members, "non_members")
    population = None if population is None else _records(population, "population")
    shape = members.tensors[0].shape[1:]
    for name, part in (("non_members", non_members), ("population", population)):
        if part is not None:
            other = part.tensors[0].shape[1:]
            require(other == shape, f"{name} records have shape {tuple(other)} but members have {tuple(shape)}")
    device = torch.device(device)
    try:
        member_signals = compute_signals(*predict(model, members, device))
        non_member_signals = compute_signals(*predict(model, non_members, device))
        loss = membership_metrics(
            loss_scores(member_signals.loss),
            loss_scores(non_member_signals.loss),
            delta=delta,
            confidence=confidence,
            n_bootstrap=n_bootstrap,
            seed=derived_seed(seed, Stream.BOOTSTRAP),
        )
    except ValueError as error:
        # Labels outside the model's classes, or a model whose outputs are not finite.
        raise UserError(f"membership inference: {error}") from None
    warnings: list[str] = []
    membership_guard("loss", loss.auc, loss.epsilon_lower_bound.value, epsilon, warnings)
    aia = _aia(model, device, (members, non_members, population), sensitive, aia_rule, seed)
    return AuditReport(
        level="flower_global_model",
        accountant_epsilon=epsilon,
        delta=delta if delta > 0 else None,
        confidence=confidence,
        members=len(members),
        non_members=len(non_members),
        mia={"loss": loss},
        aia=aia,
        canary=None,
        implementation=None,
        reference_models=None,
        warnings=warnings,
        audit_seconds=time.perf_counter() - started,
        audited_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    )
