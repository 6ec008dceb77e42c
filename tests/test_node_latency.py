"""Per-node timing of a replay and the per-channel share of measured time (the latency regulariser of Taylor
pruning), against hand computations on known node times."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from compressors import TaylorPruning
from compressors.node_latency import node_times, time_share_per_channel
from graph import capture
from graph.pruning import multiply_adds


class ConvReluConv(nn.Module):
    """conv(3->8) -> ReLU -> conv(8->4): one prunable group of 8 channels read by three nodes."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


def test_time_share_splits_each_node_time_over_the_channels_it_reads_and_writes():
    rnet = capture(ConvReluConv().eval(), torch.randn(1, 3, 6, 6))
    group = next(g for g in rnet.channel_groups() if g.prunable)
    times = np.zeros(len(rnet.graph_nodes))
    seconds = {"c1": 8.0, "c2": 2.0}
    for index, node in enumerate(rnet.graph_nodes):
        times[index] = seconds.get(node.name, 4.0 if node.op.endswith("relu") else 0.0)
    assert sorted(times[times > 0]) == [2.0, 4.0, 8.0]
    share = time_share_per_channel(rnet, [group], times)[group.id]
    # each of the 8 channels: c1 writes it (8 s / 8), the ReLU reads and writes it (4 s / 8, once), c2 reads it
    # (2 s / 8): 1.75 s of the 14 s
    np.testing.assert_allclose(share, np.full(8, 1.75 / 14))


def test_time_share_is_larger_for_channels_at_higher_resolution():
    class TwoResolutions(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide, self.narrow = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 3, padding=1)
            self.head = nn.Conv2d(32, 2, 1)

        def forward(self, x):
            big = F.relu(self.wide(x))
            small = F.relu(self.narrow(F.avg_pool2d(x, 16)))
            return self.head(torch.cat([F.avg_pool2d(big, 16), small], dim=1))

    torch.manual_seed(0)
    rnet = capture(TwoResolutions().eval(), torch.randn(1, 3, 128, 128))
    times = node_times(rnet, (torch.randn(1, 3, 128, 128),), repeats=7)
    assert times.shape == (len(rnet.graph_nodes),) and (times >= 0).all() and times.sum() > 0
    groups = [g for g in rnet.channel_groups() if g.prunable]
    shares = time_share_per_channel(rnet, groups, times)
    by_node = {g.nodes[0]: shares[g.id].mean() for g in groups}
    # 256x more positions: the wide branch's channels cost far more time than the narrow one's (a wide margin for
    # timing noise: on a loaded machine the ratio fell to about 4 with 64x)
    assert by_node["wide"] > 2 * by_node["narrow"]


def test_taylor_pruning_with_latency_regularisation_prunes_the_time_heavy_channels_first(monkeypatch):
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide, self.narrow = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(1, 16, 3, padding=1)
            self.fc = nn.Linear(32, 3)

        def forward(self, x):
            big = F.relu(self.wide(x)).mean((2, 3))
            small = F.relu(self.narrow(F.avg_pool2d(x, 4))).mean((2, 3))
            return self.fc(torch.cat([big, small], dim=1))

    def narrow_is_slow(rnet, inputs, keywords=None, repeats=5):
        # as if the narrow branch's convolution took all the time (a stand-in for a memory-bound op MACs miss)
        return np.array([1.0 if node.name == "narrow" else 0.0 for node in rnet.graph_nodes])

    monkeypatch.setattr("compressors.taylor.node_times", narrow_is_slow)
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 1, 16, 16), torch.randint(0, 3, (64,))), batch_size=16)
    model = TwoBranches().eval()
    kept = {}
    for weight in (0.0, 1.0):
        taylor = TaylorPruning(model, loader, None, flops_target=0.7, steps=1, finetune_steps=0,
                               latency_regularization=weight)
        pruned = taylor.compress()
        assert multiply_adds(pruned) <= 0.7 * multiply_adds(taylor.origin_net)
        kept[weight] = {name: pruned.module_of(pruned.node(name)).out_channels for name in ("wide", "narrow")}
    # the narrow branch holds 1/16 of the MACs: by MACs alone it is kept; its (stand-in) time makes it go first
    assert kept[0.0]["narrow"] > kept[1.0]["narrow"] == 1
