"""The allow-list of torch functions a graph may call, and how each one is treated during capture.

Every torch function, ``torch.nn.functional`` function and ``Tensor`` method or property gets a stable qualified
name (``torch.cat``, ``torch.nn.functional.relu``, ``Tensor.view``, ``Tensor.T``). Capture records ops by that
name; replay and file loading resolve names back through the allow-list only, so a file can never name an arbitrary
callable.

The allow-list (:func:`replayable_names`) holds only pure tensor functions and methods, what capture can record:

* ATen operators: built-in functions and ``Tensor`` methods whose name is an ``aten::`` operator of the dispatcher;
* composite Python functions of ``torch.nn.functional``, ``torch.functional`` and ``Tensor`` methods written in
  Python (``torch._tensor``), all built from such operators;
* the arithmetic, comparison and indexing operators of ``Tensor`` (``__add__``, ``__getitem__`` ...), the properties
  that give a tensor (``T``, ``mT``, ``real`` ...), dtype and device conversions (``Tensor.float``, ``Tensor.cpu``)
  and tensors made from Python data (``torch.tensor``);

less any name that reads or writes files or global settings (:data:`_UNSAFE`). Helpers that change interpreter or
library state (``torch.autocast_increment_nesting``, ``torch.init_num_threads``), run callables (``torch.fork``,
``Tensor.apply_``, ``F.handle_torch_function``) or import code (``torch.import_ir_module``) are none of these.
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


_PURE_PYTHON_MODULES = frozenset({"torch.nn.functional", "torch.functional", "torch._tensor"})
_TENSOR_PROPERTIES = frozenset({"T", "H", "mT", "mH", "data", "real", "imag", "grad"})
_CONVERSIONS = frozenset({
    "Tensor.bfloat16", "Tensor.half", "Tensor.float", "Tensor.double", "Tensor.cfloat", "Tensor.cdouble",
    "Tensor.bool", "Tensor.byte", "Tensor.char", "Tensor.short", "Tensor.int", "Tensor.long", "Tensor.type",
    "Tensor.cpu", "Tensor.cuda", "Tensor.xpu", "Tensor.mtia", "Tensor.ipu", "Tensor.new", "Tensor.new_tensor",
    "torch.tensor", "torch.as_tensor", "torch.asarray",
})


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


@lru_cache(maxsize=1)
def _aten_operator_names() -> frozenset[str]:
    """Names of the ``aten::`` operators registered with the dispatcher, without overload names."""
    return frozenset(op.partition("::")[2].split(".")[0] for op in torch._C._dispatch_get_all_op_names()
                     if op.startswith("aten::"))


def _is_pure_tensor_op(name: str, fn: Callable, getters: set[str]) -> bool:
    short = name.rsplit(".", 1)[-1]
    if short in _ALLOWED_DUNDERS:
        return True
    if _UNSAFE.search(short):
        return False
    if name in getters:
        return short in _TENSOR_PROPERTIES
    if name in _CONVERSIONS:
        return True
    if inspect.isbuiltin(fn) or inspect.ismethoddescriptor(fn):
        return getattr(fn, "__name__", None) in _aten_operator_names()
    return inspect.isfunction(fn) and fn.__module__ in _PURE_PYTHON_MODULES


@lru_cache(maxsize=1)
def replayable_names() -> frozenset[str]:
    """The allow-list: every op name that replay and file loading accept (pure tensor functions and methods)."""
    _, by_name, getters = _tables()
    return frozenset(name for name, fn in by_name.items() if _is_pure_tensor_op(name, fn, getters))


def is_replayable(name: str) -> bool:
    """True when ``name`` is on the allow-list that replay and file loading accept."""
    return name in replayable_names()


def resolve(name: str) -> Callable:
    """The callable for an allow-listed op name; raises ``KeyError`` for anything else."""
    if not is_replayable(name):
        raise KeyError(f"op {name!r} is not on the allow-list of replayable torch functions")
    return _tables()[1][name]


def short_name(name: str) -> str:
    """A readable short form used in node names: ``torch.cat`` -> ``cat``, ``Tensor.__iadd__`` -> ``iadd``."""
    return name.rsplit(".", 1)[-1].strip("_") or "op"
