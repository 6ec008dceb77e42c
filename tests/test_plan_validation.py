"""Pruning plans are checked one way by prune_channels and mask_channels: true integer indices in range, each group
named once, and round_to a positive integer (graph.pruning.validated_plan, check_round_to)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from graph import capture
from graph.errors import PruningError
from graph.pruning import mask_channels, plan_by_ratio, plan_for_flops, prune, prune_channels


def conv_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    return model, capture(model, torch.randn(1, 3, 8, 8))


def without_channel(model: nn.Sequential, channel: int) -> nn.Sequential:
    """The model with one channel of the first conv cut out by hand (the reference for a plan removing it)."""
    keep = [c for c in range(8) if c != channel]
    conv1, bn, conv2 = nn.Conv2d(3, 7, 3), nn.BatchNorm2d(7), nn.Conv2d(7, 4, 3)
    with torch.no_grad():
        conv1.weight.copy_(model[0].weight[keep])
        conv1.bias.copy_(model[0].bias[keep])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(getattr(model[1], name)[keep])
        conv2.weight.copy_(model[3].weight[:, keep])
        conv2.bias.copy_(model[3].bias)
    return nn.Sequential(conv1, bn, nn.ReLU(), conv2).eval()


PLAN_FUNCTIONS = {"prune_channels": prune_channels, "mask_channels": mask_channels}
NOT_INTEGERS = [1.7, 1.0, np.float64(1.0), "1", True, np.bool_(True), None, torch.tensor(1.0)]


@pytest.mark.parametrize("function", PLAN_FUNCTIONS)
@pytest.mark.parametrize("index", NOT_INTEGERS, ids=repr)
def test_an_index_that_is_not_a_true_integer_is_refused(function, index):
    _, network = conv_network()
    group = network.channel_groups()[0]
    with pytest.raises(PruningError, match=f"group {group.id}: channel index .* is not an integer"):
        PLAN_FUNCTIONS[function](network, {group: [0, index]})


@pytest.mark.parametrize("function", PLAN_FUNCTIONS)
@pytest.mark.parametrize("indices", [np.array([1.0]), torch.tensor([1.0]), torch.tensor([True]), "1", 1],
                         ids=repr)
def test_indices_that_are_not_an_integer_collection_are_refused(function, indices):
    _, network = conv_network()
    with pytest.raises(PruningError, match="group 0: "):
        PLAN_FUNCTIONS[function](network, {0: indices})


@pytest.mark.parametrize("function", PLAN_FUNCTIONS)
@pytest.mark.parametrize("index", [-1, 8, 2**40])
def test_an_index_out_of_range_is_refused(function, index):
    _, network = conv_network()
    with pytest.raises(PruningError, match=f"group 0 has 8 channels; index {index} is out of range"):
        PLAN_FUNCTIONS[function](network, {0: [index]})


@pytest.mark.parametrize("function", PLAN_FUNCTIONS)
def test_a_group_named_twice_by_object_and_by_id_is_refused(function):
    _, network = conv_network()
    group = network.channel_groups()[0]
    with pytest.raises(PruningError, match="names group 0 twice"):
        PLAN_FUNCTIONS[function](network, {group: [0, 1, 2, 3], 0: [4, 5, 6, 7]})
    with pytest.raises(PruningError, match="names group 0 twice"):
        PLAN_FUNCTIONS[function](network, {np.int64(0): [1], group: [2]})


@pytest.mark.parametrize("function", PLAN_FUNCTIONS)
def test_keys_that_are_not_groups_of_this_network_are_refused(function):
    _, network = conv_network()
    _, other = conv_network()
    for key in (other.channel_groups()[0], 7, "0", True, 0.0):
        with pytest.raises(PruningError, match="is not a channel group of this network"):
            PLAN_FUNCTIONS[function](network, {key: [1]})
    with pytest.raises(PruningError, match="a plan maps channel groups"):
        PLAN_FUNCTIONS[function](network, [(0, [1])])


@pytest.mark.parametrize("indices", [[1], [np.int64(1)], [np.uint8(1), 1], np.array([1]), torch.tensor([1]),
                                     (i for i in [1])], ids=repr)
def test_every_true_integer_form_removes_the_same_channel_as_cutting_it_by_hand(indices):
    model, network = conv_network()
    reference = without_channel(model, 1)
    x = torch.randn(2, 3, 9, 9)
    pruned = prune_channels(network, {network.channel_groups()[0]: indices})
    with torch.no_grad():
        assert torch.allclose(pruned(x), reference(x), atol=1e-6)


def test_masking_accepts_the_same_plans_and_zeroes_the_same_channel():
    model, network = conv_network()
    masked = mask_channels(network, {0: np.array([1])})
    with torch.no_grad():
        conv2 = masked.nodes[masked.node("3").key]
        assert torch.count_nonzero(conv2.weight[:, 1]) == 0
        assert torch.equal(conv2.weight[:, [0, 2, 3, 4, 5, 6, 7]], model[3].weight[:, [0, 2, 3, 4, 5, 6, 7]])


@pytest.mark.parametrize("round_to", [-4, 0, 2.5, True, "8"], ids=repr)
def test_round_to_must_be_a_positive_integer(round_to):
    _, network = conv_network()
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        plan_by_ratio(network, 0.5, round_to=round_to)
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        prune(network, 0.5, round_to=round_to)
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        plan_for_flops(network, 0.5, round_to=round_to)


def test_round_to_keeps_multiples_of_it():
    _, network = conv_network()
    plan = plan_by_ratio(network, 0.4, round_to=4)
    assert [8 - len(indices) for indices in plan.values()] == [4]
