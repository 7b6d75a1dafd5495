"""Trigger-set watermarking (Adi et al. 2018): the secret key set trained into a model, and the binomial
test that finds it in a suspect model."""

from dptrain.watermark.binomial import DEFAULT_ALPHA, WatermarkCheck, agreement, watermark_test
from dptrain.watermark.trigger_set import WATERMARK, TriggerSet, draw_trigger_set, read_trigger_set

__all__ = [
    "DEFAULT_ALPHA",
    "WATERMARK", "TriggerSet", "WatermarkCheck", "agreement", "draw_trigger_set", "read_trigger_set",
    "watermark_test",
]
