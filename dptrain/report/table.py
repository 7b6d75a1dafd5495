"""The report's table: one row per run with the overrides that differ between runs and the run's results,
and its two renderings, ``report.csv`` and a Markdown table."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from dptrain.audit.metrics import fpr_key
from dptrain.audit.results import AttributeInferenceResult, AuditReport, OneRunAudit
from dptrain.errors import UserError
from dptrain.report.collect import RunRecord
from dptrain.tracking.artifacts import AUDIT

# Overrides that set the privacy budget: the x axis of the figures rather than a series of its own.
BUDGET_KEYS = ("privacy", "privacy.target_epsilon", "privacy.noise_multiplier")

LEADING = ("test_accuracy", "epsilon", "delta", "noise_multiplier")
# Which of a run's audits its audit numbers are: audit.json, the latest, names its level and history file.
AUDIT_COLUMNS = ("audit_level", "audit_file")
# Poisoning and Byzantine robustness numbers (metrics.json), columns only when some run has them:
# members poisoned (centralized, shown only when some run poisoned any), the backdoor's success rate,
# a targeted label flip's source-class test accuracy, and the Byzantine updates a federated rule selected.
FEDERATED = ("poisoned", "backdoor_success_rate", "poisoned_class_accuracy", "byzantine_selected_fraction")
# A run on a proxy (train.proxy, metrics.json's "proxy"): what it trained on, and its validation accuracy
# there; columns only when some run has them. Its epsilon is empty: it read no member.
PROXY = ("proxy", "validation_accuracy")
# The white-box implementation audit's bound per setting (audit.json's "implementation").
WHITEBOX = ("implementation.all_iterates.eps_lb", "implementation.final_model.eps_lb")
TRAILING = ("canary.eps_lb", *WHITEBOX, "aia.advantage", "aia.leakage", "train_seconds", "audit_seconds")
ATTACK_COLUMNS = ("auc", "tpr@1%fpr", "eps_lb")
# audit.json's key of the TPR at 1% FPR (results schema: tpr_at_fpr keyed "0.001", "0.01", "0.1").
LOW_FPR_KEY = fpr_key(0.01)


@dataclass
class Table:
    """Rows keyed by column. Result values are floats (``inf`` is the non-private baseline's epsilon) or
    None where a run has no such number; ``run``, ``status``, ``missing`` and override values are strings."""

    columns: list[str]
    rows: list[dict]
    override_keys: list[str]
    attacks: list[str]


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def differing_overrides(runs: list[RunRecord]) -> list[str]:
    """Override keys (in first-seen order) whose value is not the same in every run; a key some runs
    leave at its default differs too."""
    given = [dict(map(_split, run.overrides)) for run in runs]
    keys = dict.fromkeys(key for overrides in given for key in overrides)
    return [key for key in keys if len({overrides.get(key) for overrides in given}) > 1]


def attack_column(attack: str, metric: str) -> str:
    return f"mia.{attack}.{metric}"


def threat_columns(audit: AuditReport) -> dict[str, float | None]:
    """The evasion, extraction, gradient inversion and model inversion audits' headline numbers
    (``AuditReport.threat_headlines``) as columns, e.g. ``evasion.pgd_linf@0.1``,
    ``extraction.label.fidelity@1000``, ``inversion.leak_rate`` (none for audits that were off)."""
    return {".".join(path): value for path, value in audit.threat_headlines().items()}


def _results(
    run: RunRecord, attacks: list[str], federated: list[str], per_budget: list[str], proxied: bool
) -> dict:
    metrics, audit = run.metrics or {}, run.audit
    columns = [
        *LEADING, *(PROXY if proxied else ()), *federated, *AUDIT_COLUMNS,
        *(attack_column(a, m) for a in attacks for m in ATTACK_COLUMNS),
        *per_budget, *TRAILING,
    ]  # fmt: skip
    row = dict.fromkeys(columns)
    row.update({key: metrics.get(key) for key in federated})
    if metrics:
        # Both recipes write "private" (centralized and federated ``metrics.json``).
        private = metrics["private"]
        row.update(
            test_accuracy=metrics["test_accuracy"],
            epsilon=metrics["epsilon"] if private else math.inf,
            delta=metrics["delta"] if private else None,
            noise_multiplier=metrics["noise_multiplier"],
            train_seconds=metrics["train_seconds"],
        )
    if metrics.get("proxy"):
        row.update(proxy=metrics["proxy"]["data"], validation_accuracy=metrics["proxy"]["validation_accuracy"])
    if audit is None:
        return row
    for attack, result in audit.mia.items():
        row[attack_column(attack, "auc")] = result.auc
        row[attack_column(attack, "tpr@1%fpr")] = result.tpr_at_fpr[LOW_FPR_KEY]
        row[attack_column(attack, "eps_lb")] = result.epsilon_lower_bound.value
    if isinstance(audit.canary, OneRunAudit):
        row["canary.eps_lb"] = audit.canary.epsilon_lower_bound
    for setting, record in audit.implementation_records.items():
        row[f"implementation.{setting}.eps_lb"] = record.epsilon_lower_bound
    if isinstance(audit.aia, AttributeInferenceResult):
        row["aia.advantage"] = audit.aia.members.advantage["accuracy"]
        row["aia.leakage"] = audit.aia.leakage["accuracy"]
    row.update(threat_columns(audit))
    row["audit_seconds"] = audit.audit_seconds
    row["audit_level"] = audit.level
    # Audits written before the history was kept do not name a history file.
    row["audit_file"] = audit.history_file or AUDIT
    return row


def build_table(runs: list[RunRecord]) -> Table:
    """One row per run (complete or not, in the given order): name, status, missing files, the differing
    overrides, test accuracy, epsilon, delta, noise multiplier, which audit the audit numbers come from
    (level and history file of the latest), per membership attack AUC / TPR at 1% FPR /
    empirical epsilon lower bound, the threat audits' headline numbers (``threat_columns``), the canary
    bound, attribute-inference advantage and leakage, seconds; runs on a proxy add what they trained on
    and their validation accuracy (``PROXY``), with no epsilon; poisoned
    runs add the members poisoned, the backdoor's success rate and a targeted flip's poisoned-class
    accuracy, federated runs the share of Byzantine updates selected."""
    override_keys = differing_overrides(runs)
    attacks = list(dict.fromkeys(a for run in runs if run.audit for a in run.audit.mia))
    federated = [key for key in FEDERATED if any(run.metrics and run.metrics.get(key) is not None for run in runs)]
    if not any(run.metrics and run.metrics.get("poisoned") for run in runs):
        # Every centralized run records poisoned = 0: a column of zeros says nothing.
        federated = [key for key in federated if key != "poisoned"]
    # The threat audits' columns, the evasion and extraction ones named for the budget they were read at.
    per_budget = list(dict.fromkeys(column for run in runs if run.audit for column in threat_columns(run.audit)))
    proxied = any(run.metrics and run.metrics.get("proxy") for run in runs)
    rows = []
    for run in runs:
        given = dict(map(_split, run.overrides))
        rows.append(
            {
                "run": run.name,
                "status": "complete" if run.complete else "incomplete",
                "missing": ", ".join(run.missing),
                **{key: given.get(key, "") for key in override_keys},
                **_results(run, attacks, federated, per_budget, proxied),
            }
        )
    columns = list(rows[0]) if rows else []
    return Table(columns, rows, override_keys, attacks)


def metric_columns(table: Table) -> list[str]:
    """The columns that hold a number per run (what ``--select`` can choose by)."""
    return [
        c
        for c in table.columns
        if c in (*LEADING, *FEDERATED, *TRAILING)
        or c.startswith(("mia.", "evasion.", "extraction.", "gradient_inversion.", "inversion."))
    ]


def parse_spec(spec: str, table: Table) -> tuple[str, bool]:
    """``METRIC``, ``METRIC:max`` or ``METRIC:min`` -> (column, maximize); the column must be a metric of the table."""
    metric, _, direction = spec.partition(":")
    if direction not in ("", "max", "min"):
        raise UserError(f"--select {spec}: the direction after ':' must be max or min")
    if metric not in metric_columns(table):
        choices = ", ".join(metric_columns(table))
        raise UserError(f"--select {metric} is not a column of this report: choose one of {choices}")
    return metric, direction != "min"


def run_label(table: Table, row: dict, exclude: tuple[str, ...] = ()) -> str:
    """The differing overrides of ``row`` as ``key=value`` words (those in ``exclude`` left out)."""
    return " ".join(f"{key}={row[key]}" for key in table.override_keys if key not in exclude and row[key] != "")


def _csv_value(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) and math.isfinite(value) else str(value)


def to_csv(table: Table) -> str:
    """The table as CSV text: floats at full precision, ``inf`` for the baseline's epsilon, empty for no value."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=table.columns, lineterminator="\n")
    writer.writeheader()
    for row in table.rows:
        writer.writerow({column: _csv_value(row[column]) for column in table.columns})
    return buffer.getvalue()


def _digits(column: str) -> str:
    if column in ("epsilon", "noise_multiplier") or column.endswith("eps_lb"):
        return ".2f"
    if column.endswith("seconds"):
        return ".1f"
    if column == "delta":
        return ".0e"
    if column.startswith("aia."):
        return "+.3f"
    return ".3f"


def _markdown_value(column: str, value) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else format(value, _digits(column))
    return str(value).replace("|", "\\|")


def to_markdown(table: Table) -> str:
    """The table as a Markdown table; incomplete runs keep their row, with ``–`` where they have no number.
    Result columns no run has a value in (e.g. canaries that were not inserted, or no audit) are left out."""
    results = {*metric_columns(table), *AUDIT_COLUMNS}
    columns = [
        c for c in table.columns
        if c != "missing" and not (c in results and all(row[c] is None for row in table.rows))
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table.rows:
        lines.append("| " + " | ".join(_markdown_value(c, row[c]) for c in columns) + " |")
    return "\n".join(lines)
