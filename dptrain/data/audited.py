"""The records a membership audit sees when only some members trained the model (honest clients of a
federation, honest ranks of robust data parallelism): those members, and as many non-members with
the same label histogram."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dptrain.data.prepare import SplitData


def stratified_pairs(
    member_labels: np.ndarray, non_member_labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions into each side with identical label histograms: per class c, k_c =
    min(#members of c, #non-members of c) of each, the larger side subsampled uniformly by ``rng``.

    Members and non-members are then balanced class by class, so a score that only reads the label
    (a Dirichlet partition or Byzantine clients that hold some classes skew the trained members'
    labels) gains nothing; a side is never drawn from when it is the smaller one.
    """
    members, non_members = [], []
    for label in np.union1d(member_labels, non_member_labels):
        mine, theirs = np.flatnonzero(member_labels == label), np.flatnonzero(non_member_labels == label)
        k = min(len(mine), len(theirs))
        members.append(mine if k == len(mine) else rng.choice(mine, size=k, replace=False))
        non_members.append(theirs if k == len(theirs) else rng.choice(theirs, size=k, replace=False))
    return np.sort(np.concatenate(members)), np.sort(np.concatenate(non_members))


def subset(dataset: TensorDataset, positions: np.ndarray) -> TensorDataset:
    """The records of ``dataset`` at ``positions``, in that order."""
    rows = torch.from_numpy(positions)
    return TensorDataset(*(tensor[rows] for tensor in dataset.tensors))


def audited_split(data: SplitData, trained: np.ndarray, seed: int) -> SplitData:
    """``data`` with members cut to records of ``trained`` (positions into the member split) and
    non-members to as many of the non-member split, label-stratified (``stratified_pairs``, seeded).

    Every audited member is a trained-on record and the two sides have the same size and label
    histogram. Depends only on the split and ``trained``, so ``dptrain audit`` derives the same set.
    """
    member_labels = data.members.tensors[1][torch.from_numpy(trained)].numpy()
    chosen, non_members = stratified_pairs(
        member_labels, data.non_members.tensors[1].numpy(), np.random.default_rng(seed)
    )
    members = trained[chosen]
    split = dataclasses.replace(
        data.split, members=data.split.members[members], non_members=data.split.non_members[non_members]
    )
    return dataclasses.replace(
        data, members=subset(data.members, members), non_members=subset(data.non_members, non_members), split=split
    )
