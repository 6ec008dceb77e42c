"""Turn globally comparable channel scores into a pruning plan that meets a MACs budget.

Channels of every prunable group are ranked together (lowest score first); the plan removes the ``k`` lowest,
with each group's kept count rounded to ``round_to`` and never below one channel, and ``k`` is the smallest count
whose pruned network needs at most ``macs_target`` multiply-adds (found by bisection on the pruned network, so the
budget is met exactly, not estimated; the trials prune a copy on the meta device, which has the shapes and no data).
"""
from __future__ import annotations

import copy
from typing import Mapping

import numpy as np

from graph.dependency import ChannelGroup
from graph.pruning import multiply_adds, prune_channels

from .base import CompressionError


def rounded_keep(size: int, keep: int, round_to: int | None) -> int:
    """``keep`` rounded to the nearest multiple of ``round_to`` (at least ``round_to``, at most ``size``; groups no
    larger than ``round_to`` are left whole), and at least 1."""
    if round_to:
        if size <= round_to:
            return size
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return max(1, min(size, keep))


def plan_from_count(scores: Mapping[ChannelGroup, np.ndarray], count: int,
                    round_to: int | None = None) -> dict[ChannelGroup, list[int]]:
    """Remove the ``count`` lowest-scored channels over all groups (then round each group's kept count)."""
    groups = list(scores)
    if not groups or count <= 0:
        return {}
    pooled = np.concatenate([scores[g] for g in groups])
    owner = np.repeat(np.arange(len(groups)), [g.size for g in groups])
    lowest = np.argsort(pooled, kind="stable")[:count]
    removed = np.bincount(owner[lowest], minlength=len(groups))
    plan = {}
    for index, group in enumerate(groups):
        keep = rounded_keep(group.size, group.size - int(removed[index]), round_to)
        if keep < group.size:
            plan[group] = np.argsort(scores[group], kind="stable")[:group.size - keep].tolist()
    return plan


def plan_to_macs(rnet, scores: Mapping[ChannelGroup, np.ndarray], macs_target: float,
                 round_to: int | None = None) -> dict[ChannelGroup, list[int]]:
    """The plan removing the fewest lowest-scored channels whose pruned network needs at most ``macs_target``
    multiply-adds; :class:`CompressionError` when even removing all but the minimum cannot reach it."""
    if multiply_adds(rnet) <= macs_target:
        return {}
    total = sum(g.size for g in scores)
    shapes = copy.deepcopy(rnet).to("meta")

    def fits(count: int) -> bool:
        plan = plan_from_count(scores, count, round_to)
        trial = {group.id: indices for group, indices in plan.items()}
        return bool(plan) and multiply_adds(prune_channels(shapes, trial)) <= macs_target

    if not fits(total):
        raise CompressionError(f"the prunable channels cannot bring the network down to {int(macs_target):,} MACs "
                               f"(it needs {multiply_adds(rnet):,}); raise the MACs target")
    low, high = 0, total
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return plan_from_count(scores, high, round_to)
