"""The AMC wiki's capture-boundary API (``graph.reconstructor``): capture the user's own network between two calls.

The reconstructed network is compared with the user's network itself, and the network is checked to be left
exactly as it was: no hooks, plain ``training`` flags, the same weights, and an output the boundary did not alter.
"""
from __future__ import annotations

import builtins
import shutil
import warnings

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import amc
from graph import reconstructor
from graph.errors import CaptureError
from models import AmcOpsNet, SENet, assert_outputs_close

BUILTIN_RANGE = builtins.range


def _hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


class DropoutNet(nn.Module):
    """Functional dropout that reads ``self.training``: the boundary must capture both modes."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), p=0.5, training=self.training))


def test_wiki_boundary_flow_returns_an_exact_network_and_its_networkx_graph(tmp_path):
    torch.manual_seed(0)
    net = AmcOpsNet().eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(1, 3, 32, 32)
    expected = net(x)
    reconstructor.insertCaptureBoundaryStart(net)
    out = net(x)
    reconstructor.insertCaptureBoundaryEnd()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without graphviz's dot the drawing falls back to .dot source, with a warning
        rnet, graph = reconstructor.getReconstructedNetwork(ifDraw=True, drawPath=str(tmp_path / "origin_net"))
    assert torch.equal(out, expected)
    assert isinstance(graph, nx.DiGraph)
    assert set(graph.nodes) == {n.name for n in rnet.graph_nodes}
    assert nx.is_directed_acyclic_graph(graph) and graph.number_of_edges() >= len(rnet.layer_nodes)
    if shutil.which("dot"):
        assert (tmp_path / "origin_net.svg").read_bytes().startswith(b"<?xml")
    else:
        assert (tmp_path / "origin_net.dot").read_text().lstrip().startswith("digraph")
    other = torch.rand(3, 3, 32, 32)
    assert_outputs_close(net(other), rnet(other))
    assert _hooks(net) == 0 and all(type(m.__dict__["training"]) is bool for m in net.modules())
    assert builtins.range is BUILTIN_RANGE and not torch.overrides._is_torch_function_mode_enabled()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_reconstructed_network_holds_copies_of_the_users_modules():
    torch.manual_seed(0)
    net = SENet().eval()
    with reconstructor.CaptureBoundary(net) as boundary:
        net(torch.rand(1, 3, 16, 16))
    rnet = boundary.reconstructed_network()
    x = torch.rand(2, 3, 16, 16)
    expected = net(x)
    with torch.no_grad():
        for p in rnet.parameters():
            p.zero_()
    assert_outputs_close(expected, net(x))
    assert not torch.allclose(rnet(x), expected)


def test_boundary_captures_both_training_modes_of_a_forward_that_reads_self_training():
    torch.manual_seed(0)
    net = DropoutNet().train()
    reconstructor.insert_capture_boundary_start(net)
    net(torch.rand(4, 6))
    reconstructor.insert_capture_boundary_end()
    rnet, _ = reconstructor.get_reconstructed_network()
    x = torch.rand(5, 6)
    torch.manual_seed(7)
    expected_train = net(x)
    torch.manual_seed(7)
    assert_outputs_close(expected_train, rnet.train()(x))
    assert_outputs_close(net.eval()(x), rnet.eval()(x))


def test_boundary_is_removed_even_when_the_forward_fails():
    net = SENet().eval()
    reconstructor.insertCaptureBoundaryStart(net)
    with pytest.raises(RuntimeError):
        net(torch.rand(1, 5, 16, 16))
    reconstructor.insertCaptureBoundaryEnd()
    assert _hooks(net) == 0 and all(type(m.__dict__["training"]) is bool for m in net.modules())
    assert net(torch.rand(1, 3, 16, 16)).shape[0] == 1
    with pytest.raises(CaptureError, match="no forward pass"):
        reconstructor.getReconstructedNetwork()


def test_boundary_misuse_is_reported_clearly():
    net = SENet().eval()
    with pytest.raises(CaptureError, match="no capture boundary is open"):
        reconstructor.insertCaptureBoundaryEnd()
    reconstructor.insertCaptureBoundaryStart(net)
    try:
        with pytest.raises(CaptureError, match="already open"):
            reconstructor.insertCaptureBoundaryStart(net)
        net(torch.rand(1, 3, 16, 16))
        with pytest.raises(CaptureError, match="called twice"):
            net(torch.rand(1, 3, 16, 16))
    finally:
        reconstructor.insertCaptureBoundaryEnd()
    with reconstructor.CaptureBoundary(net) as boundary:
        net(torch.rand(1, 3, 16, 16))
        with pytest.raises(CaptureError, match="still open"):
            boundary.reconstructed_network()
    with pytest.raises(TypeError, match="nn.Module"):
        reconstructor.CaptureBoundary(lambda x: x)


def test_amc_reexports_the_boundary_api():
    assert amc.reconstructor is reconstructor
    assert amc.insertCaptureBoundaryStart is reconstructor.insertCaptureBoundaryStart
    assert amc.getReconstructedNetwork is reconstructor.getReconstructedNetwork
