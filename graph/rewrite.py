"""Graph surgery on a ``ReconstructedNetwork``: replace one node by a chain of new leaf-module nodes.

Compressors that change a network's *structure* rather than its channel counts use this: low-rank decomposition
turns one convolution into two (a k×k conv to ``r`` channels, then a 1×1 conv back), and a fused or quantised layer
could replace one node by another the same way. The replacement keeps everything else of the graph: the first new
node reads exactly what the old node read (its argument template), every reader of the old node's output (other
nodes, the network output, shape guards) now reads the chain's last node, and all references are renumbered with
:func:`graph.ir.shift_refs`. The new nodes' output shapes are filled in by one replay at the captured input size, so
FLOPs, drawing, saving, ONNX export and the dependency analysis see them like captured nodes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from .capture import describe
from .errors import GraphError
from .ir import Node, Ref, Sym, shift_refs
from .leaves import leaf_type
from .network import ReconstructedNetwork, _unique_key


# What a replaced node's meta says about its own output (recomputed); the rest (mode, no_grad) is inherited.
_SHAPE_META = ("out", "dtype")


@dataclass(frozen=True)
class NewNode:
    """One node to insert: its ``name`` (unique in the graph) and the leaf ``module`` it runs (its op is the
    module's leaf type name, so it saves and loads like a captured node)."""

    name: str
    module: nn.Module


def replace_node(network: ReconstructedNetwork, name: str, chain: Sequence[NewNode]) -> ReconstructedNetwork:
    """A copy of ``network`` in which node ``name`` is replaced by ``chain`` run in sequence (see the module
    docstring); ``network`` itself is not modified. See :func:`replace_nodes` for the rules."""
    return replace_nodes(network, {name: chain})


def replace_nodes(network: ReconstructedNetwork,
                  replacements: Mapping[str, Sequence[NewNode]]) -> ReconstructedNetwork:
    """A copy of ``network`` with each named node replaced by its chain of new nodes, all in one pass.

    The old node must run a module with a single input (its argument template is given to the chain's first node;
    each later node reads the previous one). The chain's modules must be leaf modules (``nn.Conv2d``,
    ``nn.Linear``, ...). Raises :class:`~graph.errors.GraphError` naming the problem otherwise.
    """
    result = copy.deepcopy(network)
    plans = {_check(result, name, chain): list(chain) for name, chain in replacements.items()}
    taken_names = {node.name for node in result.graph_nodes}
    for chain in plans.values():
        for new in chain:
            if new.name in taken_names:
                raise GraphError(f"cannot insert node {new.name!r}: the graph already has a node of that name")
            taken_names.add(new.name)
    old_nodes = result.graph_nodes
    mapping: dict[int, int] = {}
    position = 0
    for index in range(len(old_nodes)):
        position += len(plans.get(index, [None]))
        mapping[index] = position - 1
    taken_keys = {node.key for index, node in enumerate(old_nodes) if node.key is not None and index not in plans}
    modules: dict[str, nn.Module] = {}
    new_nodes: list[Node] = []
    inserted: list[int] = []
    for index, node in enumerate(old_nodes):
        chain = plans.get(index)
        if chain is None:
            node.args, node.kwargs = shift_refs(tuple(node.args), mapping), shift_refs(dict(node.kwargs), mapping)
            new_nodes.append(node)
            if node.key is not None:
                modules[node.key] = result.nodes[node.key]
            continue
        for step, new in enumerate(chain):
            if step == 0:
                args, kwargs = shift_refs(tuple(node.args), mapping), shift_refs(dict(node.kwargs), mapping)
            else:
                args, kwargs = (Ref(len(new_nodes) - 1),), {}
            meta = {key: value for key, value in node.meta.items() if key not in _SHAPE_META}
            key = _unique_key(new.name, taken_keys)
            inserted.append(len(new_nodes))
            new_nodes.append(Node(name=new.name, op=leaf_type(new.module).__name__, key=key, args=args,
                                  kwargs=kwargs, source=node.source, meta=meta))
            modules[key] = new.module
    result.graph_nodes = new_nodes
    result.nodes = nn.ModuleDict(modules)
    result.output_template = shift_refs(result.output_template, mapping)
    result.guards = {(shift_refs(Sym(expr), mapping).expr, value): source
                     for (expr, value), source in result.guards.items()}
    result.recompile()
    _record_shapes(result, inserted)
    return result


def _check(network: ReconstructedNetwork, name: str, chain: Sequence[NewNode]) -> int:
    """The index of node ``name`` after checking that it can be replaced by ``chain``."""
    try:
        node = network.node(name)
    except KeyError:
        raise GraphError(f"cannot replace {name!r}: the network has no node of that name") from None
    if not chain:
        raise GraphError(f"cannot replace {node.describe()} by an empty chain")
    if node.key is None or node.op in ("input", "param", "constant"):
        raise GraphError(f"cannot replace {node.describe()}: only nodes that run a module can be replaced")
    if len(node.inputs) != 1:
        raise GraphError(f"cannot replace {node.describe()}: it reads {len(node.inputs)} nodes, a chain reads one")
    for new in chain:
        if not isinstance(new, NewNode) or leaf_type(new.module) is None:
            raise GraphError(f"cannot insert {new!r} in place of {node.describe()}: each chain item must be a NewNode "
                             "running a leaf module (nn.Conv2d, nn.Linear, ...)")
    return next(index for index, other in enumerate(network.graph_nodes) if other is node)


def _record_shapes(network: ReconstructedNetwork, indices: list[int]) -> None:
    """Fill in ``meta["out"]`` and ``meta["dtype"]`` of the nodes at ``indices`` from a replay at the captured
    input size (what capture records for every node): in eval mode, then, for nodes that only run in train mode, in
    train mode on a copy (so no BatchNorm statistics change)."""
    wanted = {network.graph_nodes[i].name: network.graph_nodes[i] for i in indices}

    def observe(node: Node, args: tuple, kwargs: dict, output: object) -> None:
        target = wanted.pop(node.name, None)
        if target is not None:
            target.meta["out"] = describe(output)
            if isinstance(output, torch.Tensor):
                target.meta["dtype"] = str(output.dtype).replace("torch.", "")

    args, kwargs = network.example_inputs()
    was_training = network.training
    with torch.no_grad():
        network.eval()
        network.observe(observe, *args, **kwargs)
        network.train(was_training)
        if wanted:
            copy.deepcopy(network).train().observe(observe, *args, **kwargs)
