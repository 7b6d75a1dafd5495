"""The post-training audit of a run: membership inference (LOSS, RMIA, LiRA), attribute inference
against imputation, the one-run canary bound, the white-box implementation audit, the evasion audit,
the extraction audit, the gradient inversion audit (federated runs), the model inversion audit, and sanity guards
(``dptrain.views.panels`` draws them in TensorBoard)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dptrain.audit.attribute import attribute_inference_audit
from dptrain.audit.canary import one_run_audit
from dptrain.audit.canary_clients import CanaryClients
from dptrain.audit.evasion import evasion_audit, evasion_warnings, preprocessing
from dptrain.audit.extraction import equation_solving_audit, extraction_audit
from dptrain.audit.gradient_inversion import gradient_inversion_audit
from dptrain.audit.implementation import AuditedMechanism, implementation_audit
from dptrain.audit.inversion import InversionImages, inversion_audit
from dptrain.audit.membership import compute_signals, lira_scores, loss_scores, rmia_scores
from dptrain.audit.metrics import membership_metrics
from dptrain.audit.reference import ReferenceModels, default_workers, train_references
from dptrain.audit.results import (
    AttributeInferenceResult,
    AuditReport,
    EvasionCurve,
    ExtractionAudit,
    GradientInversionResult,
    ImplementationAudit,
    InversionAudit,
    MembershipMetrics,
    OneRunAudit,
    ReferenceModelsRecord,
    Skipped,
)
from dptrain.config import Config
from dptrain.data import population_without
from dptrain.seeds import Stream, derived_seed
from dptrain.training import ranks
from dptrain.training.clients import clients_per_round
from dptrain.training.distributed import parallel_mode, shard_positions
from dptrain.training.federated import dp_fedavg
from dptrain.training.loop import predict
from dptrain.training.target import TargetRun

log = logging.getLogger(__name__)

# An AUC this far below chance means the attack's scores are inverted: a bug, not privacy.
AUC_FLOOR = 0.4


@dataclass(frozen=True)
class AuditResult:
    """The audit's report (``audit.json``), per membership attack its (member, non-member) scores, and
    the model inversion audit's images (None when it was off)."""

    report: AuditReport
    scores: dict[str, tuple[np.ndarray, np.ndarray]]
    inversion_images: InversionImages | None = None


@dataclass(frozen=True)
class AuditTarget:
    """What the audit reads: a trained run (``TargetRun``: the model, the data whose members trained it,
    the recipe's plan and the reported guarantee, the epsilon spent, the canaries) and the config of
    the audit to run on it. The audit never trains the target itself."""

    cfg: Config
    run: TargetRun


def _concat(*parts: TensorDataset) -> TensorDataset:
    return TensorDataset(*(torch.cat(tensors) for tensors in zip(*(part.tensors for part in parts))))


def _signals(model: nn.Module, dataset: TensorDataset, device: torch.device):
    logits, labels = predict(model, dataset, device)
    return compute_signals(logits, labels)


def _audited(target: AuditTarget) -> TensorDataset:
    return _concat(target.run.data.members, target.run.data.non_members)


def _needs_references(cfg) -> bool:
    return bool({"rmia", "lira"} & set(cfg.mia.attacks))


def _references(target: AuditTarget, run_dir) -> ReferenceModels:
    """The reference models the requested attacks need (LiRA: "halves", with each audited record IN
    for enough of them to fit its Gaussian; else "population")."""
    cfg = target.cfg.audit
    population = target.run.data.population
    keep = torch.from_numpy(population_without(target.run.data.split, target.run.canaries))
    lira = "lira" in cfg.mia.attacks
    return train_references(
        target.cfg,
        target.run.plan,
        audited=_audited(target),
        population=TensorDataset(*(t[keep] for t in population.tensors)),
        input_shape=target.run.data.input_shape,
        num_classes=target.run.data.num_classes,
        scheme="halves" if lira else "population",
        count=cfg.mia.reference_models,
        seed=cfg.seed,
        workers=cfg.workers or default_workers(cfg.mia.reference_models, target.cfg),
        cache_dir=run_dir,
        min_in=(2 if cfg.mia.lira_variance == "per_example" else 1) if lira else 0,
        target_threads=target.run.metrics.threads,
    )


def _mia(
    target: AuditTarget, run_dir, warnings: list[str]
) -> tuple[dict[str, MembershipMetrics], dict, ReferenceModelsRecord | None]:
    """Scores and metrics of every requested membership attack on the balanced members / non-members."""
    cfg = target.cfg.audit
    audited = _audited(target)
    members = len(target.run.data.members)
    signals = _signals(target.run.model, audited, target.run.device)
    scores: dict[str, np.ndarray] = {}
    if "loss" in cfg.mia.attacks:
        scores["loss"] = loss_scores(signals.loss)
    references = None
    if _needs_references(cfg):
        references = _references(target, run_dir)
        reference_signals = [_signals(model, audited, target.run.device) for model in references.models]
        if "rmia" in cfg.mia.attacks:
            # RMIA's population samples z come from the test split: no model (target or
            # reference) trained on them, which the pairwise ratio assumes.
            z_target = _signals(target.run.model, target.run.data.test, target.run.device)
            z_references = [_signals(model, target.run.data.test, target.run.device) for model in references.models]
            scores["rmia"] = rmia_scores(
                signals.true_class_prob,
                np.stack([s.true_class_prob for s in reference_signals]),
                z_target.true_class_prob,
                np.stack([s.true_class_prob for s in z_references]),
                reference_in=references.audited_in,
                gamma=cfg.mia.rmia_gamma,
                offline_a=cfg.mia.rmia_offline_a,
            )
        if "lira" in cfg.mia.attacks:
            phi = np.stack([s.logit_confidence for s in reference_signals])
            for online in (True, False):
                scores["lira_online" if online else "lira_offline"] = lira_scores(
                    signals.logit_confidence,
                    phi,
                    references.audited_in,
                    online=online,
                    variance=cfg.mia.lira_variance,
                )
    delta = target.run.guarantee.delta if target.run.guarantee.private else 0.0
    results = {}
    for name, score in scores.items():
        metrics = membership_metrics(
            score[:members],
            score[members:],
            delta=delta,
            confidence=cfg.confidence,
            n_bootstrap=cfg.mia.bootstrap,
            seed=derived_seed(cfg.seed, Stream.BOOTSTRAP),
        )
        results[name] = metrics
        membership_guard(name, metrics.auc, metrics.epsilon_lower_bound.value, target.run.epsilon, warnings)
    reference_record = (
        None
        if references is None
        else ReferenceModelsRecord(
            count=len(references.models),
            scheme=references.scheme,
            train_seconds=references.seconds,
            reused_from_cache=references.cached,
        )
    )
    return results, {name: (s[:members], s[members:]) for name, s in scores.items()}, reference_record


def membership_guard(name: str, auc: float, epsilon_lb: float, epsilon: float | None, warnings: list[str]) -> None:
    """Flag a membership attack whose lower bound exceeds the accountant's epsilon (suspicious, not a
    proof: see the message) or whose AUC is below ``AUC_FLOOR`` (inverted scores, a bug)."""
    if epsilon is not None and epsilon_lb > epsilon:
        warnings.append(
            f"{name}: empirical epsilon lower bound {epsilon_lb:.3f} exceeds the accountant's epsilon {epsilon:.3f}; "
            "suspicious, but no proof of a bug: with a fixed-size member / non-member split the per-record game is "
            "replace-one, which add/remove DP at epsilon bounds only by about 2 epsilon, and the bound treats "
            "records as independent trials; the canary (one-run) bound is the rigorous check"
        )
    if auc < AUC_FLOOR:
        warnings.append(f"{name}: AUC {auc:.3f} is below {AUC_FLOOR}: the attack's scores look inverted (a bug)")


def _aia(target: AuditTarget) -> AttributeInferenceResult | Skipped:
    sensitive = target.run.data.sensitive
    if sensitive is None:
        return Skipped(f"dataset {target.cfg.dataset.name} has no sensitive attribute")
    if not target.cfg.audit.aia.enabled:
        return Skipped("audit.aia.enabled=false")
    data, split = target.run.data, target.run.data.split
    keep = population_without(split, target.run.canaries)
    population = TensorDataset(*(t[torch.from_numpy(keep)] for t in data.population.tensors))
    records = _concat(data.members, data.non_members, population)
    x, y = records.tensors
    codes = torch.cat([sensitive.codes[torch.from_numpy(p)] for p in (split.members, split.non_members, split.population[keep])])
    values = codes.unique()
    if len(values) < 2:
        # Attack and imputation would both be right every time: 1.000 vs 1.000 measures nothing.
        only = sensitive.value_names[int(values[0])]
        return Skipped(
            f"dataset.sensitive={sensitive.name} has the single value {only!r} on the members, "
            "non-members and population: nothing to infer"
        )
    attribute = dataclasses.replace(sensitive, codes=codes)
    m, n = len(data.members), len(data.members) + len(data.non_members)
    prior = np.bincount(codes[n:].numpy(), minlength=len(sensitive.value_names)) / (len(records) - n)
    model = target.run.model.eval()

    def logits_fn(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(inputs.to(target.run.device)).cpu()

    return attribute_inference_audit(
        logits_fn,
        x,
        y,
        attribute,
        members=np.arange(m),
        nonmembers=np.arange(m, n),
        population=np.arange(n, len(records)),
        prior=prior,
        rule=target.cfg.audit.aia.rule,
        seed=derived_seed(target.cfg.audit.seed, Stream.ATTRIBUTE),
    )


def _canary(target: AuditTarget, requested: int, warnings: list[str]) -> OneRunAudit | Skipped | None:
    """The one-run canary audit; None when no canaries were asked for, ``Skipped`` when they were
    asked for but the run has none (they must be inserted before training)."""
    canaries = target.run.canaries
    if canaries is None:
        if not requested:
            return None
        if target.cfg.federation.name == "fedavg":
            return Skipped("canaries are inserted into centralized training only, not with federation=fedavg")
        return Skipped(
            "the run was trained with audit.canaries.count=0; canaries must be inserted at training "
            "time: retrain with audit=thorough (or audit.canaries.count>0)"
        )
    population = target.run.data.population.tensors[0]
    dataset = canaries.dataset(population, target.run.data.split.population)
    scores = loss_scores(_signals(target.run.model, dataset, target.run.device).loss)
    result = one_run_audit(
        scores,
        canaries.included,
        delta=target.run.guarantee.delta if target.run.guarantee.private else 0.0,
        confidence=target.cfg.audit.confidence,
        seed=derived_seed(target.cfg.audit.seed, Stream.TIE_BREAK),
    )
    canary_guard("canary", result.epsilon_lower_bound, target.run.epsilon, warnings)
    return result


def canary_guard(name: str, epsilon_lb: float, epsilon: float | None, warnings: list[str]) -> None:
    """Flag a canary bound (one-run black-box, or the white-box implementation audit's) above the
    accountant's epsilon: each canary's inclusion is an independent fair coin that adds or removes it
    (Steinke, Nasr & Jagielski 2023), so this contradicts the guarantee at the audit's confidence."""
    if epsilon is not None and epsilon_lb > epsilon:
        warnings.append(
            f"{name}: epsilon lower bound {epsilon_lb:.3f} exceeds the accountant's epsilon {epsilon:.3f}; "
            "this means a bug in training or in the audit"
        )


def _audited_mechanism(target: AuditTarget):
    """The mechanism whose guarantee the run reports, as the implementation audit repeats it.

    Federated sample level: the reported (worst) honest client's local DP-SGD, on records of its
    count; user level: the DP-FedAvg server with canary clients. Robust data parallelism: one
    worker's local DP-SGD on its shard's count, in this process. DPDDP: the multi-process
    mechanism, run by every rank. The canaries' releases do not depend on which real records
    train beside them, only on the mechanism.
    """
    cfg, plan, data = target.cfg, target.run.plan, target.run.data
    shape, classes = data.input_shape, data.num_classes
    if cfg.federation.name == "fedavg":
        if plan.dp_level == "user":
            dimension = sum(p.numel() for p in target.run.model.parameters())
            return CanaryClients(plan.guarantee, dp_fedavg, clients_per_round(cfg), dimension)
        client = plan.reported_client
        records = TensorDataset(*(t[: plan.client_sizes[client]] for t in data.members.tensors))
        return AuditedMechanism(
            plan.client_plans[client], records, shape, classes, f"federated client {client}: local DP-SGD (sample level)"
        )
    mode = parallel_mode(cfg)
    if mode == "robust":
        world = ranks.world_size()
        return AuditedMechanism(
            target.run.guarantee,
            TensorDataset(*(t[torch.from_numpy(shard_positions(len(data.members), 0, world))] for t in data.members.tensors)),
            shape,
            classes,
            f"worker 0 of {world}: local DP-SGD (robust data parallelism)",
        )
    if mode == "dpddp":
        scope = f"DPDDP over {ranks.world_size()} processes"
        return AuditedMechanism(target.run.guarantee, data.members, shape, classes, scope, distributed=True)
    return AuditedMechanism(target.run.guarantee, data.members, shape, classes, "centralized DP-SGD")


def _implementation(target: AuditTarget, warnings: list[str]) -> ImplementationAudit | Skipped | None:
    """The white-box implementation audit (``audit.whitebox``), or None when it is off.

    Every rank calls this: under DPDDP the audit runs are collective; elsewhere rank 0 runs them
    alone and the other ranks return at once.
    """
    if not target.cfg.audit.whitebox.enabled:
        return None
    mechanism = _audited_mechanism(target)
    if not (mechanism.distributed or ranks.is_main()):
        return None
    result = implementation_audit(target.cfg, mechanism, target.run.epsilon, target.run.device)
    if isinstance(result, ImplementationAudit):
        for setting, record in result.records.items():
            canary_guard(f"implementation ({setting})", record.epsilon_lower_bound, target.run.epsilon, warnings)
    return result


def _evasion(target: AuditTarget, warnings: list[str]) -> dict[str, EvasionCurve] | None:
    """The evasion audit (``audit.evasion``) on the first ``n`` test records, behind the run's
    inference-time preprocessing (``defense.preprocess``), or None when it is off. The privacy audits
    query the bare model: the preprocessing is a fixed map of the query, which changes no DP guarantee."""
    cfg = target.cfg.audit.evasion
    if not cfg.enabled:
        return None
    test = TensorDataset(*(t[: cfg.n] for t in target.run.data.test.tensors))
    curves = evasion_audit(
        target.run.model,
        test,
        target.run.data.units,
        {norm: list(getattr(cfg, f"budgets_{norm}")) for norm in cfg.norms},
        cfg.steps,
        cfg.restarts,
        target.run.device,
        derived_seed(target.cfg.audit.seed, Stream.EVASION),
        preprocessing=preprocessing(target.cfg.defense),
        library=cfg.apgd,
    )
    warnings.extend(evasion_warnings(curves))
    return curves


def _extraction(target: AuditTarget) -> ExtractionAudit | None:
    """The extraction audit (``audit.extraction``) with the population (canaries removed) as the
    attacker's records, or None when it is off; equation solving beside it for ``model=logreg`` with
    the probabilities interface. The attacker has records: every split has a population record, and
    canaries take at most half of them (``dptrain.validation``)."""
    cfg = target.cfg.audit.extraction
    if not cfg.enabled:
        return None
    data = target.run.data
    keep = torch.from_numpy(population_without(data.split, target.run.canaries))
    attacker = data.population.tensors[0][keep]
    seed = derived_seed(target.cfg.audit.seed, Stream.EXTRACTION)
    curves = extraction_audit(
        target.run.model,
        attacker,
        data.test,
        target.cfg.model,
        data.num_classes,
        list(cfg.queries),
        list(cfg.output),
        cfg.decimals,
        cfg.steps,
        target.run.device,
        seed,
    )
    solving = None
    # The solve needs log-probabilities affine in the input: a ScatterNet in front makes them not.
    if target.cfg.model.name == "logreg" and target.cfg.model.features == "none" and "probabilities" in cfg.output:
        solving = equation_solving_audit(target.run.model, data.input_shape, seed)
    return ExtractionAudit(curves, solving)


def _gradient_inversion(target: AuditTarget) -> GradientInversionResult | None:
    """The gradient inversion audit (``audit.gradient_inversion``) on the audited members, from the
    trained global model, or None when it is off (validation admits it for federated runs only)."""
    if not target.cfg.audit.gradient_inversion.enabled:
        return None
    return gradient_inversion_audit(
        target.cfg,
        target.run.plan,
        target.run.model,
        target.run.data.members,
        target.run.data.units,
        target.run.device,
        derived_seed(target.cfg.audit.seed, Stream.GRADIENT_INVERSION),
    )


def _inversion(
    target: AuditTarget, warnings: list[str]
) -> tuple[InversionAudit, InversionImages] | tuple[None, None]:
    """The model inversion audit (``audit.inversion``) of every class or those listed, its prior drawn
    from the population (canaries removed: the attacker's records), scored against the audited
    members and non-members; (None, None) when it is off. Image data only (``dptrain.validation``).
    A class without an audited member or non-member cannot be scored: it is left out with a warning
    (and the audit too, with one, when no class is left)."""
    cfg = target.cfg.audit.inversion
    if not cfg.enabled:
        return None, None
    data = target.run.data
    requested = list(cfg.classes) or list(range(data.num_classes))
    present = set(data.members.tensors[1].tolist()) & set(data.non_members.tensors[1].tolist())
    classes = [c for c in requested if c in present]
    if len(classes) < len(requested):
        missing = [c for c in requested if c not in present]
        warnings.append(f"inversion: classes {missing} have no audited member or non-member to score against; left out")
    if not classes:
        return None, None
    keep = torch.from_numpy(population_without(data.split, target.run.canaries))
    return inversion_audit(
        target.run.model,
        classes,
        data.population.tensors[0][keep],
        data.members.tensors,
        data.non_members.tensors,
        data.units,
        cfg.prior,
        cfg.cost,
        cfg.steps,
        cfg.lr,
        cfg.tv_weight,
        cfg.l2_weight,
        derived_seed(target.cfg.audit.seed, Stream.INVERSION),
    )


def run_audit(target: AuditTarget, run_dir, canaries_requested: int | None = None) -> AuditResult | None:
    """Audit ``target`` as ``target.cfg.audit`` says; return its report (``audit.json``) and the attacks' scores.

    Members and non-members are ``target.run.data``'s (balanced, disjoint, same
    distribution; only records that trained the model are members); every
    number carries the counts it was measured on. A lower bound above the
    accountant's epsilon (a bug for the canary bound, suspicious for the
    membership attacks' replace-one bounds), or an AUC below 0.4, is logged at
    error level and listed under ``warnings``. In a multi-process
    run every rank calls this: the reference models (and a DPDDP run's
    implementation audit) are trained across ranks and only rank 0 attacks,
    writes and returns the report (others get None).

    ``canaries_requested`` is the canary count the audit was asked for (default: the run's own); the
    canaries audited are always those inserted in training, ``target.run.canaries``. The member and
    non-member scores of every attack come back beside the report, for the TensorBoard panels. The
    report's ``audit_seconds`` times the attacks; ``pipeline.audit_target`` records the whole stage's
    (imports and panels included).
    """
    if not ranks.is_main():
        # Other ranks of a multi-process run only share the reference models' and audit runs' training.
        if _needs_references(target.cfg.audit):
            _references(target, run_dir)
        _implementation(target, [])
        return None
    started = time.perf_counter()
    if canaries_requested is None:
        canaries_requested = target.cfg.audit.canaries.count
    warnings: list[str] = []
    mia, scores, references = _mia(target, run_dir, warnings)
    aia = _aia(target)
    canary = _canary(target, canaries_requested, warnings)
    implementation = _implementation(target, warnings)
    evasion = _evasion(target, warnings)
    extraction = _extraction(target)
    gradient_inversion = _gradient_inversion(target)
    inversion, inversion_images = _inversion(target, warnings)
    report = AuditReport(
        level=target.cfg.audit.name,
        accountant_epsilon=target.run.epsilon,
        delta=target.run.guarantee.delta if target.run.guarantee.private else None,
        confidence=target.cfg.audit.confidence,
        members=len(target.run.data.members),
        non_members=len(target.run.data.non_members),
        mia=mia,
        aia=aia,
        canary=canary,
        implementation=implementation,
        evasion=evasion,
        extraction=extraction,
        gradient_inversion=gradient_inversion,
        inversion=inversion,
        reference_models=references,
        warnings=warnings,
        audit_seconds=time.perf_counter() - started,
        audited_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    )
    for warning in warnings:
        log.error("audit: %s", warning)
    return AuditResult(report, scores, inversion_images)
