"""Which nodes of a captured network low-rank decomposition can split, and how: one small handler per layer kind
(:data:`LAYER_KINDS`: ``nn.Linear`` and ``nn.Conv1d/2d/3d``), plus what follows a layer in the graph (a BatchNorm
whose affine map defines the responses that matter, a ReLU for the nonlinear reconstruction).

A k×k convolution (n ← c, ``groups`` g) becomes a k×k convolution (r ← c, groups g, the original stride, padding,
dilation and padding mode, no bias) followed by a 1×1 convolution (n ← r, groups g, the original bias); a Linear
becomes two Linears. ``r`` is a multiple of g: ``rank`` per group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from graph.ir import Node, Ref
from graph.leaves import leaf_type
from graph.network import ReconstructedNetwork

from .low_rank_solvers import Factors, ResponseSpace


class LayerKind:
    """How one kind of layer is split. ``weight_matrix`` is the weight as (n × fan-in per group), rows grouped by
    group; ``build`` makes the two modules from :class:`Factors`."""

    def groups(self, module: nn.Module) -> int:
        """The number of independent row blocks of the weight."""
        return 1

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        """The weight as an (n × fan-in per group) matrix."""
        return module.weight.detach().reshape(module.weight.shape[0], -1)

    def build(self, module: nn.Module, factors: Factors, rank: int) -> tuple[nn.Module, nn.Module]:
        """The (first, second) modules computing ``second(first(x)) = L (R x) + b'``."""
        raise NotImplementedError


class LinearKind(LayerKind):
    """``nn.Linear`` (n ← c): Linear (r ← c, no bias), then Linear (n ← r, the bias)."""

    def build(self, module: nn.Linear, factors: Factors, rank: int) -> tuple[nn.Module, nn.Module]:
        like = {"device": module.weight.device, "dtype": module.weight.dtype}
        first = nn.Linear(module.in_features, rank, bias=False, **like)
        second = nn.Linear(rank, module.out_features, bias=factors.bias is not None, **like)
        _assign(first, second, factors)
        return first, second


class ConvKind(LayerKind):
    """``nn.Conv1d/2d/3d`` (n ← c, groups g): the same conv type k×k (g·rank ← c, groups g) without bias, then
    1×1 (n ← g·rank, groups g) with the bias."""

    def groups(self, module: nn.Module) -> int:
        return module.groups

    def build(self, module: nn.Module, factors: Factors, rank: int) -> tuple[nn.Module, nn.Module]:
        kind, groups = type(module), module.groups
        like = {"device": module.weight.device, "dtype": module.weight.dtype}
        first = kind(module.in_channels, rank * groups, module.kernel_size, stride=module.stride,
                     padding=module.padding, dilation=module.dilation, groups=groups, bias=False,
                     padding_mode=module.padding_mode, **like)
        second = kind(rank * groups, module.out_channels, 1, groups=groups, bias=factors.bias is not None, **like)
        _assign(first, second, factors)
        return first, second


def _assign(first: nn.Module, second: nn.Module, factors: Factors) -> None:
    with torch.no_grad():
        first.weight.copy_(factors.first.reshape(first.weight.shape))
        second.weight.copy_(factors.second.reshape(second.weight.shape))
        if factors.bias is not None:
            second.bias.copy_(factors.bias)


LAYER_KINDS: dict[type[nn.Module], LayerKind] = {nn.Linear: LinearKind(), nn.Conv1d: ConvKind(),
                                                 nn.Conv2d: ConvKind(), nn.Conv3d: ConvKind()}


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The handler of ``module``'s leaf type, or None when it cannot be decomposed."""
    return LAYER_KINDS.get(leaf_type(module))


@dataclass
class Candidate:
    """A node that can be decomposed: its ``kind``, ``groups``, ``out_channels`` n, per-group ``fan_in``, its
    captured ``macs`` and the MACs of one rank in every group (``macs_per_rank``)."""

    name: str
    kind: LayerKind
    groups: int
    out_channels: int
    fan_in: int
    macs: float
    macs_per_rank: float

    @property
    def full_rank(self) -> int:
        """The rank per group at which the decomposition is exact (it then costs more MACs than the layer)."""
        return min(self.out_channels // self.groups, self.fan_in)

    @property
    def max_rank(self) -> int:
        """The largest rank per group that still needs fewer MACs than the layer."""
        return min(self.full_rank, math.ceil(self.macs / self.macs_per_rank) - 1)

    def rank_for_ratio(self, ratio: float) -> int:
        """The largest rank per group removing at least ``ratio`` of the layer's MACs (at least 1)."""
        return max(1, min(self.max_rank, math.floor((1 - ratio) * self.macs / self.macs_per_rank)))


def candidates(network: ReconstructedNetwork, macs_by_node: dict[str, int]) -> list[Candidate]:
    """Every node of ``network`` that some rank would make cheaper, in graph order: a Linear or convolution that
    runs its own module (not one shared with another node)."""
    uses: dict[int, int] = {}
    for node in network.graph_nodes:
        if node.key is not None:
            uses[id(network.module_of(node))] = uses.get(id(network.module_of(node)), 0) + 1
    found = []
    for node in network.graph_nodes:
        if node.key is None:
            continue
        module = network.module_of(node)
        kind = layer_kind(module)
        macs = macs_by_node.get(node.name)
        if kind is None or uses[id(module)] > 1 or not macs:
            continue
        weight = kind.weight_matrix(module)
        groups = kind.groups(module)
        n, fan_in = weight.shape
        per_rank = macs * (groups * fan_in + n) / (n * fan_in)
        candidate = Candidate(node.name, kind, groups, n, fan_in, float(macs), per_rank)
        if candidate.max_rank >= 1:
            found.append(candidate)
    return found


_RELU_OPS = frozenset({"ReLU", "torch.relu", "torch.relu_", "torch.nn.functional.relu", "Tensor.relu",
                       "Tensor.relu_"})
_BATCHNORM_OPS = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d"})


def _sole_reader(network: ReconstructedNetwork, index: int, users: dict[int, list[int]]) -> Node | None:
    """The node that alone reads node ``index``'s output as its first argument, if there is exactly one such."""
    readers = users.get(index, [])
    if len(readers) != 1 or any(ref.index == index for ref in network.output_refs()):
        return None
    reader = network.graph_nodes[readers[0]]
    return reader if reader.args and reader.args[0] == Ref(index) and reader.inputs == [index] else None


@dataclass
class Followers:
    """What follows a layer: the response space (its BatchNorm's eval-mode affine map, or identity), the node
    whose output that is, and whether a ReLU alone reads it next (so the nonlinear reconstruction applies)."""

    space: ResponseSpace
    response_node: str
    relu: bool


def followers(network: ReconstructedNetwork, name: str, channels: int) -> Followers:
    """The :class:`Followers` of node ``name`` (``channels`` outputs): a BatchNorm counts when it alone reads the
    layer, tracks running statistics and normalises the layer's channel dim; a ReLU when it alone reads the
    BatchNorm (or the layer)."""
    users = network.users()
    index = next(i for i, node in enumerate(network.graph_nodes) if node.name == name)
    space, response = ResponseSpace.identity(channels), network.graph_nodes[index]
    reader = _sole_reader(network, index, users)
    if reader is not None and reader.op in _BATCHNORM_OPS:
        norm = network.module_of(reader)
        layer_is_linear = isinstance(network.module_of(response), nn.Linear)
        if norm.running_var is not None and norm.num_features == channels and \
                not (layer_is_linear and len(response.out_shape) != 2):
            space = _batchnorm_space(norm)
            response = reader
    response_index = next(i for i, node in enumerate(network.graph_nodes) if node is response)
    after = _sole_reader(network, response_index, users)
    return Followers(space, response.name, after is not None and after.op in _RELU_OPS)


def _batchnorm_space(norm: nn.modules.batchnorm._BatchNorm) -> ResponseSpace:
    """The eval-mode map ``scale ⊙ y + shift`` of a BatchNorm."""
    scale = 1 / torch.sqrt(norm.running_var.detach().double().cpu() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double().cpu()
    shift = -norm.running_mean.detach().double().cpu() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double().cpu()
    return ResponseSpace(scale, shift)
