"""Datasets, their seeded member / non-member / population / test splits, and federated client partitions.

A run calls ``describe`` while validating its config, then ``load``,
``make_split`` (or ``Split.load`` to reuse a run's split) and ``prepare``.
"""

from dptrain.data.audited import audited_split, stratified_pairs, subset
from dptrain.data.canaries import Canaries, canary_inclusion, draw_canaries, population_without
from dptrain.data.dataset import DatasetInfo, DatasetSource, InputUnits, LabeledData, SensitiveAttribute
from dptrain.data.partition import dirichlet_partition, iid_partition
from dptrain.data.prepare import SplitData, prepare
from dptrain.data.registry import DATASETS, describe, load
from dptrain.data.splits import Split, SplitSizes, make_split, split_sizes

__all__ = [
    "Canaries",
    "DATASETS",
    "DatasetInfo",
    "DatasetSource",
    "InputUnits",
    "LabeledData",
    "SensitiveAttribute",
    "Split",
    "SplitData",
    "SplitSizes",
    "audited_split",
    "canary_inclusion",
    "describe",
    "dirichlet_partition",
    "draw_canaries",
    "iid_partition",
    "load",
    "make_split",
    "population_without",
    "prepare",
    "split_sizes",
    "stratified_pairs",
    "subset",
]
