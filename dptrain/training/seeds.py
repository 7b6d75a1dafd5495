"""Independent random streams derived from ``train.seed``: a draw added to one never shifts another."""

from __future__ import annotations

import numpy as np

(
    BYZANTINE_STREAM,
    SCHEDULE_STREAM,
    POISON_STREAM,
    ATTACK_STREAM,
    AGGREGATOR_STREAM,
    SAMPLING_STREAM,
    NOISE_STREAM,
    AUDIT_STREAM,
) = range(1, 9)


def derived_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed for the stream ``keys`` of ``seed`` (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])
