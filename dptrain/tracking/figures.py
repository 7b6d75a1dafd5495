"""The audit's figures: a log-log ROC of every attack with the chance diagonal and each attack's member /
non-member score histograms overlaid on shared bins, both drawn with Pillow, the model inversion grid (Pillow); robust accuracy and
extraction fidelity curves (matplotlib, imported only when one is drawn).

The membership panels avoid matplotlib: its import (about 0.5 s, more on a loaded machine) and its ROC
(about 50 ms drawing and encoding) were most of a ``fast`` audit's cost (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Fixed margins instead of tight_layout, and decade ticks only on log axes: laying out
# mathtext minor tick labels took most of a fast audit's time (0.1 s of a 0.13 s budget).
MARGINS = dict(left=0.15, bottom=0.12, right=0.96, top=0.92)
# The histograms span the central 98% of an attack's pooled scores (the tails fall in the end bins):
# a few outlying losses would otherwise squeeze every other record into a bin or two.
SCORE_RANGE = (0.01, 0.99)
# One histogram panel (pixels) and its plot area's insets: left, top, right, bottom.
PANEL = (320, 180)
INSETS = (14, 26, 14, 24)
# The ROC image (pixels, square) and its plot area's insets: left, top, right, bottom.
ROC_SIZE = 400
ROC_INSETS = (70, 28, 12, 40)
# matplotlib's default colour cycle, one colour per attack in the ROC.
CYCLE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
# The cycle's first two colours, as in the ROC; non-members filled at 45% opacity on white.
NON_MEMBERS, MEMBERS = CYCLE[0], CYCLE[1]
NON_MEMBER_FILL = tuple(round(255 - 0.45 * (255 - c)) for c in NON_MEMBERS)
BLACK = (0, 0, 0)
# Gridlines and the chance diagonal.
GRID = (222, 222, 222)
CHANCE = (128, 128, 128)
# The inversion grid: each image drawn at this many pixels a side (nearest neighbour) with a white gap
# between images, under a header.
INVERSION_CELL = 88
INVERSION_GAP = 4
INVERSION_HEADER = 22
INVERSION_LABELS = 70
INVERSION_COLUMNS = ("reconstruction", "class mean", "nearest member")


def roc_image(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], floor: float) -> Image.Image:
    """ROC curves ``{attack: (fpr, tpr)}`` on log-log axes down to ``floor`` (Carlini et al. 2022's view of
    low FPR): each curve as steps holding its TPR until the next FPR (matplotlib's ``step(where="post")``),
    values below ``floor`` drawn at it, the chance diagonal dashed, a gridline and label per decade."""
    image = Image.new("RGB", (ROC_SIZE, ROC_SIZE), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = ROC_INSETS[0], ROC_INSETS[1], ROC_SIZE - ROC_INSETS[2], ROC_SIZE - ROC_INSETS[3]
    decades = -math.log10(floor)

    def x_of(values):
        return np.rint(left + (right - left) * (1 + np.log10(np.maximum(values, floor)) / decades))

    def y_of(values):
        return np.rint(bottom - (bottom - top) * (1 + np.log10(np.maximum(values, floor)) / decades))

    small = _font(11)
    for value in 10.0 ** np.arange(-math.floor(decades), 1):
        x, y = x_of(value), y_of(value)
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((x, bottom + 5), f"{value:g}", font=small, fill=BLACK, anchor="mt")
        draw.text((left - 5, y), f"{value:g}", font=small, fill=BLACK, anchor="rm")
    for fraction in np.linspace(0, 1, 41)[::2]:
        # The chance diagonal TPR = FPR, dashed: every other fortieth of it.
        draw.line([(left + (right - left) * fraction, bottom - (bottom - top) * fraction),
                   (left + (right - left) * (fraction + 1 / 40), bottom - (bottom - top) * (fraction + 1 / 40))], fill=CHANCE)
    legend = [("chance", CHANCE)]
    for colour, (name, (fpr, tpr)) in zip(itertools.cycle(CYCLE), curves.items()):
        xs, ys = x_of(np.asarray(fpr)), y_of(np.asarray(tpr))
        steps = np.empty((2 * xs.size - 1, 2))
        steps[0::2] = np.c_[xs, ys]
        steps[1::2] = np.c_[xs[1:], ys[:-1]]
        # On whole pixels a curve of a million records has a few hundred distinct corners.
        keep = np.r_[True, np.any(steps[1:] != steps[:-1], axis=1)]
        draw.line(steps[keep].ravel().tolist(), fill=colour, width=2)
        legend.append((name, colour))
    draw.rectangle([left, top, right, bottom], outline=BLACK)
    draw.text(((left + right) / 2, 8), "membership inference ROC", font=_font(13), fill=BLACK, anchor="mt")
    draw.text(((left + right) / 2, ROC_SIZE - 8), "false positive rate", font=small, fill=BLACK, anchor="mb")
    label = Image.new("RGB", (bottom - top, 16), "white")
    ImageDraw.Draw(label).text(((bottom - top) / 2, 8), "true positive rate", font=small, fill=BLACK, anchor="mm")
    image.paste(label.rotate(90, expand=True), (4, top))
    for row, (name, colour) in enumerate(reversed(legend)):
        # Lower right, as matplotlib's legend(loc="lower right"), last entry lowest.
        y = bottom - 12 - 16 * row
        draw.line([(right - 120, y), (right - 100, y)], fill=colour, width=2)
        draw.text((right - 94, y), name, font=small, fill=BLACK, anchor="lm")
    return image


def evasion_figure(curves: Mapping[str, tuple[list[float], list[float], float]]):
    """Robust accuracy against the budget, ``{"<attack>_<norm>": (budgets, robust_accuracy, clean)}``, one
    panel per norm on a log budget axis (data units), clean accuracy dashed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullLocator

    norms = list(dict.fromkeys(key.split("_", 1)[1] for key in curves))
    figure = Figure(figsize=(5 * len(norms), 4))
    axes = figure.subplots(1, len(norms), squeeze=False)[0]
    for axis, norm in zip(axes, norms):
        clean = None
        for key, (budgets, accuracy, clean) in curves.items():
            if key.endswith(f"_{norm}"):
                axis.plot(budgets, accuracy, marker="o", label=key.split("_", 1)[0])
        axis.axhline(clean, color="grey", linestyle="--", linewidth=1, label="clean")
        axis.set(xscale="log", ylim=(0, 1.02), xlabel=f"budget ({norm}, data units)", ylabel="robust accuracy")
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_locator(NullLocator())
        axis.grid(True, which="major", linewidth=0.5, alpha=0.5)
        axis.set_title(f"evasion, {norm}")
        axis.legend(loc="upper right")
    figure.subplots_adjust(**MARGINS)
    return figure


def extraction_figure(curves: Mapping[str, tuple[list[int], list[float]]]):
    """The extraction surrogate's fidelity against the query budget, ``{output: (queries, fidelity)}``,
    one line per output interface on a log query axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullLocator

    figure = Figure(figsize=(5, 4))
    axis = figure.subplots()
    for output, (queries, fidelity) in curves.items():
        axis.plot(queries, fidelity, marker="o", label=output)
    axis.set(xscale="log", ylim=(0, 1.02), xlabel="queries", ylabel="fidelity (agreement with the target)")
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_locator(NullLocator())
    axis.grid(True, which="major", linewidth=0.5, alpha=0.5)
    axis.set_title("extraction")
    axis.legend(loc="lower right")
    figure.subplots_adjust(**MARGINS)
    return figure


def score_histograms(
    members: np.ndarray, non_members: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(edges, member_counts, nonmember_counts)``: both histograms on the same ``bins`` edges, which span
    the central 98% of the pooled scores; scores beyond them are counted in the end bins, so every
    record is counted."""
    edges = _shared_edges(np.concatenate([members, non_members]), bins)
    counts = [np.histogram(np.clip(group, edges[0], edges[-1]), edges)[0] for group in (members, non_members)]
    return edges, counts[0], counts[1]


def score_histograms_image(scores: Mapping[str, tuple[np.ndarray, np.ndarray]], bins: int) -> Image.Image:
    """One panel per attack of ``{attack: (member_scores, nonmember_scores)}``, one under the other (a
    TensorBoard card is about one panel wide): the non-members' histogram filled and the members' drawn
    as a line over it, on the same bins (``score_histograms``). The audit's members and non-members
    are equally many, so the counts compare bin by bin.

    Drawn with Pillow rather than matplotlib: a matplotlib panel took about 25 ms (most of it laying
    out its title, legend and tick labels), which would take a fast audit past a tenth of its
    training time; this takes about 2 ms.
    """
    image = Image.new("RGB", (PANEL[0], PANEL[1] * len(scores)), "white")
    draw = ImageDraw.Draw(image)
    for index, (name, (members, non_members)) in enumerate(scores.items()):
        histograms = score_histograms(members, non_members, bins)
        _histogram_panel(draw, (0, PANEL[1] * index), name, *histograms, legend=index == 0)
    return image


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # matplotlib's own font, so the Pillow panels read like its figures; found without importing it.
    package = Path(importlib.util.find_spec("matplotlib").submodule_search_locations[0])
    return ImageFont.truetype(str(package / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def _ticks(low: float, high: float, most: int = 4) -> np.ndarray:
    """Round tick values covering [low, high] in at most ``most`` steps: the smallest step of 1, 2, 2.5
    or 5 times a power of ten that fits (as matplotlib's MaxNLocator, with fewer step choices).
    Precondition: low < high, most >= 4 (a step of 20 times the magnitude then always fits)."""
    magnitude = 10.0 ** math.floor(math.log10((high - low) / most))
    for step in (magnitude * m for m in (1, 2, 2.5, 5, 10, 20)):
        first, last = math.floor(low / step), math.ceil(high / step)
        if last - first <= most:
            break
    return np.arange(first, last + 1) * step


def _histogram_panel(draw, origin, name, edges, member_counts, nonmember_counts, legend: bool) -> None:
    """One attack's panel with ``origin`` its top-left pixel: non-members filled, members as a line."""
    x0, y0 = origin
    left, top, right, bottom = x0 + INSETS[0], y0 + INSETS[1], x0 + PANEL[0] - INSETS[2], y0 + PANEL[1] - INSETS[3]

    def x_of(value):
        return left + (right - left) * (value - edges[0]) / (edges[-1] - edges[0])

    per_record = 0.95 * (bottom - top) / max(member_counts.max(), nonmember_counts.max(), 1)
    xs = x_of(edges)
    for x_low, x_high, count in zip(xs[:-1], xs[1:], nonmember_counts):
        if count:
            draw.rectangle([x_low, bottom - count * per_record, x_high, bottom], fill=NON_MEMBER_FILL)
    tops = bottom - member_counts * per_record
    steps = [point for x_low, x_high, y in zip(xs[:-1], xs[1:], tops) for point in ((x_low, y), (x_high, y))]
    draw.line([(xs[0], bottom), *steps, (xs[-1], bottom)], fill=MEMBERS, width=2)
    draw.line([(left, bottom), (right, bottom)], fill=BLACK)
    draw.text(((left + right) / 2, y0 + 6), f"{name} score (higher: member)", font=_font(12), fill=BLACK, anchor="mt")
    small = _font(11)
    for value in _ticks(edges[0], edges[-1]):
        if edges[0] <= value <= edges[-1]:
            label = f"{value:g}"
            draw.line([(x_of(value), bottom), (x_of(value), bottom + 4)], fill=BLACK)
            # A label at an end of the axis is shifted to stay inside the panel.
            half = small.getlength(label) / 2
            centre = min(max(x_of(value), x0 + half + 2), x0 + PANEL[0] - half - 2)
            draw.text((centre, bottom + 6), label, font=small, fill=BLACK, anchor="mt")
    if legend:
        draw.rectangle([left + 6, top + 4, left + 24, top + 12], fill=NON_MEMBER_FILL)
        draw.text((left + 30, top + 8), "non-members", font=small, fill=BLACK, anchor="lm")
        draw.line([(left + 6, top + 24), (left + 24, top + 24)], fill=MEMBERS, width=2)
        draw.text((left + 30, top + 24), "members", font=small, fill=BLACK, anchor="lm")


def inversion_grid_image(rows: Mapping[str, tuple[np.ndarray, ...]]) -> Image.Image:
    """One row per reconstructed class, ``{label: (reconstruction, class_mean, nearest_member)}``, each a
    (C, H, W) array of pixels in [0, 1] (1 or 3 channels), side by side under the column names, so a
    reconstruction is seen against the class's average and the training record nearest to it."""
    step = INVERSION_CELL + INVERSION_GAP
    size = (INVERSION_LABELS + step * len(INVERSION_COLUMNS), INVERSION_HEADER + step * len(rows))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    small = _font(11)
    for column, name in enumerate(INVERSION_COLUMNS):
        centre = INVERSION_LABELS + step * column + INVERSION_CELL / 2
        draw.text((centre, INVERSION_HEADER / 2), name, font=small, fill=BLACK, anchor="mm")
    for row, (label, images) in enumerate(rows.items()):
        top = INVERSION_HEADER + step * row
        draw.text((6, top + INVERSION_CELL / 2), label, font=_font(12), fill=BLACK, anchor="lm")
        for column, pixels in enumerate(images):
            grey = np.clip(np.asarray(pixels, dtype=np.float64), 0, 1)
            grey = np.round(255 * np.moveaxis(grey, 0, -1)).astype(np.uint8)
            cell = Image.fromarray(grey[:, :, 0] if grey.shape[2] == 1 else grey)
            cell = cell.resize((INVERSION_CELL, INVERSION_CELL), Image.Resampling.NEAREST).convert("RGB")
            image.paste(cell, (INVERSION_LABELS + step * column, top))
    return image


def _shared_edges(pooled: np.ndarray, bins: int) -> np.ndarray:
    low, high = np.quantile(pooled, SCORE_RANGE)
    if high == low:
        # Every central score equal (e.g. a model that outputs one label): a single bin around it.
        return np.array([low - 0.5, low + 0.5])
    return np.linspace(low, high, bins + 1)
