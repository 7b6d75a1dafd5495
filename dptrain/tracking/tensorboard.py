"""TensorBoard logging for a run, laid out for a person: the training curves in a custom-scalars layout,
the audit's figures and text, and an HParams record in its own run ``tb/hparams``."""

from __future__ import annotations

import io
import math
import re
import time
from pathlib import Path
from typing import Mapping

from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

# The HParams record's run, below the run's own: the HParams dashboard takes every scalar tag of a
# session's run (and the runs below it) for a metric column, so only the final metrics may live there.
HPARAMS_RUN = "hparams"
# Tag prefix of the final metrics. The Scalars and Time Series tabs sort tag groups by name: after
# "fed", "privacy", "test" and "train", these one-point charts come last, below the training curves.
METRIC_PREFIX = "trial/"
# Lowest zlib effort: the images stay tens of kB, and a fast audit has about 0.1 s in all.
PNG_COMPRESSION = 1


def _multiline(*tags: str) -> list:
    # Custom scalars match each regex from the start of the tag; "$" keeps "train/loss" from also
    # taking a later "train/loss_...".
    return ["Multiline", [f"{tag}$" for tag in tags]]


def training_layout(federated: bool) -> dict:
    """The Custom Scalars tab's layout (``SummaryWriter.add_custom_scalars``): the training curves a
    recipe logs, train and test on one chart, grouped as training (or federation) then privacy."""
    if federated:
        first = {
            "federation": {
                "test accuracy (and backdoor success)": _multiline("fed/test_accuracy", "fed/backdoor_success_rate"),
                "loss: test, clients' training": _multiline("fed/test_loss", "fed/client_loss"),
                "update norms: honest, Byzantine, aggregate": _multiline(
                    "fed/update_norm/honest", "fed/update_norm/byzantine", "fed/aggregate_norm"
                ),
                "share of selected updates that were Byzantine": _multiline("fed/byzantine_selected_fraction"),
                "clients per round": _multiline("fed/clients"),
                "aggregation seconds": _multiline("fed/aggregation_seconds"),
            }
        }
    else:
        first = {
            "training": {
                "accuracy: train, test": _multiline("train/accuracy", "test/accuracy"),
                "training loss": _multiline("train/loss"),
                "learning rate": _multiline("train/lr"),
            }
        }
    privacy = {
        "privacy": {
            "epsilon spent (RDP)": _multiline("privacy/epsilon_rdp"),
            "noise multiplier": _multiline("privacy/noise_multiplier"),
        }
    }
    return {**first, **privacy}


def _hparam_value(value):
    # Finite numbers stay numbers (the dashboard filters and plots them by value), the rest is text:
    # JSON has no inf, and torch's summary would write a bool as the number 0 or 1.
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return "null" if value is None else str(value)


def _after_newest_event_file(directory: Path) -> None:
    """Wait, if need be, until the clock's whole second is past that of the newest event file in ``directory``.

    TensorBoard reads a run's event files in name order and an event file is named by the whole
    second it was opened in, then the writing process's counter, as text: two records written in the
    same second could be read newest first ("...pid.10" sorts before "...pid.9"), and the HParams
    dashboard would show the older record's metrics as the latest. Costs up to a second, only when
    two records of one run are written within the same second (repeated audits in one process).
    """
    seconds = [int(path.name.split(".")[3]) for path in directory.glob("events.out.tfevents.*")]
    if seconds:
        time.sleep(max(0.0, max(seconds) + 1 - time.time()))


class TensorBoardLog:
    """A ``SummaryWriter`` on ``<run_dir>/tb``, and the run's HParams record in ``<run_dir>/tb/hparams``.

    ``purge_step`` drops events a crashed run wrote after its last checkpoint.
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        self.log_dir = Path(run_dir) / "tb"
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        self._layout: dict | None = None

    def layout(self, layout: Mapping[str, Mapping[str, list]]) -> None:
        """Set the Custom Scalars layout (see ``training_layout``). It is written with the first
        ``scalars``, keeping only the charts that match some of their tags: a chart of tags the run
        never logs (the baseline's epsilon, the Byzantine share under a rule that selects nothing)
        would stay empty."""
        self._layout = {category: dict(charts) for category, charts in layout.items()}

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        """Log each finite value under its tag at ``step``; None (no value, e.g. the baseline's epsilon) is skipped."""
        logged = [tag for tag, value in values.items() if value is not None and math.isfinite(value)]
        for tag in logged:
            self.writer.add_scalar(tag, values[tag], step)
        if self._layout is not None:
            self._write_layout(logged)

    def _write_layout(self, tags: list[str]) -> None:
        layout = {}
        for category, charts in self._layout.items():
            kept = {
                title: chart
                for title, chart in charts.items()
                if any(re.match(pattern, tag) for pattern in chart[1] for tag in tags)
            }
            if kept:
                layout[category] = kept
        self.writer.add_custom_scalars(layout)
        self._layout = None

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        self.writer.add_text(tag, markdown, step)

    def figure(self, tag: str, figure, step: int = 0) -> None:
        """Log a matplotlib ``figure`` as a PNG image at ``step``."""
        png = io.BytesIO()
        figure.savefig(png, format="png", pil_kwargs={"compress_level": PNG_COMPRESSION})
        self._png(tag, png.getvalue(), *figure.canvas.get_width_height(), channels=4, step=step)

    def image(self, tag: str, image, step: int = 0) -> None:
        """Log a Pillow ``image`` as a PNG image at ``step``."""
        png = io.BytesIO()
        image.save(png, format="PNG", compress_level=PNG_COMPRESSION)
        self._png(tag, png.getvalue(), *image.size, channels=len(image.getbands()), step=step)

    def _png(self, tag: str, png: bytes, width: int, height: int, channels: int, step: int) -> None:
        # The image summary SummaryWriter.add_image writes, without its re-encoding at zlib's default effort.
        image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def hparams(self, hparams: Mapping[str, object], metrics: Mapping[str, float | None], step: int = 0) -> None:
        """Write the run's HParams record into ``tb/hparams``: its ``hparams`` and, at ``step``, its final
        ``metrics`` as scalars ``trial/<name>``. A metric that is None (no value, as the baseline's
        epsilon) is left out; NaN marks one an earlier record had that this one does not measure.

        No experiment summary is written: the dashboard then builds its columns from every run's
        record, the keys whose values differ between runs first (one run's summary would fix the
        columns of all, in alphabetical order). A later record of the same run (a re-audit, at a
        larger ``step``) supersedes the metrics: the dashboard shows each metric's last value.
        """
        logged = {f"{METRIC_PREFIX}{k}": float(v) for k, v in metrics.items() if v is not None}
        _, start, end = hparams_summary({k: _hparam_value(v) for k, v in hparams.items()}, logged)
        record_dir = self.log_dir / HPARAMS_RUN
        _after_newest_event_file(record_dir)
        with SummaryWriter(log_dir=str(record_dir)) as writer:
            writer._get_file_writer().add_summary(start, step)
            for tag, value in logged.items():
                writer.add_scalar(tag, value, step)
            writer._get_file_writer().add_summary(end, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
