"""The graph IR: nodes, references between them, and argument templates.

A node's ``args``/``kwargs`` are *templates*: the arguments the op was called with during capture, where every
tensor is replaced by a :class:`Ref` to the node that produced it and every shape-derived number by a :class:`Sym`
holding its expression (see :mod:`graph.symbolic`). Replay fills templates in from the values of the current run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Ref:
    """The output of node ``index``; ``path`` indexes into it when the node returns a tuple, list or dict."""

    index: int
    path: tuple = ()


@dataclass(frozen=True)
class Sym:
    """A value computed at replay from an expression over tensor sizes, the training flag or the input device."""

    expr: Any


@dataclass(frozen=True)
class Struct:
    """A structured container to rebuild at replay (a named tuple or a ``ModelOutput``): ``cls(**fields)``."""

    cls: type
    fields: dict


@dataclass
class Node:
    """One op of a captured graph.

    ``op`` names what runs: a leaf module type (``Conv2d``), an allow-listed torch function (``torch.cat``),
    ``input``, ``param`` or ``constant``. ``key`` is the node's entry in ``ReconstructedNetwork.nodes``;
    ``meta`` holds derived facts such as ``meta["out"]`` (output shapes and dtypes) and analysis results.
    """

    name: str
    op: str
    key: str | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    source: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def inputs(self) -> list[int]:
        """Indices of the nodes this node reads, in order of first use (sizes included)."""
        seen: dict[int, None] = {}
        for ref in iter_refs((self.args, self.kwargs)):
            seen.setdefault(ref.index, None)
        return list(seen)

    @property
    def out_shape(self) -> Any:
        """Captured output shape(s): a tuple for a tensor output, a list of them for a sequence output."""
        return self.meta.get("out")

    def describe(self) -> str:
        """``name (op) <- input names`` in one line, for error messages and tables."""
        return f"{self.name} ({self.op})" + (f" at {self.source}" if self.source else "")


def map_template(template: Any, leaf: Callable[[Any], Any]) -> Any:
    """Rebuild a template with ``leaf`` applied to every non-container value (``Ref``, ``Sym`` and constants)."""
    if isinstance(template, tuple) and not hasattr(template, "_fields"):
        return tuple(map_template(t, leaf) for t in template)
    if isinstance(template, list):
        return [map_template(t, leaf) for t in template]
    if isinstance(template, dict):
        return {k: map_template(v, leaf) for k, v in template.items()}
    if isinstance(template, slice):
        return slice(*(map_template(t, leaf) for t in (template.start, template.stop, template.step)))
    if isinstance(template, Struct):
        return Struct(template.cls, map_template(template.fields, leaf))
    return leaf(template)


def iter_refs(template: Any, through_sym: bool = True) -> Iterator[Ref]:
    """Every ``Ref`` in a template; those inside symbolic expressions too unless ``through_sym`` is false."""
    if isinstance(template, Ref):
        yield template
    elif isinstance(template, Sym):
        if through_sym:
            yield from iter_refs(template.expr)
    elif isinstance(template, (tuple, list)):
        for item in template:
            yield from iter_refs(item, through_sym)
    elif isinstance(template, dict):
        for item in template.values():
            yield from iter_refs(item, through_sym)
    elif isinstance(template, slice):
        yield from iter_refs((template.start, template.stop, template.step), through_sym)
    elif isinstance(template, Struct):
        yield from iter_refs(template.fields, through_sym)


def is_dynamic(template: Any) -> bool:
    """True when a template holds a ``Ref`` or ``Sym`` (so it must be filled in at replay)."""
    if isinstance(template, (Ref, Sym)):
        return True
    if isinstance(template, (tuple, list)):
        return any(is_dynamic(t) for t in template)
    if isinstance(template, dict):
        return any(is_dynamic(t) for t in template.values())
    if isinstance(template, slice):
        return any(is_dynamic(t) for t in (template.start, template.stop, template.step))
    return isinstance(template, Struct)


def shift_refs(template: Any, mapping: dict[int, int]) -> Any:
    """A copy of ``template`` with every ``Ref`` index renumbered through ``mapping`` (after node removal/insertion)."""

    def leaf(value: Any) -> Any:
        if isinstance(value, Ref):
            return Ref(mapping[value.index], value.path)
        if isinstance(value, Sym):
            return Sym(_shift_expr(value.expr, mapping))
        return value

    return map_template(template, leaf)


def _shift_expr(expr: Any, mapping: dict[int, int]) -> Any:
    if isinstance(expr, Ref):
        return Ref(mapping[expr.index], expr.path)
    if isinstance(expr, tuple):
        return tuple(_shift_expr(e, mapping) for e in expr)
    return expr


def captured_sizes(expr: Any, nodes: list[Node]) -> set[int]:
    """The values at capture of the tensor sizes (``("size", ref, dim)``) a symbolic expression reads."""
    if not isinstance(expr, tuple) or not expr:
        return set()
    if expr[0] == "size" and isinstance(expr[1], Ref):
        shape = nodes[expr[1].index].out_shape
        for key in expr[1].path:  # outputs are described as lists and dicts of shape tuples
            shape = shape[key] if isinstance(shape, (list, dict)) else None
        dim = expr[2]
        return {shape[dim]} if isinstance(shape, tuple) and -len(shape) <= dim < len(shape) else set()
    return set().union(*(captured_sizes(e, nodes) for e in expr[1:]))
