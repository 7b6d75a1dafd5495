"""The report's figures against the accountant's epsilon: test accuracy, membership leakage (TPR at 1% FPR
and AUC), empirical epsilon lower bounds with the y = x line, and for a poisoning sweep what k poisoned
records achieved beside the group-privacy bound. The non-private baseline is drawn at the right edge of
the epsilon axis, labelled "inf"."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dptrain.report.poisoning import MEASURES, group_bound, seed_summaries  # noqa: E402
from dptrain.report.table import BUDGET_KEYS, Table, attack_column, run_label  # noqa: E402
from dptrain.tracking.atomic import write_atomic  # noqa: E402

# Where the baseline sits, in doublings of epsilon beyond the largest finite one.
INF_OFFSET = 2**1.5
LOW_FPR = 0.01
MAX_LEGEND = 12
# Every file report_figures may write.
FIGURE_FILES = (
    "accuracy_vs_epsilon.png", "leakage_vs_epsilon.png", "lower_bound_vs_epsilon.png", "frontier.png",
    "poisoning_vs_epsilon.png",
)  # fmt: skip
POISONING_TITLES = {
    "backdoor_success_rate": "backdoor success rate",
    "poisoned_class_accuracy": "poisoned-class accuracy",
}


class EpsilonAxis:
    """A log2 epsilon axis with a tick at each epsilon of the sweep and the baseline at the right edge."""

    def __init__(self, epsilons: list[float]):
        finite = sorted({e for e in epsilons if math.isfinite(e)})
        self.finite = finite
        self.has_baseline = any(math.isinf(e) for e in epsilons)
        self.inf_x = finite[-1] * INF_OFFSET if finite else 1.0

    def x(self, epsilon: float) -> float:
        return self.inf_x if math.isinf(epsilon) else epsilon

    def decorate(self, axis) -> None:
        axis.set_xscale("log", base=2)
        ticks = self.finite[:: max(1, math.ceil(len(self.finite) / 8))]
        labels = [f"{e:.2g}" if e < 100 else f"{e:.0f}" for e in ticks]
        if self.has_baseline:
            ticks, labels = [*ticks, self.inf_x], [*labels, "inf"]
            if self.finite:
                axis.axvline(math.sqrt(self.finite[-1] * self.inf_x), color="lightgrey", linestyle=":", linewidth=1)
        axis.set_xticks(ticks, labels)
        axis.minorticks_off()
        low = self.finite[0] if self.finite else self.inf_x
        axis.set_xlim(low / 2**0.5, (self.inf_x if self.has_baseline else self.finite[-1]) * 2**0.5)
        axis.set_xlabel("epsilon (accountant)")


def _complete(table: Table) -> list[dict]:
    """The complete runs that have the members' epsilon to plot against: runs on a proxy have none."""
    return [row for row in table.rows if row["status"] == "complete" and not row.get("proxy")]


def _series(table: Table, column: str, name: str = "") -> dict[str, list[tuple[float, float]]]:
    """``{label: [(epsilon, value), ...]}`` sorted by epsilon, one series per combination of the
    non-budget overrides, for the complete rows that have ``column``."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in _complete(table):
        if row[column] is None:
            continue
        label = ", ".join(part for part in (name, run_label(table, row, BUDGET_KEYS)) if part)
        series.setdefault(label, []).append((row["epsilon"], row[column]))
    return {label: sorted(points) for label, points in series.items()}


def _plot(
    axis, eps_axis: EpsilonAxis, label: str, points: list[tuple[float, float]], level: bool = False, marker: str = "o"
) -> None:
    """Finite epsilons joined by a line; the baseline as a hollow marker of the same colour, and with
    ``level`` also as a dashed horizontal line the private runs can be read against."""
    finite = [(e, v) for e, v in points if math.isfinite(e)]
    baseline = [(eps_axis.x(e), v) for e, v in points if math.isinf(e)]
    (line,) = axis.plot([e for e, _ in finite], [v for _, v in finite], marker=marker, label=label or None)
    if baseline and level:
        axis.axhline(baseline[0][1], color=line.get_color(), linestyle="--", linewidth=1, alpha=0.5)
    if baseline:
        axis.plot(
            [x for x, _ in baseline],
            [v for _, v in baseline],
            marker=marker,
            linestyle="none",
            markerfacecolor="white",
            color=line.get_color(),
            label=None if finite else label or None,
        )


def _legend(axis) -> None:
    # A matrix sweep (aggregator x attack) draws dozens of series: a legend that long hides the plot.
    labels = axis.get_legend_handles_labels()[1]
    if 0 < len(labels) <= MAX_LEGEND:
        axis.legend(fontsize="small")


def _delta(table: Table) -> float:
    deltas = [row["delta"] for row in _complete(table) if row["delta"] is not None]
    return max(deltas) if deltas else 0.0


def draw_accuracy(axis, table: Table, eps_axis: EpsilonAxis) -> None:
    for label, points in _series(table, "test_accuracy").items():
        _plot(axis, eps_axis, label, points, level=True)
    eps_axis.decorate(axis)
    axis.set(ylabel="test accuracy", title="utility")
    _legend(axis)


def draw_leakage(axis, table: Table, eps_axis: EpsilonAxis, metric: str) -> None:
    """One series per attack; TPR at 1% FPR comes with chance (1%) and the ceiling any (epsilon, delta)-DP
    model imposes on every attack, TPR <= e^epsilon * FPR + delta (Kairouz et al. 2015); AUC with chance 0.5."""
    measured = [LOW_FPR]
    for attack in table.attacks:
        for label, points in _series(table, attack_column(attack, metric), attack).items():
            _plot(axis, eps_axis, label, points)
            measured += [v for _, v in points]
    if metric == "tpr@1%fpr":
        if eps_axis.finite:
            grid = np.geomspace(eps_axis.finite[0] / 2**0.5, eps_axis.finite[-1], 100)
            ceiling = np.minimum(1.0, np.exp(grid) * LOW_FPR + _delta(table))
            axis.plot(grid, ceiling, color="grey", linestyle="--", linewidth=1, label="DP ceiling e^ε·1% + δ")
        axis.axhline(LOW_FPR, color="grey", linestyle=":", linewidth=1, label="chance")
        # The ceiling grows like e^epsilon: scale to the measurements and let it leave the plot.
        axis.set_ylim(0, min(1.0, 2.5 * max(measured)))
        axis.set(ylabel="TPR at 1% FPR", title="leakage: TPR at 1% FPR")
    else:
        axis.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
        axis.set(ylabel="AUC", title="leakage: AUC")
    eps_axis.decorate(axis)
    _legend(axis)


# The white-box implementation audit's series: its name in the legend and its marker.
WHITEBOX_SERIES = {
    "implementation.all_iterates.eps_lb": ("white-box, all iterates", "s"),
    "implementation.final_model.eps_lb": ("white-box, final model", "D"),
}


def draw_lower_bound(axis, table: Table, eps_axis: EpsilonAxis) -> None:
    """Empirical lower bounds per attack (black-box), of the canary audit and of the white-box
    implementation audit, against the accountant's epsilon; a point above y = x would contradict the
    accountant, i.e. a bug in training or in the audit."""
    columns = [(attack, attack_column(attack, "eps_lb"), "o") for attack in table.attacks]
    columns += [("canary", "canary.eps_lb", "o")]
    columns += [(name, column, marker) for column, (name, marker) in WHITEBOX_SERIES.items()]
    top = 0.0
    for name, column, marker in columns:
        for label, points in _series(table, column, name).items():
            _plot(axis, eps_axis, label, points, marker=marker)
            top = max([top, *(v for _, v in points)])
    if eps_axis.finite:
        edge = eps_axis.finite[-1]
        axis.plot([eps_axis.finite[0] / 2**0.5, edge], [eps_axis.finite[0] / 2**0.5, edge], color="grey",
                  linestyle="--", linewidth=1, label="y = x (accountant)")
        top = max(top, edge)
    eps_axis.decorate(axis)
    axis.set_ylim(0, max(top, 1.0) * 1.08)
    axis.set(ylabel="empirical epsilon lower bound", title="audit vs accountant")
    _legend(axis)


def draw_poisoning(axis, table: Table, eps_axis: EpsilonAxis, column: str) -> None:
    """One line per series and poisoned count k: the mean over seeds with min-max bars; for k > 0 the
    group-privacy bound at each finite epsilon from the k = 0 runs' mean there, dashed in the same colour
    (``report.poisoning``: a ceiling on the success rate, a floor on the poisoned-class accuracy)."""
    summaries = seed_summaries(table, column)
    for label, by_count in summaries.items():
        clean = {cell.epsilon: cell for cell in by_count.get(0, [])}
        for poisoned, cells in by_count.items():
            name = ", ".join(part for part in (label, f"k={poisoned}") if part)
            points = [(cell.epsilon, cell.mean) for cell in cells]
            _plot(axis, eps_axis, name, points)
            line = axis.get_lines()[-1]
            x = [eps_axis.x(cell.epsilon) for cell in cells]
            below = [cell.mean - cell.low for cell in cells]
            above = [cell.high - cell.mean for cell in cells]
            axis.errorbar(x, [cell.mean for cell in cells], yerr=[below, above], fmt="none", capsize=3,
                          color=line.get_color(), linewidth=1)
            bounds = [(e, group_bound(column, clean[e], poisoned)) for e, _ in points if e in clean and poisoned]
            bounds = [(e, b) for e, b in bounds if b is not None]
            if bounds:
                axis.plot([e for e, _ in bounds], [b for _, b in bounds], color=line.get_color(), linestyle="--",
                          linewidth=1, marker="_", label=f"{name}: DP {MEASURES[column]}")
    eps_axis.decorate(axis)
    axis.set_ylim(-0.02, 1.02)
    seeds = max(len(cell.values) for by_count in summaries.values() for cells in by_count.values() for cell in cells)
    axis.set(ylabel=f"{POISONING_TITLES[column]} (mean, min-max over {seeds} seeds)", title=POISONING_TITLES[column])
    _legend(axis)


def poisoning_columns(table: Table) -> list[str]:
    """The poisoning measurements some complete run of ``table`` has, in ``MEASURES`` order."""
    return [c for c in MEASURES if c in table.columns and any(row[c] is not None for row in _complete(table))]


def report_figures(table: Table) -> dict[str, object]:
    """The report's figures by file name; leakage and lower-bound figures only when the runs were audited,
    none without a complete run."""
    rows = _complete(table)
    if not rows:
        return {}
    eps_axis = EpsilonAxis([row["epsilon"] for row in rows])
    figures = {}
    figure, axis = plt.subplots(figsize=(5, 3.8))
    draw_accuracy(axis, table, eps_axis)
    figures["accuracy_vs_epsilon.png"] = figure
    measures = poisoning_columns(table)
    if measures:
        figure, axes = plt.subplots(1, len(measures), figsize=(6 * len(measures), 4.2), squeeze=False)
        for axis, column in zip(axes[0], measures):
            draw_poisoning(axis, table, eps_axis, column)
        figures["poisoning_vs_epsilon.png"] = figure
    if not table.attacks:
        return figures
    figure, (tpr, auc) = plt.subplots(1, 2, figsize=(10, 3.8))
    draw_leakage(tpr, table, eps_axis, "tpr@1%fpr")
    draw_leakage(auc, table, eps_axis, "auc")
    figures["leakage_vs_epsilon.png"] = figure
    figure, axis = plt.subplots(figsize=(5, 3.8))
    draw_lower_bound(axis, table, eps_axis)
    figures["lower_bound_vs_epsilon.png"] = figure
    figure, (accuracy, tpr, bound) = plt.subplots(1, 3, figsize=(14, 3.8))
    draw_accuracy(accuracy, table, eps_axis)
    draw_leakage(tpr, table, eps_axis, "tpr@1%fpr")
    draw_lower_bound(bound, table, eps_axis)
    figure.suptitle("privacy-utility-leakage frontier")
    figures["frontier.png"] = figure
    return figures


def save_figure(figure, path: Path) -> Path:
    """Write ``figure`` as a PNG atomically and close it."""
    figure.tight_layout()
    try:
        return write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    finally:
        plt.close(figure)
