"""Hard and soft channel pruning: pruning equals masking, parameter counts match hand counts, plans are validated,
pruned networks train and replay, and the torchvision zoo prunes exactly."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from graph import capture
from graph.errors import PruningError
from graph.pruning import plan_by_ratio, prune
from models import assert_outputs_close
from test_dependency import (AttentionNet, ChannelsLastNet, ConcatNet, DepthwiseNet, FlattenNet, GroupedNet, NormNet,
                             PixelShuffleNet, ResidualNet, SliceNet, SplitNet, SqueezeExciteNet, captured, group_with,
                             input_for, members_of, positions_of)

# (net, {(node, position): indices removed from the group holding node.weight[0][position]}, hand-counted
# parameters after pruning)
CASES = [
    (ResidualNet, {("c1", 0): [1, 5]}, (27 * 6 + 6) + (9 * 6 * 6 + 6) + (4 * 6 * 9 + 4)),
    (ConcatNet, {("c1", 0): [0], ("c2", 0): [1, 4]}, (27 * 3 + 3) + (27 * 4 + 4) + (5 * 7 * 9 + 5)),
    (SplitNet, {("c1", 0): [0], ("c1", 5): [1]}, (27 * 6 + 6) + (3 * 3 * 9 + 3) + (3 * 2 * 9 + 3)),
    (SliceNet, {("c1", 2): [0, 3], ("c1", 0): [1]}, (27 * 5 + 5) + (3 * 2 * 9 + 3)),
    (FlattenNet, {("c1", 0): [2]}, (27 * 3 + 3) + (5 * 3 * 16 + 5)),
    (DepthwiseNet, {("c1", 0): [0, 7]}, (27 * 6 + 6) + (9 * 6 + 6) + (3 * 6 * 9 + 3)),
    (GroupedNet, {("c1", 0): [1]}, (27 * 4 + 4) + (2 * 4 + 2) + (3 * 2 * 9 + 3)),
    (NormNet, {("c1", 0): [1, 2]}, (27 * 4 + 4) + 2 * 4 + 2 * 4 + 4 + (3 * 4 * 9 + 3)),
    (PixelShuffleNet, {("c1", 0): [0]}, (27 * 4 + 4) + (3 * 1 * 9 + 3)),
    (ChannelsLastNet, {("c1", 0): [0, 1], ("fc", 0): [2], ("c2", 0): [0], ("fc2", 0): [3, 4]},
     (27 * 6 + 6) + (5 * 6 + 5) + (4 * 5 * 9 + 4) + (5 * 4 + 5) + (3 * 5 * 9 + 3)),
    (SqueezeExciteNet, {("c1", 0): [0, 2], ("se1", 0): [1]}, (27 * 6 + 6) + (6 + 1) + (6 + 6) + (3 * 6 * 9 + 3)),
    (AttentionNet, {("q", 0): [1]}, (8 * 4 + 8) + 3 * (4 * 8 + 4) + (8 * 4 + 8) + (3 * 8 + 3)),
    (AttentionNet, {("embed", 0): [0, 1]}, (6 * 4 + 6) + 3 * (8 * 6 + 8) + (6 * 8 + 6) + (3 * 6 + 3)),
]
IDS = [f"{net.__name__}-{i}" for i, (net, _, _) in enumerate(CASES)]


def plan_for(rnet, removals):
    return {group_with(rnet, node, position=position): indices for (node, position), indices in removals.items()}


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("net, removals, expected_parameters", CASES, ids=IDS)
def test_pruned_output_equals_masked_output_and_differs_from_unpruned(net, removals, expected_parameters):
    rnet = captured(net())
    plan = plan_for(rnet, removals)
    x = input_for(net)
    with torch.no_grad():
        original, pruned, masked = rnet(x), rnet.prune_channels(plan)(x), rnet.mask_channels(plan)(x)
    assert_outputs_close(masked, pruned)
    assert (masked - original).abs().max() > 1e-4
    assert (pruned - original).abs().max() > 1e-4


@pytest.mark.parametrize("net, removals, expected_parameters", CASES, ids=IDS)
def test_pruned_parameter_count_matches_hand_count(net, removals, expected_parameters):
    rnet = captured(net())
    assert parameter_count(rnet.prune_channels(plan_for(rnet, removals))) == expected_parameters


@pytest.mark.parametrize("net, removals, expected_parameters", CASES[:4] + CASES[-2:], ids=IDS[:4] + IDS[-2:])
def test_pruned_network_trains_one_step(net, removals, expected_parameters):
    rnet = captured(net())
    pruned = rnet.prune_channels(plan_for(rnet, removals)).train()
    before = {name: p.detach().clone() for name, p in pruned.named_parameters()}
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.1)
    loss = pruned(input_for(net)).square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in pruned.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    optimizer.step()
    assert any(not torch.equal(before[name], p) for name, p in pruned.named_parameters())


@pytest.mark.parametrize("net, removals, expected_parameters", CASES[:3] + CASES[9:], ids=IDS[:3] + IDS[9:])
def test_pruned_network_recaptures_and_replays_at_other_batch_size(net, removals, expected_parameters):
    rnet = captured(net())
    plan = plan_for(rnet, removals)
    pruned, masked = rnet.prune_channels(plan), rnet.mask_channels(plan)
    x = input_for(net, batch=3)
    with torch.no_grad():
        assert_outputs_close(masked(x), pruned(x))
        assert_outputs_close(pruned(x), capture(pruned, input_for(net, batch=1))(x))


def test_pruning_leaves_the_input_network_unchanged():
    rnet = captured(ChannelsLastNet())
    x = input_for(ChannelsLastNet)
    state = copy.deepcopy(rnet.state_dict())
    shapes = [copy.deepcopy(n.meta["out"]) for n in rnet.graph_nodes]
    with torch.no_grad():
        before = rnet(x)
        plan = plan_for(rnet, CASES[9][1])
        rnet.prune_channels(plan)
        rnet.mask_channels(plan)
        after = rnet(x)
    assert torch.equal(before, after)
    assert all(torch.equal(state[k], v) for k, v in rnet.state_dict().items())
    assert [n.meta["out"] for n in rnet.graph_nodes] == shapes


def test_pruned_network_shares_no_tensor_with_the_input_network():
    rnet = captured(ChannelsLastNet())
    pruned = rnet.prune_channels(plan_for(rnet, CASES[9][1]))
    storages = {t.untyped_storage().data_ptr() for t in [*rnet.parameters(), *rnet.buffers()] if t.numel()}
    assert not any(t.untyped_storage().data_ptr() in storages for t in [*pruned.parameters(), *pruned.buffers()])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in rnet.parameters())


def test_removing_every_channel_of_a_group_is_rejected():
    rnet = captured(ResidualNet())
    with pytest.raises(PruningError, match="all 8 channels"):
        rnet.prune_channels({group_with(rnet, "c1"): range(8)})


def test_out_of_range_index_is_rejected():
    rnet = captured(ResidualNet())
    with pytest.raises(PruningError, match="out of range"):
        rnet.prune_channels({group_with(rnet, "c1"): [8]})
    with pytest.raises(PruningError, match="out of range"):
        rnet.mask_channels({group_with(rnet, "c1"): [-1]})


def test_pruning_a_group_that_reaches_the_output_is_rejected():
    rnet = captured(ResidualNet())
    with pytest.raises(PruningError, match="output"):
        rnet.prune_channels({group_with(rnet, "c3"): [0]})


def test_group_of_another_network_is_rejected():
    rnet, other = captured(ResidualNet()), captured(ResidualNet())
    with pytest.raises(PruningError, match="not a channel group"):
        rnet.prune_channels({group_with(other, "c1"): [0]})


def test_plan_removes_the_channels_with_lowest_mean_normalised_squared_norms():
    rnet = captured(DepthwiseNet())
    group = group_with(rnet, "c1")
    weights = {n: rnet.module_of(rnet.node(n)) for n in ("c1", "dw", "c3")}
    norms = [weights["c1"].weight.square().sum((1, 2, 3)), weights["c1"].bias.square(),
             weights["dw"].weight.square().sum((1, 2, 3)), weights["dw"].bias.square(),
             weights["c3"].weight.square().sum((0, 2, 3))]
    score = sum(n / n.mean() for n in norms)
    plan = plan_by_ratio(rnet, 0.5)
    assert sorted(plan[group]) == sorted(torch.argsort(score)[:4].tolist())


def test_round_to_keeps_pruned_group_sizes_multiples_of_8():
    rnet = capture(torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32))
    plan = plan_by_ratio(rnet, 0.3, round_to=8)
    assert plan and all((g.size - len(indices)) % 8 == 0 for g, indices in plan.items())
    pruned = prune(rnet, 0.3, round_to=8)
    assert all(m.out_channels % 8 == 0 for m in pruned.modules() if isinstance(m, nn.Conv2d))


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def test_flops_target_halves_multiply_adds():
    rnet = capture(torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32))
    pruned = prune(rnet, flops_target=0.5)
    x = torch.randn(1, 3, 32, 32)
    assert _flops(pruned, x) <= 0.5 * _flops(rnet, x)
    assert _flops(pruned, x) >= 0.2 * _flops(rnet, x)


def _zoo(name: str) -> nn.Module:
    extra = {"googlenet": {"aux_logits": False, "init_weights": False}, "vit_b_16": {"image_size": 32}}
    if name.startswith(("fcn_", "deeplabv3_", "lraspp_")):
        return getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=4)
    return getattr(torchvision.models, name)(weights=None, **extra.get(name, {}))


ZOO = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "densenet121", "efficientnet_b0",
       "regnet_y_400mf", "resnext50_32x4d", "googlenet", "squeezenet1_0", "mnasnet0_5", "vit_b_16",
       "fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_half_l2_plan_prunes_exactly_like_masking(name):
    torch.manual_seed(0)
    model = _zoo(name).eval()
    x = torch.randn(1, 3, 32, 32)
    rnet = capture(model, x)
    plan = {g: indices for g, indices in plan_by_ratio(rnet, 0.5).items() if g.exact}
    assert plan, "no exact prunable group"
    with torch.no_grad():
        pruned, masked, original = rnet.prune_channels(plan)(x), rnet.mask_channels(plan)(x), model(x)
    assert_outputs_close(masked, pruned)
    assert parameter_count(rnet.prune_channels(plan)) < parameter_count(model)
    assert_outputs_close(original, rnet(x))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_llama_half_plan_prunes_exactly_like_masking(attention):
    hf_models = pytest.importorskip("hf_models", reason="needs transformers")
    model = hf_models.llama(attention).eval()
    ids, mask = hf_models.token_inputs(2, 6, False)
    rnet = capture(model, ids, attention_mask=mask, use_cache=False)
    plan = {g: indices for g, indices in plan_by_ratio(rnet, 0.5).items() if g.exact}
    assert plan
    with torch.no_grad():
        pruned = rnet.prune_channels(plan)(ids, attention_mask=mask, use_cache=False)
        masked = rnet.mask_channels(plan)(ids, attention_mask=mask, use_cache=False)
        original = model(ids, attention_mask=mask, use_cache=False)
    assert_outputs_close(masked, pruned)
    assert (masked.logits - original.logits).abs().max() > 1e-4


def test_convnext_inexact_groups_prune_to_a_working_network():
    model = torchvision.models.convnext_tiny(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    rnet = capture(model, x)
    assert any(not g.exact for g in rnet.channel_groups() if g.prunable)
    pruned = prune(rnet, 0.5)
    out = pruned(x)
    assert out.shape == model(x).shape
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in pruned.parameters())
    assert parameter_count(pruned) < 0.6 * parameter_count(model)


class MultiheadNet(nn.Module):
    """A residual block around ``nn.MultiheadAttention`` (16 wide, 4 heads of 4)."""

    def __init__(self, batch_first: bool, need_weights: bool = False):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.embed, self.head = nn.Linear(4, 16), nn.Linear(16, 3)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=self.need_weights)
        return self.head(h + a)


def _multihead_case(batch_first: bool):
    torch.manual_seed(0)
    model = MultiheadNet(batch_first).eval()
    x = torch.randn(2, 5, 4) if batch_first else torch.randn(5, 2, 4)
    return model, x, capture(model, x)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads_prune_like_zeroing_their_out_proj_columns(batch_first):
    model, x, rnet = _multihead_case(batch_first)
    heads = group_with(rnet, "attn", "in_proj_weight")
    assert (heads.size, heads.prunable, heads.exact, heads.explicit_only) == (4, True, True, True)
    assert heads not in plan_by_ratio(rnet, 0.5)
    assert positions_of(heads, "attn", "out_proj.weight", 1) == [list(range(4 * h, 4 * h + 4)) for h in range(4)]
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.attn.out_proj.weight[:, 4:8] = 0
        pruned = rnet.prune_channels({heads: [1]})
        out, want = pruned(x), masked(x)
    assert_outputs_close(want, out)
    assert (want - model(x)).abs().max() > 1e-4
    attn = pruned.module_of(pruned.node("attn"))
    assert (attn.num_heads, attn.head_dim, attn.in_proj_weight.shape) == (3, 4, (36, 16))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_embed_channels_prune_like_zeroing_their_consumers(batch_first):
    model, x, rnet = _multihead_case(batch_first)
    width = group_with(rnet, "embed")
    assert width.size == 16 and width.prunable and ("attn", "out_proj.weight", 0) in members_of(width)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for weight in (masked.attn.in_proj_weight, masked.head.weight):
            weight[:, [0, 3, 9]] = 0
        pruned = rnet.prune_channels({width: [0, 3, 9]})
        out, want = pruned(x), masked(x)
    assert_outputs_close(want, out)
    pruned.train()
    pruned(x).square().mean().backward()
    attn = pruned.module_of(pruned.node("attn"))
    assert (attn.embed_dim, attn.out_proj.weight.shape) == (13, (13, 16))
    assert attn.in_proj_weight.grad.shape == (48, 13)


def test_multihead_attention_heads_are_inexact_when_averaged_weights_are_returned():
    torch.manual_seed(0)
    model = MultiheadNet(True, need_weights=True).eval()
    rnet = capture(model, torch.randn(2, 5, 4))
    heads = group_with(rnet, "attn", "in_proj_weight")
    assert heads.prunable and not heads.exact


def test_small_vision_transformer_prunes_heads_and_mlp_like_zeroing_their_output_columns():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the classifier
    x = torch.randn(2, 3, 32, 32)
    rnet = capture(model, x)
    masked = copy.deepcopy(model)
    plan = {}
    with torch.no_grad():
        for layer in range(2):
            prefix = f"encoder.layers.encoder_layer_{layer}"
            heads = group_with(rnet, f"{prefix}.self_attention", "in_proj_weight")
            mlp = group_with(rnet, f"{prefix}.mlp.0")
            assert (heads.size, heads.exact, mlp.size, mlp.exact) == (4, True, 64, True)
            plan[heads], plan[mlp] = [2], [1, 7, 30]
            block = getattr(masked.encoder.layers, f"encoder_layer_{layer}")
            block.self_attention.out_proj.weight[:, 16:24] = 0
            block.mlp[3].weight[:, [1, 7, 30]] = 0
        out, want = rnet.prune_channels(plan)(x), masked(x)
    assert_outputs_close(want, out)
    assert (want - model(x)).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_swin_exact_groups_prune_like_masking(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    rnet = capture(model, x)
    plan = {g: indices for g, indices in plan_by_ratio(rnet, 0.5).items() if g.exact}
    assert len(plan) >= 12  # at least every block's MLP (2 + 2 + 6 + 2 blocks)
    with torch.no_grad():
        pruned, masked = rnet.prune_channels(plan)(x), rnet.mask_channels(plan)(x)
    assert_outputs_close(masked, pruned)
    assert (masked - model(x)).abs().max() > 1e-4


def test_pruned_network_saves_loads_draws_and_exports_with_its_smaller_shapes(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export check needs onnxruntime (extra 'test')")
    from graph import load

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    pruned = prune(capture(model, torch.randn(1, 3, 32, 32)), channel_ratio=0.5, round_to=8)
    x = torch.randn(2, 3, 40, 40)
    writers = {"pkl": lambda path: pruned.save(pkl=path), "json": lambda path: pruned.save_to_json(file=path),
               "vnmodel": lambda path: pruned.save_to_vnmodel(pkl=path, model_base_size_hw=(32, 32))}
    with torch.no_grad():
        expected = pruned(x)
        for suffix, write in writers.items():
            write(str(tmp_path / f"small.{suffix}"))
            loaded = load(str(tmp_path / f"small.{suffix}"))
            assert_outputs_close(expected, loaded(x))
            assert parameter_count(loaded) == parameter_count(pruned) < 0.3 * parameter_count(model)
    source = open(loaded.draw(tmp_path / "small.dot")).read()
    conv = loaded.module_of(loaded.node("layer1.0.conv1"))
    assert conv.out_channels < model.layer1[0].conv1.out_channels
    assert f"layer1.0.conv1\\nConv2d\\n{conv.in_channels}→{conv.out_channels}\\n" in source
    onnx_path = loaded.export_onnx(str(tmp_path / "small.onnx"), x)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_outputs_close(expected, torch.from_numpy(got), rtol=1e-4)
