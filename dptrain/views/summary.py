"""The run summary printed at the end: accuracy, epsilon at delta, where the artifacts are."""

from __future__ import annotations

from pathlib import Path

from dptrain.audit.results import (
    AuditReport,
    EvasionCurve,
    ExtractionAudit,
    GradientInversionResult,
    ImplementationAudit,
    InversionAudit,
    Skipped,
)
from dptrain.training.metrics import FederationMetrics, RunMetrics


def format_summary(metrics: RunMetrics, report: AuditReport | None, run_dir: str | Path) -> str:
    """A few aligned lines a person reads at the end of ``dptrain train``: utility, privacy, audit, artifacts."""
    federation, centralized = metrics.federation, metrics.centralized
    if centralized is not None and centralized.proxy is not None:
        return format_proxy(metrics, centralized.proxy, run_dir)
    if metrics.private:
        target = metrics.target_epsilon
        privacy = (
            f"epsilon {metrics.epsilon:.3f} at delta {metrics.delta:.0e}"
            f" ({'no target' if target is None else f'target {target:g}'}, {metrics.accountant} accountant,"
            f" noise multiplier {metrics.noise_multiplier:.3f}, clipping norm {metrics.max_grad_norm:g},"
            f" {metrics.steps} steps at sample rate {metrics.sample_rate:.4f})"
        )
    else:
        privacy = "none: non-private baseline (no clipping, no noise, epsilon = inf)"
    # A federated or poisoned run's train accuracy is measured on the members the audit uses.
    if federation is not None:
        records = f"{federation.honest_members} audited"
    elif centralized is not None and centralized.poisoned:
        records = f"{metrics.audited_members} clean audited"
    else:
        records = str(metrics.members)
    lines = [
        f"test accuracy  {metrics.test_accuracy:.4f}   (train {metrics.train_accuracy:.4f}"
        f" on {records} member records)",
        f"training       {format_training_time(metrics)}",
        f"privacy        {privacy}",
    ]
    if metrics.grad_sample_mode is not None:
        lines.append(f"clipping       {format_grad_sample(metrics)}")
    if federation is not None:
        lines += format_federation(metrics, federation)
    if centralized is not None and centralized.pretrain is not None:
        lines.append(format_pretrain(centralized.pretrain))
    if centralized is not None and centralized.world_size > 1:
        how = {
            "dpddp": "DP data parallelism (DPDDP), one noise draw per step",
            "robust": "robust aggregation of the workers' gradients, each clipped and noised locally when private",
        }[centralized.parallel_mode]
        lines.append(f"parallel       {centralized.world_size} processes: {how}")
    if centralized is not None and centralized.poisoned:
        lines.append(
            f"poisoning      {centralized.poisoned} of {metrics.members} member records poisoned (poisoned.json)"
            f"{', covered by the guarantee' if metrics.private else ''};"
            f" the audit measures {metrics.audited_members} of those left clean"
        )
    if centralized is not None and centralized.backdoor_success_rate is not None:
        lines.append(format_backdoor(metrics, centralized.backdoor_success_rate))
    if centralized is not None and centralized.poisoned_class_accuracy is not None:
        lines.append(
            f"label flip     source-class test accuracy {centralized.poisoned_class_accuracy:.4f}"
            f" (clean test accuracy {metrics.test_accuracy:.4f})"
        )
    if centralized is not None and centralized.watermark is not None:
        mark = centralized.watermark
        lines.append(
            f"watermark      {mark['accuracy']:.2f} of {mark['keys']} keys learnt, p-value {mark['p_value']:.2g} "
            "(watermark.pt; test a suspect with dptrain verify run_dir=... model=...)"
        )
    if report is not None:
        lines.append(format_audit(report))
    files = "metrics.json, audit.json" if report is not None else "metrics.json"
    lines += [
        f"artifacts      {run_dir}  ({files}, model.pt, manifest.json, split.json, tb/)",
        f"tensorboard    tensorboard --logdir {run_dir}",
    ]
    return "\n".join(lines)


def format_grad_sample(metrics: RunMetrics) -> str:
    """The per-example clipping method and, when ``auto`` timed the candidates, each one's ms per step."""
    seconds = metrics.grad_sample_seconds or {}
    if not seconds:
        return metrics.grad_sample_mode
    timed = ", ".join(f"{mode} {value * 1e3:.1f}" for mode, value in sorted(seconds.items(), key=lambda kv: kv[1]))
    return f"{metrics.grad_sample_mode} (auto, ms per step: {timed})"


def format_training_time(metrics: RunMetrics) -> str:
    """What the training stage took: ``train_seconds`` counts only optimizer steps (federated: the
    rounds' local training and aggregation); ``wall_seconds``, what the progress bar shows, adds
    the per-epoch (per-round) evaluation, accounting, TensorBoard and checkpoints."""
    if metrics.federation is not None:
        measured, unit = "rounds (local training and aggregation)", "round"
    else:
        measured, unit = "optimizer steps", "epoch"
    return (
        f"{metrics.train_seconds:.1f} s in {measured}, {metrics.wall_seconds:.1f} s wall incl. per-{unit}"
        " evaluation, accounting, TensorBoard, checkpoints"
    )


def format_proxy(metrics: RunMetrics, proxy: dict, run_dir: str | Path) -> str:
    """A run on a proxy (``dptrain.training.proxy``): its validation accuracy first, what it read (public
    records only) and the members' mechanism it imitates; nothing it reports is a guarantee."""
    return "\n".join(
        [
            f"validation     {proxy['validation_accuracy']:.4f} on the proxy's {proxy['validation_records']} held-out"
            f" population records (test accuracy {metrics.test_accuracy:.4f}, train {metrics.train_accuracy:.4f}"
            f" on its {proxy['train_records']} records)",
            f"training       {format_training_time(metrics)}",
            f"proxy          trained on {proxy['train_records']} population records, ASSUMED PUBLIC: no member read,"
            " nothing accounted (epsilon null)",
            f"imitates       the members' run: {proxy['steps']} steps at sample rate {proxy['sample_rate']:.4f}, noise"
            f" multiplier {proxy['members_noise_multiplier']:.3f} there, {metrics.noise_multiplier:.3f} here (same"
            f" noise-to-batch ratio {proxy['noise_to_batch']:.4g}); that run would spend epsilon"
            f" {proxy['members_epsilon']:.3f} at delta {metrics.delta:.0e}",
            f"artifacts      {run_dir}  (metrics.json, proxy.json, model.pt, manifest.json, split.json, tb/)",
        ]
    )


def format_pretrain(pretrain: dict) -> str:
    """The assumption public pretraining rests on: the public data are public; epsilon covers the private phase."""
    return (
        f"pretraining    non-private on the {pretrain['public']} ({pretrain['public_records']} records,"
        f" {pretrain['public_epochs']} epochs), ASSUMED PUBLIC: not covered by epsilon; DP-SGD fine-tuning"
        f" ({pretrain['finetune']}) on the {pretrain['private_records']} private records is what epsilon covers"
    )


def format_federation(metrics: RunMetrics, federation: FederationMetrics) -> list[str]:
    """The federated run's lines: clients, rounds, attack and aggregator, whose epsilon the privacy line
    reports, and the backdoor's success rate next to clean accuracy."""
    pre = "".join(f"{name} -> " for name in federation.pre)
    # DP-FedAvg samples each client with probability clients_per_round / clients.
    user_level = federation.dp_level == "user"
    per_round = f"~{federation.clients_per_round} expected" if user_level else federation.clients_per_round
    lines = [
        f"federation     {federation.clients} clients ({federation.byzantine} Byzantine, attack {federation.attack}),"
        f" {federation.rounds} rounds of {per_round}, aggregator {pre}{federation.aggregator},"
        f" {federation.partition} partition, {metrics.members} member records, {federation.honest_members}"
        " of them on honest clients that trained (audited)"
    ]
    if metrics.private:
        whose = (
            "DP-FedAvg, per client"
            if user_level
            else f"local DP-SGD, per record; the privacy line is honest client {federation.reported_client}, the worst"
        )
        lines.append(f"dp level       {federation.dp_level}: {whose}")
    if federation.byzantine_selected_fraction is not None:
        share = federation.byzantine_selected_fraction
        lines.append(f"selection      {share:.3f} of the updates the rule selected were Byzantine")
    if federation.backdoor_success_rate is not None:
        lines.append(format_backdoor(metrics, federation.backdoor_success_rate))
    return lines


def format_backdoor(metrics: RunMetrics, success_rate: float) -> str:
    """The backdoor's success rate next to clean accuracy (federated or centralized)."""
    return (
        f"backdoor       attack success rate {success_rate:.4f} on triggered test inputs"
        f" (clean test accuracy {metrics.test_accuracy:.4f})"
    )


def format_implementation(section: ImplementationAudit | Skipped | None) -> list[str]:
    """The white-box implementation audit's lines: per setting the f-DP lower bound with its confidence
    and whether the accountant's own curve was rejected, Steinke et al.'s bound beside it, the
    Gaussian-DP estimate (not a bound) and the canaries, runs and time it took."""
    if section is None:
        return []
    if isinstance(section, Skipped):
        return [f"{'white-box':<13}skipped: {section.reason}"]
    lines = []
    for r in section.records.values():
        estimate = "n/a" if r.epsilon_estimate is None else f"{r.epsilon_estimate:.3f}"
        verdict = "REJECTED" if r.accountant_curve_rejected else "not rejected"
        lines.append(
            f"{'white-box':<13}{r.setting.replace('_', ' ')}: eps lower bound {r.epsilon_lower_bound:.3f}"
            f" (f-DP, {r.confidence:.0%}, {r.n_correct} of {r.n_guesses} guesses right; the accountant's"
            f" curve {verdict}), Steinke et al. {r.steinke.epsilon_lower_bound:.3f}, GDP estimate {estimate}"
            f" (not a bound); {r.runs} run(s) x {r.canaries} canaries of {r.mechanism},"
            f" {section.seconds:.1f} s"
        )
    return lines


def format_evasion(curves: dict[str, EvasionCurve] | None) -> list[str]:
    """The evasion audit's lines: per attack and norm the robust accuracy at each budget (data units:
    pixels in [0, 1], standard deviations for tables), beside clean accuracy, the records attacked and
    the preprocessing defence the model was measured behind, if any."""
    lines = []
    for key, curve in (curves or {}).items():
        at = ", ".join(f"{accuracy:.3f} @ {budget:g}" for budget, accuracy in zip(curve.budgets, curve.robust_accuracy))
        behind = "" if curve.defense == "none" else f", behind {curve.defense} (BPDA)"
        lines.append(
            f"{'evasion':<13}{key:<10}robust accuracy {at}  (clean {curve.clean_accuracy:.3f}, {curve.n} test records{behind})"
        )
    return lines


def format_extraction(section: ExtractionAudit | None) -> list[str]:
    """The extraction audit's lines: per output interface the surrogate's fidelity and test accuracy at
    each query budget, and the equation-solving attack's parameter error."""
    if section is None:
        return []
    lines = []
    for output, curve in section.curves.items():
        at = ", ".join(
            f"{fidelity:.3f} ({accuracy:.3f}) @ {queries}"
            for queries, fidelity, accuracy in zip(curve.queries, curve.fidelity, curve.surrogate_accuracy)
        )
        lines.append(
            f"{'extraction':<13}{output:<14}fidelity (surrogate accuracy) {at} queries"
            f"  ({curve.n} test records; queries past {curve.attacker_records} are mixup)"
        )
    solving = section.equation_solving
    if solving is not None:
        error = "n/a (an answer underflowed)" if solving.relative_error is None else f"{solving.relative_error:.1e}"
        lines.append(
            f"{'extraction':<13}equation solving: relative error {error} of w_k - w_0, b_k - b_0"
            f" from {solving.queries} probability queries"
        )
    return lines


def format_gradient_inversion(result: GradientInversionResult | None) -> list[str]:
    """The gradient inversion audit's line: the attack, what the server saw, how many reconstructions'
    nearest member is their record (against chance), the median MSE and PSNR, and iDLG's labels."""
    if result is None:
        return []
    seen = "raw update" if result.update == "raw" else f"DP-SGD update (sigma {result.noise_multiplier:.3g})"
    found = sum(result.nearest_member_is_true)
    labels = "" if result.label_recovered is None else f"; iDLG labels {sum(result.label_recovered)}/{len(result.label_recovered)}"
    return [
        f"{'grad. inv.':<13}{result.method}, {result.clients} clients x {result.records} records, "
        f"{result.local_steps} local steps, {seen}: nearest member is the record {found}/{len(result.mse)} "
        f"(chance 1/{result.members}); median MSE {result.median_mse:.3g}, PSNR {result.median_psnr:.1f} dB{labels}"
    ]


def format_inversion(section: InversionAudit | None) -> list[str]:
    """The model inversion audit's line: the leak rate and the nearest-is-member rate against chance,
    and the mean distances (L2, pixels) from the reconstructions to the nearest member, nearest
    non-member and class mean."""
    if section is None:
        return []
    classes = len(section.classes)
    mean = {
        name: sum(values) / classes
        for name, values in (
            ("member", section.member_distance),
            ("non-member", section.nonmember_distance),
            ("class mean", section.mean_distance),
        )
    }
    return [
        f"{'inversion':<13}leak rate {section.leak_rate:.2f} of {classes} classes, nearest record a member"
        f" {section.nearest_member_rate:.2f} (chance {section.chance:.2f}); mean L2 distance (pixels) to nearest"
        f" member {mean['member']:.2f}, non-member {mean['non-member']:.2f}, class mean {mean['class mean']:.2f}"
        f"  (prior {section.prior}; {section.members} members / {section.non_members} non-members)"
    ]


def format_audit(report: AuditReport) -> str:
    """The audit's lines of the summary: each attack's AUC with its interval, TPR at 1% FPR and epsilon lower bound."""
    lines = []
    for name, m in report.mia.items():
        tpr = m.tpr_at_fpr["0.01"]
        lines.append(
            f"{name:<13}AUC {m.auc:.3f} [{m.auc_ci.low:.3f}, {m.auc_ci.high:.3f}]"
            f"  TPR@1%FPR {'n/a' if tpr is None else f'{tpr:.3f}'}"
            f"  eps lower bound {m.epsilon_lower_bound.value:.3f}"
            f"  ({m.n_members} members / {m.n_nonmembers} non-members)"
        )
    aia = report.aia
    if isinstance(aia, Skipped):
        lines.append(f"{'attribute':<13}skipped: {aia.reason}")
    else:
        lines.append(
            f"{'attribute':<13}attack accuracy {aia.members.attack.accuracy:.3f} on members,"
            f" {aia.nonmembers.attack.accuracy:.3f} on non-members; imputation"
            f" {aia.members.imputation.accuracy:.3f} / {aia.nonmembers.imputation.accuracy:.3f};"
            f" leakage {aia.leakage['accuracy']:+.3f}"
        )
    c = report.canary
    if isinstance(c, Skipped):
        lines.append(f"{'canaries':<13}skipped: {c.reason}")
    elif c is not None:
        lines.append(
            f"{'canaries':<13}one-run eps lower bound {c.epsilon_lower_bound:.3f}"
            f" ({c.n_correct} of {c.n_guesses} guesses right, {c.n_canaries} canaries)"
        )
    lines += format_implementation(report.implementation)
    lines += format_evasion(report.evasion)
    lines += format_extraction(report.extraction)
    lines += format_gradient_inversion(report.gradient_inversion)
    lines += format_inversion(report.inversion)
    lines += [f"WARNING      {warning}" for warning in report.warnings]
    return "\n".join(f"{'audit' if i == 0 else '':<15}{line}" for i, line in enumerate(lines))
