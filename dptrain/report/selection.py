"""``dptrain report --select``: the best run of a report by one metric, and the privacy cost of having
chosen it (``tuning``), with the assumptions each number rests on."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from dptrain.errors import UserError
from dptrain.report.collect import RunRecord
from dptrain.report.table import Table, run_label
from dptrain.report.tuning import (
    Mechanism,
    TuningBound,
    composition_epsilon,
    epsilon_from_rdp,
    random_stopping_bounds,
    rdp_curve,
)

# Scores computed from the trained model and records outside the members: a trial that trains with
# DP-SGD and reports one of these is a DP computation on the members, as the tuning bounds require.
# Audit numbers are computed on the members without noise; train_* on the members.
COVERED = ("test_accuracy",)


@dataclass
class Selection:
    """The best complete private run by ``metric`` and what choosing it costs at ``delta``.

    ``bounds`` (random stopping) and ``composition_epsilon`` are None when the metric is not covered
    or fewer than two private runs were candidates.
    """

    metric: str
    maximize: bool
    best: str
    label: str
    value: float
    candidates: list[str]
    delta: float
    single_epsilon: float
    single_rdp_epsilon: float
    bounds: list[TuningBound] | None
    composition_epsilon: float | None
    better_baseline: str | None

    @property
    def covered(self) -> bool:
        """Whether ``metric`` is a DP score of the runs, as the tuning bounds require (``COVERED``)."""
        return self.metric in COVERED

    @property
    def tuning(self) -> Literal["tuned", "not covered", "single candidate"]:
        """Whether the choice has tuning bounds, or why not: the metric is not covered, or only one private
        run was a candidate (``select`` computes the bounds exactly when neither holds)."""
        if self.bounds:
            return "tuned"
        return "single candidate" if self.covered else "not covered"

    @property
    def tuning_epsilon(self) -> float | None:
        """The smallest random-stopping bound (the distribution is fixed before tuning, independently of the data)."""
        return min(bound.epsilon for bound in self.bounds) if self.bounds else None

    def to_dict(self) -> dict:
        return {**asdict(self), "covered": self.covered, "tuning_epsilon": self.tuning_epsilon}


def run_rdp_curve(metrics: dict) -> np.ndarray:
    """The Renyi-DP curve of one run from its ``metrics.json``: its mechanism's, or for a federated
    sample-level run the pointwise maximum over its honest clients' mechanisms, since each record is
    protected by its own client's local DP-SGD (the reported client is the worst only at one delta)."""
    fields = ("noise_multiplier", "sample_rate", "steps")
    clients = {tuple(m[k] for k in fields) for m in metrics.get("client_mechanisms") or [] if m is not None}
    mechanisms = clients or {tuple(metrics[k] for k in fields)}
    return np.max([rdp_curve(Mechanism(*mechanism)) for mechanism in mechanisms], axis=0)


def select(table: Table, runs: list[RunRecord], metric: str, maximize: bool) -> Selection:
    """The best complete private run by ``metric`` (highest when ``maximize``, as ``table.parse_spec`` reads
    ``--select``) and the privacy cost of the selection.

    Candidates are the complete runs with a finite epsilon and a value of the metric: the
    non-private baseline has no finite guarantee to charge, so it is left out (and named when it
    would have won). Raises ``UserError`` when no private run has the metric, or when a run trained on a
    proxy (``train.proxy``) is among them.
    """
    records = {run.name: run for run in runs}
    scored = [row for row in table.rows if row["status"] == "complete" and row[metric] is not None]
    proxied = [row["run"] for row in scored if row.get("proxy")]
    if proxied:
        raise UserError(
            f"--select {metric}: run {proxied[0]} trained on a proxy (train.proxy), not on the members: its numbers "
            "are not the members' and it spent none of their budget; scripts/tune_recipe.py --proxy selects among "
            "such runs and trains the choice on the members"
        )
    candidates = [row for row in scored if math.isfinite(row["epsilon"]) and row["noise_multiplier"] > 0]
    if not candidates:
        raise UserError(f"--select {metric}: no complete private run has a value of {metric} to choose from")
    sign = 1 if maximize else -1
    best = max(candidates, key=lambda row: sign * row[metric])
    overall = max(scored, key=lambda row: sign * row[metric])
    metrics = {row["run"]: records[row["run"]].metrics for row in candidates}
    curves = np.stack([run_rdp_curve(m) for m in metrics.values()])
    names = list(metrics)
    delta = best["delta"]
    tuned = metric in COVERED and len(candidates) > 1
    return Selection(
        metric=metric,
        maximize=maximize,
        best=best["run"],
        label=run_label(table, best) or best["run"],
        value=best[metric],
        candidates=names,
        delta=delta,
        single_epsilon=best["epsilon"],
        single_rdp_epsilon=epsilon_from_rdp(curves[names.index(best["run"])], delta),
        bounds=random_stopping_bounds(curves, delta) if tuned else None,
        composition_epsilon=composition_epsilon(curves, delta) if tuned else None,
        better_baseline=overall["run"] if overall is not best and not math.isfinite(overall["epsilon"]) else None,
    )


def _eps(value: float) -> str:
    return f"{value:.2f}"


def selection_markdown(selection: Selection) -> str:
    """The report's selection section: the chosen run, its single-run epsilon, the cost of choosing it,
    and the assumptions, stated plainly."""
    s = selection
    m = len(s.candidates)
    direction = "highest" if s.maximize else "lowest"
    lines = [
        f"## Selection: {direction} `{s.metric}`",
        "",
        f"Best private run: `{s.best}` ({s.label}), {s.metric} = {s.value:.4g}, chosen among {m} complete private "
        f"run{'s' if m > 1 else ''} ({', '.join(f'`{c}`' for c in s.candidates)}).",
    ]
    if s.better_baseline:
        lines += [
            "",
            f"The non-private run `{s.better_baseline}` scores better but has no privacy guarantee; "
            "it is not a candidate.",
        ]
    lines += [
        "",
        f"| guarantee for releasing `{s.best}` | epsilon at δ = {s.delta:.0e} |",
        "|---|---|",
        f"| this run alone, its accountant (as if no other run had been made) | {_eps(s.single_epsilon)} |",
        f"| this run alone, RDP (the scale of the rows below) | {_eps(s.single_rdp_epsilon)} |",
    ]
    if s.tuning == "not covered":
        lines += [
            "",
            f"**No tuning bound:** the bounds below assume every trial's score is computed from the DP-trained model "
            f"and records outside the protected members ({', '.join(COVERED)} is). `{s.metric}` is not such a score "
            "(audit numbers and train_* are computed on the members without noise), so choosing by it is not a DP "
            "computation and its cost is not bounded here.",
        ]
        return "\n".join(lines)
    if s.tuning == "single candidate":
        lines += [
            "",
            "Only one private run was a candidate: nothing was chosen among private runs, its own epsilon applies.",
        ]
        return "\n".join(lines)
    for bound in s.bounds:
        lines.append(
            f"| random stopping, K ~ {bound.distribution}, {bound.parameters}, E[K] = {bound.expected_trials:g} "
            f"(P[best candidate never tried] = {bound.miss_probability:.2f}) | {_eps(bound.epsilon)} |"
        )
    lines += [
        f"| the grid as run: composition of all {m} private runs | {_eps(s.composition_epsilon)} |",
        "",
        f"**Privacy cost of the choice:** ε = {_eps(s.composition_epsilon)} for the fixed grid that was actually "
        f"run (composition), the one number here that covers what was done; ε = {_eps(s.tuning_epsilon)} had the "
        f"number of trials been random (the random-stopping bound of Papernot & Steinke 2022), against "
        f"ε = {_eps(s.single_rdp_epsilon)} for the run alone on the same RDP scale ({_eps(s.single_epsilon)} by its "
        "own accountant).",
    ]
    if s.composition_epsilon < s.tuning_epsilon:
        lines += [
            "",
            "Here composing the runs costs less than random stopping: every trial is charged the largest "
            "candidate's RDP curve, which dominates when the candidates' budgets differ (a sweep over epsilon). "
            "Random stopping pays off when many candidates share one budget, e.g. a learning-rate grid at a fixed "
            "epsilon: under the truncated negative binomial its cost grows with log E[K] (under Poisson, linearly in "
            "E[K] through its mu * delta term), composition's with the number of runs.",
        ]
    lines += [
        "",
        "What each number assumes:",
        "",
        "- *Random stopping* (Papernot & Steinke 2022, *Hyperparameter Tuning with Rényi Differential Privacy*, "
        "ICLR; Theorem 2 for the truncated negative binomial, Theorem 6 for Poisson): the number of trials K is drawn "
        "at random before tuning starts; every trial independently draws one of the candidates uniformly, trains it "
        "with DP-SGD and scores it; only the best trial's model and score are released. Each trial's RDP curve is "
        "bounded by the pointwise maximum of the candidates' curves (Opacus' RDP analysis of each run's noise "
        "multiplier, sample rate and steps), and the result is converted to (ε, δ) as Opacus does "
        "(Balle et al. 2020).",
        f"- *This sweep did not do that.* It ran a fixed grid, each candidate exactly once. E[K] = {m} above matches "
        "the grid's compute, and with it random stopping would miss the grid's best candidate with the probability "
        "shown. The theorems need K to be random: a fixed number of runs is not covered by them, and the bound "
        "that holds for a fixed grid is composition. The random-stopping numbers are what this choice would cost "
        "had it been made that way; the composition row is the guarantee of the procedure actually run "
        "(releasing one model is post-processing of all of them).",
        f"- `{s.metric}` is computed on the test split, which the runs' guarantee does not cover: if those records "
        "are private too, the choice leaks about them without any bound.",
        "- The audit columns of this report are computed on the members without noise: publishing them is "
        "outside every guarantee above.",
    ]
    return "\n".join(lines)
