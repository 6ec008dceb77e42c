"""The allow-list of torch functions a graph may call, and how each one is treated during capture.

Every torch function, ``torch.nn.functional`` function and ``Tensor`` method or property gets a stable qualified
name (``torch.cat``, ``torch.nn.functional.relu``, ``Tensor.view``, ``Tensor.T``). Capture records ops by that
name; replay and file loading resolve names back through this table only, so a file can never name an arbitrary
callable. Functions with side effects outside the tensor they return (file I/O, global settings) are excluded.
"""
from __future__ import annotations

import inspect
import operator
import re
from enum import Enum
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn.functional as F


class OpKind(Enum):
    """How capture treats a call: record it, read sizes symbolically, pass metadata through, or refuse it."""

    RECORD = "record"
    SIZE = "size"
    METADATA = "metadata"
    DATA_TO_PYTHON = "data_to_python"


_NAMESPACES = (
    ("torch.nn.functional", F),
    ("torch", torch),
    ("torch.special", torch.special),
    ("torch.linalg", torch.linalg),
    ("torch.fft", torch.fft),
)
_UNSAFE = re.compile(
    r"(save|load|from_file|^set_|_set_|seed|compile|hub|export|register|share_memory|pin_memory|"
    r"storage|untyped|record_stream|backward|^__reduce|__setstate__|__getstate__|__deepcopy__|vmap|cond$|"
    r"while_loop|use_deterministic|^_)"
)
_ALLOWED_DUNDERS = {
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__", "__idiv__", "__floordiv__",
    "__rfloordiv__", "__ifloordiv__", "__mod__", "__rmod__", "__imod__", "__pow__", "__rpow__", "__ipow__",
    "__matmul__", "__rmatmul__", "__neg__", "__pos__", "__abs__", "__invert__", "__and__", "__rand__", "__iand__",
    "__or__", "__ror__", "__ior__", "__xor__", "__rxor__", "__ixor__", "__lshift__", "__rshift__",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__getitem__", "__setitem__",
}
_SIZE = {"Tensor.size", "Tensor.shape", "Tensor.__len__", "Tensor.numel", "torch.numel"}
_METADATA = {
    "Tensor.dim", "Tensor.ndim", "Tensor.ndimension", "Tensor.dtype", "Tensor.device", "Tensor.is_cuda",
    "Tensor.is_floating_point", "Tensor.is_complex", "Tensor.is_contiguous", "Tensor.requires_grad",
    "Tensor.is_leaf", "Tensor.layout", "Tensor.get_device", "Tensor.element_size", "Tensor.is_sparse",
    "Tensor.stride", "Tensor.names", "Tensor.__repr__", "Tensor.__str__", "Tensor.__format__", "Tensor.__hash__",
    "Tensor.data_ptr", "Tensor.storage_offset", "Tensor.is_quantized", "Tensor.is_meta", "Tensor.is_nested",
    "Tensor.grad_fn", "Tensor.is_inference", "Tensor.has_names", "Tensor.is_mkldnn", "Tensor.is_mps",
    "Tensor.is_xpu", "Tensor.is_cpu", "Tensor.itemsize", "Tensor.nbytes", "Tensor.type", "Tensor.is_signed",
    "Tensor.grad", "Tensor.output_nr", "Tensor._version", "Tensor.is_sparse_csr", "Tensor.retains_grad",
    "Tensor.register_hook", "Tensor.retain_grad", "Tensor.__dir__", "Tensor.__sizeof__",
    "torch.is_tensor", "torch.is_floating_point", "torch.is_complex", "torch.is_storage",
    "torch.get_default_dtype", "torch.is_grad_enabled", "torch.is_autocast_enabled", "torch.result_type",
    "torch.promote_types", "torch.can_cast",
}
_DATA_TO_PYTHON = {
    "Tensor.item", "Tensor.tolist", "Tensor.__bool__", "Tensor.__int__", "Tensor.__float__", "Tensor.__index__",
    "Tensor.__complex__", "Tensor.numpy", "Tensor.__array__", "Tensor.__contains__", "Tensor.equal",
    "torch.equal", "torch.is_nonzero", "Tensor.is_nonzero", "torch.allclose", "Tensor.allclose",
}


def _static_tensor_attrs() -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for cls in reversed(torch.Tensor.__mro__):
        attrs.update(vars(cls))
    return attrs


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[int, str], dict[str, Callable], set[str]]:
    """(id of callable -> name, name -> replay callable, names of property getters)."""
    by_id: dict[int, str] = {}
    by_name: dict[str, Callable] = {}
    getters: set[str] = set()
    for prefix, namespace in _NAMESPACES:
        for attr in dir(namespace):
            if attr.startswith("_") and attr not in ("_assert",):
                continue
            obj = getattr(namespace, attr, None)
            if obj is None or isinstance(obj, type) or inspect.ismodule(obj) or not callable(obj):
                continue
            name = f"{prefix}.{attr}"
            by_id.setdefault(id(obj), name)
            by_name.setdefault(name, obj)
    for attr, raw in _static_tensor_attrs().items():
        if attr.startswith("__") and attr not in _ALLOWED_DUNDERS and f"Tensor.{attr}" not in (
            _SIZE | _METADATA | _DATA_TO_PYTHON
        ):
            continue
        name = f"Tensor.{attr}"
        if inspect.isdatadescriptor(raw) and not callable(raw):
            getters.add(name)
            by_id.setdefault(id(raw), name)
            by_name.setdefault(name, operator.attrgetter(attr))
            continue
        obj = getattr(torch.Tensor, attr, None)
        if callable(obj) and not isinstance(obj, type):
            by_id.setdefault(id(obj), name)
            by_name.setdefault(name, obj)
    return by_id, by_name, getters


def name_of(func: Callable) -> str | None:
    """The qualified name of a torch function, Tensor method or Tensor property getter; ``None`` if unknown."""
    by_id, _, _ = _tables()
    name = by_id.get(id(func))
    if name is None and getattr(func, "__name__", None) == "__get__":
        name = by_id.get(id(getattr(func, "__self__", None)))
    return name


def kind_of(name: str | None) -> OpKind:
    """How capture treats the op called ``name``."""
    if name in _SIZE:
        return OpKind.SIZE
    if name in _METADATA:
        return OpKind.METADATA
    if name in _DATA_TO_PYTHON:
        return OpKind.DATA_TO_PYTHON
    return OpKind.RECORD


def is_replayable(name: str) -> bool:
    """True when ``name`` is on the allow-list that replay and file loading accept."""
    _, by_name, _ = _tables()
    short = name.rsplit(".", 1)[-1]
    return name in by_name and (short in _ALLOWED_DUNDERS or not _UNSAFE.search(short))


def resolve(name: str) -> Callable:
    """The callable for an allow-listed op name; raises ``KeyError`` for anything else."""
    if not is_replayable(name):
        raise KeyError(f"op {name!r} is not on the allow-list of replayable torch functions")
    return _tables()[1][name]


def short_name(name: str) -> str:
    """A readable short form used in node names: ``torch.cat`` -> ``cat``, ``Tensor.__iadd__`` -> ``iadd``."""
    return name.rsplit(".", 1)[-1].strip("_") or "op"
