"""Shape arithmetic that survives replay.

During capture, ``x.shape`` / ``x.size()`` on a traced tensor return :class:`TracedInt` values: real ints that also
carry an *expression* saying how they were computed from tensor sizes. Ops that receive them record the expression,
so replay recomputes sizes from the actual input instead of freezing them. Python control flow on a traced int
(comparisons, ``bool``, ``range``, ``int()``) records a *guard*: replay re-checks it and raises a clear error if an
input of another shape would have taken another branch.

Expressions are nested tuples (so they serialise as JSON):
``("size", ref, dim)`` — size of a node output, ``("item", ref)`` — the value of a one-element node output that
was computed only from sizes and constants (see ``Tracer.read_value`` in :mod:`graph.capture`),
``("training",)`` — the network's training flag, ``("device",)`` — the device of the replayed input,
``("if_training", a, b)`` — ``a`` in train mode, ``b`` in eval mode (see :mod:`graph.modes`),
``(op, a, b)`` / ``(op, a)`` — arithmetic, plain ints are constants.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "floordiv": operator.floordiv,
    "mod": operator.mod, "pow": operator.pow, "truediv": operator.truediv, "lshift": operator.lshift,
    "rshift": operator.rshift, "and": operator.and_, "or": operator.or_, "max": max, "min": min,
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
}
_UNARY: dict[str, Callable[[Any], Any]] = {
    "neg": operator.neg, "abs": abs, "bool": bool, "int": int, "float": float, "sqrt": math.sqrt,
    "ceil": math.ceil, "floor": math.floor,
}

_recorder = None  # the active tracer, set by graph.capture while a capture runs
_builtin_range = range  # capture replaces builtins.range with guarded_range, which must still reach this one


def set_recorder(recorder) -> None:
    """Install (or clear with ``None``) the object whose ``add_guard(expr, value)`` records guards."""
    global _recorder
    _recorder = recorder


def expr_of(value: Any) -> Any:
    """The expression of a traced value, or the value itself when it is a plain constant."""
    return value.expr if isinstance(value, (TracedInt, TracedFloat, TrainingFlag)) else value


def _guard(expr: Any, value: Any) -> None:
    if _recorder is not None:
        _recorder.add_guard(expr, value)


def evaluate(expr: Any, tensor_of: Callable[[Any], Any], context: dict) -> Any:
    """Evaluate an expression; ``tensor_of(ref)`` gives a replayed tensor, ``context`` holds training/device."""
    if not isinstance(expr, tuple):
        return expr
    head = expr[0]
    if head == "size":
        return tensor_of(expr[1]).shape[expr[2]]
    if head == "item":
        return tensor_of(expr[1]).item()
    if head in ("training", "device"):
        return context[head]
    if head == "tuple":
        return tuple(evaluate(e, tensor_of, context) for e in expr[1:])
    if head == "if_training":
        return evaluate(expr[1] if context["training"] else expr[2], tensor_of, context)
    if len(expr) == 3:
        return _BINARY[head](evaluate(expr[1], tensor_of, context), evaluate(expr[2], tensor_of, context))
    return _UNARY[head](evaluate(expr[1], tensor_of, context))


def is_symbolic(expr: Any) -> bool:
    """True when the expression depends on replay-time values."""
    return isinstance(expr, tuple)


def traced(value: Any, expr: Any) -> Any:
    """``value`` as a :class:`TracedInt` / :class:`TracedFloat` carrying ``expr``; other values unchanged."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, int):
        return TracedInt(value, expr)
    return TracedFloat(value, expr)


def _binary(name: str, reflected: bool = False):
    fn = _BINARY[name]

    def method(self, other):
        if isinstance(other, bool) or not isinstance(other, (int, float)):
            return NotImplemented
        a, b = (other, self) if reflected else (self, other)
        value = fn(a.value if isinstance(a, _Traced) else a, b.value if isinstance(b, _Traced) else b)
        return traced(value, (name, expr_of(a), expr_of(b)))

    return method


def _compare(name: str):
    fn = _BINARY[name]

    def method(self, other):
        plain = other.value if isinstance(other, _Traced) else other
        result = fn(self.value, plain)
        if result is not NotImplemented:
            _guard((name, self.expr, expr_of(other)), result)
        return result

    return method


def _unary(name: str):
    fn = _UNARY[name]

    def method(self):
        return traced(fn(self.value), (name, self.expr))

    return method


def _guarded(name: str, convert: Callable[[Any], Any]):
    def method(self):
        result = convert(self.value)
        _guard((name, self.expr), result)
        return result

    return method


class _Traced:
    """Arithmetic shared by traced ints and floats: each operator returns a traced value with a longer expression."""

    __add__, __radd__ = _binary("add"), _binary("add", True)
    __sub__, __rsub__ = _binary("sub"), _binary("sub", True)
    __mul__, __rmul__ = _binary("mul"), _binary("mul", True)
    __floordiv__, __rfloordiv__ = _binary("floordiv"), _binary("floordiv", True)
    __truediv__, __rtruediv__ = _binary("truediv"), _binary("truediv", True)
    __mod__, __rmod__ = _binary("mod"), _binary("mod", True)
    __pow__, __rpow__ = _binary("pow"), _binary("pow", True)
    __neg__, __abs__ = _unary("neg"), _unary("abs")
    __eq__, __ne__ = _compare("eq"), _compare("ne")
    __lt__, __le__, __gt__, __ge__ = _compare("lt"), _compare("le"), _compare("gt"), _compare("ge")
    __bool__ = _guarded("bool", bool)
    __int__ = _guarded("int", int)
    __float__ = _guarded("float", float)
    __index__ = _guarded("int", int)

    def __ceil__(self):
        return traced(math.ceil(self.value), ("ceil", self.expr))

    def __floor__(self):
        return traced(math.floor(self.value), ("floor", self.expr))

    def __round__(self, ndigits=None):
        result = round(self.value, ndigits)
        _guard(("eq", self.expr, self.value), True)
        return result


class TracedInt(_Traced, int):
    """An ``int`` computed from traced tensor sizes; ``expr`` recomputes it at replay."""

    __lshift__, __rshift__ = _binary("lshift"), _binary("rshift")
    __and__, __or__ = _binary("and"), _binary("or")
    __hash__ = int.__hash__

    def __new__(cls, value: int, expr: Any):
        obj = int.__new__(cls, value)
        obj.expr = expr
        return obj

    @property
    def value(self) -> int:
        return int.__int__(self)

    def __repr__(self) -> str:
        return repr(self.value)

    def __reduce__(self):
        return int, (self.value,)


class TracedFloat(_Traced, float):
    """A ``float`` computed from traced tensor sizes (for example ``head_dim ** -0.5`` with a traced ``head_dim``)."""

    __hash__ = float.__hash__

    def __new__(cls, value: float, expr: Any):
        obj = float.__new__(cls, value)
        obj.expr = expr
        return obj

    @property
    def value(self) -> float:
        return float.__float__(self)

    def __repr__(self) -> str:
        return repr(self.value)

    def __reduce__(self):
        return float, (self.value,)


class TracedSize(tuple):
    """What ``x.shape`` returns during capture: a tuple of :class:`TracedInt` with ``torch.Size``'s ``numel``."""

    def numel(self) -> Any:
        total = 1
        for dim in self:
            total = total * dim
        return total


class TrainingFlag:
    """Stands in for ``module.training`` of traced-into modules during capture.

    Passed to an op (``F.dropout(x, training=self.training)``) it replays with the network's current mode;
    branching on it (``if self.training:``) records a guard, so replay in the other mode raises instead of diverging.
    """

    expr = ("training",)

    def __init__(self, value: bool):
        self.value = bool(value)

    def __bool__(self) -> bool:
        _guard(("bool", self.expr), self.value)
        return self.value

    def __eq__(self, other):
        result = self.value == other
        _guard(("eq", self.expr, other), result)
        return result

    __hash__ = None

    def __repr__(self) -> str:
        return f"TrainingFlag({self.value})"


class _RangeType(type):
    """Metaclass that makes :class:`guarded_range` stand in for ``range`` in ``isinstance``/``issubclass`` checks."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _builtin_range)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, _builtin_range)


class guarded_range(metaclass=_RangeType):  # noqa: N801 - stands in for the builtin ``range``
    """``range`` while a capture runs: a loop bound computed from a traced size records a guard. A class, so code
    that checks ``isinstance(x, range)`` or builds ``slice | range`` (torch._dynamo, imported lazily) still works."""

    def __new__(cls, *args: Any) -> range:
        return _builtin_range(*(int(a) if isinstance(a, TracedInt) else a for a in args))
