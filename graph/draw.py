"""Draw a ``ReconstructedNetwork`` with graphviz: one box per node (name, op, output shapes, channel counts).

Edges are those of :meth:`ReconstructedNetwork.to_networkx`. Inputs, outputs, parameters/constants, leaf modules and
functional ops are styled apart. Without the ``dot`` binary the graphviz source is written instead, with a warning.
"""
from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Callable

import graphviz
import torch.nn as nn

from .ir import Node
from .registry import registers_in
from .serialization.atomic import atomic_path

RENDERED_FORMATS = ("svg", "pdf", "png")
SOURCE_FORMATS = ("dot", "gv")
DEFAULT_FORMAT = "svg"
# Above this many nodes dot's crossing minimisation dominates (minutes on a few thousand nodes); these settings
# bound its iterations so large graphs render in seconds, at the cost of a few more crossings.
LARGE_GRAPH = 400
_LARGE_GRAPH_ATTRS = {"nslimit": "2", "nslimit1": "2", "mclimit": "0.2", "searchsize": "10", "remincross": "false"}

_STYLES: dict[str, dict[str, str]] = {
    "input": {"shape": "ellipse", "style": "filled", "fillcolor": "#c6e2ff"},
    "output": {"shape": "box", "style": "filled,bold", "fillcolor": "#ffd9a8", "peripheries": "2"},
    "tensor": {"shape": "note", "style": "filled", "fillcolor": "#eeeeee", "fontsize": "9"},
    "module": {"shape": "box", "style": "filled,rounded", "fillcolor": "#e3f5e1"},
    "function": {"shape": "box", "style": "rounded"},
}

_CHANNELS: dict[type, Callable[[nn.Module], str]] = {}
channels_of = registers_in(_CHANNELS)


@channels_of(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_channels(module: nn.Module) -> str:
    groups = f", groups {module.groups}" if module.groups > 1 else ""
    return f"{module.in_channels}→{module.out_channels}{groups}"


@channels_of(nn.Linear)
def _linear_channels(module: nn.Linear) -> str:
    return f"{module.in_features}→{module.out_features}"


@channels_of(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
             nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _batch_norm_channels(module: nn.Module) -> str:
    return f"{module.num_features}→{module.num_features}"


@channels_of(nn.GroupNorm)
def _group_norm_channels(module: nn.GroupNorm) -> str:
    return f"{module.num_channels}→{module.num_channels}, groups {module.num_groups}"


@channels_of(nn.LayerNorm, nn.RMSNorm)
def _layer_norm_channels(module: nn.Module) -> str:
    size = "x".join(str(s) for s in module.normalized_shape)
    return f"{size}→{size}"


@channels_of(nn.Embedding)
def _embedding_channels(module: nn.Embedding) -> str:
    return f"{module.num_embeddings} ids→{module.embedding_dim}"


def channel_label(module: nn.Module | None) -> str | None:
    """``in→out`` channel counts of a conv, linear, norm or embedding module; ``None`` for anything else."""
    for cls in type(module).__mro__:
        handler = _CHANNELS.get(cls)
        if handler is not None:
            return handler(module)
    return None


def shape_label(shape: Any) -> str:
    """A captured output shape as text: ``1x8x32x32`` per tensor, lists and dicts of them bracketed, ``-`` else."""
    if isinstance(shape, tuple):
        return "x".join(str(s) for s in shape) if shape else "scalar"
    if isinstance(shape, list):
        return "[" + ", ".join(shape_label(s) for s in shape) + "]"
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{k}: {shape_label(v)}" for k, v in shape.items()) + "}"
    return "-"


def _category(node: Node, outputs: set[int], index: int) -> str:
    if node.op == "input":
        return "input"
    if index in outputs:
        return "output"
    if node.op in ("param", "constant"):
        return "tensor"
    return "function" if "." in node.op else "module"


def _label(rnet, node: Node) -> str:
    lines = [node.name, node.op]
    channels = channel_label(rnet.module_of(node)) if node.key is not None else None
    if channels is not None:
        lines.append(channels)
    lines.append(shape_label(node.out_shape))
    return "\\n".join(line.replace("\\", "\\\\") for line in lines)


def build_digraph(rnet) -> graphviz.Digraph:
    """The graphviz digraph of ``rnet``: one labelled, styled box per node and an edge per data dependency."""
    nodes = rnet.graph_nodes
    outputs = {ref.index for ref in rnet.output_refs()}
    digraph = graphviz.Digraph(name=type(rnet).__name__, graph_attr={"rankdir": "TB"},
                               node_attr={"fontname": "Helvetica", "fontsize": "10"},
                               edge_attr={"arrowsize": "0.6"})
    if len(nodes) > LARGE_GRAPH:
        digraph.graph_attr.update(_LARGE_GRAPH_ATTRS)
    ids = {node.name: f"n{i}" for i, node in enumerate(nodes)}
    for i, node in enumerate(nodes):
        digraph.node(ids[node.name], label=_label(rnet, node), tooltip=node.source or node.name,
                     **_STYLES[_category(node, outputs, i)])
    for source, target in rnet.to_networkx().edges:
        digraph.edge(ids[source], ids[target])
    return digraph


def _target(path: str, format: str | None) -> tuple[str, str]:
    """``(file to write, graphviz format)``: the suffix decides; otherwise ``format`` (default svg) is appended."""
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if suffix in RENDERED_FORMATS or suffix in SOURCE_FORMATS:
        return path, suffix
    format = (format or DEFAULT_FORMAT).lower()
    if format not in RENDERED_FORMATS and format not in SOURCE_FORMATS:
        raise ValueError(f"cannot draw to {path!r} in format {format!r}: use one of "
                         f"{', '.join(RENDERED_FORMATS + SOURCE_FORMATS)}")
    return f"{path}.{format}", format


def _write(path: str, data: bytes) -> str:
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
    return path


def draw_network(rnet, path: str | os.PathLike, format: str | None = None) -> str:
    """Draw ``rnet`` to ``path`` and return the file written.

    The format comes from ``path``'s suffix (``.svg``, ``.pdf``, ``.png``; ``.dot``/``.gv`` write the graphviz
    source only), else from ``format`` (default svg), whose extension is then appended. When graphviz's ``dot``
    binary is missing, the source is written beside ``path`` as ``.dot`` with a warning and that path is returned.
    """
    target, format = _target(os.fspath(path), format)
    source = build_digraph(rnet)
    if format in SOURCE_FORMATS:
        return _write(target, source.source.encode())
    if shutil.which("dot") is not None:
        try:
            return _write(target, source.pipe(format=format))
        except graphviz.ExecutableNotFound:
            pass
    fallback = os.path.splitext(target)[0] + ".dot"
    warnings.warn(f"graphviz's 'dot' program is not installed, so {target} was not rendered; wrote the graph "
                  f"source to {fallback} instead (`apt-get install graphviz` renders it: dot -T{format} "
                  f"{fallback} -o {target})", RuntimeWarning, stacklevel=3)
    return _write(fallback, source.source.encode())
