"""What a search agent decides on: one :class:`Unit` per prunable channel group, in topological order, with the kept
channel counts that ``round_to`` and the lower bound allow and the static features of the layer that produces it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch.nn as nn

from compressors.base import CompressionError

LAYER_TYPES = ("conv", "depthwise-conv", "linear", "other")
"""The layer-type feature of the state, in this order (AMC's 0 = conv, 1 = linear, extended)."""


@dataclass
class Unit:
    """One decision of the search: how many of ``size`` channels (or ranks) to keep.

    ``keeps`` are the allowed kept counts, ascending (multiples of ``round_to`` from the lower bound up, and
    ``size``); ``layer`` holds the static features of the layer the unit belongs to (``type``, ``in_channels``,
    ``out_channels``, ``stride``, ``kernel``); ``key`` is what the action adapter acts on (a ``ChannelGroup``).
    """

    name: str
    size: int
    keeps: np.ndarray
    layer: dict[str, Any]
    key: Any = field(default=None, repr=False)

    def keep_for(self, ratio: float) -> int:
        """The allowed kept count nearest to ``ratio * size``."""
        return int(self.keeps[np.argmin(np.abs(self.keeps - ratio * self.size))])

    @property
    def lowest(self) -> int:
        """The smallest allowed kept count (the lower bound after rounding)."""
        return int(self.keeps[0])


def allowed_keeps(size: int, lbound: float, round_to: int | None) -> np.ndarray:
    """Kept counts a group of ``size`` channels may take: at least ``ceil(lbound * size)`` (and 1), multiples of
    ``round_to`` (every count without it), and always ``size`` itself."""
    if not 0 < lbound <= 1:
        raise CompressionError(f"lbound must be in (0, 1], got {lbound}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise CompressionError(f"round_to must be a positive integer, got {round_to!r}")
    step = round_to or 1
    low = max(1, math.ceil(lbound * size - 1e-9))
    first = max(step, int(math.ceil(low / step)) * step)
    return np.unique(np.append(np.arange(first, size + 1, step), size)).astype(np.int64)


def layer_features(module: nn.Module | None, size: int) -> dict[str, Any]:
    """AMC's static layer features of the module producing a unit: type, in/out channels, stride, kernel."""
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        return {"type": "depthwise-conv" if depthwise else "conv", "in_channels": module.in_channels,
                "out_channels": module.out_channels, "stride": module.stride[0], "kernel": module.kernel_size[0]}
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in_channels": module.in_features, "out_channels": module.out_features,
                "stride": 0, "kernel": 1}
    return {"type": "other", "in_channels": size, "out_channels": size, "stride": 0, "kernel": 1}


def channel_units(rnet, lbound: float = 0.2, round_to: int | None = None,
                  ignore: Iterable[str] = ()) -> list[Unit]:
    """One unit per prunable channel group of ``rnet`` (``rnet.channel_groups()``), ordered by the position of the
    layer that produces it. Groups touching a node in ``ignore``, transformer groups that prune only when named
    (``explicit_only``) and groups whose rounding leaves no choice are left out. The unit's name is its producing
    node's name."""
    ignore = set(ignore)
    order = {node.name: index for index, node in enumerate(rnet.graph_nodes)}
    unknown = sorted(ignore - set(order))
    if unknown:
        raise CompressionError(f"ignore names {unknown[0]!r}, which is not a node of this network")
    units = []
    for group in rnet.channel_groups():
        if not group.prunable or group.explicit_only or ignore & set(group.nodes):
            continue
        keeps = allowed_keeps(group.size, lbound, round_to)
        if len(keeps) < 2:
            continue
        producers = [m.node for m in group.members if m.role == "out"] or group.nodes
        producer = min(producers, key=order.__getitem__)
        module = rnet.module_of(rnet.node(producer))
        units.append((order[producer], Unit(producer, group.size, keeps, layer_features(module, group.size), group)))
    if not units:
        raise CompressionError("the network has no prunable channel group to search over (every group is fixed, "
                               "ignored, or too small for round_to)")
    units.sort(key=lambda item: item[0])
    names = [unit.name for _, unit in units]
    for _, unit in units:
        if names.count(unit.name) > 1:
            unit.name = f"{unit.name}:{unit.key.id}"
    return [unit for _, unit in units]
