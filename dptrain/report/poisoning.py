"""DP against poisoning: the group-privacy ceiling on what k poisoned records can do to a model trained
with (epsilon, delta)-DP, and a poisoning sweep's measurements summarised over seeds, per budget and
number of poisoned records, for the report's figure.

The bound (Dwork & Roth, "The Algorithmic Foundations of Differential Privacy", 2014, Theorem 2.2
and its (epsilon, delta) form): if a mechanism M is (epsilon, delta)-DP for neighbouring datasets,
then for datasets D, D' that differ by a chain of m neighbouring steps, for every event E,

    P[M(D') in E] <= e^(m epsilon) P[M(D) in E] + m e^((m - 1) epsilon) delta.

(By induction on the chain: the step from D_(i-1) to D_i multiplies the bound by e^epsilon and adds
delta, and sum_(i < m) e^(i epsilon) delta <= m e^((m - 1) epsilon) delta.) dptrain's accountant
reports epsilon for add/remove neighbours (Poisson-subsampled Gaussian, Opacus / PRV), and centralized
poisoning *replaces* k members: each replacement is a removal and an addition, so D' (poisoned) is
m = 2k steps from D (clean).

Here E is "the trained model classifies one triggered test input as the target": the backdoor success
rate is the mean of such indicators over test inputs fixed before training, so by linearity the bound
holds for the expected success rate over the training's randomness, with P[M(D) in E] the expected
rate of the same trigger on the model trained without poison. Applied to the complementary event
("a source-class test input is classified correctly") in the other direction, D' to D, it floors the
expected poisoned-class accuracy:

    acc(D') >= e^(-m epsilon) (acc(D) - m e^((m - 1) epsilon) delta).

Both are vacuous (ceiling 1, floor 0) once m epsilon is more than a few: the figure draws them anyway
so a user sees when their budget does and does not promise anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dptrain.report.table import BUDGET_KEYS, Table, run_label

# Overrides that vary within one line of the poisoning figure: the seed is summarised over, the poisoned
# count (however it was given) is the line itself.
SEED_KEYS = ("train.seed",)
POISON_KEYS = ("attack.poison_count", "attack.poison_fraction")
# The measurements the figure draws: metrics.json key, and whether the group bound caps it from above.
MEASURES = {"backdoor_success_rate": "ceiling", "poisoned_class_accuracy": "floor"}


def group_steps(poisoned: int) -> int:
    """Add/remove steps between the clean and the poisoned training set: 2 per replaced record."""
    return 2 * poisoned


def _slack(epsilon: float, delta: float, m: int) -> float:
    """``m e^((m - 1) epsilon) delta``, computed in logs so a vacuous bound does not overflow."""
    if delta == 0:
        return 0.0
    return math.exp(min(math.log(m) + (m - 1) * epsilon + math.log(delta), 1.0))


def group_ceiling(clean: float, epsilon: float, delta: float, poisoned: int) -> float:
    """The most an (``epsilon``, ``delta``)-DP (add/remove) training lets ``poisoned`` replaced records raise
    the probability of an event whose probability without them is ``clean``:
    ``min(1, e^(m epsilon) clean + m e^((m - 1) epsilon) delta)`` with m = 2 * poisoned (module
    docstring). Preconditions 0 <= clean <= 1, epsilon >= 0 (inf: no bound, 1), poisoned >= 0."""
    if poisoned == 0:
        return clean
    if math.isinf(epsilon):
        return 1.0
    m = group_steps(poisoned)
    scaled = 0.0 if clean == 0 else math.exp(min(m * epsilon + math.log(clean), 1.0))
    return min(1.0, scaled + _slack(epsilon, delta, m))


def group_floor(clean: float, epsilon: float, delta: float, poisoned: int) -> float:
    """The least an (``epsilon``, ``delta``)-DP training lets ``poisoned`` replaced records lower the
    probability of an event whose probability without them is ``clean``:
    ``max(0, e^(-m epsilon) (clean - m e^((m - 1) epsilon) delta))``, m = 2 * poisoned."""
    if poisoned == 0:
        return clean
    if math.isinf(epsilon):
        return 0.0
    m = group_steps(poisoned)
    return max(0.0, math.exp(-m * epsilon) * (clean - _slack(epsilon, delta, m)))


@dataclass(frozen=True)
class SeedSummary:
    """One (series, poisoned count, epsilon) cell of a sweep: the mean of ``values`` over its seeds and
    their range (the figure's interval: with a handful of seeds, min-max shows every run)."""

    epsilon: float
    poisoned: int
    values: tuple[float, ...]
    delta: float | None

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)


def seed_summaries(table: Table, column: str) -> dict[str, dict[int, list[SeedSummary]]]:
    """``{series label: {poisoned count: [SeedSummary by increasing epsilon]}}`` for the complete rows with
    ``column``; runs that differ only in budget, seed and poison share or count are one series."""
    exclude = (*BUDGET_KEYS, *SEED_KEYS, *POISON_KEYS)
    cells: dict[tuple[str, int, float], list[dict]] = {}
    for row in table.rows:
        if row["status"] != "complete" or row.get(column) is None:
            continue
        key = (run_label(table, row, exclude), int(row["poisoned"]), row["epsilon"])
        cells.setdefault(key, []).append(row)
    series: dict[str, dict[int, list[SeedSummary]]] = {}
    for (label, poisoned, epsilon), rows in sorted(cells.items(), key=lambda item: item[0]):
        deltas = [row["delta"] for row in rows if row["delta"] is not None]
        summary = SeedSummary(epsilon, poisoned, tuple(row[column] for row in rows), max(deltas) if deltas else None)
        series.setdefault(label, {}).setdefault(poisoned, []).append(summary)
    return series


def group_bound(column: str, clean: SeedSummary, poisoned: int) -> float | None:
    """The group-privacy bound on ``column`` for ``poisoned`` records at ``clean``'s budget, from the mean
    of the unpoisoned runs ``clean`` (the plug-in estimate of the clean expectation); None without a
    guarantee (the non-private baseline)."""
    if clean.delta is None or math.isinf(clean.epsilon):
        return None
    bound = group_ceiling if MEASURES[column] == "ceiling" else group_floor
    return bound(clean.mean, clean.epsilon, clean.delta, poisoned)
