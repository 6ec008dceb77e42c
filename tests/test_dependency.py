"""Channel dependency analysis: the groups found for each op kind, checked against hand-derived expectations."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graph import capture
from models import assert_outputs_close

IMAGE = (2, 3, 8, 8)


def conv(cin: int, cout: int, kernel: int = 3, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups)


class ResidualNet(nn.Module):
    """conv -> relu -> conv + skip -> conv: the skip ties both convs' outputs and both consumers' inputs."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = conv(3, 8), conv(8, 8), conv(8, 4)

    def forward(self, x):
        r = F.relu(self.c1(x))
        return self.c3(self.c2(r) + r)


class ConcatNet(nn.Module):
    """Two branches concatenated: each branch's channels sit at an offset in the consumer's input."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = conv(3, 4), conv(3, 6), conv(10, 5)

    def forward(self, x):
        return self.c3(F.relu(torch.cat([self.c1(x), self.c2(x)], dim=1)))


class SplitNet(nn.Module):
    """chunk into halves, then split the second half unevenly; one split part is unused."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = conv(3, 8), conv(4, 3), conv(3, 3)

    def forward(self, x):
        a, b = torch.chunk(self.c1(x), 2, dim=1)
        _, q = torch.split(b, [1, 3], dim=1)
        return self.c2(a) + self.c3(q)


class SliceNet(nn.Module):
    """Only channels 2..5 of the first conv are read, through ``__getitem__``."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 8), conv(4, 3)

    def forward(self, x):
        return self.c2(self.c1(x)[:, 2:6])


class FlattenNet(nn.Module):
    """conv -> flatten -> Linear: one conv channel is a block of H*W input features."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc = conv(3, 4), nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(F.relu(self.c1(x)).flatten(1))


class DepthwiseNet(nn.Module):
    """A depthwise conv couples each input channel with its output channel."""

    def __init__(self):
        super().__init__()
        self.c1, self.dw, self.c3 = conv(3, 8), conv(8, 8, groups=8), conv(8, 3)

    def forward(self, x):
        return self.c3(F.relu(self.dw(self.c1(x))))


class GroupedNet(nn.Module):
    """A 2-group 1x1 conv: a whole conv group (4 inputs, 2 outputs) is one channel."""

    def __init__(self):
        super().__init__()
        self.c1, self.g, self.c3 = conv(3, 8), conv(8, 4, kernel=1, groups=2), conv(4, 3)

    def forward(self, x):
        return self.c3(self.g(self.c1(x)))


class NormNet(nn.Module):
    """BatchNorm, GroupNorm (4 groups of 2 channels) and a per-channel PReLU on one conv's channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.gn, self.act, self.c2 = conv(3, 8), nn.BatchNorm2d(8), nn.GroupNorm(4, 8), \
            nn.PReLU(8), conv(8, 3)

    def forward(self, x):
        return self.c2(self.act(self.gn(self.bn(self.c1(x)))))


class PixelShuffleNet(nn.Module):
    """pixel_shuffle(2): each output channel is a block of 4 input channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.shuffle, self.c2 = conv(3, 8), nn.PixelShuffle(2), conv(2, 3)

    def forward(self, x):
        return self.c2(self.shuffle(self.c1(x)))


class ChannelsLastNet(nn.Module):
    """permute to channels-last into a Linear, transpose back; then a flatten/transpose/reshape round trip."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc, self.c2, self.fc2, self.c3 = conv(3, 8), nn.Linear(8, 6), conv(6, 5), nn.Linear(5, 7), \
            conv(7, 3)

    def forward(self, x):
        y = self.fc(self.c1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.c2(y)
        n, c, h, w = y.shape
        tokens = self.fc2(y.flatten(2).transpose(1, 2))
        return self.c3(tokens.transpose(1, 2).reshape(n, -1, h, w))


class SqueezeExciteNet(nn.Module):
    """Squeeze-excitation: the gate (n, C, 1, 1) broadcasts over the feature map it multiplies."""

    def __init__(self):
        super().__init__()
        self.c1, self.se1, self.se2, self.c3 = conv(3, 8), conv(8, 2, 1), conv(2, 8, 1), conv(8, 3)

    def forward(self, x):
        y = self.c1(x)
        gate = torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        return self.c3(y * gate)


class AttentionNet(nn.Module):
    """Hand-written two-head self-attention through matmul/softmax between an embedding and a head; ``rotate`` adds
    rotate-half to queries and keys (``cat([-t[..., d // 2:], t[..., : d // 2]], -1)``, d read from the shape)."""

    def __init__(self, dim: int = 8, heads: int = 2, rotate: bool = False):
        super().__init__()
        self.heads, self.rotate = heads, rotate
        self.embed, self.head = nn.Linear(4, dim), nn.Linear(dim, 3)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        n, length, _ = x.shape
        h = self.embed(x)

        def split(t):
            return t.reshape(n, length, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        if self.rotate:
            q, k = (t + torch.cat([-t[..., t.shape[-1] // 2:], t[..., : t.shape[-1] // 2]], -1) for t in (q, k))
        weights = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        y = (weights @ v).transpose(1, 2).reshape(n, length, -1)
        return self.head(h + self.proj(y))


class RollNet(nn.Module):
    """``torch.roll`` along channels has no channel rule."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 8), conv(8, 3)

    def forward(self, x):
        return self.c2(torch.roll(self.c1(x), 1, dims=1))


class UnfoldNet(nn.Module):
    """``F.unfold`` mixes channels and kernel positions and has no channel rule."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc = conv(3, 4), nn.Linear(4 * 4, 3)

    def forward(self, x):
        return self.fc(F.unfold(self.c1(x), 2, stride=2).transpose(1, 2))


class ComputedSliceNet(nn.Module):
    """Slices channels at a bound computed from the channel count, ``y[:, : y.shape[1] // 2]`` (as rotate-half
    does)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 8), conv(4, 3)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(y[:, : y.shape[1] // 2])


class SpatialBoundSliceNet(nn.Module):
    """Slices channels at a bound computed from a spatial size, ``y[:, : y.shape[-1] // 2]``."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 8), conv(4, 3)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(y[:, : y.shape[-1] // 2])


class WindowAttentionNet(nn.Module):
    """Swin's window attention (16 wide, 4 heads of 4, 4 tokens): qkv reshaped to ``(B, N, 3, heads, C // heads)``
    and permuted, queries scaled by ``(C // heads) ** -0.5``, a relative-position-bias table indexed by a buffer and
    added per head, heads merged back with ``reshape(B, N, C)``. ``cosine`` is Swin v2: the key bias zeroed through
    a slice at ``numel // 3``, normalised queries and keys, a per-head ``logit_scale``."""

    def __init__(self, cosine: bool = False):
        super().__init__()
        self.cosine, self.heads = cosine, 4
        self.embed, self.qkv, self.proj, self.head = nn.Linear(3, 16), nn.Linear(16, 48), nn.Linear(16, 16), \
            nn.Linear(16, 3)
        self.table, self.logit_scale = nn.Parameter(torch.randn(9, 4)), nn.Parameter(torch.rand(4, 1, 1))
        self.register_buffer("index", torch.arange(16) % 9)

    def forward(self, x):
        h = self.embed(x)
        b, n, c = h.shape
        bias = self.qkv.bias
        if self.cosine:
            bias = bias.clone()
            length = bias.numel() // 3
            bias[length:2 * length].zero_()
        qkv = F.linear(h, self.qkv.weight, bias).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.cosine:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * self.logit_scale.exp()
        else:
            attn = q * (c // self.heads) ** -0.5 @ k.transpose(-2, -1)
        table = self.table[self.index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        out = ((attn + table).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.head(h + self.proj(out))


def input_for(net: type[nn.Module], batch: int = 2) -> torch.Tensor:
    """A random input of the shape the test net class expects."""
    if net is AttentionNet:
        return torch.randn(batch, 5, 4)
    if net is WindowAttentionNet:
        return torch.randn(batch, 4, 3)
    size = 4 if net is FlattenNet else 8
    return torch.randn(batch, 3, size, size)


def captured(model: nn.Module):
    torch.manual_seed(0)
    return capture(model.eval(), input_for(type(model)))


def group_with(rnet, node: str, tensor: str = "weight", dim: int = 0, position: int = 0):
    """The group in which position ``position`` of ``node.tensor`` along ``dim`` lies."""
    for group in rnet.channel_groups():
        for member in group.members:
            if (member.node, member.tensor, member.dim) == (node, tensor, dim) and position in member.positions:
                return group
    raise AssertionError(f"no group holds {node}.{tensor}[{dim}] position {position}")


def members_of(group) -> set[tuple[str, str, int]]:
    return {(m.node, m.tensor, m.dim) for m in group.members}


def positions_of(group, node: str, tensor: str = "weight", dim: int = 0) -> list[list[int]]:
    return next(m.positions.tolist() for m in group.members if (m.node, m.tensor, m.dim) == (node, tensor, dim))


def conv_members(name: str, role: str) -> set[tuple[str, str, int]]:
    return {(name, "weight", 0), (name, "bias", 0)} if role == "out" else {(name, "weight", 1)}


def test_residual_add_couples_producer_consumer_and_skip():
    group = group_with(captured(ResidualNet()), "c1")
    assert (group.size, group.prunable, group.exact) == (8, True, True)
    assert members_of(group) == conv_members("c1", "out") | conv_members("c2", "in") | conv_members("c2", "out") \
        | conv_members("c3", "in")


def test_group_reaching_the_output_is_not_prunable():
    group = group_with(captured(ResidualNet()), "c3")
    assert group.size == 4 and not group.prunable and "output" in group.reason


def test_concat_places_each_branch_at_its_offset():
    rnet = captured(ConcatNet())
    first, second = group_with(rnet, "c1"), group_with(rnet, "c2")
    assert (first.size, second.size) == (4, 6)
    assert members_of(first) == conv_members("c1", "out") | conv_members("c3", "in")
    assert positions_of(first, "c3", dim=1) == [[i] for i in range(4)]
    assert positions_of(second, "c3", dim=1) == [[i] for i in range(4, 10)]


def test_chunk_and_split_give_one_group_per_part():
    rnet = captured(SplitNet())
    halves = [group_with(rnet, "c1", position=p) for p in (0, 4, 5)]
    assert [g.size for g in halves] == [4, 1, 3]
    assert members_of(halves[0]) == conv_members("c1", "out") | conv_members("c2", "in")
    assert members_of(halves[1]) == conv_members("c1", "out")
    assert members_of(halves[2]) == conv_members("c1", "out") | conv_members("c3", "in")
    assert positions_of(halves[2], "c1") == [[5], [6], [7]]


def test_getitem_slice_couples_only_the_read_channels():
    rnet = captured(SliceNet())
    read, unread = group_with(rnet, "c1", position=2), group_with(rnet, "c1", position=0)
    assert positions_of(read, "c1") == [[2], [3], [4], [5]]
    assert positions_of(unread, "c1") == [[0], [1], [6], [7]]
    assert members_of(read) == conv_members("c1", "out") | conv_members("c2", "in")
    assert members_of(unread) == conv_members("c1", "out")


def test_flatten_into_linear_makes_a_channel_a_block_of_features():
    group = group_with(captured(FlattenNet()), "c1")
    assert group.size == 4 and group.prunable
    assert positions_of(group, "fc", dim=1) == [list(range(16 * c, 16 * c + 16)) for c in range(4)]


def test_depthwise_conv_couples_input_with_output_channel():
    group = group_with(captured(DepthwiseNet()), "c1")
    assert group.size == 8
    assert members_of(group) == conv_members("c1", "out") | conv_members("dw", "out") | conv_members("c3", "in")


def test_grouped_conv_couples_whole_conv_groups():
    group = group_with(captured(GroupedNet()), "c1")
    assert group.size == 2
    assert members_of(group) == conv_members("c1", "out") | conv_members("g", "out") | conv_members("c3", "in")
    assert positions_of(group, "c1") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert positions_of(group, "c3", dim=1) == [[0, 1], [2, 3]]


def test_group_norm_keeps_whole_norm_groups_and_norm_parameters_follow():
    group = group_with(captured(NormNet()), "c1")
    assert (group.size, group.exact) == (4, True)
    norm_params = {("bn", t, 0) for t in ("weight", "bias", "running_mean", "running_var")} | \
        {("gn", "weight", 0), ("gn", "bias", 0), ("act", "weight", 0)}
    assert members_of(group) == conv_members("c1", "out") | norm_params | conv_members("c2", "in")
    assert positions_of(group, "gn") == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_pixel_shuffle_makes_blocks_of_r_squared_channels():
    group = group_with(captured(PixelShuffleNet()), "c1")
    assert group.size == 2
    assert positions_of(group, "c1") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert positions_of(group, "c2", dim=1) == [[0], [1]]


def test_permute_transpose_and_channels_last_reshape_follow_channels():
    rnet = captured(ChannelsLastNet())
    assert members_of(group_with(rnet, "c1")) == conv_members("c1", "out") | {("fc", "weight", 1)}
    assert members_of(group_with(rnet, "fc")) == {("fc", "weight", 0), ("fc", "bias", 0)} | conv_members("c2", "in")
    assert members_of(group_with(rnet, "c2")) == conv_members("c2", "out") | {("fc2", "weight", 1)}
    fc2 = group_with(rnet, "fc2")
    assert fc2.size == 7 and fc2.prunable
    assert members_of(fc2) == {("fc2", "weight", 0), ("fc2", "bias", 0)} | conv_members("c3", "in")


def test_squeeze_excitation_gate_couples_with_the_gated_channels():
    rnet = captured(SqueezeExciteNet())
    gated = group_with(rnet, "c1")
    assert gated.size == 8
    assert members_of(gated) == conv_members("c1", "out") | conv_members("se1", "in") | conv_members("se2", "out") \
        | conv_members("c3", "in")
    assert members_of(group_with(rnet, "se1")) == conv_members("se1", "out") | conv_members("se2", "in")


def test_hand_written_attention_prunes_whole_heads():
    rnet = captured(AttentionNet())
    heads = group_with(rnet, "q")
    assert heads.size == 2 and heads.prunable
    rows = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert members_of(heads) == {(n, t, 0) for n in "qkv" for t in ("weight", "bias")} | {("proj", "weight", 1)}
    assert all(positions_of(heads, n) == rows for n in "qkv") and positions_of(heads, "proj", dim=1) == rows
    model = group_with(rnet, "embed")
    assert model.size == 8 and {("proj", "weight", 0), ("head", "weight", 1)} <= members_of(model)


def test_rotate_half_of_each_head_keeps_heads_separate_and_prunes_like_zeroing_proj_columns():
    torch.manual_seed(0)
    model, x = AttentionNet(rotate=True).eval(), input_for(AttentionNet)
    rnet = capture(model, x)
    heads = group_with(rnet, "q")
    assert (heads.size, heads.prunable, heads.exact) == (2, True, True)
    assert all(positions_of(heads, n) == [[0, 1, 2, 3], [4, 5, 6, 7]] for n in "qkv")
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.proj.weight[:, 4:] = 0
        assert_outputs_close(masked(x), rnet.prune_channels({heads: [1]})(x))
    assert (masked(x) - model(x)).abs().max() > 1e-4


@pytest.mark.parametrize("net, op", [(RollNet, "torch.roll"), (UnfoldNet, "unfold")])
def test_op_without_rule_makes_its_channels_unprunable(net, op):
    group = group_with(captured(net()), "c1")
    assert not group.prunable and op in group.reason


def test_every_member_position_lies_in_exactly_one_group():
    rnet = captured(ChannelsLastNet())
    seen: dict[tuple, list[int]] = {}
    for group in rnet.channel_groups():
        for member in group.members:
            assert member.positions.shape[0] == group.size
            seen.setdefault((member.node, member.tensor, member.dim), []).extend(member.positions.ravel().tolist())
    for (node, tensor, dim), positions in seen.items():
        size = getattr(rnet.module_of(rnet.node(node)), tensor).shape[dim]
        assert sorted(positions) == list(range(size)), (node, tensor, dim)


def test_group_ids_follow_execution_order():
    groups = captured(ConcatNet()).channel_groups()
    assert [g.id for g in groups] == list(range(len(groups)))
    assert np.all(np.diff([g.size for g in groups if g.nodes[0] == "c1"]) >= 0)


def test_slice_bound_computed_from_the_channel_count_is_rewritten_to_the_kept_count():
    rnet = captured(ComputedSliceNet())
    read, unread = group_with(rnet, "c1", position=0), group_with(rnet, "c1", position=4)
    assert (read.size, read.prunable, read.exact) == (4, True, True)
    assert members_of(read) == conv_members("c1", "out") | conv_members("c2", "in")
    assert positions_of(unread, "c1") == [[4], [5], [6], [7]]
    model, x = copy.deepcopy(rnet), input_for(ComputedSliceNet)
    with torch.no_grad():
        model.module_of(model.node("c2")).weight[:, 1] = 0
        assert_outputs_close(model(x), rnet.prune_channels({read: [1], unread: [0, 2]})(x))


def test_slice_with_bound_computed_from_a_spatial_size_fixes_the_sliced_channels():
    group = group_with(captured(SpatialBoundSliceNet()), "c1")
    assert not group.prunable and "coupled" in group.reason
    assert positions_of(group, "c1") == [list(range(8))]


@pytest.mark.parametrize("cosine", [False, True])
def test_window_attention_heads_couple_qkv_rows_bias_table_columns_and_proj_columns(cosine):
    rnet = captured(WindowAttentionNet(cosine))
    heads = group_with(rnet, "qkv.weight", "value")
    assert (heads.size, heads.prunable, heads.exact) == (4, True, True)
    rows = [[4 * h + j + 16 * s for s in range(3) for j in range(4)] for h in range(4)]
    assert positions_of(heads, "qkv.weight", "value") == rows and positions_of(heads, "qkv.bias", "value") == rows
    assert positions_of(heads, "table", "value", 1) == [[h] for h in range(4)]
    assert positions_of(heads, "proj", dim=1) == [list(range(4 * h, 4 * h + 4)) for h in range(4)]
    assert (("logit_scale", "value", 0) in members_of(heads)) == cosine
    rows_of_table = group_with(rnet, "table", "value", 0)
    assert not rows_of_table.prunable and "index tensor" in rows_of_table.reason


@pytest.mark.parametrize("cosine", [False, True])
def test_window_attention_pruned_heads_and_width_equal_zeroed_consumer_columns(cosine):
    torch.manual_seed(0)
    model = WindowAttentionNet(cosine).eval()
    x = input_for(WindowAttentionNet)
    rnet = capture(model, x)
    heads, width = group_with(rnet, "qkv.weight", "value"), group_with(rnet, "embed")
    assert (width.size, width.prunable, width.exact) == (16, True, True)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.proj.weight[:, 4:8] = 0
        for weight in (masked.qkv.weight, masked.head.weight):
            weight[:, [0, 5, 9]] = 0
        pruned = rnet.prune_channels({heads: [1], width: [0, 5, 9]})
        assert_outputs_close(masked(x), pruned(x))
        assert_outputs_close(masked(x[:1]), pruned(x[:1]))
    assert (masked(x) - model(x)).abs().max() > 1e-4
    assert pruned.module_of(pruned.node("qkv.weight")).value.shape == (36, 13)


class SpatialRollNet(nn.Module):
    """``torch.roll`` along the spatial dims only (as Swin's shifted windows)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 8), conv(8, 3)

    def forward(self, x):
        return self.c2(torch.roll(self.c1(x), shifts=(1, -2), dims=(2, 3)))


def test_roll_along_spatial_dims_passes_channels_and_along_channels_blocks_them():
    spatial = group_with(captured(SpatialRollNet()), "c1")
    assert (spatial.size, spatial.prunable) == (8, True)
    assert members_of(spatial) == conv_members("c1", "out") | conv_members("c2", "in")
    channel = group_with(captured(RollNet()), "c1")
    assert not channel.prunable and "torch.roll shifts along this channel dim" in channel.reason


class ScaledEmbedding(nn.Embedding):
    """An ``nn.Embedding`` subclass that overrides ``forward`` (as Gemma's scaled word embedding), so capture traces
    into it and sees ``F.embedding``."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


class ScaledEmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc = ScaledEmbedding(20, 6), nn.Linear(6, 3)

    def forward(self, ids):
        return self.fc(torch.relu(self.embed(ids)))


def test_functional_embedding_columns_are_a_named_only_group_and_its_rows_stay():
    torch.manual_seed(0)
    model = ScaledEmbeddingNet().eval()
    ids = torch.randint(0, 20, (2, 5))
    rnet = capture(model, ids)
    hidden = group_with(rnet, "embed.weight", tensor="value", dim=1)
    assert (hidden.size, hidden.prunable, hidden.explicit_only) == (6, True, True)
    assert members_of(hidden) == {("embed.weight", "value", 1), ("fc", "weight", 1)}
    rows = group_with(rnet, "embed.weight", tensor="value", dim=0)
    assert not rows.prunable and "looked up by the input's values" in rows.reason
    plan = {hidden: [1, 4]}
    other = torch.randint(0, 20, (3, 7))
    with torch.no_grad():
        pruned, masked = rnet.prune_channels(plan)(other), rnet.mask_channels(plan)(other)
        weight = model.embed.weight.clone()
        weight[:, [1, 4]] = 0
        by_hand = model.fc(torch.relu(F.embedding(other, weight) * 2.0))
    assert torch.allclose(pruned, masked, atol=1e-6) and torch.allclose(pruned, by_hand, atol=1e-6)
    assert not torch.allclose(pruned, model(other), atol=1e-3)
