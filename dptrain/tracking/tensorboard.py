"""TensorBoard logging for a run: scalars, text, figures, histograms and one HParams record, all in the run's ``tb/``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary


def _hparam_value(value):
    # The HParams plugin takes bool, int, float and str only.
    if isinstance(value, (bool, int, float, str)):
        return value
    return "null" if value is None else str(value)


class TensorBoardLog:
    """A ``SummaryWriter`` on ``<run_dir>/tb`` that writes HParams into the same event stream.

    ``SummaryWriter.add_hparams`` would open a second run directory per call;
    writing the hparams summaries to this writer keeps one run per run
    directory, so a sweep lines up row by row in the HParams dashboard.
    ``purge_step`` drops events a crashed run wrote after its last checkpoint.
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        self.log_dir = Path(run_dir) / "tb"
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        """Log each finite value under its tag at ``step``; None (no value, e.g. the baseline's epsilon) is skipped."""
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        self.writer.add_text(tag, markdown, step)

    def figure(self, tag: str, figure, step: int = 0) -> None:
        self.writer.add_figure(tag, figure, step, close=True)

    def histogram(self, tag: str, values: np.ndarray, bins: np.ndarray, step: int = 0) -> None:
        """Log ``values`` as a TensorBoard histogram over the bin edges ``bins`` (shared edges make two histograms comparable)."""
        self.writer.add_histogram(tag, values, step, bins=bins)

    def hparams(self, hparams: Mapping[str, object], metrics: Mapping[str, float | None]) -> None:
        """Write the run's HParams record: its config values and final metrics (non-finite metrics dropped)."""
        finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        experiment, start, end = hparams_summary({k: _hparam_value(v) for k, v in hparams.items()}, finite)
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        for tag, value in finite.items():
            self.writer.add_scalar(tag, value, 0)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
