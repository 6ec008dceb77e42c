"""What a node's module is, as a plain spec, and how to build it back (on the ``meta`` device, without tensors).

One writer per module class (found through the module's MRO) and one builder per spec ``kind``: ``leaf`` (an
allow-listed ``nn.Module`` type and its constructor arguments), ``function`` (an allow-listed torch function),
``param`` and ``constant`` (a tensor the forward reads directly).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from .. import oplib
from ..errors import FileFormatError
from ..leaves import LEAF_TYPES, leaf_class, leaf_type
from ..modules import ConstantNode, FunctionalOp, ParameterNode, make_functional
from .leaf_configs import build_leaf, leaf_config
from ..registry import registers_in

ModuleWriter = Callable[[nn.Module], dict[str, Any]]
ModuleBuilder = Callable[[dict[str, Any]], nn.Module]
_WRITERS: dict[type, ModuleWriter] = {}
_BUILDERS: dict[str, ModuleBuilder] = {}


def module_spec(module: nn.Module) -> dict[str, Any]:
    """The spec of a node module (its leaf arguments are raw Python values; encode them as templates)."""
    if leaf_type(module) is not None:
        return _write_leaf(module)
    for cls in type(module).__mro__:
        writer = _WRITERS.get(cls)
        if writer is not None:
            return writer(module)
    raise TypeError(f"cannot save a node module of type {type(module).__module__}.{type(module).__qualname__}: it "
                    "is neither a leaf type, an allow-listed function nor a parameter/constant node")


def build_module(spec: dict[str, Any]) -> nn.Module:
    """The module a spec describes, its tensors on the ``meta`` device; :class:`FileFormatError` if not allowed."""
    if not isinstance(spec, dict):
        raise FileFormatError(f"malformed module spec {spec!r}")
    builder = _BUILDERS.get(spec.get("kind"))
    if builder is None:
        raise FileFormatError(f"unknown module kind {spec.get('kind')!r}")
    return builder(spec)


_writes = registers_in(_WRITERS)
_builds = registers_in(_BUILDERS)


def _field(spec: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in spec:
        raise FileFormatError(f"missing key {name!r} in module spec")
    value = spec[name]
    if not isinstance(value, kind):
        raise FileFormatError(f"module spec key {name!r} has a malformed value {value!r}")
    return value


@_writes(*LEAF_TYPES)
def _write_leaf(module: nn.Module) -> dict[str, Any]:
    cls = leaf_type(module)
    if cls is None:
        raise TypeError(f"{type(module).__qualname__} overrides forward, so it cannot be saved as its base leaf type")
    return {"kind": "leaf", "type": cls.__name__, "config": leaf_config(module, cls)}


@_builds("leaf")
def _build_leaf(spec: dict[str, Any]) -> nn.Module:
    name = _field(spec, "type", str)
    cls = leaf_class(name)
    if cls is None:
        raise FileFormatError(f'unknown op "{name}" not on the allow-list of leaf module types')
    config = _field(spec, "config", dict)
    try:
        return build_leaf(cls, config)
    except (TypeError, ValueError, RuntimeError) as error:
        raise FileFormatError(f"cannot build {name} from its stored arguments {config}: {error}") from None


@_writes(FunctionalOp)
def _write_function(module: FunctionalOp) -> dict[str, Any]:
    return {"kind": "function", "target": module.target}


@_builds("function")
def _build_function(spec: dict[str, Any]) -> nn.Module:
    target = _field(spec, "target", str)
    if not oplib.is_replayable(target):
        raise FileFormatError(f'unknown op "{target}" not on the allow-list of replayable torch functions')
    return make_functional(target)


def _tensor_node_writer(kind: str) -> ModuleWriter:
    def write(module: ParameterNode) -> dict[str, Any]:
        return {"kind": kind, "parameter": isinstance(module.value, nn.Parameter), "shape": tuple(module.value.shape)}

    return write


def _tensor_node_builder(cls: type[ParameterNode]) -> ModuleBuilder:
    def build(spec: dict[str, Any]) -> nn.Module:
        shape = _field(spec, "shape", tuple)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise FileFormatError(f"malformed tensor shape {shape!r} in module spec")
        placeholder = torch.empty(shape, device="meta")
        return cls(nn.Parameter(placeholder) if _field(spec, "parameter", bool) else placeholder)

    return build


for _kind, _cls in (("param", ParameterNode), ("constant", ConstantNode)):
    _writes(_cls)(_tensor_node_writer(_kind))
    _builds(_kind)(_tensor_node_builder(_cls))
