"""The audit's TensorBoard sink: its headline numbers (the run's HParams metrics), its text summary, and
the ROC and score-histogram panels of every membership attack."""

from __future__ import annotations

from dptrain.audit.metrics import FPR_TARGETS, fpr_key, roc_curve
from dptrain.audit.results import AttributeInferenceResult, AuditReport, OneRunAudit, Skipped
from dptrain.tracking.figures import (
    evasion_figure,
    extraction_figure,
    inversion_grid_image,
    roc_image,
    score_histograms_image,
)
from dptrain.views.summary import (
    format_evasion,
    format_extraction,
    format_gradient_inversion,
    format_implementation,
    format_inversion,
)
from dptrain.tracking.tensorboard import TensorBoardLog

# Bins of the member / non-member score histograms.
SCORE_BINS = 40


def headline_metrics(report: AuditReport) -> dict[str, float | None]:
    """The audit's headline numbers, the metrics of the run's HParams record: per membership attack
    AUC, TPR at 1% FPR and the epsilon lower bound; attribute inference's advantage on members and
    leakage; the canary bound; the implementation audit's bounds; the threat audits' headline numbers
    (``AuditReport.threat_headlines``). The rest (intervals, TPR at 0.1% and 10%, counts) is in the text
    summary."""
    values: dict[str, float | None] = {}
    for name, metrics in report.mia.items():
        values[f"mia/{name}/auc"] = metrics.auc
        values[f"mia/{name}/tpr@1%"] = metrics.tpr_at_fpr[fpr_key(0.01)]
        values[f"mia/{name}/eps_lb"] = metrics.epsilon_lower_bound.value
    if isinstance(report.aia, AttributeInferenceResult):
        values["aia/advantage"] = report.aia.members.advantage["accuracy"]
        values["aia/leakage"] = report.aia.leakage["accuracy"]
    if isinstance(report.canary, OneRunAudit):
        values["canary/eps_lb"] = report.canary.epsilon_lower_bound
    for setting, record in report.implementation_records.items():
        values[f"implementation/{setting}/eps_lb"] = record.epsilon_lower_bound
        if record.steinke is not None:  # audits before the f-DP bound have one bound only
            values[f"implementation/{setting}/steinke_eps_lb"] = record.steinke.epsilon_lower_bound
        values[f"implementation/{setting}/eps_estimate"] = record.epsilon_estimate
    values.update({"/".join(path): value for path, value in report.threat_headlines().items()})
    return values


def _number(value: float | None, digits: str = ".3f") -> str:
    return "n/a" if value is None else format(value, digits)


def summary_table(report: AuditReport) -> str:
    """Markdown table of the membership attacks, for TensorBoard's text tab and the console."""
    rows = ["| attack | AUC [95% CI] | TPR@0.1% | TPR@1% | TPR@10% | eps lower bound | members / non-members |", "|---|---|---|---|---|---|---|"]
    for name, m in report.mia.items():
        tprs = " | ".join(_number(m.tpr_at_fpr[fpr_key(t)]) for t in FPR_TARGETS)
        rows.append(
            f"| {name} | {m.auc:.3f} [{m.auc_ci.low:.3f}, {m.auc_ci.high:.3f}] | {tprs} | "
            f"{m.epsilon_lower_bound.value:.3f} | {m.n_members} / {m.n_nonmembers} |"
        )
    return "\n".join(rows)


def _aia_table(aia: AttributeInferenceResult) -> str:
    rows = [
        f"| attribute `{aia.attribute}` | attack accuracy | imputation accuracy | advantage |",
        "|---|---|---|---|",
    ]
    for g, label in ((aia.members, "members"), (aia.nonmembers, "non-members")):
        rows.append(
            f"| {label} | {g.attack.accuracy:.3f} | {g.imputation.accuracy:.3f} | {g.advantage['accuracy']:+.3f} |"
        )
    rows.append(f"| leakage (members - non-members) | | | {aia.leakage['accuracy']:+.3f} |")
    return "\n".join(rows)


def audit_text(report: AuditReport, step: int) -> str:
    """The audit's TensorBoard text: which audit it is, every attack's numbers, attribute inference,
    the canary bound (or why there is none) and the warnings."""
    when = report.audited_at.replace("T", " ").replace("+00:00", " UTC")
    parts = [f"**Audit {step}** of this run: level `{report.level}`, {when}."]
    if report.mia:
        parts.append(summary_table(report))
    aia = report.aia
    parts.append(f"Attribute inference skipped: {aia.reason}." if isinstance(aia, Skipped) else _aia_table(aia))
    canary = report.canary
    if canary is not None:
        parts.append(
            f"Canaries skipped: {canary.reason}."
            if isinstance(canary, Skipped)
            else f"Canaries: one-run epsilon lower bound {canary.epsilon_lower_bound:.3f} "
            f"({canary.n_correct} of {canary.n_guesses} guesses right, {canary.n_canaries} canaries)."
        )
    parts += format_implementation(report.implementation)
    parts += format_evasion(report.evasion)
    parts += format_extraction(report.extraction)
    parts += format_gradient_inversion(report.gradient_inversion)
    parts += format_inversion(report.inversion)
    if report.warnings:
        parts.append("**Warnings**: " + "; ".join(report.warnings))
    return "\n\n".join(parts)


def draw_audit(tb: TensorBoardLog, report: AuditReport, scores: dict, step: int, inversion_images=None) -> None:
    """The audit's panels at ``step``: the ROC of every attack, the score histograms (one panel per
    attack), robust accuracy against the evasion budget, extraction fidelity against the query budget,
    the model inversion grid (``inversion_images``, ``dptrain.audit.inversion.InversionImages``, when the
    audit ran) and the text summary. Single numbers go to the text and to HParams, not to one-point charts."""
    if scores:
        curves = {}
        for name, (member_scores, nonmember_scores) in scores.items():
            roc = roc_curve(member_scores, nonmember_scores)
            curves[name] = (roc.fpr, roc.tpr)
        floor = 1.0 / max(len(s[1]) for s in scores.values())
        tb.image("audit/roc", roc_image(curves, floor=min(floor, 1e-3)), step)
        tb.image("audit/scores", score_histograms_image(scores, SCORE_BINS), step)
    if report.evasion:
        curves = {key: (c.budgets, c.robust_accuracy, c.clean_accuracy) for key, c in report.evasion.items()}
        tb.figure("audit/evasion", evasion_figure(curves), step)
    if report.extraction is not None:
        curves = {output: (c.queries, c.fidelity) for output, c in report.extraction.curves.items()}
        tb.figure("audit/extraction", extraction_figure(curves), step)
    if inversion_images is not None:
        rows = {
            f"class {c}": (r.numpy(), m.numpy(), n.numpy())
            for c, r, m, n in zip(
                report.inversion.classes,
                inversion_images.reconstructions,
                inversion_images.class_means,
                inversion_images.nearest_members,
            )
        }
        tb.image("audit/inversion", inversion_grid_image(rows), step)
    tb.text("audit/summary", audit_text(report, step), step)
