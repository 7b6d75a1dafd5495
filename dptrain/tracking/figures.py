"""The audit's figure: a log-log ROC of every attack with the chance diagonal."""

from __future__ import annotations

from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullLocator  # noqa: E402

# Fixed margins instead of tight_layout, and decade ticks only on log axes: laying out
# mathtext minor tick labels took most of a fast audit's time (0.1 s of a 0.13 s budget).
MARGINS = dict(left=0.15, bottom=0.12, right=0.96, top=0.92)


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], floor: float):
    """ROC curves ``{attack: (fpr, tpr)}`` on log-log axes down to ``floor`` (Carlini et al. 2022's view of low FPR)."""
    figure, axis = plt.subplots(figsize=(5, 5))
    grid = np.logspace(np.log10(floor), 0, 100)
    axis.plot(grid, grid, color="grey", linestyle="--", linewidth=1, label="chance")
    for name, (fpr, tpr) in curves.items():
        # log axes cannot show 0: draw the curve from the floor, where it is flat at its first value.
        axis.step(np.maximum(fpr, floor), np.maximum(tpr, floor), where="post", label=name)
    axis.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false positive rate", ylabel="true positive rate")
    for scale in (axis.xaxis, axis.yaxis):
        scale.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        scale.set_minor_locator(NullLocator())
    axis.grid(True, which="major", linewidth=0.5, alpha=0.5)
    axis.set_title("membership inference ROC")
    axis.legend(loc="lower right")
    figure.subplots_adjust(**MARGINS)
    return figure
