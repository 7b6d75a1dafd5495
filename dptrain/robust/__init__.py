"""Byzantine robustness: aggregation rules, pre-aggregators and attacks, as functions over an
(n, d) tensor of client updates, and the builders Hydra's ``aggregator`` and ``attack`` groups select."""

from __future__ import annotations

from dptrain.robust.aggregators import (
    CenteredClipping,
    bulyan,
    bulyan_select,
    centered_clipping,
    geometric_median,
    krum,
    krum_select,
    mean,
    mean_around_median,
    median,
    multi_krum,
    trimmed_mean,
)
from dptrain.robust.attacks import (
    ATTACKS,
    Attack,
    alie,
    alie_z,
    build_attack,
    gaussian,
    ipm,
    mimic,
    min_max,
    min_sum,
    sign_flip,
)
from dptrain.robust.pipeline import (
    AGGREGATORS,
    PRE_AGGREGATORS,
    Aggregation,
    AggregationFailed,
    RobustAggregator,
    build_aggregator,
    tolerated_byzantine,
)
from dptrain.robust.poisoning import backdoor, label_flip, model_replacement_scale, stamp_trigger
from dptrain.robust.preaggregators import bucketing, nnm, static_clipping
from dptrain.robust.primitives import pairwise_sq_distances

__all__ = [
    "AGGREGATORS",
    "ATTACKS",
    "PRE_AGGREGATORS",
    "Aggregation",
    "AggregationFailed",
    "Attack",
    "CenteredClipping",
    "RobustAggregator",
    "alie",
    "alie_z",
    "backdoor",
    "bucketing",
    "build_aggregator",
    "build_attack",
    "bulyan",
    "bulyan_select",
    "centered_clipping",
    "gaussian",
    "geometric_median",
    "ipm",
    "krum",
    "krum_select",
    "label_flip",
    "mean",
    "mean_around_median",
    "median",
    "mimic",
    "min_max",
    "min_sum",
    "model_replacement_scale",
    "multi_krum",
    "nnm",
    "pairwise_sq_distances",
    "sign_flip",
    "stamp_trigger",
    "static_clipping",
    "tolerated_byzantine",
    "trimmed_mean",
]
