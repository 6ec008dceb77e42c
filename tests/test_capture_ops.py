"""Capture is exact on every op kind: the hand-written networks of ``tests/models.py`` replay to the original
model's output at the capture batch, at another batch size and (fully convolutional ones) at another resolution,
in eval and in train mode; node names follow module paths; capture leaves the original model untouched.
"""
from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn

from graph import capture, symbolic

from models import (AmcOpsNet, PaddedSkipUNet, SENet, SplitMergeNet, TinyViT, TokenTransformer, assert_outputs_close,
                    parameter_pairs)

pytestmark = pytest.mark.filterwarnings("ignore:.*upsample.* is deprecated:UserWarning")


@dataclass
class Case:
    """A test network, how to make its input for a batch size and a size, the capture size and another size."""

    build: Callable[[], nn.Module]
    make_input: Callable[[int, int], torch.Tensor]
    size: int
    other_size: int | None
    expected_ops: set[str]


def _images(channels: int) -> Callable[[int, int], torch.Tensor]:
    return lambda batch, side: torch.randn(batch, channels, side, side + 2)


def _tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length))


AMC_OPS = {
    "Conv2d", "BatchNorm2d", "ReLU", "ReLU6", "Tanh", "Sigmoid", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
    "Upsample", "Linear", "torch.nn.functional.max_pool2d", "torch.nn.functional.avg_pool2d",
    "torch.nn.functional.interpolate", "torch.nn.functional.pixel_shuffle", "torch.nn.functional.relu",
    "torch.nn.functional.relu6", "Tensor.tanh", "Tensor.sigmoid", "torch.add", "torch.cat", "Tensor.view",
    "Tensor.reshape", "Tensor.permute", "Tensor.squeeze", "Tensor.add", "Tensor.add_",
}
CASES = {
    "amc_ops": Case(AmcOpsNet, lambda batch, side: torch.randn(batch, 3, side, side + 8), 16, 24, AMC_OPS),
    "padded_skip_unet": Case(PaddedSkipUNet, _images(3), 13, 18,
                             {"ConvTranspose2d", "GroupNorm", "torch.nn.functional.pad", "torch.cat"}),
    "tiny_vit": Case(TinyViT, lambda batch, side: torch.randn(batch, 3, side, side), 16, None,
                     {"param", "Tensor.expand", "torch.cat", "torch.matmul", "Tensor.matmul", "Tensor.softmax",
                      "torch.nn.functional.layer_norm", "LayerNorm", "Tensor.__getitem__", "Tensor.unbind"}),
    "squeeze_excite": Case(SENet, _images(3), 8, 11, {"Tensor.mean", "torch.sigmoid", "Tensor.mul", "Tensor.sum"}),
    "split_merge": Case(SplitMergeNet, _images(8), 5, 7,
                        {"Tensor.chunk", "torch.split", "torch.unbind", "Tensor.__getitem__", "Tensor.__setitem__",
                         "Tensor.add_", "Tensor.mean", "Tensor.sum", "Tensor.flatten", "Tensor.expand",
                         "torch.einsum", "torch.bmm", "torch.roll", "Tensor.masked_fill", "Tensor.new_zeros",
                         "torch.arange", "torch.zeros"}),
    "token_transformer": Case(TokenTransformer, _tokens, 7, 11,
                              {"Embedding", "MultiheadAttention", "LayerNorm", "torch.arange"}),
}
CAPTURE_BATCH, OTHER_BATCH = 2, 3


def _build(case: Case, train: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return case.build().train(train)


def _captured(case: Case, train: bool = False) -> tuple[nn.Module, nn.Module]:
    model = _build(case, train)
    return model, capture(model, case.make_input(CAPTURE_BATCH, case.size))


@pytest.mark.parametrize("name", CASES)
def test_replay_matches_original_at_capture_and_other_batch_size(name):
    model, net = _captured(CASES[name])
    for batch in (CAPTURE_BATCH, OTHER_BATCH):
        x = CASES[name].make_input(batch, CASES[name].size)
        with torch.no_grad():
            assert_outputs_close(model(x), net(x))


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.other_size is not None])
def test_replay_matches_original_at_other_resolution(name):
    case = CASES[name]
    model, net = _captured(case)
    x = case.make_input(OTHER_BATCH, case.other_size)
    with torch.no_grad():
        assert_outputs_close(model(x), net(x))


@pytest.mark.parametrize("name", CASES)
def test_graph_records_each_op_the_forward_calls(name):
    _, net = _captured(CASES[name])
    assert CASES[name].expected_ops <= {node.op for node in net.graph_nodes}


def test_node_names_come_from_module_paths_and_functional_scopes():
    _, net = _captured(CASES["amc_ops"])
    assert net.node("block.conv1").op == "Conv2d"
    assert net.node("block.bn1").op == "BatchNorm2d"
    assert net.node("block.add").op == "Tensor.add"
    assert net.node("fc").op == "Linear"
    assert isinstance(net.module_of(net.node("block.conv1")), nn.Conv2d)
    _, vit = _captured(CASES["tiny_vit"])
    assert vit.node("class_token").op == "param"
    assert vit.node("pos_embedding").op == "param"
    assert vit.node("blocks.1.qkv").op == "Linear"
    assert vit.node("blocks.1.softmax").op == "Tensor.softmax"
    assert vit.node("blocks.0.layer_norm").op == "torch.nn.functional.layer_norm"


def test_input_and_layer_nodes_partition_the_graph():
    _, net = _captured(CASES["amc_ops"])
    assert [node.name for node in net.input_nodes] == ["x"]
    assert len(net.layer_nodes) == len(net.graph_nodes) - 1
    assert {n.name for n in net.layer_nodes} >= {"stem", "bn", "block.conv1", "block.add", "cat", "view", "fc"}


@pytest.mark.parametrize("name", ["amc_ops", "tiny_vit"])
def test_capture_leaves_original_model_unchanged(name):
    model = _build(CASES[name], train=True)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    capture(model, CASES[name].make_input(CAPTURE_BATCH, CASES[name].size))
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert type(module.training) is bool and module.training
    assert builtins.range.__module__ == "builtins"
    assert symbolic._recorder is None


@pytest.mark.parametrize("name", ["amc_ops", "tiny_vit", "split_merge", "token_transformer"])
def test_train_mode_replay_matches_original_outputs_and_gradients(name):
    case = CASES[name]
    model, net = _captured(case, train=True)
    x = case.make_input(OTHER_BATCH, case.size)
    outputs = []
    for module in (model, net):
        torch.manual_seed(1)
        out = module(x)
        out.square().mean().backward()
        outputs.append(out.detach())
    assert_outputs_close(*outputs)
    pairs = parameter_pairs(model, net)
    assert {id(original) for original, _ in pairs} == {id(p) for p in model.parameters()}
    for original, copy in pairs:
        assert_outputs_close(original.grad, copy.grad)


def test_stochastic_depth_captured_in_eval_replays_in_train_mode_like_original():
    torchvision = pytest.importorskip("torchvision", reason="StochasticDepth comes from torchvision.ops")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), torchvision.ops.StochasticDepth(0.5, "row"), nn.ReLU()).eval()
    net = capture(model, torch.randn(1, 3, 8, 8))
    assert not net.guards
    model.train()
    net.train()
    x = torch.randn(16, 3, 8, 8)
    outputs = []
    for module in (model, net):
        torch.manual_seed(3)
        outputs.append(module(x))
    assert_outputs_close(*outputs)
    dropped_rows = (outputs[0].flatten(1).abs().sum(1) == 0).sum()
    assert 0 < dropped_rows < 16


class _ModeScaledNet(nn.Module):
    """Branches on ``self.training`` only to pick constants, as every Hugging Face attention layer does."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 3.0 if self.training else 0.5
        return nn.functional.dropout(self.linear(x) * scale, p=0.5 if self.training else 0.0)


@pytest.mark.parametrize("captured_mode", ["eval", "train"])
def test_branch_that_picks_constants_by_mode_replays_in_both_modes(captured_mode, tmp_path):
    from graph import load

    model = _ModeScaledNet().train(captured_mode == "train")
    net = capture(model, torch.randn(2, 4))
    assert not net.guards
    reloaded = load(net.save_to_json(file=str(tmp_path / "net.json")))
    x = torch.randn(64, 4)
    for training in (False, True):
        outputs = []
        for module in (model, net, reloaded):
            module.train(training)
            torch.manual_seed(5)
            outputs.append(module(x))
        assert_outputs_close(outputs[0], outputs[1])
        assert_outputs_close(outputs[0], outputs[2])
        assert (outputs[0] == 0).any() == training


def test_train_mode_batch_norm_updates_running_stats_like_original():
    model, net = _captured(CASES["amc_ops"], train=True)
    x = CASES["amc_ops"].make_input(OTHER_BATCH, 16)
    model(x)
    net(x)
    bn = net.module_of(net.node("block.bn1"))
    assert_outputs_close(model.block.bn1.running_mean, bn.running_mean)
    assert_outputs_close(model.block.bn1.running_var, bn.running_var)


class _InputMutatingNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[:, 0] = x[:, 1] * 2
        x += 1
        return x.relu_()


def test_in_place_ops_on_the_input_mutate_the_replay_input_like_the_original():
    model = _InputMutatingNet()
    net = capture(model, torch.randn(2, 3, 4))
    x = torch.randn(3, 3, 5)
    expected_input, replay_input = x.clone(), x.clone()
    expected = model(expected_input)
    actual = net(replay_input)
    assert_outputs_close(expected, actual)
    assert torch.equal(replay_input, expected_input)
    assert actual.data_ptr() == replay_input.data_ptr()


def test_hooks_on_node_modules_and_global_hooks_still_run_at_replay():
    _, net = _captured(CASES["amc_ops"])
    calls = []
    conv = net.module_of(net.node("block.conv1"))
    add = net.module_of(net.node("block.add"))
    conv.register_forward_hook(lambda module, args, out: calls.append("conv"))
    add.register_forward_pre_hook(lambda module, args: calls.append("add"))
    x = CASES["amc_ops"].make_input(1, 16)
    net(x)
    assert calls == ["conv", "add"]
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: calls.append(type(module)))
    try:
        net(x)
    finally:
        handle.remove()
    assert calls.count(nn.Linear) == 1 and calls.count(nn.BatchNorm2d) == 2


class RangeCheckNet(nn.Module):
    """Loops over a range built from a size and checks ``isinstance(..., range)``, as library code does."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = range(x.shape[0])
        assert isinstance(steps, range) and issubclass(type(steps), range)
        return torch.stack([self.linear(x[i]) for i in steps])


def test_range_passes_isinstance_checks_during_capture_and_the_loop_replays():
    torch.manual_seed(0)
    model = RangeCheckNet()
    net = capture(model, torch.randn(2, 4))
    x = torch.randn(2, 4)
    assert_outputs_close(model(x), net(x))
    assert builtins.range.__module__ == "builtins"
