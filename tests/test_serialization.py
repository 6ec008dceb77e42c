"""Saving and loading captured networks as .pkl, .json and .vnmodel (graph.serialization, docs/vnmodel.md)."""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import struct
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from graph import FileFormatError, ReplayError, capture
from graph.ir import Ref, Sym
from graph.leaves import LEAF_TYPES
from graph.serialization import load, read_vnmodel_header
from graph.serialization import vnmodel as vnmodel_format
from graph.serialization.leaf_configs import build_leaf, config_problem, leaf_config
from graph.serialization.spec import network_to_spec
from graph.serialization.templates import TemplateDecoder, TemplateEncoder

SAVERS = {
    "pkl": lambda net, path: net.save(pkl=path),
    "json": lambda net, path: net.save_to_json(file=path),
    "vnmodel": lambda net, path: net.save_to_vnmodel(pkl=path, model_base_size_hw=(64, 64), model_id=7),
}

MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (1, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), (1, 3, 64, 64)),
    "vit": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                         hidden_dim=32, mlp_dim=64, num_classes=10), (1, 3, 32, 32)),
    "densenet": (lambda: torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                                     num_classes=10), (1, 3, 32, 32)),
    "shufflenet_v2": (lambda: torchvision.models.shufflenet_v2_x0_5(weights=None), (1, 3, 64, 64)),
    "inception_v3": (lambda: torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False),
                     (1, 3, 75, 75)),
}
_CAPTURED: dict[str, tuple] = {}


def captured(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(captured network, example input, its model output, batch-2 input, its model output) for a model of MODELS,
    built once per test session; the outputs come from the original model."""
    if name not in _CAPTURED:
        build, shape = MODELS[name]
        torch.manual_seed(0)
        model = build().eval()
        example, other = torch.randn(shape), torch.randn((2,) + shape[1:])
        with torch.no_grad():
            _CAPTURED[name] = (capture(model, example), example, model(example), other, model(other))
    return _CAPTURED[name]


class Pair(NamedTuple):
    scores: torch.Tensor
    extra: collections.OrderedDict


class SmallNet(nn.Module):
    """Conv, batch norm, functional ops, a shape-dependent reshape, a guard and a named-tuple output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> Pair:
        y = F.relu(self.bn(self.conv(x)))
        a, b = torch.split(y, 4, dim=1)
        y = torch.cat([b, a * scale], dim=1)
        y = y.view(y.size(0), 2, -1, y.shape[2], y.shape[3]).transpose(1, 2).reshape(y.shape)
        if y.shape[-1] > 4:
            y = y[..., ::2]
        pooled = y.mean(dim=(2, 3))
        return Pair(self.head(pooled), collections.OrderedDict(features=pooled))


def small_network() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallNet().eval()
    example = torch.randn(2, 3, 8, 8)
    return model, capture(model, example), example


def assert_same_pair(got: Pair, expected: Pair) -> None:
    assert torch.equal(got.scores, expected.scores)
    assert list(got.extra) == ["features"] and torch.equal(got.extra["features"], expected.extra["features"])


# --------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", SAVERS)
@pytest.mark.parametrize("model_name", MODELS)
def test_loaded_network_matches_original_model_at_captured_and_other_batch_size(model_name, fmt, tmp_path):
    network, example, expected, other, expected_other = captured(model_name)
    loaded = load(SAVERS[fmt](network, tmp_path / f"net.{fmt}"))
    with torch.no_grad():
        assert torch.equal(loaded(example), expected)
        assert torch.equal(loaded(other), expected_other)
    assert [n.name for n in loaded.graph_nodes] == [n.name for n in network.graph_nodes]


@pytest.mark.parametrize("fmt", SAVERS)
def test_named_tuple_and_ordered_dict_outputs_survive_with_their_classes(fmt, tmp_path):
    model, network, example = small_network()
    loaded = load(SAVERS[fmt](network, tmp_path / "net.bin"))
    with torch.no_grad():
        got, expected = loaded(example), model(example)
    assert type(got) is Pair and type(got.extra) is collections.OrderedDict
    assert_same_pair(got, expected)


@pytest.mark.parametrize("fmt", SAVERS)
def test_guards_and_input_constants_replay_after_load(fmt, tmp_path):
    model, network, example = small_network()
    loaded = load(SAVERS[fmt](network, tmp_path / "net.bin"))
    assert loaded.guards == network.guards and loaded.guards
    other = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        assert_same_pair(loaded(other), model(other))
    with pytest.raises(ReplayError, match="diverges"):
        loaded(torch.randn(1, 3, 4, 4))
    captured_with_scale = capture(model, example, 3.0)
    reloaded = load(SAVERS[fmt](captured_with_scale, tmp_path / "scaled.bin"))
    with torch.no_grad():
        assert_same_pair(reloaded(example, 3.0), model(example, 3.0))
    with pytest.raises(ReplayError, match="scale"):
        reloaded(example, 4.0)


def test_signature_keeps_names_kinds_and_defaults(tmp_path):
    class Keywords(nn.Module):
        def forward(self, x, bias: float = 0.5, *rest, flag: bool = True, marker=object(), **options):
            return x + bias

    network = capture(Keywords(), torch.ones(2))
    loaded = load(network.save_to_json(file=tmp_path / "net.json"))
    original = inspect_parameters(network.signature)
    restored = inspect_parameters(loaded.signature)
    assert [p[:2] for p in restored] == [p[:2] for p in original]
    assert restored[1][2] == 0.5 and restored[3][2] is True
    assert repr(loaded.signature.parameters["marker"].default) == repr(network.signature.parameters["marker"].default)
    assert torch.equal(loaded(torch.ones(3)), torch.full((3,), 1.5))
    with pytest.raises(ReplayError, match="marker"):
        loaded(torch.ones(3), marker=network.signature.parameters["marker"].default)


def inspect_parameters(signature):
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def test_load_detects_the_format_from_content_not_the_file_name(tmp_path):
    model, network, example = small_network()
    paths = [network.save_to_vnmodel(pkl=tmp_path / "a.json"), network.save_to_json(file=tmp_path / "b.pkl"),
             network.save(pkl=tmp_path / "c.vnmodel")]
    with torch.no_grad():
        for path in paths:
            assert_same_pair(load(path)(example), model(example))


def test_vnmodel_header_holds_model_id_and_base_size(tmp_path):
    _, network, _ = small_network()
    path = network.save_to_vnmodel(pkl=tmp_path / "net.vnmodel", model_base_size_hw=(224, 192), model_id=41)
    header = read_vnmodel_header(path)
    assert (header.version, header.model_id, header.model_base_size_hw) == (2, 41, (224, 192))
    path = network.save_to_vnmodel(pkl=tmp_path / "plain.vnmodel")
    assert read_vnmodel_header(path).model_base_size_hw is None


def test_vnmodel_layout_follows_the_documented_spec(tmp_path):
    _, network, _ = small_network()
    data = open(network.save_to_vnmodel(pkl=tmp_path / "net.vnmodel", model_id=3), "rb").read()
    fields = struct.unpack_from("<8sIIIIQQQ", data, 0)
    magic, version, model_id, height, width, graph_length, table_length, file_length = fields
    assert (magic, version, model_id, height, width, file_length) == (b"VNMODEL\0", 2, 3, 0, 0, len(data))
    graph = json.loads(data[48:48 + graph_length].decode("utf-8"))
    assert graph["format"] == "reconstructed-network" and [n["name"] for n in graph["nodes"]] == [
        n.name for n in network.graph_nodes]
    position = 48 + graph_length
    (count,) = struct.unpack_from("<I", data, position)
    position += 4
    state = network.state_dict()
    assert count == len(state)
    for _ in range(count):
        (name_length,) = struct.unpack_from("<H", data, position)
        name = data[position + 2:position + 2 + name_length].decode()
        position += 2 + name_length
        code, rank = struct.unpack_from("<BB", data, position)
        shape = struct.unpack_from(f"<{rank}Q", data, position + 2)
        offset, nbytes = struct.unpack_from("<QQ", data, position + 2 + 8 * rank)
        digest = data[position + 2 + 8 * rank + 16:position + 2 + 8 * rank + 48]
        position += 2 + 8 * rank + 48
        expected = state[name]
        assert offset % 64 == 0 and shape == tuple(expected.shape) and code == {torch.float32: 0, torch.int64: 8}[
            expected.dtype]
        raw = expected.contiguous().numpy().tobytes()
        assert data[offset:offset + nbytes] == raw
        dtype = str(expected.dtype).removeprefix("torch.")
        assert digest == hashlib.sha256(f"{name}\0{dtype}\0{list(shape)}\0".encode() + raw).digest()
    assert position == 48 + graph_length + table_length and (len(data) - 96) % 64 == 0
    header_end, graph_end = 48, 48 + graph_length
    assert data[-96:] == b"".join(hashlib.sha256(part).digest() for part in (
        data[:header_end], data[header_end:graph_end], data[graph_end:position]))


@pytest.mark.parametrize("fmt", ["json", "vnmodel"])
def test_round_trip_keeps_every_tensor_dtype(fmt, tmp_path):
    class Typed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4).to(torch.float16)
            self.register_buffer("steps", torch.tensor([3, -2**40], dtype=torch.int64))
            self.register_buffer("mask", torch.tensor([True, False, True, True]))
            self.register_buffer("scale", torch.tensor([1.5, -2.25, 3.0, 0.125], dtype=torch.bfloat16))

        def forward(self, x):
            y = self.proj(x).float() * self.scale.float()
            return torch.where(self.mask, y, y * self.steps[0])

    model = Typed()
    network = capture(model, torch.randn(2, 4, dtype=torch.float16))
    loaded = load(SAVERS[fmt](network, tmp_path / "net.bin"))
    for (name, expected), (loaded_name, got) in zip(network.state_dict().items(), loaded.state_dict().items()):
        assert name == loaded_name and got.dtype == expected.dtype and torch.equal(got, expected)
    x = torch.randn(3, 4, dtype=torch.float16)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("fmt", SAVERS)
def test_tied_weights_stay_tied_and_frozen_flags_and_mode_are_kept(fmt, tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.norm = nn.LayerNorm(6)

        def forward(self, ids):
            return F.linear(self.norm(self.embed(ids)), self.embed.weight)

    torch.manual_seed(0)
    model = Tied().eval()
    network = capture(model, torch.tensor([[1, 2, 3]]))
    network.nodes[network.node("norm").key].bias.requires_grad_(False)
    network.train()
    loaded = load(SAVERS[fmt](network, tmp_path / "net.bin"))
    embedding_weight = loaded.nodes[loaded.node("embed").key].weight
    tied = [loaded.module_of(n).value for n in loaded.graph_nodes if n.op == "param"]
    assert tied and all(t is embedding_weight for t in tied)
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == {
        n: p.requires_grad for n, p in network.named_parameters()}
    assert loaded.training and not loaded.captured_training
    ids = torch.tensor([[4, 5], [6, 9]])
    assert torch.equal(loaded(ids), model(ids))


# ------------------------------------------------------------------------------------------------ leaf arguments
LEAF_EXAMPLES = [
    nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="reflect"),
    nn.Conv2d(4, 6, (3, 1), padding="same", dilation=2), nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1,
                                                                   padding_mode="circular"),
    nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1, groups=2, bias=False),
    nn.ConvTranspose2d(4, 2, 3, dilation=2, padding=(1, 2)), nn.ConvTranspose3d(2, 2, 2, stride=2),
    nn.Linear(5, 3, bias=False), nn.Bilinear(3, 4, 2, bias=False), nn.Identity(),
    nn.Embedding(10, 4, padding_idx=2, max_norm=1.5, scale_grad_by_freq=True),
    nn.EmbeddingBag(10, 4, mode="max", include_last_offset=True, padding_idx=1),
    nn.MultiheadAttention(8, 2, dropout=0.1, bias=False, add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=5,
                          batch_first=True),
    nn.BatchNorm1d(4, eps=1e-3, momentum=None), nn.BatchNorm2d(4, affine=False), nn.BatchNorm3d(4, bias=False),
    nn.SyncBatchNorm(4, momentum=0.2, track_running_stats=False), nn.GroupNorm(2, 4, eps=1e-3, affine=False),
    nn.LayerNorm((3, 4), bias=False), nn.RMSNorm([4], eps=1e-4, elementwise_affine=False),
    nn.InstanceNorm1d(4, affine=True), nn.InstanceNorm2d(4, track_running_stats=True), nn.InstanceNorm3d(4),
    nn.LocalResponseNorm(3, alpha=1e-3, beta=0.5, k=2.0),
    nn.ReLU(inplace=True), nn.ReLU6(inplace=True), nn.LeakyReLU(0.2), nn.PReLU(3, init=0.1), nn.ELU(0.5),
    nn.SELU(True), nn.CELU(0.7), nn.GELU("tanh"), nn.SiLU(True), nn.Mish(True), nn.Hardswish(True),
    nn.Hardsigmoid(True), nn.Hardtanh(-2.0, 3.0), nn.Sigmoid(), nn.Tanh(), nn.Softplus(2.0, 10.0), nn.Softsign(),
    nn.Tanhshrink(), nn.Threshold(0.1, 20.0), nn.LogSigmoid(), nn.Softmax(dim=1), nn.LogSoftmax(dim=0),
    nn.Softmax2d(), nn.GLU(dim=0),
    nn.MaxPool1d(3, 2, 1, dilation=2, return_indices=True, ceil_mode=True), nn.MaxPool2d((2, 3)),
    nn.MaxPool3d(2, padding=1), nn.AvgPool1d(3, 2, 1, ceil_mode=True, count_include_pad=False),
    nn.AvgPool2d(3, divisor_override=2), nn.AvgPool3d(2), nn.AdaptiveAvgPool1d(3), nn.AdaptiveAvgPool2d((None, 4)),
    nn.AdaptiveAvgPool3d(2), nn.AdaptiveMaxPool1d(3, return_indices=True), nn.AdaptiveMaxPool2d(2),
    nn.AdaptiveMaxPool3d((1, 2, 3)),
    nn.Dropout(0.3, inplace=True), nn.Dropout1d(0.2), nn.Dropout2d(0.1), nn.Dropout3d(0.4), nn.AlphaDropout(0.2),
    nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=True), nn.UpsamplingNearest2d(size=(4, 5)),
    nn.UpsamplingBilinear2d(scale_factor=3), nn.PixelShuffle(2), nn.PixelUnshuffle(3), nn.ChannelShuffle(2),
    nn.Flatten(2, 3), nn.Unflatten(1, (2, 3)),
    nn.ZeroPad1d((1, 2)), nn.ZeroPad2d(1), nn.ZeroPad3d((1, 0, 1, 0, 2, 0)), nn.ConstantPad1d(2, 0.5),
    nn.ConstantPad2d((1, 2, 3, 4), -1.0), nn.ConstantPad3d(1, 3.0), nn.ReflectionPad1d(2),
    nn.ReflectionPad2d((1, 0, 2, 0)), nn.ReplicationPad1d(1), nn.ReplicationPad2d(2),
]


def test_every_leaf_type_has_an_example_here():
    assert {type(m) for m in LEAF_EXAMPLES} == set(LEAF_TYPES)


@pytest.mark.parametrize("module", LEAF_EXAMPLES, ids=lambda m: type(m).__name__)
def test_leaf_rebuilt_from_its_stored_arguments_has_the_original_attributes_and_tensor_shapes(module):
    config = json.loads(json.dumps(TemplateEncoder({}).encode(leaf_config(module, type(module)))))
    rebuilt = build_leaf(type(module), TemplateDecoder({}).decode(config))
    assert type(rebuilt) is type(module)
    assert public_attributes(rebuilt) == public_attributes(module)
    assert repr(rebuilt) == repr(module)
    assert tensor_shapes(rebuilt) == tensor_shapes(module)


@pytest.mark.parametrize("module", LEAF_EXAMPLES, ids=lambda m: type(m).__name__)
def test_leaf_arguments_as_saved_pass_the_load_time_type_and_value_checks(module):
    config = TemplateDecoder({}).decode(json.loads(json.dumps(TemplateEncoder({}).encode(
        leaf_config(module, type(module))))))
    assert config_problem(type(module), config) is None
    for name in config:
        assert f"argument {name}=[]" in config_problem(type(module), {**config, name: []})
    assert "'not_an_argument' is not an argument" in config_problem(type(module), {**config, "not_an_argument": 1})


def public_attributes(module: nn.Module) -> dict:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and not isinstance(v, torch.Tensor)}


def tensor_shapes(module: nn.Module) -> dict:
    return {name: tuple(t.shape) for name, t in [*module.named_parameters(), *module.named_buffers()]}


def pruned_channels_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    network = capture(model, torch.randn(1, 3, 8, 8))
    keep = torch.tensor([0, 2, 5, 7])
    conv1, bn, conv2 = (network.nodes[network.node(name).key] for name in ("0", "1", "3"))
    with torch.no_grad():
        conv1.weight, conv1.bias = nn.Parameter(conv1.weight[keep]), nn.Parameter(conv1.bias[keep])
        bn.weight, bn.bias = nn.Parameter(bn.weight[keep]), nn.Parameter(bn.bias[keep])
        bn.running_mean, bn.running_var = bn.running_mean[keep], bn.running_var[keep]
        conv2.weight = nn.Parameter(conv2.weight[:, keep])
    conv1.out_channels = bn.num_features = conv2.in_channels = 4
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    reference.load_state_dict({k.removeprefix("nodes."): v for k, v in network.state_dict().items()})
    return network, reference


@pytest.mark.parametrize("fmt", SAVERS)
def test_channel_pruned_network_round_trips_at_its_new_width(fmt, tmp_path):
    network, reference = pruned_channels_network()
    loaded = load(SAVERS[fmt](network, tmp_path / "net.bin"))
    assert loaded.nodes[loaded.node("0").key].weight.shape == (4, 3, 3, 3)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


@pytest.mark.parametrize("fmt", SAVERS)
def test_network_pruned_by_graph_pruning_round_trips(fmt, tmp_path):
    from graph.pruning import prune

    network, _, _, other, _ = captured("vit")
    pruned = prune(network, 0.5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in network.parameters())
    loaded = load(SAVERS[fmt](pruned, tmp_path / "net.bin"))
    with torch.no_grad():
        assert torch.equal(loaded(other), pruned(other))


@pytest.mark.parametrize("fmt", SAVERS)
def test_vit_on_multihead_attention_pruned_in_heads_and_width_or_masked_round_trips(fmt, tmp_path):
    from graph.layer_sync import PrunedMultiheadAttention
    from graph.pruning import mask_channels, prune_channels

    network, _, _, other, _ = captured("vit")
    plan = {group: list(range(group.size // 2)) for group in network.channel_groups() if group.prunable}
    assert any(group.explicit_only for group in plan)  # attention heads and the hidden width are named explicitly
    pruned, masked = prune_channels(network, plan), mask_channels(network, plan)
    assert any(isinstance(module, PrunedMultiheadAttention) for module in pruned.nodes.values())
    for variant in (pruned, masked):
        path = SAVERS[fmt](variant, tmp_path / "net.bin")
        loaded = load(path)
        with torch.no_grad():
            assert torch.equal(loaded(other), variant(other))
        assert network_to_spec(loaded)[0] == network_to_spec(variant)[0]


def test_saving_refuses_a_module_whose_arguments_disagree_with_its_weights(tmp_path):
    network, _ = pruned_channels_network()
    network.nodes[network.node("3").key].in_channels = 8
    with pytest.raises(ValueError, match=r"node 3 \(Conv2d\).*weight: \(4, 4, 3, 3\)"):
        network.save_to_json(file=tmp_path / "net.json")
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------------- templates
TEMPLATE_VALUES = [
    (1, [2, 3.5], (), []), {"a": None, 3: "x", "$tagged": True, (1, 2): [slice(1, None, 2)]},
    slice(None, Sym(("size", Ref(0), 1)), -1), Ellipsis, (torch.float16, torch.bfloat16, torch.int8),
    torch.device("cpu"), torch.device("cuda", 1), torch.channels_last, torch.strided, float("inf"), -math.inf,
    complex(1.5, -2), b"\x00\xff", Ref(3, (0, "logits")), Sym(("floordiv", ("size", Ref(1, (2,)), 0), 2)),
    Sym(("training",)), True, -(2**70), "$not-a-tag", {"$list": [1]},
]


@pytest.mark.parametrize("value", TEMPLATE_VALUES, ids=repr)
def test_template_values_survive_json_with_their_types(value):
    assert_identical(json_round_trip(value), value)


def test_tensor_inside_a_template_is_stored_in_the_tensor_table():
    tensors = {}
    encoded = json.loads(json.dumps(TemplateEncoder(tensors).encode((torch.arange(4), 2))))
    decoded = TemplateDecoder(tensors).decode(encoded)
    assert list(tensors) == ["templates.0"] and torch.equal(decoded[0], torch.arange(4)) and decoded[1] == 2


def test_nan_survives_json():
    assert math.isnan(json_round_trip(float("nan")))


plain_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=3), max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(plain_values)
def test_nested_plain_values_survive_json_with_their_types(value):
    assert_identical(json_round_trip(value), value)


def json_round_trip(value):
    return TemplateDecoder({}).decode(json.loads(json.dumps(TemplateEncoder({}).encode(value), allow_nan=False)))


def assert_identical(got, expected):
    assert type(got) is type(expected), (got, expected)
    if isinstance(expected, (tuple, list)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_identical(g, e)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            assert_identical(got[key], expected[key])
    else:
        assert got == expected


def test_saving_an_unknown_object_in_a_template_names_the_node(tmp_path):
    _, network, _ = small_network()
    node = network.node("conv")
    node.kwargs = {"weird": object()}
    with pytest.raises(TypeError, match=r"node conv \(Conv2d\).*builtins.object"):
        network.save(pkl=tmp_path / "net.pkl")


def test_saving_an_output_of_a_class_loading_could_not_rebuild_is_refused(tmp_path):
    class Scores(dict):
        pass

    class ScoresNet(nn.Module):
        def forward(self, x):
            return Scores(doubled=x * 2)

    network = capture(ScoresNet(), torch.ones(2))
    with pytest.raises(TypeError, match="the output template.*class .*Scores"):
        network.save_to_vnmodel(pkl=tmp_path / "net.vnmodel")


# ---------------------------------------------------------------------------------------- damaged and hostile files
def saved_json(tmp_path) -> tuple[dict, str]:
    _, network, _ = small_network()
    path = network.save_to_json(file=tmp_path / "net.json")
    with open(path) as stream:
        return json.load(stream), path


def rewrite(path, document) -> None:
    with open(path, "w") as stream:
        json.dump(document, stream)


@pytest.mark.parametrize("fmt", SAVERS)
def test_truncated_file_raises_file_format_error_naming_the_file(fmt, tmp_path):
    _, network, _ = small_network()
    path = SAVERS[fmt](network, tmp_path / "net.bin")
    data = open(path, "rb").read()
    for cut in (len(data) // 3, len(data) - 5):
        with open(path, "wb") as stream:
            stream.write(data[:cut])
        with pytest.raises(FileFormatError, match=r"net\.bin.*(truncated|corrupted)"):
            load(path)


def test_vnmodel_reports_bad_magic_version_truncation_and_damaged_part(tmp_path):
    _, network, _ = small_network()
    path = network.save_to_vnmodel(pkl=tmp_path / "net.vnmodel")
    data = bytearray(open(path, "rb").read())
    graph_length = struct.unpack_from("<Q", data, 24)[0]

    def load_with(content: bytes):
        with open(path, "wb") as stream:
            stream.write(content)
        return load(path)

    def flipped(position: int) -> bytes:
        return bytes(data[:position]) + bytes([data[position] ^ 0x10]) + bytes(data[position + 1:])

    with pytest.raises(FileFormatError, match="the graph spec is damaged"):
        load_with(flipped(48 + graph_length // 2))
    with pytest.raises(FileFormatError, match="the tensor table is damaged"):
        load_with(flipped(48 + graph_length + 6))
    with pytest.raises(FileFormatError, match="the header is damaged"):
        load_with(flipped(13))
    with pytest.raises(FileFormatError, match="tensor 'nodes.bn.num_batches_tracked' is damaged"):
        load_with(flipped(len(data) - 96 - 64 + 2))
    with pytest.raises(FileFormatError, match="padding .* is not zero"):
        load_with(flipped(len(data) - 96 - 1))
    with pytest.raises(FileFormatError, match="unknown format version 7"):
        load_with(data[:8] + struct.pack("<I", 7) + data[12:])
    with pytest.raises(FileFormatError, match="version 1 has no digest"):
        load_with(data[:8] + struct.pack("<I", 1) + data[12:])
    with pytest.raises(FileFormatError, match="truncated at byte 20"):
        load_with(data[:20])
    with pytest.raises(FileFormatError, match=f"truncated at byte {len(data) - 70}"):
        load_with(data[:-70])
    with pytest.raises(FileFormatError, match="3 unexpected bytes after the end"):
        load_with(data + b"abc")
    with pytest.raises(FileFormatError, match="truncated at byte 5"):
        load_with(data[:5])
    with pytest.raises(FileFormatError, match="unrecognised file format"):
        load_with(b"NOTAMODEL" + data[9:])
    with pytest.raises(FileFormatError, match="bad magic"):
        vnmodel_format.read_vnmodel(open(path, "rb").read())


def test_json_naming_an_op_outside_the_allow_list_is_refused(tmp_path):
    document, path = saved_json(tmp_path)
    for hostile in ("os.system", "torch.save", "builtins.eval"):
        changed = json.loads(json.dumps(document))
        function_node = next(n for n in changed["nodes"] if n["op"] == "torch.cat")
        function_node["op"] = hostile
        rewrite(path, changed)
        with pytest.raises(FileFormatError, match=f'unknown op "{hostile}" not on the allow-list'):
            load(path, unchecked=True)
        changed = json.loads(json.dumps(document))
        changed["modules"][function_node["key"]]["target"] = hostile
        rewrite(path, changed)
        with pytest.raises(FileFormatError, match=f'unknown op "{hostile}" not on the allow-list'):
            load(path, unchecked=True)
    changed = json.loads(json.dumps(document))
    changed["modules"]["conv"]["type"] = "Sequential"
    rewrite(path, changed)
    with pytest.raises(FileFormatError, match='unknown op "Sequential"'):
        load(path, unchecked=True)


def test_json_struct_classes_resolve_only_through_the_allow_list(tmp_path):
    model, network, example = small_network()
    path = network.save_to_json(file=tmp_path / "net.json")
    text = open(path).read()
    name = f"{Pair.__module__}:Pair"
    assert name in text
    for hostile in ("os:system", "builtins:dict", "subprocess:Popen"):
        with open(path, "w") as stream:
            stream.write(text.replace(name, hostile))
        with pytest.raises(FileFormatError, match="is not allowed"):
            load(path, unchecked=True)
    with open(path, "w") as stream:
        stream.write(text.replace(name, "module_that_is_not_loaded:Pair"))
    with torch.no_grad():
        got, expected = load(path, unchecked=True)(example), model(example)
    assert type(got) is not Pair and type(got).__name__ == "Pair" and got._fields == ("scores", "extra")
    assert_same_pair(got, expected)


def test_json_with_missing_key_corrupted_tensor_or_wrong_shape_is_refused(tmp_path):
    document, path = saved_json(tmp_path)
    changed = dict(document)
    del changed["nodes"]
    rewrite(path, changed)
    with pytest.raises(FileFormatError, match="missing key 'nodes'"):
        load(path, unchecked=True)
    changed = json.loads(json.dumps(document))
    entry = changed["data"]["nodes.conv.weight"]
    entry["base64"] = ("A" if entry["base64"][0] != "A" else "B") + entry["base64"][1:]
    rewrite(path, changed)
    with pytest.raises(FileFormatError, match="tensor 'nodes.conv.weight' is damaged"):
        load(path)
    changed = json.loads(json.dumps(document))
    changed["modules"]["conv"]["config"]["out_channels"] = 6
    rewrite(path, changed)
    with pytest.raises(FileFormatError, match="tensor shape mismatch for node 'conv'"):
        load(path, unchecked=True)
    changed = json.loads(json.dumps(document))
    changed["nodes"][3]["args"] = [{"$ref": [7, []]}]
    rewrite(path, changed)
    with pytest.raises(FileFormatError, match="reads node 7, which does not run before it"):
        load(path, unchecked=True)


def test_pkl_is_read_weights_only_so_a_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pkl"
    torch.save({"spec": Exploit(), "tensors": {}}, path)
    with pytest.raises(FileFormatError, match="refused to unpickle"):
        load(path)
    assert not marker.exists()


def test_failed_save_leaves_the_previous_file_intact_and_no_temporary_files(tmp_path, monkeypatch):
    model, network, example = small_network()
    path = network.save_to_vnmodel(pkl=tmp_path / "net.vnmodel")
    before = open(path, "rb").read()

    def failing_tensor_bytes(tensor):
        raise OSError("disk full")

    monkeypatch.setattr(vnmodel_format, "tensor_bytes", failing_tensor_bytes)
    with pytest.raises(OSError, match="disk full"):
        network.save_to_vnmodel(pkl=path)
    assert os.listdir(tmp_path) == ["net.vnmodel"] and open(path, "rb").read() == before
    with torch.no_grad():
        assert_same_pair(load(path)(example), model(example))
