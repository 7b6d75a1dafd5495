"""``dptrain report``: collect the runs below a directory and write ``report.csv``, ``report.md``, the
figures and, with ``--select``, ``selection.json``; every file is written atomically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dptrain.report.collect import Sweep, find_runs
from dptrain.report.table import Table, build_table, parse_spec, to_csv, to_markdown
from dptrain.tracking.atomic import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from dptrain.report.selection import Selection

CSV = "report.csv"
MARKDOWN = "report.md"
SELECTION = "selection.json"

COLUMN_NOTES = """Columns:

- `epsilon`: the accountant's epsilon for the steps the run took, at `delta`; `inf` is the non-private baseline.
- `audit_level`, `audit_file`: the audit the audit columns show, the run's latest (`audit.json`); every audit of
  a run is kept in its `audits/` directory.
- `mia.<attack>.auc`, `mia.<attack>.tpr@1%fpr`, `mia.<attack>.eps_lb`: membership inference on the run's
  members vs non-members: AUC, true-positive rate at 1% false-positive rate, and the empirical epsilon lower
  bound (95% confidence); `canary.eps_lb` is the one-run canary bound.
- `aia.advantage`: attribute-inference accuracy minus imputation accuracy on the members; `aia.leakage`: that
  advantage minus the same on non-members.
- Poisoned runs: `poisoned` members, `backdoor_success_rate` on triggered test inputs of other classes,
  `poisoned_class_accuracy` (a targeted label flip's source class, test records); federated runs:
  `byzantine_selected_fraction` of the updates the aggregator selected that were Byzantine.
  `poisoning_vs_epsilon.png` draws them per poisoned count k (mean over seeds, bars min-max) with the
  group-privacy bound from the k = 0 runs at the same epsilon: 2k add/remove steps, so
  ASR <= e^(2k eps) ASR_0 + 2k e^((2k-1) eps) delta (clipped at 1; vacuous once 2k eps is a few).
- `–`: no value (not audited, attack not run, or the run is incomplete)."""


@dataclass
class Report:
    """What ``build_report`` wrote and the content behind it."""

    out: Path
    files: list[Path]
    sweep: Sweep
    table: Table
    selection: Selection | None


def _overview(sweep: Sweep) -> list[str]:
    complete = sum(run.complete for run in sweep.runs)
    counts = f"{complete} complete, {len(sweep.runs) - complete} incomplete"
    if sweep.jobs is not None:
        counts += f", of {sweep.jobs} jobs in the sweep"
    lines = [f"Runs below `{sweep.root}`: {counts}."]
    if sweep.command:
        lines += ["", f"Sweep: `{sweep.command}`"]
    return lines


def _incomplete(sweep: Sweep) -> list[str]:
    runs = [run for run in sweep.runs if not run.complete]
    if not runs:
        return []
    return ["", "Incomplete runs (interrupted, failed or still running), listed with what they lack:", ""] + [
        f"- `{run.name}`: no {', '.join(run.missing)}" for run in runs
    ]


def build_report(root: str | Path, out: str | Path | None = None, select: str | None = None) -> Report:
    """Write the report of the runs below ``root`` into ``out`` (default: ``root``).

    Runs without ``metrics.json``, ``manifest.json`` or (when audited) ``audit.json`` stay in the table as
    incomplete; figures and the selection use the complete runs. ``select`` is ``METRIC[:max|:min]``
    (see ``selection.select``). Raises ``UserError`` for a directory without runs or a bad ``select``,
    before anything is written.
    """
    sweep = find_runs(root)
    out = Path(root if out is None else out)
    table = build_table(sweep.runs)
    chosen = None
    if select is not None:
        # A misspelt metric fails here, before the selection's imports (Opacus, torch) take seconds.
        metric, maximize = parse_spec(select, table)
        from dptrain.report.selection import select as select_run

        chosen = select_run(table, sweep.runs, metric, maximize)
    from dptrain.report.figures import FIGURE_FILES, report_figures, save_figure

    files = [write_text_atomic(out / CSV, to_csv(table))]
    figures = report_figures(table)
    files += [save_figure(figure, out / name) for name, figure in figures.items()]
    sections = ["# dptrain report", "", *_overview(sweep), "", to_markdown(table), *_incomplete(sweep)]
    if figures:
        sections += ["", "## Figures", ""] + [f"![{Path(name).stem}]({name})" for name in figures]
    sections += ["", COLUMN_NOTES]
    if chosen is not None:
        from dptrain.report.selection import selection_markdown

        sections += ["", selection_markdown(chosen)]
        files.append(write_json_atomic(out / SELECTION, chosen.to_dict()))
    files.append(write_text_atomic(out / MARKDOWN, "\n".join(sections) + "\n"))
    # What an earlier report wrote and this one does not (no --select, no audited run) would look current.
    for stale in {*FIGURE_FILES, SELECTION} - {path.name for path in files}:
        (out / stale).unlink(missing_ok=True)
    return Report(out, files, sweep, table, chosen)


def console_summary(report: Report) -> str:
    """What ``dptrain report`` prints: the table, incomplete runs, the selection in one paragraph, the files."""
    lines = [*_overview(report.sweep), "", to_markdown(report.table), *_incomplete(report.sweep)]
    s = report.selection
    if s is not None:
        lines += [
            "",
            f"{'selected':<15}`{s.best}` ({s.label}): {s.metric} {s.value:.4g}, epsilon {s.single_epsilon:.2f} alone",
        ]
        if s.tuning == "tuned":
            lines += [
                f"{'':<15}{s.composition_epsilon:.2f} for choosing it from the fixed grid as run"
                f" ({len(s.candidates)} private runs, composition),",
                f"{'':<15}{s.tuning_epsilon:.2f} had the number of trials been random"
                f" (random stopping, Papernot & Steinke 2022); assumptions in {MARKDOWN}",
            ]
        elif s.tuning == "not covered":
            lines.append(f"{'':<15}no tuning bound: {s.metric} is not a DP score of the runs (see {MARKDOWN})")
        else:
            lines.append(f"{'':<15}the only private candidate: nothing was chosen among private runs")
    lines += ["", f"{'report':<15}{', '.join(str(path) for path in report.files)}"]
    return "\n".join(lines)

