"""A ``ReconstructedNetwork`` as a plain, JSON-able graph spec plus a table of named tensors, and back.

The spec layout is documented in ``docs/vnmodel.md``; the file formats (``pkl``, ``json``, ``vnmodel``) only differ
in how they store these two parts. Rebuilding never runs code named by the spec: ops resolve through the allow-lists
of :mod:`graph.leaves` and :mod:`graph.oplib`, and every problem is a :class:`~graph.errors.FileFormatError`.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.nn as nn

from .. import oplib
from ..errors import FileFormatError
from ..ir import Node, Sym, iter_refs
from ..leaves import leaf_class
from ..modules import MODE_SELECT
from ..network import ReconstructedNetwork
from .leaf_configs import shape_mismatches
from .module_specs import build_module, module_spec
from .schema import FORMAT_NAME, FORMAT_VERSION, check_spec
from .templates import TemplateDecoder, TemplateEncoder, encode_or_placeholder

_GRAPH_OPS = ("input", "param", "constant", MODE_SELECT)  # ops of the graph itself, beside leaves and functions
_PARAMETER_KINDS = {kind.name: kind for kind in (
    inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL,
    inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)}


# ------------------------------------------------------------------------------------------------------------ saving
def network_to_spec(network: ReconstructedNetwork) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(spec, tensors)``: the JSON-able graph spec and the CPU tensors it names (tied tensors stored once).

    Raises ``TypeError`` naming the node when a template holds a value no format can store, and ``ValueError``
    when a module's constructor arguments disagree with its tensors (for example after inconsistent pruning).
    Weights masked with ``torch.nn.utils.prune`` (magnitude pruning) are saved as what they compute: masks folded in.
    """
    network = _masks_folded(network)
    template_tensors: dict[str, torch.Tensor] = {}
    encoder = TemplateEncoder(template_tensors)
    spec: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "signature": [_encode_parameter(p, encoder) for p in network.signature.parameters.values()],
        "captured_training": bool(network.captured_training),
        "training": bool(network.training),
        "input_constants": [[encoder.encode(tuple(path)), encode_or_placeholder(value, encoder)]
                            for path, value in network.input_constants.items()],
        "guards": [[_encode_in(f"guard at {source}", expr, encoder), encoder.encode(value), source]
                   for (expr, value), source in network.guards.items()],
        "output_template": _encode_in("the output template", network.output_template, encoder),
        "nodes": [_encode_node(node, encoder) for node in network.graph_nodes],
    }
    owners = {node.key: node for node in network.graph_nodes if node.key is not None}
    spec["modules"] = {key: _encode_module(key, module, owners, encoder) for key, module in network.nodes.items()}
    roles, tensors = _tensor_table(network)
    roles.update({name: {"role": "template", "requires_grad": False} for name in template_tensors})
    tensors.update({name: tensor.to("cpu") for name, tensor in template_tensors.items()})
    spec["tensors"] = roles
    return spec, tensors


def _masks_folded(network: ReconstructedNetwork) -> ReconstructedNetwork:
    """``network``, or a copy whose ``torch.nn.utils.prune`` masks are folded into their tensors (``prune.remove``)."""
    from torch.nn.utils import prune

    def masks(module: nn.Module) -> list:
        return [hook for hook in module._forward_pre_hooks.values() if isinstance(hook, prune.BasePruningMethod)]

    if not any(masks(module) for module in network.modules()):
        return network
    with torch.no_grad():  # the masked weight a forward left behind holds autograd history, which deepcopy refuses
        for module in network.modules():
            for hook in masks(module):
                setattr(module, hook._tensor_name, hook.apply_mask(module))
    folded = copy.deepcopy(network)
    for module in folded.modules():
        for hook in masks(module):
            prune.remove(module, hook._tensor_name)
    folded.recompile()
    return folded


def _encode_in(where: str, value: Any, encoder: TemplateEncoder) -> Any:
    try:
        return encoder.encode(value)
    except TypeError as error:
        raise TypeError(f"cannot save {where}: {error}") from None


def _encode_parameter(parameter: inspect.Parameter, encoder: TemplateEncoder) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": parameter.name, "kind": parameter.kind.name}
    if parameter.default is not inspect.Parameter.empty:
        entry["default"] = encode_or_placeholder(parameter.default, encoder)
    return entry


def _encode_node(node: Node, encoder: TemplateEncoder) -> dict[str, Any]:
    where = f"node {node.describe()}"
    return {"name": node.name, "op": node.op, "key": node.key,
            "args": _encode_in(f"the arguments of {where}", tuple(node.args), encoder),
            "kwargs": _encode_in(f"the arguments of {where}", dict(node.kwargs), encoder),
            "source": node.source, "meta": _encode_in(f"the meta of {where}", dict(node.meta), encoder)}


def _encode_module(key: str, module: nn.Module, owners: dict[str, Node], encoder: TemplateEncoder) -> Any:
    where = f"node {owners[key].describe()}" if key in owners else f"module {key!r}"
    try:
        spec = module_spec(module)
    except TypeError as error:
        raise TypeError(f"cannot save {where}: {error}") from None
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    problems = shape_mismatches(build_module(spec), tensors)
    if problems:
        raise ValueError(f"cannot save {where}: its constructor arguments {spec.get('config')} disagree with its "
                         f"tensors ({'; '.join(problems)})")
    return _encode_in(where, spec, encoder)


def _tensor_table(network: nn.Module) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    roles: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    first_name: dict[int, str] = {}
    for role, named in (("parameter", network.named_parameters(remove_duplicate=False)),
                        ("buffer", network.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            entry = {"role": role, "requires_grad": bool(tensor.requires_grad)}
            first = first_name.setdefault(id(tensor), name)
            if first != name:
                entry["same_as"] = first
            else:
                tensors[name] = tensor.detach().to("cpu")
            roles[name] = entry
    return roles, tensors


# ----------------------------------------------------------------------------------------------------------- loading
def network_from_spec(spec: Any, tensors: dict[str, torch.Tensor]) -> ReconstructedNetwork:
    """Rebuild the network a spec describes, giving it ``tensors``; raises :class:`FileFormatError` on any problem.

    The spec is checked against the schema (:func:`~graph.serialization.schema.check_spec`) before anything is
    decoded or built; what remains to check here are the links between its parts (node references, modules, tensors).
    """
    check_spec(spec)
    decoder = TemplateDecoder(tensors)
    nodes = [_decode_node(i, entry, decoder) for i, entry in enumerate(spec["nodes"])]
    output_template = _decode_in("the output template", spec["output_template"], decoder)
    guards = {(_decode_in(f"guards[{i}]", expr, decoder), _decode_in(f"guards[{i}]", value, decoder)): source
              for i, (expr, value, source) in enumerate(spec["guards"])}
    _check_refs(nodes, output_template, guards)
    modules = {key: _decode_module(key, entry, decoder) for key, entry in spec["modules"].items()}
    for node in nodes:
        if node.op != "input" and node.key not in modules:
            raise FileFormatError(f"node {node.name!r} runs module {node.key!r}, which the file does not define")
    network = ReconstructedNetwork(
        nodes, modules, _decode_signature(spec["signature"], decoder),
        {_decode_in("input_constants", path, decoder): _decode_in("input_constants", value, decoder)
         for path, value in spec["input_constants"]},
        output_template, guards, spec["captured_training"])
    _assign_tensors(network, spec["tensors"], tensors)
    network.train(spec["training"])
    return network


def _decode_in(where: str, value: Any, decoder: TemplateDecoder) -> Any:
    try:
        return decoder.decode(value)
    except FileFormatError as error:
        raise FileFormatError(f"{where}: {error}") from None


def _decode_module(key: str, entry: Any, decoder: TemplateDecoder) -> nn.Module:
    try:
        return build_module(decoder.decode(entry))
    except FileFormatError as error:
        raise FileFormatError(f"module {key!r}: {error}") from None


def _decode_node(index: int, entry: dict, decoder: TemplateDecoder) -> Node:
    op = entry["op"]
    where = f"nodes[{index}] ({entry['name']!r})"
    if op not in _GRAPH_OPS and leaf_class(op) is None and not oplib.is_replayable(op):
        raise FileFormatError(f'unknown op "{op[:80]}" not on the allow-list ({where})')
    return Node(name=entry["name"], op=op, key=entry["key"], args=_decode_in(where, entry["args"], decoder),
                kwargs=_decode_in(where, entry["kwargs"], decoder), source=entry["source"],
                meta=_decode_in(where, entry["meta"], decoder))


def _decode_signature(entries: list, decoder: TemplateDecoder) -> inspect.Signature:
    parameters = []
    for entry in entries:
        name = entry["name"]
        default = entry.get("default", inspect.Parameter.empty)
        if default is not inspect.Parameter.empty:
            default = _decode_in(f"signature parameter {name!r}", default, decoder)
        parameters.append(inspect.Parameter(name, _PARAMETER_KINDS[entry["kind"]], default=default))
    try:
        return inspect.Signature(parameters)
    except ValueError as error:
        raise FileFormatError(f"malformed forward signature: {error}") from None


def _check_refs(nodes: list[Node], output_template: Any, guards: dict[tuple, Any]) -> None:
    for index, node in enumerate(nodes):
        for ref in iter_refs((node.args, node.kwargs)):
            if ref.index >= index:
                raise FileFormatError(f"node {index} ({node.name!r}) reads node {ref.index}, which does not run "
                                      "before it")
    for ref in iter_refs((output_template, [Sym(expr) for expr, _ in guards])):
        if ref.index >= len(nodes):
            raise FileFormatError(f"the output or a guard reads node {ref.index}, but there are {len(nodes)} nodes")


def _assign_tensors(network: ReconstructedNetwork, roles: dict[str, dict], tensors: dict[str, torch.Tensor]) -> None:
    owners = {node.key: node.name for node in network.graph_nodes}
    assigned: dict[str, torch.Tensor] = {}
    stored = {name for name, entry in roles.items() if "same_as" not in entry}
    unlisted = sorted(tensors.keys() - stored)
    if unlisted:
        raise FileFormatError(f"tensor {unlisted[0]!r} is stored but the graph spec does not list it")
    for name, entry in roles.items():
        role = entry["role"]
        if role == "template":
            if name not in tensors:
                raise FileFormatError(f"missing tensor {name!r}")
            continue
        module_path, _, attribute = name.rpartition(".")
        owner = owners.get(module_path.removeprefix("nodes.").split(".")[0], module_path)
        module = _submodule(network, module_path)
        if module is None:
            raise FileFormatError(f"tensor {name!r} belongs to no module of the network")
        slots = dict(module.named_parameters(recurse=False, remove_duplicate=False) if role == "parameter"
                     else module.named_buffers(recurse=False, remove_duplicate=False))
        if attribute not in slots:
            raise FileFormatError(f"tensor {name!r} is not a {role} of node {owner!r}")
        value = _stored_tensor(name, entry, tensors, assigned)
        if tuple(value.shape) != tuple(slots[attribute].shape):
            raise FileFormatError(f"tensor shape mismatch for node {owner!r}: {name} is {tuple(value.shape)} in the "
                                  f"file but its stored arguments give {tuple(slots[attribute].shape)}")
        if role == "parameter" and entry["requires_grad"] and not (value.is_floating_point() or value.is_complex()):
            raise FileFormatError(f"tensor {name!r} of node {owner!r} is {value.dtype}, which cannot require "
                                  "gradients")
        if role == "parameter" and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=entry["requires_grad"])
        setattr(module, attribute, value)
        assigned[name] = value
    for name, tensor in [*network.named_parameters(remove_duplicate=False),
                         *network.named_buffers(remove_duplicate=False)]:
        if tensor.is_meta:
            raise FileFormatError(f"missing tensor {name!r} (the file does not list it)")


def _submodule(network: nn.Module, path: str) -> nn.Module | None:
    module = network
    for part in path.split(".") if path else ():
        module = module._modules.get(part)
        if module is None:
            return None
    return module


def _stored_tensor(name: str, entry: dict, tensors: dict[str, torch.Tensor],
                   assigned: dict[str, torch.Tensor]) -> torch.Tensor:
    if "same_as" in entry:
        if entry["same_as"] not in assigned:
            raise FileFormatError(f"tensor {name!r} is tied to {entry['same_as']!r}, which is not stored before it")
        return assigned[entry["same_as"]]
    if name not in tensors:
        raise FileFormatError(f"missing tensor {name!r}")
    return tensors[name]
