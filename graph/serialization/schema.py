"""The schema of a graph spec (``docs/vnmodel.md``), checked before anything is decoded or built.

One checker per top-level key, per node field and per known ``meta`` key (registries, so a new key is one function).
``meta`` keys without a checker of their own may hold any template value, so passes that record new facts on nodes
keep round-tripping; the known ones are type-checked because replay and analysis read them.
"""
from __future__ import annotations

from keyword import iskeyword
from typing import Any, Callable

import torch.nn as nn

from ..errors import FileFormatError
from ..registry import registers_in
from .module_specs import check_module_spec
from .validation import (DTYPE_NAMES, brief, check_keys, check_name, check_hashable, check_shape, check_str_mapping,
                         check_template, check_type, expression_bits, fail, is_int, tag_of)

FORMAT_NAME = "reconstructed-network"
FORMAT_VERSION = 2
Checker = Callable[[Any, str], None]
_SPEC_KEYS: dict[str, Checker] = {}
_NODE_KEYS: dict[str, Checker] = {}
_META_KEYS: dict[str, Checker] = {}
_spec_key = registers_in(_SPEC_KEYS)
_node_key = registers_in(_NODE_KEYS)
_meta_key = registers_in(_META_KEYS)
_PARAMETER_KINDS = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD", "VAR_POSITIONAL", "KEYWORD_ONLY", "VAR_KEYWORD")
_TENSOR_ROLES = ("parameter", "buffer", "template")
_MODULE_DICT_ATTRIBUTES = frozenset(dir(nn.ModuleDict()))


def check_spec(spec: Any) -> None:
    """Raise :class:`FileFormatError` naming the first part of ``spec`` that does not follow the schema."""
    check_keys(spec, tuple(_SPEC_KEYS), "the graph spec")
    for key, checker in _SPEC_KEYS.items():
        checker(spec[key], key)


def check_format_version(version: Any) -> None:
    """Refuse a version other than :data:`FORMAT_VERSION`, saying what the reader knows."""
    if version == FORMAT_VERSION and is_int(version):
        return
    if version == 1 and is_int(version):
        raise FileFormatError("format version 1 has no digest over the whole file and is no longer read; load it with "
                              "the release that wrote it and save it again")
    raise FileFormatError(f"unknown format version {brief(version)} (this reader knows version {FORMAT_VERSION})")


# ------------------------------------------------------------------------------------------------ top-level keys
@_spec_key("format")
def _format(value: Any, where: str) -> None:
    if value != FORMAT_NAME:
        raise FileFormatError(f"not a saved network: format is {brief(value)}, expected {FORMAT_NAME!r}")


@_spec_key("version")
def _version(value: Any, where: str) -> None:
    check_format_version(value)


@_spec_key("signature")
def _signature(value: Any, where: str) -> None:
    for i, entry in enumerate(check_type(value, list, where)):
        here = f"{where}[{i}]"
        check_keys(entry, ("name", "kind"), here, optional=("default",))
        if not (isinstance(entry["name"], str) and entry["name"].isidentifier() and not iskeyword(entry["name"])):
            raise fail(here, f"parameter name {brief(entry['name'])} is not an identifier")
        if entry["kind"] not in _PARAMETER_KINDS:
            raise fail(here, f"unknown parameter kind {brief(entry['kind'])}")
        if "default" in entry:
            check_template(entry["default"], f"{here}.default")


@_spec_key("captured_training", "training")
def _flag(value: Any, where: str) -> None:
    check_type(value, bool, where)


@_spec_key("input_constants")
def _input_constants(value: Any, where: str) -> None:
    for i, entry in enumerate(check_type(value, list, where)):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list) and entry[0]):
            raise fail(f"{where}[{i}]", f"expected [path, value], found {brief(entry)}")
        _check_path(entry[0], f"{where}[{i}][0]")
        check_template(entry[1], f"{where}[{i}][1]")


@_spec_key("guards")
def _guards(value: Any, where: str) -> None:
    for i, entry in enumerate(check_type(value, list, where)):
        here = f"{where}[{i}]"
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], (str, type(None)))):
            raise fail(here, f"expected [expression, value, source], found {brief(entry)}")
        if not isinstance(entry[0], list):
            raise fail(here, f"a guard checks an expression (an array), found {brief(entry[0])}")
        expression_bits(entry[0], f"{here}[0]")
        check_template(entry[1], f"{here}[1]")
        check_hashable(entry[1], f"{here}[1]")


@_spec_key("output_template")
def _output_template(value: Any, where: str) -> None:
    check_template(value, where)


@_spec_key("nodes")
def _nodes(value: Any, where: str) -> None:
    for i, node in enumerate(check_type(value, list, where)):
        here = f"{where}[{i}]"
        check_keys(node, tuple(_NODE_KEYS), here)
        for key, checker in _NODE_KEYS.items():
            checker(node[key], f"{here}.{key}")
        if node["op"] == "input" and "path" not in node["meta"]:
            raise fail(here, "an input node needs meta.path, the argument it is bound to")


@_spec_key("modules")
def _modules(value: Any, where: str) -> None:
    check_type(value, dict, where)
    for key, spec in value.items():
        if not key or "." in key or key in _MODULE_DICT_ATTRIBUTES:
            raise fail(where, f"{brief(key)} cannot name a module (empty, dotted or an attribute of nn.ModuleDict)")
        check_module_spec(spec, f"{where}.{key}")


@_spec_key("tensors")
def _tensors(value: Any, where: str) -> None:
    check_type(value, dict, where)
    for name, entry in value.items():
        here = f"{where}.{name}"
        check_name(name, here)
        check_keys(entry, ("role", "requires_grad"), here, optional=("same_as",))
        if entry["role"] not in _TENSOR_ROLES:
            raise fail(here, f"unknown tensor role {brief(entry['role'])}")
        check_type(entry["requires_grad"], bool, f"{here}.requires_grad")
        if "same_as" in entry:
            check_name(entry["same_as"], f"{here}.same_as")


# ---------------------------------------------------------------------------------------------------- node fields
@_node_key("name", "op")
def _node_name(value: Any, where: str) -> None:
    check_name(value, where)


@_node_key("key")
def _node_key_field(value: Any, where: str) -> None:
    if value is not None:
        check_name(value, where)


@_node_key("args")
def _node_args(value: Any, where: str) -> None:
    check_template(check_type(value, list, where), where)


@_node_key("kwargs")
def _node_kwargs(value: Any, where: str) -> None:
    check_type(value, dict, where)
    if tag_of(value, where) is not None:
        raise fail(where, "keyword arguments are a plain object with string keys")
    check_template(value, where)


@_node_key("source")
def _node_source(value: Any, where: str) -> None:
    check_type(value, (str, type(None)), where)


@_node_key("meta")
def _node_meta(value: Any, where: str) -> None:
    check_str_mapping(value, where)
    items = value["$dict"] if tag_of(value, where) == "$dict" else value.items()
    for key, item in items:
        checker = _META_KEYS.get(key)
        if checker is not None:
            checker(item, f"{where}.{key}")


# ----------------------------------------------------------------------------------------------------- meta keys
@_meta_key("out")
def _meta_out(value: Any, where: str, depth: int = 0) -> None:
    """Output shapes: a shape (array of sizes) per tensor, ``$list``/objects mirroring containers, null otherwise."""
    if depth > 32:
        raise fail(where, "output shapes nested too deeply")
    if value is None:
        return
    if isinstance(value, list):
        check_shape(value, where)
        return
    check_type(value, dict, where)
    tag = tag_of(value, where)
    if tag == "$list":
        items = enumerate(check_type(value["$list"], list, where))
    elif tag is None:
        items = value.items()
    elif tag == "$dict":
        check_template(value, where)
        items = enumerate(item[1] for item in value["$dict"])
    else:
        raise fail(where, f"expected output shapes, found a {tag} value")
    for key, item in items:
        _meta_out(item, f"{where}[{key!r}]", depth + 1)


@_meta_key("dtype")
def _meta_dtype(value: Any, where: str) -> None:
    if not isinstance(value, str) or value not in DTYPE_NAMES:
        raise fail(where, f"unknown dtype {brief(value)}")


@_meta_key("no_grad")
def _meta_flag(value: Any, where: str) -> None:
    check_type(value, bool, where)


@_meta_key("path")
def _meta_path(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise fail(where, f"expected a non-empty argument path, found {brief(value)}")
    _check_path(value, where)


def _check_path(value: list, where: str) -> None:
    if not isinstance(value[0], str):
        raise fail(where, f"an argument path starts with a parameter name, found {brief(value)}")
    check_template(value, where)
    check_hashable(value, where)
