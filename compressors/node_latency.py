"""Where a network's CPU time goes, per channel: each node's measured time shared among the channels it carries.

MACs see only convolutions and matrix products, but on a CPU the memory-bound ops (activations, pooling,
concatenation, upsampling, normalisation) take much of the time, most of it at full resolution. Pruning ranked by
MACs alone therefore cuts fewer seconds than multiply-adds (``shared/seeds/004``: FLOPs -44%, latency -32%).
:func:`node_times` times every node of a replay; :func:`time_share_per_channel` divides each node's time evenly over
the channel positions of the values it reads and writes, so one channel's share is what removing it saves if time
scales with channel counts.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from graph.dependency import ChannelGroup
from graph.ir import iter_refs
from graph.network import ReconstructedNetwork
from graph.pruning import dependency_graph


def node_times(rnet: ReconstructedNetwork, inputs: tuple[Any, ...], keywords: dict[str, Any] | None = None,
               repeats: int = 5) -> np.ndarray:
    """Median seconds each node of ``rnet`` takes in an eager replay on ``inputs`` and ``keywords`` (eval mode, no
    grad; one warm-up run, then ``repeats`` timed ones). Nodes that do not run in eval mode take 0."""
    keywords = keywords or {}
    times = np.zeros((repeats, len(rnet.graph_nodes)))
    index_of = {id(node): i for i, node in enumerate(rnet.graph_nodes)}
    was_training = rnet.training
    rnet.eval()
    try:
        with torch.no_grad():
            rnet(*inputs, **keywords)
            for run in range(repeats):
                last = [time.perf_counter()]

                def observer(node, args, kwargs, output, row=times[run], last=last) -> None:
                    now = time.perf_counter()
                    row[index_of[id(node)]] += now - last[0]
                    last[0] = now

                rnet.observe(observer, *inputs, **keywords)
    finally:
        rnet.train(was_training)
    return np.median(times, axis=0)


def time_share_per_channel(rnet: ReconstructedNetwork, groups: list[ChannelGroup],
                           times: np.ndarray) -> dict[int, np.ndarray]:
    """For each group (by id), the fraction of the network's measured time each of its channels costs: a node's
    time is split evenly over the channel positions of every value it reads or writes, and a channel gets the
    largest such split over the node's values (an activation counts once, a convolution once for its input and
    once for its output channels)."""
    graph = dependency_graph(rnet)
    group_of, channel_of = graph.channel_index(groups)
    outputs: dict[int, list] = {}
    for (index, _), labeling in graph.values.items():
        outputs.setdefault(index, []).append(labeling)
    totals = [np.zeros(group.size) for group in groups]
    for index, node in enumerate(rnet.graph_nodes):
        if not times[index]:
            continue
        labelings = list(outputs.get(index, ()))
        labelings += [graph.values[(ref.index, ref.path)] for ref in iter_refs((node.args, node.kwargs),
                                                                                 through_sym=False)
                      if (ref.index, ref.path) in graph.values]
        node_share: dict[int, np.ndarray] = {}
        for factor in (f for labeling in labelings for f in labeling.factors if 0 not in f.dims):
            components = graph.component[factor.ids.ravel()]
            owners, channels = group_of[components], channel_of[components]
            for owner in np.unique(owners[owners >= 0]):
                share = np.zeros(groups[owner].size)
                hit = owners == owner
                np.add.at(share, channels[hit], times[index] / components.size)
                node_share[owner] = np.maximum(node_share.get(owner, share), share)
        for owner, share in node_share.items():
            totals[owner] += share
    total = float(times.sum()) or 1.0
    return {group.id: share / total for group, share in zip(groups, totals)}
