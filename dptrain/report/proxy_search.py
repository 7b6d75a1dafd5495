"""A search on a proxy (``scripts/tune_recipe.py --proxy``): the grid point whose runs on the proxy
(``train.proxy``) have the best mean validation accuracy over their seeds, and what the search cost the
members, set against what the same search on the members would have cost (``tuning``).

The proxy runs read no member (``dptrain.training.proxy``), so choosing among them spends none of the
members' budget: the members pay for the one final run of the chosen point, and its epsilon is the
search's whole cost. A search on the members would have run each proxy run's imitated mechanism on
them; its cost is what ``dptrain report --select`` computes for such a sweep (composition of the runs,
and the random-stopping bounds of Papernot & Steinke 2022).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from dptrain.errors import UserError
from dptrain.report.collect import RunRecord
from dptrain.report.selection import run_rdp_curve
from dptrain.report.table import differing_overrides
from dptrain.report.tuning import (
    Mechanism,
    TuningBound,
    composition_epsilon,
    epsilon_from_rdp,
    random_stopping_bounds,
    rdp_curve,
)

SEED_KEY = "train.seed"
PROXY_KEY = "train.proxy"


@dataclass(frozen=True)
class GridPoint:
    """One grid point: its overrides as a run on the members takes them (``train.seed`` and ``train.proxy``
    left out) and its proxy runs' validation accuracies."""

    overrides: tuple[str, ...]
    label: str
    runs: tuple[str, ...]
    validation_accuracies: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.mean(self.validation_accuracies)

    @property
    def spread(self) -> float:
        """Sample standard deviation over the seeds (0 for one seed)."""
        return statistics.stdev(self.validation_accuracies) if len(self.validation_accuracies) > 1 else 0.0


@dataclass(frozen=True)
class ProxySearch:
    """The grid points in grid order, the best (first among equal means), and the cost at ``delta`` of
    the member-side search: one run on the members per proxy run, composed (``composition_epsilon``) or
    under random stopping (``bounds``; None for a single run)."""

    points: list[GridPoint]
    best: GridPoint
    delta: float
    member_runs: int
    composition_epsilon: float
    bounds: list[TuningBound] | None

    @property
    def tuning_epsilon(self) -> float | None:
        return min(bound.epsilon for bound in self.bounds) if self.bounds else None


def _point_overrides(run: RunRecord) -> tuple[str, ...]:
    return tuple(o for o in run.overrides if o.partition("=")[0].lstrip("+~") not in (SEED_KEY, PROXY_KEY))


def proxy_search(runs: list[RunRecord]) -> ProxySearch:
    """Group the proxy runs of a sweep by their overrides without ``train.seed`` and choose the point with the
    highest mean ``proxy.validation_accuracy``. Raises ``UserError`` when a run is incomplete or did not
    train on a proxy, or when the runs imitate members' runs at different deltas."""
    for run in runs:
        if not run.complete:
            raise UserError(f"proxy run {run.name} is incomplete ({', '.join(run.missing)}): run the search again")
        if not run.metrics.get("proxy"):
            raise UserError(f"run {run.name} did not train on a proxy (train.proxy=none): not a proxy search")
    deltas = {run.metrics["delta"] for run in runs}
    if len(deltas) != 1:
        raise UserError(f"the proxy runs imitate members' runs at several deltas ({sorted(deltas)}): use one")
    shown = [key for key in differing_overrides(runs) if key not in (SEED_KEY, PROXY_KEY)]
    groups: dict[tuple[str, ...], list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(_point_overrides(run), []).append(run)
    points = []
    for overrides, members in groups.items():
        given = dict(o.partition("=")[::2] for o in overrides)
        points.append(
            GridPoint(
                overrides=overrides,
                label=" ".join(f"{key}={given[key]}" for key in shown if key in given) or "(the recipe)",
                runs=tuple(run.name for run in members),
                validation_accuracies=tuple(run.metrics["proxy"]["validation_accuracy"] for run in members),
            )
        )
    best = max(points, key=lambda point: point.mean)
    curves = np.stack(
        [
            rdp_curve(Mechanism(p["members_noise_multiplier"], p["sample_rate"], p["steps"]))
            for p in (run.metrics["proxy"] for run in runs)
        ]
    )
    (delta,) = deltas
    return ProxySearch(
        points=points,
        best=best,
        delta=delta,
        member_runs=len(runs),
        composition_epsilon=composition_epsilon(curves, delta),
        bounds=random_stopping_bounds(curves, delta) if len(runs) > 1 else None,
    )


def proxy_search_markdown(search: ProxySearch, final_run: str, final_metrics: dict) -> str:
    """The search's report: the grid on the proxy, the chosen point, the final run on the members, and the
    members' cost (the final run's epsilon) beside the member-side search's. Raises ``UserError`` when the
    final run is not a private run on the members."""
    if final_metrics.get("proxy") or final_metrics.get("epsilon") is None:
        raise UserError(f"the final run {final_run} is not a private run on the members: it has no members' epsilon")
    s = search
    lines = [
        "## Search on the proxy (train.proxy)",
        "",
        "| grid point | validation accuracy (mean ± sd over seeds) | runs |",
        "|---|---|---|",
        *(
            f"| {'**' if p is s.best else ''}`{p.label}`{'**' if p is s.best else ''} | {p.mean:.3f} ± {p.spread:.3f}"
            f" | {len(p.runs)} |"
            for p in s.points
        ),
        "",
        f"Chosen: `{s.best.label}`; trained once on the members: `{final_run}`, test accuracy "
        f"{final_metrics['test_accuracy']:.4f}.",
        "",
        f"| what the members paid (δ = {s.delta:.0e}) | epsilon |",
        "|---|---|",
        f"| this search: the final run alone (the proxy runs read no member), its accountant | "
        f"{final_metrics['epsilon']:.2f} |",
        f"| the same, RDP (the scale of the rows below) | "
        f"{epsilon_from_rdp(run_rdp_curve(final_metrics), s.delta):.2f} |",
        f"| the same search on the members: composition of its {s.member_runs} runs | {s.composition_epsilon:.2f} |",
    ]
    if s.bounds:
        lines.append(
            f"| the same search on the members, had the number of trials been random (Papernot & Steinke 2022, "
            f"best of {len(s.bounds)} distributions, E[K] = {s.member_runs}) | {s.tuning_epsilon:.2f} |"
        )
    lines += [
        "",
        "The proxy is half of the population split, assumed public (`dptrain.training.proxy`); the validation "
        "accuracy is on its other half, never on the test split or the members.",
    ]
    return "\n".join(lines)
