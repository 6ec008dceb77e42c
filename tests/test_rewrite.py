"""graph.rewrite: replacing one node by a chain keeps the graph exact, renumbers every reference and guard, and
refuses what it cannot do."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graph
from graph.errors import GraphError
from graph.rewrite import NewNode, replace_node, replace_nodes


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = y + self.conv2(y)
        if y.shape[-1] > 1:  # a shape guard on a node after the replaced one
            y = y * 2
        return self.fc(y.mean((2, 3)).view(y.shape[0], -1))  # a size read from a node after the replaced one


def network():
    torch.manual_seed(0)
    model = Residual().eval()
    return model, graph.capture(model, torch.randn(2, 3, 5, 5))


def split_linear(linear: nn.Linear) -> tuple[nn.Linear, nn.Linear]:
    """Two Linears whose composition is exactly ``linear`` (identity first)."""
    first = nn.Linear(linear.in_features, linear.in_features, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.eye(linear.in_features))
    return first, linear


def test_replacing_nodes_by_equivalent_chains_keeps_outputs_and_leaves_the_input_untouched():
    model, net = network()
    names = [n.name for n in net.graph_nodes]
    conv = net.module_of(net.node("conv2"))
    first, second = split_linear(net.module_of(net.node("fc")))
    rewritten = replace_nodes(net, {"conv2": [NewNode("conv2.same", conv), NewNode("conv2.id", nn.Identity())],
                                    "fc": [NewNode("fc.eye", first), NewNode("fc.w", second)]})
    assert [n.name for n in net.graph_nodes] == names
    new_names = [n.name for n in rewritten.graph_nodes]
    assert len(new_names) == len(names) + 2
    assert new_names.index("conv2.id") == new_names.index("conv2.same") + 1
    assert new_names.index("conv2.id") in rewritten.node("add").inputs
    assert len(rewritten.guards) == len(net.guards) == 1
    for x in (torch.randn(3, 3, 5, 5), torch.randn(1, 3, 7, 7)):
        torch.testing.assert_close(rewritten(x), model(x))
    with pytest.raises(graph.errors.ReplayError):  # the guard still reads the right node
        rewritten(torch.randn(2, 3, 1, 1))
    assert rewritten.node("fc.eye").out_shape == (2, 6) and rewritten.node("fc.eye").meta["dtype"] == "float32"
    assert rewritten.flops().by_node["fc.eye"].macs == 2 * 6 * 6


def test_replace_node_refuses_unknown_names_clashes_and_non_leaf_modules():
    _, net = network()
    conv = net.module_of(net.node("conv1"))
    with pytest.raises(GraphError, match="no node of that name"):
        replace_node(net, "nope", [NewNode("x", conv)])
    with pytest.raises(GraphError, match="already has a node"):
        replace_node(net, "conv1", [NewNode("conv2", conv)])
    with pytest.raises(GraphError, match="empty chain"):
        replace_node(net, "conv1", [])
    with pytest.raises(GraphError, match="leaf module"):
        replace_node(net, "conv1", [NewNode("c", nn.Sequential(conv))])
    add = next(n for n in net.graph_nodes if len(n.inputs) == 2)
    with pytest.raises(GraphError, match="reads 2 nodes"):
        replace_node(net, add.name, [NewNode("a", nn.Identity())])
