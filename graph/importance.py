"""Channel importance scores per group, aggregated over every member tensor of the group."""
from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch

from .dependency import ChannelGroup

Importance = Union[str, Callable[["ReconstructedNetwork", ChannelGroup], np.ndarray]]  # noqa: F821


def _norm_scores(rnet, group: ChannelGroup, power: int) -> np.ndarray:
    scores = np.zeros(group.size)
    for member in group.members:
        tensor = member_tensor(rnet, member.node, member.tensor).detach()
        reduce_dims = [d for d in range(tensor.dim()) if d != member.dim]
        per_position = tensor.abs().pow(power).float().sum(dim=reduce_dims).cpu().numpy() if reduce_dims else \
            tensor.abs().pow(power).float().cpu().numpy()
        per_channel = np.array([per_position[p].sum() for p in member.positions])
        mean = per_channel.mean()
        scores += per_channel / mean if mean > 0 else per_channel
    return scores


IMPORTANCES: dict[str, Callable] = {
    "l1": lambda rnet, group: _norm_scores(rnet, group, 1),
    "l2": lambda rnet, group: _norm_scores(rnet, group, 2),
    "random": lambda rnet, group: np.random.default_rng(group.id).random(group.size),
}


def group_importance(rnet, group: ChannelGroup, importance: Importance = "l2") -> np.ndarray:
    """One score per channel of ``group`` (higher = more important): ``l1``, ``l2``, ``random`` or a callable.

    Norm scores sum, over members, each member's per-channel norm divided by that member's mean, so a wide
    producer does not drown a narrow consumer.
    """
    function = importance if callable(importance) else IMPORTANCES.get(importance)
    if function is None:
        raise ValueError(f"unknown importance {importance!r}; use one of {sorted(IMPORTANCES)} or a callable")
    scores = np.asarray(function(rnet, group), dtype=float)
    if scores.shape != (group.size,):
        raise ValueError(f"importance returned shape {scores.shape} for a group of {group.size} channels")
    return scores


def member_tensor(rnet, node_name: str, path: str) -> torch.Tensor:
    """The tensor ``path`` (``weight``, ``value``) of the module of the node named ``node_name``."""
    owner = rnet.module_of(rnet.node(node_name))
    for part in path.split("."):
        owner = getattr(owner, part)
    return owner
