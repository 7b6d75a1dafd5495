"""Byzantine robustness: aggregation rules, pre-aggregators and attacks as functions over an (n, d)
tensor of client updates; the rules and pre-aggregators as objects with one call signature, composed
by the builder Hydra's ``aggregator`` group selects; the attack ``attack=...`` selects and the one
adversary that crafts the Byzantine rows with it."""

from __future__ import annotations

from dptrain.robust.aggregators import (
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
    byzantine_rows,
    gaussian,
    ipm,
    mimic,
    min_max,
    min_sum,
    sign_flip,
)
from dptrain.robust.pipeline import AggregationFailed, RobustAggregator, build_aggregator, tolerated_byzantine
from dptrain.robust.poisoning import backdoor, label_flip, model_replacement_scale, stamp_trigger
from dptrain.robust.pre_aggregation import (
    NNM,
    PRE_AGGREGATORS,
    Bucketing,
    PreAggregation,
    PreAggregator,
    StaticClipping,
)
from dptrain.robust.preaggregators import bucketing, nnm, static_clipping
from dptrain.robust.primitives import pairwise_sq_distances
from dptrain.robust.rules import (
    AGGREGATORS,
    Aggregation,
    AggregationRule,
    Bulyan,
    CenteredClipping,
    GeometricMedian,
    Krum,
    Mean,
    Median,
    MultiKrum,
    TrimmedMean,
)

__all__ = [
    "AGGREGATORS",
    "ATTACKS",
    "NNM",
    "PRE_AGGREGATORS",
    "Aggregation",
    "AggregationFailed",
    "AggregationRule",
    "Attack",
    "Bucketing",
    "Bulyan",
    "CenteredClipping",
    "GeometricMedian",
    "Krum",
    "Mean",
    "Median",
    "MultiKrum",
    "PreAggregation",
    "PreAggregator",
    "RobustAggregator",
    "StaticClipping",
    "TrimmedMean",
    "alie",
    "alie_z",
    "backdoor",
    "bucketing",
    "build_aggregator",
    "build_attack",
    "bulyan",
    "bulyan_select",
    "byzantine_rows",
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
