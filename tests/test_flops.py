"""Per-node MACs and params (graph.flops) against hand counts, torch's FlopCounterMode and the models' parameters."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import hf_models
from graph import capture, prune
from graph.flops import COUNTERS, count_flops
from graph.leaves import LEAF_TYPES
from models import HandAttention, TinyViT


def reference_macs(model: nn.Module, *args, **kwargs) -> int:
    """torch's own count: FlopCounterMode FLOPs / 2, with attention on the math path it can see (the fused CPU
    kernels and nn.MultiheadAttention's fast path are invisible to it)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() // 2


class ConvBnReluLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.bn(self.conv(x))), 1))


class GroupedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 16, 3, stride=2, dilation=2, padding=2, groups=4, bias=False)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)

    def forward(self, x):
        return self.depthwise(self.grouped(x))


class TransposedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2)
        self.grouped_up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)

    def forward(self, x):
        return self.grouped_up(self.up(x))


class SdpaNet(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 4, kdim=6, vdim=10, batch_first=True)

    def forward(self, q, k, v):
        return self.attention(q, k, v, need_weights=False)[0]


class Einsum(nn.Module):
    def __init__(self, equation: str):
        super().__init__()
        self.equation = equation

    def forward(self, *operands):
        return torch.einsum(self.equation, *operands)


class SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


class WithFFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.fft.rfft(self.fc(x)).abs()


def report_for(model: nn.Module, *inputs):
    return capture(model.eval(), *inputs).flops()


def test_conv_bn_relu_linear_matches_hand_count():
    report = report_for(ConvBnReluLinear(), torch.randn(1, 3, 8, 8))
    rows = report.by_node
    assert rows["conv"].macs == (8 * 8 * 8) * (3 * 3 * 3)
    assert rows["conv"].params == 8 * 3 * 3 * 3 + 8
    assert (rows["bn"].macs, rows["bn"].other, rows["bn"].params) == (0, 512, 16)
    assert (rows["relu"].macs, rows["relu"].other) == (0, 512)
    assert rows["fc"].macs == 512 * 10
    assert report.total_macs == 13824 + 5120
    assert report.total_params == 224 + 16 + 5130
    assert [row.name for row in report.rows] == ["conv", "bn", "relu", "flatten", "fc"]
    assert rows["conv"].shape == "1x8x8x8"


def test_grouped_dilated_strided_and_depthwise_convs_match_hand_count():
    report = report_for(GroupedConvs(), torch.randn(1, 8, 9, 9))
    # (9 + 2*2 - 2*(3-1) - 1) // 2 + 1 = 5: output 16x5x5, each output reads 8/4 channels x 3x3.
    assert report.by_node["grouped"].macs == 16 * 5 * 5 * 2 * 9
    assert report.by_node["depthwise"].macs == 16 * 5 * 5 * 1 * 9


def test_transposed_convs_match_hand_count():
    report = report_for(TransposedConvs(), torch.randn(2, 4, 5, 5))
    # Each input element is scattered to (out channels / groups) x kernel outputs.
    assert report.by_node["up"].macs == 2 * 4 * 5 * 5 * 6 * 9
    assert report.by_node["up"].shape == "2x6x11x11"
    assert report.by_node["grouped_up"].macs == 2 * 6 * 11 * 11 * 2 * 4


def test_hand_written_attention_matches_hand_count():
    report = report_for(HandAttention(16, 2, 0.0), torch.randn(2, 5, 16))
    qkv, scores, mix, proj = 2 * 5 * 48 * 16, 2 * 2 * 5 * 5 * 8, 2 * 2 * 5 * 8 * 5, 2 * 5 * 16 * 16
    assert report.total_macs == qkv + scores + mix + proj
    assert report.by_node["matmul"].macs == scores


def test_scaled_dot_product_attention_counts_qk_and_av():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    report = report_for(SdpaNet(), q, k, v)
    assert report.total_macs == 2 * 3 * 5 * 7 * 8 + 2 * 3 * 5 * 7 * 4
    assert report.total_macs == reference_macs(SdpaNet(), q, k, v)


def test_multihead_attention_counts_projections_and_attention():
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 6), torch.randn(2, 7, 10)
    model = CrossAttention().eval()
    report = report_for(model, q, k, v)
    projections = 2 * 5 * 16 * 16 + 2 * 7 * 6 * 16 + 2 * 7 * 10 * 16 + 2 * 5 * 16 * 16
    attention = 2 * 4 * 5 * 7 * 4 * 2
    assert report.total_macs == projections + attention
    assert report.total_macs == reference_macs(model, q, k, v)
    assert report.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("equation, shapes, expected", [
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], 2 * 3 * 4 * 5),
    ("nci,cd->ndi", [(2, 8, 3), (8, 4)], 2 * 8 * 3 * 4),
    ("...ij,jk->...ik", [(2, 3, 4, 5), (5, 6)], 2 * 3 * 4 * 5 * 6),
    ("ij,jk,kl->il", [(3, 4), (4, 5), (5, 6)], 3 * 4 * 5 + 3 * 5 * 6),
    ("ij,ij->ij", [(3, 4), (3, 4)], 0),
    ("bij->bji", [(2, 3, 4)], 0),
])
def test_einsum_counts_from_equation_and_shapes(equation, shapes, expected):
    operands = [torch.randn(shape) for shape in shapes]
    report = report_for(Einsum(equation), *operands)
    assert report.total_macs == expected
    assert report.total_macs == reference_macs(Einsum(equation), *operands)


def _vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64)


@pytest.mark.parametrize("build, size", [
    (torchvision.models.resnet18, 64), (torchvision.models.mobilenet_v2, 64), (_vit, 32),
])
def test_torchvision_macs_and_params_match_torch(build, size):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, size, size)
    report = report_for(model, x)
    assert report.uncounted == []
    assert report.total_macs == reference_macs(model, x)
    assert report.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", hf_models.ATTENTION_IMPLEMENTATIONS)
def test_transformers_macs_and_params_match_torch(family, attention):
    model = hf_models.FAMILIES[family](attention)
    input_ids, attention_mask = hf_models.token_inputs(2, 8, padded=True)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    report = capture(model, **kwargs).flops()
    assert report.uncounted == []
    assert report.total_macs == reference_macs(model, **kwargs)
    assert report.total_params == sum(p.numel() for p in model.parameters())


def test_counts_at_given_inputs_follow_their_size():
    model = ConvBnReluLinear().eval()
    rnet = capture(nn.Sequential(model.conv, model.bn, model.relu).eval(), torch.randn(1, 3, 8, 8))
    larger = torch.randn(3, 3, 16, 16)
    report = count_flops(rnet, larger)
    assert report.total_macs == reference_macs(rnet, larger) == 3 * 8 * 16 * 16 * 27
    assert report.by_node["0"].shape == "3x8x16x16"


def test_shared_module_parameters_count_once_in_total():
    model = SharedLinear().eval()
    report = report_for(model, torch.randn(3, 4))
    assert [row.params for row in report.rows if row.op == "Linear"] == [20, 20]
    assert report.total_params == sum(p.numel() for p in model.parameters()) == 20
    assert report.total_macs == reference_macs(model, torch.randn(3, 4)) == 2 * 3 * 4 * 4


def test_parameter_nodes_count_their_tensor():
    model = TinyViT(dropout=0.0).eval()
    report = report_for(model, torch.randn(2, 3, 16, 16))
    assert report.by_node["class_token"].params == 16
    assert report.by_node["pos_embedding"].params == 17 * 16
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.total_macs == reference_macs(model, torch.randn(2, 3, 16, 16))


def test_ops_without_a_counter_are_listed_not_guessed():
    report = report_for(WithFFT(), torch.randn(2, 8))
    assert report.uncounted == ["torch.fft.rfft"]
    row = next(row for row in report.rows if row.op == "torch.fft.rfft")
    assert row.macs is None and row.other is None
    assert report.total_macs == 2 * 8 * 8
    assert "torch.fft.rfft" in str(report) and "?" in str(report)


def test_every_leaf_module_type_has_a_counter():
    assert [cls.__name__ for cls in LEAF_TYPES if cls.__name__ not in COUNTERS] == []


def test_show_fmlas_prints_every_node_and_the_totals(capsys):
    model = ConvBnReluLinear().eval()
    rnet = capture(model, torch.randn(1, 3, 8, 8))
    rnet.showFMLAs()
    printed = capsys.readouterr().out
    for node in rnet.layer_nodes:
        assert node.name in printed
    total_line = next(line for line in printed.splitlines() if line.startswith("total"))
    assert f"{reference_macs(model, torch.randn(1, 3, 8, 8)):,}" in total_line
    assert f"{sum(p.numel() for p in model.parameters()):,}" in total_line


def test_markdown_table_has_a_row_per_node_and_totals():
    model = ConvBnReluLinear().eval()
    rnet = capture(model, torch.randn(1, 3, 8, 8))
    lines = rnet.flops().to_markdown().strip().splitlines()
    assert len(lines) == 2 + len(rnet.layer_nodes) + 1
    assert f"**{reference_macs(model, torch.randn(1, 3, 8, 8)):,}**" in lines[-1]


def test_pruning_halves_channels_and_counts_still_match_torch():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    rnet = capture(model, x)
    pruned = prune(rnet, channel_ratio=0.5)
    before, after = rnet.flops(), pruned.flops()
    assert after.total_macs < 0.5 * before.total_macs
    assert after.total_macs == reference_macs(pruned, x)
    assert after.total_params < before.total_params
