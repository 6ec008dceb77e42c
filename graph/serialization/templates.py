"""JSON encoding of argument templates, ``meta`` values, guards and module configs (the table in ``docs/vnmodel.md``).

A JSON array is a tuple, a JSON object without ``$``-keys a str-keyed dict; every other value is an object tagged by
one ``$``-key. Encoders are registered per Python type, decoders per tag, so a new kind of value is one function.
"""
from __future__ import annotations

import base64
import collections
import importlib
import math
import sys
from functools import lru_cache
from typing import Any, Callable

import torch

from ..errors import FileFormatError
from ..ir import Ref, Struct, Sym
from ..registry import registers_in
from .validation import TAG_PREFIX, brief

_STRUCT_IMPORTABLE = ("collections", "torchvision", "transformers")


class TemplateEncoder:
    """Turns template values into JSON values; a tensor met inside a template goes into ``tensors``."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def encode(self, value: Any) -> Any:
        """The JSON value of ``value``; raises ``TypeError`` naming the type of anything it cannot store."""
        for cls in type(value).__mro__:
            encoder = _ENCODERS.get(cls)
            if encoder is not None:
                return encoder(value, self)
        raise TypeError(f"cannot save a value of type {type(value).__module__}.{type(value).__qualname__}: "
                        f"{brief(value)}")


class UnsavedValue:
    """Stands in, after loading, for a forward-argument default or input constant that no format can store.

    Replay never reads defaults, and compares a passed argument with the captured constant: a placeholder equals
    nothing, so passing that argument explicitly is refused instead of silently replaying with another value.
    """

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def encode_or_placeholder(value: Any, encoder: TemplateEncoder) -> Any:
    """``encoder.encode(value)``, or ``{"$unsaved": repr(value)}`` when the value cannot be stored."""
    try:
        return encoder.encode(value)
    except TypeError:
        return {"$unsaved": brief(value)}


class TemplateDecoder:
    """Turns JSON values back into template values; ``{"$tensor": name}`` reads ``tensors``."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def decode(self, value: Any) -> Any:
        """The template value of a JSON value; raises :class:`FileFormatError` for anything malformed."""
        if isinstance(value, list):
            return tuple(self.decode(v) for v in value)
        if isinstance(value, dict):
            tag = next((k for k in value if k.startswith(TAG_PREFIX)), None)
            if tag is None:
                return {k: self.decode(v) for k, v in value.items()}
            decoder = _DECODERS.get(tag[len(TAG_PREFIX):])
            if decoder is None:
                raise FileFormatError(f"unknown value tag {tag!r}")
            return decoder(value, self)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise FileFormatError(f"unexpected {type(value).__name__} in the graph spec")


# ---------------------------------------------------------------------------------------------------------- encoders
_ENCODERS: dict[type, Callable[[Any, TemplateEncoder], Any]] = {}
_encodes = registers_in(_ENCODERS)


@_encodes(type(None), bool)
def _encode_plain(value: Any, encoder: TemplateEncoder) -> Any:
    return value


@_encodes(int, str)
def _encode_int_or_str(value: Any, encoder: TemplateEncoder) -> Any:
    return int(value) if isinstance(value, int) else str(value)  # subclasses (IntEnum, str enums) become plain


@_encodes(float)
def _encode_float(value: float, encoder: TemplateEncoder) -> Any:
    return float(value) if math.isfinite(value) else {"$float": repr(float(value))}


@_encodes(complex)
def _encode_complex(value: complex, encoder: TemplateEncoder) -> Any:
    return {"$complex": [encoder.encode(value.real), encoder.encode(value.imag)]}


@_encodes(bytes)
def _encode_bytes(value: bytes, encoder: TemplateEncoder) -> Any:
    return {"$bytes": base64.b64encode(value).decode("ascii")}


@_encodes(tuple)
def _encode_tuple(value: tuple, encoder: TemplateEncoder) -> Any:
    return [encoder.encode(v) for v in value]


@_encodes(list)
def _encode_list(value: list, encoder: TemplateEncoder) -> Any:
    return {"$list": [encoder.encode(v) for v in value]}


@_encodes(dict)
def _encode_dict(value: dict, encoder: TemplateEncoder) -> Any:
    if all(isinstance(k, str) and not k.startswith(TAG_PREFIX) for k in value):
        return {k: encoder.encode(v) for k, v in value.items()}
    return {"$dict": [[encoder.encode(k), encoder.encode(v)] for k, v in value.items()]}


@_encodes(Ref)
def _encode_ref(value: Ref, encoder: TemplateEncoder) -> Any:
    return {"$ref": [value.index, encoder.encode(tuple(value.path))]}


@_encodes(Sym)
def _encode_sym(value: Sym, encoder: TemplateEncoder) -> Any:
    return {"$sym": encoder.encode(value.expr)}


@_encodes(Struct)
def _encode_struct(value: Struct, encoder: TemplateEncoder) -> Any:
    if not _allowed_struct(value.cls):
        raise TypeError(f"cannot save structured value of class {value.cls.__qualname__}: loading rebuilds only "
                        "named tuples, OrderedDict and transformers ModelOutput classes")
    kind = "namedtuple" if issubclass(value.cls, tuple) else "mapping"
    return {"$struct": f"{value.cls.__module__}:{value.cls.__qualname__}", "kind": kind,
            "fields": encoder.encode(dict(value.fields))}


@_encodes(slice)
def _encode_slice(value: slice, encoder: TemplateEncoder) -> Any:
    return {"$slice": [encoder.encode(v) for v in (value.start, value.stop, value.step)]}


@_encodes(type(Ellipsis))
def _encode_ellipsis(value: Any, encoder: TemplateEncoder) -> Any:
    return {"$ellipsis": None}


@_encodes(torch.dtype, torch.memory_format, torch.layout)
def _encode_torch_constant(value: Any, encoder: TemplateEncoder) -> Any:
    return {f"${_TORCH_CONSTANT_TAGS[type(value)]}": str(value).removeprefix("torch.")}


@_encodes(torch.device)
def _encode_device(value: torch.device, encoder: TemplateEncoder) -> Any:
    return {"$device": str(value)}


@_encodes(torch.Tensor)
def _encode_tensor(value: torch.Tensor, encoder: TemplateEncoder) -> Any:
    name = f"templates.{len(encoder.tensors)}"
    encoder.tensors[name] = value.detach()
    return {"$tensor": name}


# ---------------------------------------------------------------------------------------------------------- decoders
_DECODERS: dict[str, Callable[[dict, TemplateDecoder], Any]] = {}
_TORCH_CONSTANT_TAGS = {torch.dtype: "dtype", torch.memory_format: "memory_format", torch.layout: "layout"}
_decodes = registers_in(_DECODERS)


def _payload(value: dict, tag: str, kind: type | tuple[type, ...], length: int | None = None) -> Any:
    payload = value[f"${tag}"]
    if not isinstance(payload, kind) or (length is not None and len(payload) != length):
        raise FileFormatError(f"malformed ${tag} value {brief(payload)}")
    return payload


@_decodes("float")
def _decode_float(value: dict, decoder: TemplateDecoder) -> float:
    text = _payload(value, "float", str)
    if text not in ("nan", "inf", "-inf"):
        raise FileFormatError(f"malformed $float value {text!r}")
    return float(text)


@_decodes("complex")
def _decode_complex(value: dict, decoder: TemplateDecoder) -> complex:
    real, imag = (decoder.decode(v) for v in _payload(value, "complex", list, 2))
    return complex(real, imag)


@_decodes("bytes")
def _decode_bytes(value: dict, decoder: TemplateDecoder) -> bytes:
    try:
        return base64.b64decode(_payload(value, "bytes", str), validate=True)
    except ValueError as error:
        raise FileFormatError(f"malformed $bytes value: {error}") from None


@_decodes("list")
def _decode_list(value: dict, decoder: TemplateDecoder) -> list:
    return [decoder.decode(v) for v in _payload(value, "list", list)]


@_decodes("dict")
def _decode_dict(value: dict, decoder: TemplateDecoder) -> dict:
    items = _payload(value, "dict", list)
    if not all(isinstance(item, list) and len(item) == 2 for item in items):
        raise FileFormatError("malformed $dict value: expected [key, value] pairs")
    return {decoder.decode(k): decoder.decode(v) for k, v in items}


@_decodes("ref")
def _decode_ref(value: dict, decoder: TemplateDecoder) -> Ref:
    index, path = _payload(value, "ref", list, 2)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise FileFormatError(f"malformed $ref index {index!r}")
    path = decoder.decode(path)
    if not isinstance(path, tuple):
        raise FileFormatError(f"malformed $ref path {path!r}")
    return Ref(index, path)


@_decodes("sym")
def _decode_sym(value: dict, decoder: TemplateDecoder) -> Sym:
    return Sym(decoder.decode(value["$sym"]))


@_decodes("struct")
def _decode_struct(value: dict, decoder: TemplateDecoder) -> Struct:
    name = _payload(value, "struct", str)
    kind = value.get("kind")
    fields = decoder.decode(value.get("fields"))
    if kind not in ("namedtuple", "mapping") or not isinstance(fields, dict):
        raise FileFormatError(f"malformed $struct value for {name!r}")
    return Struct(struct_class(name, kind, tuple(fields)), fields)


@_decodes("slice")
def _decode_slice(value: dict, decoder: TemplateDecoder) -> slice:
    return slice(*(decoder.decode(v) for v in _payload(value, "slice", list, 3)))


@_decodes("ellipsis")
def _decode_ellipsis(value: dict, decoder: TemplateDecoder) -> Any:
    return Ellipsis


def _torch_constant_decoder(tag: str, cls: type) -> Callable[[dict, TemplateDecoder], Any]:
    def decode(value: dict, decoder: TemplateDecoder) -> Any:
        name = _payload(value, tag, str)
        constant = getattr(torch, name, None)
        if not isinstance(constant, cls):
            raise FileFormatError(f"unknown torch {tag} {name!r}")
        return constant

    return decode


for _cls, _tag in _TORCH_CONSTANT_TAGS.items():
    _decodes(_tag)(_torch_constant_decoder(_tag, _cls))


@_decodes("device")
def _decode_device(value: dict, decoder: TemplateDecoder) -> torch.device:
    try:
        return torch.device(_payload(value, "device", str))
    except RuntimeError as error:
        raise FileFormatError(f"malformed $device value: {error}") from None


@_decodes("unsaved")
def _decode_unsaved(value: dict, decoder: TemplateDecoder) -> UnsavedValue:
    return UnsavedValue(_payload(value, "unsaved", str))


@_decodes("tensor")
def _decode_tensor(value: dict, decoder: TemplateDecoder) -> torch.Tensor:
    name = _payload(value, "tensor", str)
    if name not in decoder.tensors:
        raise FileFormatError(f"missing tensor {name!r} used in a template")
    return decoder.tensors[name]


# ---------------------------------------------------------------------------------------------------- struct classes
def struct_class(name: str, kind: str, field_names: tuple[str, ...]) -> type:
    """The class a stored ``"module:qualname"`` names, if allowed; a stand-in when it cannot be found.

    Only ``collections.OrderedDict``, tuple subclasses with ``_fields`` and ``transformers`` ``ModelOutput``
    subclasses are accepted; modules are imported only under ``collections``, ``torchvision`` and ``transformers``.
    A class that cannot be found becomes a ``namedtuple`` with the stored fields, or ``dict`` for a mapping.
    """
    module_name, _, qualname = name.partition(":")
    if not module_name or not qualname:
        raise FileFormatError(f"malformed struct class name {name!r} (expected 'module:qualname')")
    cls = _find_class(module_name, qualname)
    if cls is None:
        return _stand_in(qualname.rsplit(".", 1)[-1], kind, field_names)
    if not _allowed_struct(cls):
        raise FileFormatError(f"struct class {name!r} is not allowed: only OrderedDict, named tuples and "
                              "transformers ModelOutput classes are rebuilt")
    return cls


def _find_class(module_name: str, qualname: str) -> Any:
    try:
        module = sys.modules.get(module_name)
        if module is None and module_name.split(".", 1)[0] in _STRUCT_IMPORTABLE:
            module = importlib.import_module(module_name)
        value: Any = module
        for part in qualname.split(".") if module is not None else ():
            value = getattr(value, part, None)
        return value
    except Exception:  # noqa: BLE001 - a lazy package (transformers) raises anything for a name it cannot import
        return None


def _allowed_struct(cls: Any) -> bool:
    if not isinstance(cls, type):
        return False
    if cls is collections.OrderedDict or (issubclass(cls, tuple) and hasattr(cls, "_fields")):
        return True
    transformers_utils = sys.modules.get("transformers.utils")  # loaded whenever a ModelOutput class exists
    return transformers_utils is not None and issubclass(cls, transformers_utils.ModelOutput)


@lru_cache(maxsize=None)
def _stand_in(typename: str, kind: str, field_names: tuple[str, ...]) -> type:
    if kind == "mapping":
        return dict
    try:
        return collections.namedtuple(typename, field_names)
    except ValueError as error:
        raise FileFormatError(f"cannot rebuild named tuple {typename!r}: {error}") from None
