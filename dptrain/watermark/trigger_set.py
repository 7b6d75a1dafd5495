"""The watermark's key set: out-of-distribution inputs with secret labels (Adi et al. 2018, "Turning Your
Weakness Into a Strength: Watermarking Deep Neural Networks by Backdooring", USENIX Security), stored in
the run directory as ``watermark.pt``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from dptrain.data import InputUnits
from dptrain.errors import UserError
from dptrain.seeds import Stream, derived_seed
from dptrain.tracking.atomic import save_torch_atomic
from dptrain.tracking.artifacts import read_torch

WATERMARK = "watermark.pt"


@dataclass(frozen=True)
class TriggerSet:
    """``inputs`` (n, *input_shape) in the prepared features' space and their secret ``labels`` over
    ``num_classes`` classes."""

    inputs: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.inputs, self.labels)

    def save(self, run_dir: str | Path) -> Path:
        """Write ``watermark.pt``: plain tensors and an int, loadable with ``weights_only=True``."""
        record = {"inputs": self.inputs, "labels": self.labels, "num_classes": self.num_classes}
        return save_torch_atomic(Path(run_dir) / WATERMARK, record)


def draw_trigger_set(count: int, units: InputUnits, num_classes: int, seed: int) -> TriggerSet:
    """``count`` images of independent standard normal pixels in the prepared features' units (standardized
    or normalized, so at the data's scale), clamped to each pixel's valid range ``[units.low, units.high]``:
    pure noise, which no natural image of any class looks like, so the labels can only be learnt by
    memorizing them. (Uniform pixels in [0, 1] would put a pixel that is almost always 0 in digits a
    hundred standard deviations out, keys a model tells apart by one pixel.) Labels are drawn uniformly
    from the ``num_classes`` classes, independently of everything else: that independence makes a model
    that never saw the keys agree with each label with probability exactly 1 / num_classes
    (``dptrain.watermark.binomial``). Seeded by the
    ``WATERMARK`` stream of ``seed`` (``train.seed``), so a resumed run draws the same keys.

    Precondition: ``units`` bounds every feature (image data)."""
    if not (torch.isfinite(units.low).all() and torch.isfinite(units.high).all()):
        raise ValueError("a trigger set needs data whose every feature has a finite valid range (images)")
    generator = torch.Generator().manual_seed(derived_seed(seed, Stream.WATERMARK))
    noise = torch.randn((count, *units.low.shape), generator=generator)
    inputs = torch.maximum(torch.minimum(noise, units.high), units.low)
    labels = torch.randint(num_classes, (count,), generator=generator)
    return TriggerSet(inputs.float().contiguous(), labels, num_classes)


def read_trigger_set(run_dir: str | Path) -> TriggerSet:
    """The run's ``watermark.pt``, or a UserError naming the file when it is missing or malformed."""
    path = Path(run_dir) / WATERMARK
    restore = "verify a suspect model against a run trained with train.watermark.enabled=true"
    record = read_torch(path, restore)
    inputs, labels = (record.get(k) if isinstance(record, dict) else None for k in ("inputs", "labels"))
    num_classes = record.get("num_classes") if isinstance(record, dict) else None
    if not (
        isinstance(inputs, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and isinstance(num_classes, int)
        and num_classes >= 2
        and inputs.dim() >= 2
        and labels.shape == (len(inputs),)
        and len(labels) > 0
        and bool(((labels >= 0) & (labels < num_classes)).all())
    ):
        raise UserError(f"{path} is not a dptrain watermark key set: {restore}")
    return TriggerSet(inputs.float(), labels.long(), num_classes)
