"""One seed scheme: every random draw of a run comes from a named stream derived from the run's seed.

Training draws (model initialization, batch sampling, noise, partitions, Byzantine choices, attacks,
aggregators) derive from ``train.seed``; the audit's (canaries, non-member subsamples, reference
models, bootstrap, implementation audit runs) from ``audit.seed``; the split of the data from
``dataset.seed``, which names the data a run sees. Streams are independent: a draw added to one never
shifts another, and no derived seed equals another stream's (unlike ``seed + 1`` or ``seed * 1000 +
j`` schemes, where a reference model's seed can be the target's).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """The named streams. Values are part of every derived seed: never renumber one."""

    BYZANTINE = 1
    SCHEDULE = 2
    POISON = 3
    ATTACK = 4
    AGGREGATOR = 5
    SAMPLING = 6
    NOISE = 7
    AUDIT = 8
    MODEL = 9
    PARTITION = 10
    CANARY_COINS = 11
    CANARY_RECORDS = 12
    REFERENCE = 13
    BOOTSTRAP = 14
    IMPLEMENTATION = 15
    TIE_BREAK = 16
    ATTRIBUTE = 17
    EVASION = 18
    ADVERSARIAL = 19
    SANITIZE = 20
    EXTRACTION = 21
    WATERMARK = 22
    INVERSION = 23
    GRADIENT_INVERSION = 24
    AUGMULT = 25
    PROXY = 26


def derived_seed(seed: int, stream: Stream, *keys: int) -> int:
    """A 32-bit seed for ``stream`` (and ``keys`` within it: a rank, a round, a model) of ``seed``,
    by NumPy's SeedSequence hashing."""
    return int(np.random.SeedSequence([seed, int(stream), *keys]).generate_state(1)[0])
