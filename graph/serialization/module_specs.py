"""What a node's module is, as a plain spec, and how to build it back (on the ``meta`` device, without tensors).

One writer per module class (found through the module's MRO), and per spec ``kind`` one schema check (run on the
JSON before anything is decoded) and one builder: ``leaf`` (an allow-listed ``nn.Module`` type and its constructor
arguments), ``function`` (an allow-listed torch function), ``param`` and ``constant`` (a tensor the forward reads
directly), ``pruned_multihead_attention`` (an ``nn.MultiheadAttention`` whose widths pruning changed).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from .. import oplib
from ..errors import FileFormatError
from ..layer_sync import PrunedMultiheadAttention
from ..leaves import LEAF_TYPES, leaf_class, leaf_type
from ..modules import MODE_SELECT, ConstantNode, FunctionalOp, ModeSelect, ParameterNode, make_functional
from ..registry import registers_in
from .leaf_configs import build_leaf, config_problem, leaf_config
from .templates import TemplateDecoder
from .validation import brief, check_keys, check_shape, check_str_mapping, check_type, fail

ModuleWriter = Callable[[nn.Module], dict[str, Any]]
ModuleBuilder = Callable[[dict[str, Any]], nn.Module]
SpecCheck = Callable[[dict[str, Any], str], None]
_WRITERS: dict[type, ModuleWriter] = {}
_BUILDERS: dict[str, ModuleBuilder] = {}
_CHECKS: dict[str, SpecCheck] = {}


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
    """The module a spec describes, its tensors on the ``meta`` device. ``spec`` is one :func:`module_spec` wrote
    or, decoded, one :func:`check_module_spec` accepted; :class:`FileFormatError` if the constructor refuses it."""
    return _BUILDERS[spec["kind"]](spec)


def check_module_spec(spec: Any, where: str) -> None:
    """Check a module spec as stored (JSON, before decoding) against the schema of its ``kind``."""
    check_type(spec, dict, where)
    kind = spec.get("kind")
    check = _CHECKS.get(kind) if isinstance(kind, str) else None
    if check is None:
        raise fail(where, f"unknown module kind {brief(kind)}")
    check(spec, where)


_writes = registers_in(_WRITERS)
_builds = registers_in(_BUILDERS)
_checks = registers_in(_CHECKS)


@_writes(*LEAF_TYPES)
def _write_leaf(module: nn.Module) -> dict[str, Any]:
    cls = leaf_type(module)
    if cls is None:
        raise TypeError(f"{type(module).__qualname__} overrides forward, so it cannot be saved as its base leaf type")
    return {"kind": "leaf", "type": cls.__name__, "config": leaf_config(module, cls)}


@_checks("leaf")
def _check_leaf(spec: dict[str, Any], where: str) -> None:
    check_keys(spec, ("kind", "type", "config"), where)
    name = check_type(spec["type"], str, f"{where}.type")
    cls = leaf_class(name)
    if cls is None:
        raise fail(where, f'unknown op "{name[:80]}" not on the allow-list of leaf module types')
    check_str_mapping(spec["config"], f"{where}.config")
    problem = config_problem(cls, TemplateDecoder({}).decode(spec["config"]))
    if problem:
        raise fail(f"{where}.config", f"cannot build {name}: {problem}")


@_builds("leaf")
def _build_leaf(spec: dict[str, Any]) -> nn.Module:
    name, config = spec["type"], spec["config"]
    try:
        return build_leaf(leaf_class(name), config)
    except Exception as error:  # noqa: BLE001 - torch's constructors check values with any exception type
        raise FileFormatError(f"cannot build {name} from its stored arguments {brief(config)}: {error}") from None


@_writes(FunctionalOp)
def _write_function(module: FunctionalOp) -> dict[str, Any]:
    return {"kind": "function", "target": module.target}


@_checks("function")
def _check_function(spec: dict[str, Any], where: str) -> None:
    check_keys(spec, ("kind", "target"), where)
    target = check_type(spec["target"], str, f"{where}.target")
    if not oplib.is_replayable(target):
        raise fail(where, f'unknown op "{target[:80]}" not on the allow-list of replayable torch functions')


@_builds("function")
def _build_function(spec: dict[str, Any]) -> nn.Module:
    return make_functional(spec["target"])


def _tensor_node_writer(kind: str) -> ModuleWriter:
    def write(module: ParameterNode) -> dict[str, Any]:
        return {"kind": kind, "parameter": isinstance(module.value, nn.Parameter), "shape": tuple(module.value.shape)}

    return write


def _tensor_node_builder(cls: type[ParameterNode]) -> ModuleBuilder:
    def build(spec: dict[str, Any]) -> nn.Module:
        placeholder = torch.empty(spec["shape"], device="meta")
        return cls(nn.Parameter(placeholder) if spec["parameter"] else placeholder)

    return build


@_checks("param", "constant")
def _check_tensor_node(spec: dict[str, Any], where: str) -> None:
    check_keys(spec, ("kind", "parameter", "shape"), where)
    check_type(spec["parameter"], bool, f"{where}.parameter")
    check_shape(spec["shape"], f"{where}.shape")


@_writes(ModeSelect)
def _write_mode_select(module: ModeSelect) -> dict[str, Any]:
    return {"kind": MODE_SELECT}


@_checks(MODE_SELECT)
def _check_mode_select(spec: dict[str, Any], where: str) -> None:
    check_keys(spec, ("kind",), where)


@_builds(MODE_SELECT)
def _build_mode_select(spec: dict[str, Any]) -> nn.Module:
    return ModeSelect()


for _kind, _cls in (("param", ParameterNode), ("constant", ConstantNode)):
    _writes(_cls)(_tensor_node_writer(_kind))
    _builds(_kind)(_tensor_node_builder(_cls))


# ------------------------------------------------------------------------------------ pruned nn.MultiheadAttention
_ATTENTION_SIZES = ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "out_features")
_ATTENTION_FLAGS = ("qkv_same_embed_dim", "bias", "batch_first")


@_writes(PrunedMultiheadAttention)
def _write_pruned_attention(module: PrunedMultiheadAttention) -> dict[str, Any]:
    return {"kind": "pruned_multihead_attention", "config": module.sizes()}


@_checks("pruned_multihead_attention")
def _check_pruned_attention(spec: dict[str, Any], where: str) -> None:
    check_keys(spec, ("kind", "config"), where)
    config = check_keys(spec["config"], (*_ATTENTION_SIZES, *_ATTENTION_FLAGS, "dropout"), f"{where}.config")
    for name in _ATTENTION_SIZES:
        value = check_type(config[name], int, f"{where}.config.{name}")
        if not 0 < value < 2**31:
            raise fail(f"{where}.config.{name}", f"must be a positive size, found {value}")
    for name in _ATTENTION_FLAGS:
        check_type(config[name], bool, f"{where}.config.{name}")
    dropout = check_type(config["dropout"], (int, float), f"{where}.config.dropout")
    if not 0 <= dropout <= 1:
        raise fail(f"{where}.config.dropout", f"must lie in [0, 1], found {dropout}")


@_builds("pruned_multihead_attention")
def _build_pruned_attention(spec: dict[str, Any]) -> nn.Module:
    return PrunedMultiheadAttention.from_sizes(**spec["config"])
