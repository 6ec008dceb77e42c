"""Schema checks for the JSON values of a graph spec, run before anything is decoded or built.

Each checker takes the parsed JSON value and ``where`` (a path such as ``nodes[3].kwargs.stride``) and raises
:class:`FileFormatError` naming it; none decodes, imports or allocates. Templates follow the grammar of
``docs/vnmodel.md`` (one checker per ``$``-tag); symbolic expressions (``$sym`` and guards) must use the heads that
:func:`graph.symbolic.evaluate` knows, with the right number of operands, and every number they can compute is bounded
(:data:`MAX_EXPRESSION_BITS`), so a crafted ``["pow", 7, 10**8]`` is refused at load instead of burning CPU at replay.
"""
from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Callable

import torch

from ..errors import FileFormatError
from ..registry import registers_in

TAG_PREFIX = "$"
MAX_DEPTH = 100
MAX_DIM = 2**48
MAX_ELEMENTS = 2**48
MAX_NODE_INDEX = 2**31
MAX_EXPRESSION_BITS = 4096
BY_MODE = "by_mode"  # a whole $sym choosing a template by mode (graph.modes); replay fills in only the chosen one
_DEVICE = re.compile(r"[a-z][a-z0-9_]{0,31}(:[0-9]{1,5})?")
_FLOAT_NAMES = ("nan", "inf", "-inf")
_TORCH_CONSTANTS = {tag: frozenset(name for name in dir(torch) if isinstance(getattr(torch, name, None), cls))
                    for tag, cls in (("dtype", torch.dtype), ("memory_format", torch.memory_format),
                                     ("layout", torch.layout))}
DTYPE_NAMES = _TORCH_CONSTANTS["dtype"]


def fail(where: str, problem: str) -> FileFormatError:
    """The error for a malformed value: ``where: problem``."""
    return FileFormatError(f"{where}: {problem}")


def brief(value: Any) -> str:
    """A short repr of a JSON value for error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------------------------------ primitives
def is_int(value: Any) -> bool:
    """True for a JSON integer (``bool`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a JSON integer or float (``bool`` is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_type(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    """``value`` if it is of the JSON type ``kind`` (``int`` excludes ``bool``), else :class:`FileFormatError`."""
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                  else (kind,))):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise fail(where, f"expected {names}, found {brief(value)}")
    return value


def check_keys(value: Any, required: tuple[str, ...], where: str, optional: tuple[str, ...] = ()) -> dict:
    """``value`` if it is a JSON object with all ``required`` keys and no key outside ``required + optional``."""
    check_type(value, dict, where)
    missing = [key for key in required if key not in value]
    if missing:
        raise fail(where, f"missing key {missing[0]!r}")
    extra = [key for key in value if key not in required and key not in optional]
    if extra:
        raise fail(where, f"unexpected key {brief(extra[0])}")
    return value


def check_shape(value: Any, where: str) -> tuple[int, ...]:
    """A tensor shape: a list of at most 64 dimensions in ``[0, MAX_DIM)`` holding fewer than ``MAX_ELEMENTS``."""
    if not isinstance(value, list) or len(value) > 64 or not all(is_int(d) and 0 <= d < MAX_DIM for d in value):
        raise fail(where, f"malformed tensor shape {brief(value)}")
    elements = 1
    for dim in value:
        elements *= dim or 1
    if elements >= MAX_ELEMENTS:
        raise fail(where, f"tensor shape {brief(value)} has too many elements")
    return tuple(value)


def check_name(value: Any, where: str) -> str:
    """A non-empty string of at most 1000 characters (node, tensor and module names)."""
    if not isinstance(value, str) or not 0 < len(value) <= 1000:
        raise fail(where, f"expected a name (a non-empty string), found {brief(value)}")
    return value


def tag_of(value: dict, where: str) -> str | None:
    """The ``$``-tag of a JSON object (``None`` for a plain object); refuses objects with several tags."""
    tags = [key for key in value if key.startswith(TAG_PREFIX)]
    if len(tags) > 1:
        raise fail(where, f"an object may carry one $-tag, found {brief(tags)}")
    return tags[0] if tags else None


# ------------------------------------------------------------------------------------------------------- templates
TagChecker = Callable[[dict, str, int], None]
_TAGS: dict[str, TagChecker] = {}
_checks_tag = registers_in(_TAGS)
_CONSTANT_TAGS = {"$float", "$complex", "$dtype", "$device", "$memory_format", "$layout", "$ref"}
_HASHABLE_TAGS = {"$float", "$complex", "$bytes", "$ref", "$sym", "$ellipsis", "$dtype", "$memory_format",
                  "$layout", "$device", "$tensor", "$unsaved"}


def check_template(value: Any, where: str, depth: int = 0) -> None:
    """A template value: plain JSON, arrays (tuples) and objects of templates, or one registered ``$``-tag."""
    if depth > MAX_DEPTH:
        raise fail(where, f"nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_template(item, f"{where}[{i}]", depth + 1)
        return
    if not isinstance(value, dict):
        raise fail(where, f"unexpected {type(value).__name__} value")
    tag = tag_of(value, where)
    if tag is None:
        for key, item in value.items():
            check_template(item, f"{where}.{key}", depth + 1)
        return
    checker = _TAGS.get(tag)
    if checker is None:
        raise fail(where, f"unknown value tag {brief(tag)}")
    if tag != "$struct" and len(value) != 1:
        raise fail(where, f"a {tag} object has no other keys")
    checker(value, f"{where}.{tag}", depth + 1)


def check_str_mapping(value: Any, where: str, depth: int = 0) -> None:
    """A template that decodes to a ``dict`` with string keys (a plain object, or ``$dict`` with string keys)."""
    check_type(value, dict, where)
    tag = tag_of(value, where)
    if tag not in (None, "$dict"):
        raise fail(where, f"expected an object with string keys, found a {tag} value")
    check_template(value, where, depth)
    if tag == "$dict" and not all(isinstance(key, str) for key, _ in value["$dict"]):
        raise fail(where, "expected an object with string keys")


def check_hashable(value: Any, where: str) -> None:
    """A template that decodes to a hashable value (a dict key, a guard's value)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_hashable(item, f"{where}[{i}]")
    elif isinstance(value, dict) and (tag_of(value, where) not in _HASHABLE_TAGS):
        raise fail(where, "a dictionary key must be hashable (not a list, dict, slice or struct)")


@_checks_tag("$float")
def _float(value: dict, where: str, depth: int) -> None:
    if value["$float"] not in _FLOAT_NAMES:
        raise fail(where, f"expected one of {_FLOAT_NAMES}, found {brief(value['$float'])}")


@_checks_tag("$complex")
def _complex(value: dict, where: str, depth: int) -> None:
    payload = value["$complex"]
    if not (isinstance(payload, list) and len(payload) == 2 and all(
            is_number(v) or (isinstance(v, dict) and set(v) == {"$float"} and v["$float"] in _FLOAT_NAMES)
            for v in payload)):
        raise fail(where, f"expected [real, imaginary] numbers, found {brief(payload)}")


@_checks_tag("$bytes")
def _bytes(value: dict, where: str, depth: int) -> None:
    try:
        base64.b64decode(check_type(value["$bytes"], str, where), validate=True)
    except (binascii.Error, ValueError) as error:
        raise fail(where, f"malformed base64: {error}") from None


@_checks_tag("$list")
def _list(value: dict, where: str, depth: int) -> None:
    check_template(check_type(value["$list"], list, where), where, depth)


@_checks_tag("$dict")
def _dict(value: dict, where: str, depth: int) -> None:
    for i, item in enumerate(check_type(value["$dict"], list, where)):
        if not (isinstance(item, list) and len(item) == 2):
            raise fail(f"{where}[{i}]", f"expected a [key, value] pair, found {brief(item)}")
        check_template(item[0], f"{where}[{i}][0]", depth + 1)
        check_hashable(item[0], f"{where}[{i}][0]")
        check_template(item[1], f"{where}[{i}][1]", depth + 1)


@_checks_tag("$ref")
def _ref(value: dict, where: str, depth: int) -> None:
    payload = value["$ref"]
    if not (isinstance(payload, list) and len(payload) == 2 and is_int(payload[0])
            and 0 <= payload[0] < MAX_NODE_INDEX and isinstance(payload[1], list) and len(payload[1]) <= 16
            and all(is_int(p) or isinstance(p, str) for p in payload[1])):
        raise fail(where, f"expected [node index, [path of ints and strings]], found {brief(payload)}")


@_checks_tag("$sym")
def _sym(value: dict, where: str, depth: int) -> None:
    payload = value["$sym"]
    if isinstance(payload, list) and payload[:1] == [BY_MODE]:
        if len(payload) != 3:
            raise fail(where, f"{BY_MODE!r} takes a template for each mode, found {len(payload) - 1}")
        check_template(payload[1:], where, depth)
        return
    expression_bits(payload, where, depth)


@_checks_tag("$struct")
def _struct(value: dict, where: str, depth: int) -> None:
    check_keys(value, ("$struct", "kind", "fields"), where.removesuffix(".$struct"))
    name = check_type(value["$struct"], str, where)
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.<>]*", name):
        raise fail(where, f"malformed class name {brief(name)} (expected 'module:qualname')")
    if value["kind"] not in ("namedtuple", "mapping"):
        raise fail(where, f"unknown struct kind {brief(value['kind'])}")
    check_str_mapping(value["fields"], f"{where}.fields", depth)


@_checks_tag("$slice")
def _slice(value: dict, where: str, depth: int) -> None:
    payload = value["$slice"]
    if not (isinstance(payload, list) and len(payload) == 3):
        raise fail(where, f"expected [start, stop, step], found {brief(payload)}")
    check_template(payload, where, depth)


@_checks_tag("$ellipsis")
def _ellipsis(value: dict, where: str, depth: int) -> None:
    if value["$ellipsis"] is not None:
        raise fail(where, "expected null")


def _torch_constant_checker(tag: str) -> TagChecker:
    def check(value: dict, where: str, depth: int) -> None:
        if not isinstance(value[f"${tag}"], str) or value[f"${tag}"] not in _TORCH_CONSTANTS[tag]:
            raise fail(where, f"unknown torch {tag} {brief(value[f'${tag}'])}")

    return check


for _tag in _TORCH_CONSTANTS:
    _checks_tag(f"${_tag}")(_torch_constant_checker(_tag))


@_checks_tag("$device")
def _device(value: dict, where: str, depth: int) -> None:
    text = value["$device"]
    if not (isinstance(text, str) and _DEVICE.fullmatch(text)):
        raise fail(where, f"malformed device {brief(text)}")
    try:
        torch.device(text)
    except RuntimeError as error:
        raise fail(where, f"malformed device {brief(text)}: {str(error).splitlines()[0]}") from None


@_checks_tag("$unsaved", "$tensor")
def _text(value: dict, where: str, depth: int) -> None:
    check_type(next(iter(value.values())), str, where)


# ----------------------------------------------------------------------------------------------------- expressions
BitBound = Callable[[list[int], list[Any]], int]
EXPRESSION_HEADS: dict[str, tuple[int | None, BitBound]] = {}
"""Head -> (number of operands or ``None`` for any, bound on the bits of the result from the operands' bounds)."""


def _head(*names: str, operands: int | None) -> Callable[[BitBound], BitBound]:
    def register(bound: BitBound) -> BitBound:
        for name in names:
            EXPRESSION_HEADS[name] = (operands, bound)
        return bound

    return register


def _constant_exponent(operand: Any, bits: int) -> int:
    """An upper bound of ``|operand|`` as an int: the constant itself, else ``2**bits``."""
    if is_number(operand):
        return int(abs(operand)) + 1
    return 2 ** min(bits, 64)


@_head("size", operands=2)
def _size_bits(bits: list[int], operands: list[Any]) -> int:
    return 63


@_head("item", operands=1)
def _item_bits(bits: list[int], operands: list[Any]) -> int:
    return 64


@_head("training", "device", operands=0)
def _flag_bits(bits: list[int], operands: list[Any]) -> int:
    return 1


@_head("tuple", operands=None)
@_head("if_training", operands=2)
@_head("max", "min", "floordiv", "mod", "truediv", "rshift", operands=2)
@_head("neg", "abs", "int", "float", "sqrt", "ceil", "floor", operands=1)
def _largest_operand_bits(bits: list[int], operands: list[Any]) -> int:
    return max(bits, default=1)


@_head("add", "sub", "and", "or", operands=2)
def _sum_bits(bits: list[int], operands: list[Any]) -> int:
    return max(bits) + 1


@_head("mul", operands=2)
def _product_bits(bits: list[int], operands: list[Any]) -> int:
    return bits[0] + bits[1]


@_head("lshift", operands=2)
def _shift_bits(bits: list[int], operands: list[Any]) -> int:
    return bits[0] + _constant_exponent(operands[1], bits[1])


@_head("pow", operands=2)
def _power_bits(bits: list[int], operands: list[Any]) -> int:
    return bits[0] * _constant_exponent(operands[1], bits[1])


@_head("eq", "ne", "lt", "le", "gt", "ge", operands=2)
@_head("bool", operands=1)
def _truth_bits(bits: list[int], operands: list[Any]) -> int:
    return 1


def expression_bits(expr: Any, where: str, depth: int = 0) -> int:
    """Check a symbolic expression and return an upper bound of the bits of any integer it can evaluate to.

    An expression is a constant (any non-array template) or ``[head, operand, ...]`` with a head of
    :data:`EXPRESSION_HEADS`; ``size`` and ``item`` read a ``$ref``, ``size`` a dimension index in ``[-64, 64)``.
    """
    if depth > MAX_DEPTH:
        raise fail(where, f"expression nested more than {MAX_DEPTH} levels deep")
    if not isinstance(expr, list):
        if isinstance(expr, dict) and tag_of(expr, where) not in _CONSTANT_TAGS:
            raise fail(where, f"an expression operand is a number, a string or a tagged scalar, found {brief(expr)}")
        check_template(expr, where, depth)
        return max(abs(expr).bit_length(), 1) if is_int(expr) else 64
    if not expr or not isinstance(expr[0], str) or expr[0] not in EXPRESSION_HEADS:
        raise fail(where, f"unknown expression head {brief(expr[0] if expr else expr)} (known: "
                          f"{', '.join(sorted(EXPRESSION_HEADS))})")
    head, operands = expr[0], expr[1:]
    count, bound = EXPRESSION_HEADS[head]
    if count is not None and len(operands) != count:
        raise fail(where, f"{head!r} takes {count} operands, found {len(operands)}")
    if head in ("size", "item"):
        reference = operands[0]
        if not (isinstance(reference, dict) and set(reference) == {"$ref"}):
            raise fail(where, f"{head!r} reads a node output ($ref), found {brief(reference)}")
        _ref(reference, f"{where}[1]", depth + 1)
        if head == "size" and not (is_int(operands[1]) and -64 <= operands[1] < 64):
            raise fail(where, f"'size' needs a dimension index in [-64, 64), found {brief(operands[1])}")
        return bound([], operands)
    bits = [expression_bits(operand, f"{where}[{i + 1}]", depth + 1) for i, operand in enumerate(operands)]
    result = bound(bits, operands)
    if result > MAX_EXPRESSION_BITS:
        raise fail(where, f"expression {brief(expr)} can compute a number of up to {result} bits (the limit is "
                          f"{MAX_EXPRESSION_BITS})")
    return result
