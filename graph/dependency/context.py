"""What a channel rule sees of one node, and what it may declare."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch.nn as nn

from ..ir import Node, Ref, Sym
from ..symbolic import evaluate
from .labels import ElementRecord, Factor, Labeling


@dataclass
class Member:
    """A tensor dim that follows channel elements: ``module_of(node).<tensor>`` sliced along ``dim``.

    ``role`` is ``"out"`` (the op produces the channel), ``"in"`` (it consumes it: masking zeroes these) or
    ``"param"`` (a per-channel scale, shift or statistic).
    """

    node: int
    tensor: str
    dim: int
    ids: np.ndarray
    role: str


@dataclass
class SizeArg:
    """A constant in a node's arguments that equals a channel count: rewritten to the kept count of ``ids``."""

    node: int
    path: tuple
    ids: np.ndarray


class RuleContext:
    """The view a rule gets of one node: its arguments, shapes and input labels, plus ways to declare coupling."""

    def __init__(self, analysis, index: int, node: Node, module: nn.Module | None):
        self._analysis = analysis
        self.index, self.node, self.module = index, node, module
        self.record: ElementRecord = analysis.record

    # ---------------------------------------------------------------- reading
    def arg(self, position: int, name: str | None = None, default: Any = None) -> Any:
        """Argument template by position, else by keyword ``name``, else ``default``."""
        if position is not None and len(self.node.args) > position:
            return self.node.args[position]
        return self.node.kwargs.get(name, default) if name else default

    def tensor_args(self) -> list[Ref]:
        """Every tensor argument (top-level and inside lists/tuples), in order."""
        refs: list[Ref] = []
        for value in [*self.node.args, *self.node.kwargs.values()]:
            items = value if isinstance(value, (list, tuple)) else [value]
            refs.extend(v for v in items if isinstance(v, Ref))
        return refs

    def labels(self, ref: Any) -> Labeling | None:
        """The labeling of a tensor argument, or ``None`` when it carries no channel elements."""
        return self._analysis.values.get((ref.index, ref.path)) if isinstance(ref, Ref) else None

    def shape(self, ref: Any) -> tuple[int, ...] | None:
        """Captured shape of a tensor argument."""
        return self._analysis.shape_of(ref) if isinstance(ref, Ref) else None

    @property
    def out_shape(self) -> Any:
        return self.node.meta.get("out")

    @staticmethod
    def is_constant(value: Any) -> bool:
        """True for plain numbers (not recomputed at replay)."""
        return not isinstance(value, (Ref, Sym))

    def reads_channel_sizes_only(self, value: Any) -> bool:
        """True for a computed value (:class:`Sym`) whose expression is arithmetic over channel sizes and constants
        only (``C // num_heads``): a constant of the architecture, unaffected by the input's batch or resolution."""
        def pure(expr) -> bool:
            if not isinstance(expr, tuple):
                return not isinstance(expr, (Ref, list))
            if expr[0] == "size":
                return isinstance(expr[1], Ref) and self._is_channel_size(expr[1], expr[2])
            return expr[0] not in ("item", "training", "device", "if_training") and all(pure(e) for e in expr[1:])
        return isinstance(value, Sym) and pure(value.expr)

    def _is_channel_size(self, ref: Ref, dim: int) -> bool:
        labeling = self.labels(ref)
        factor = labeling.factor_at(dim) if labeling is not None else None
        return factor is not None and np.unique(factor.ids).size == factor.ids.size

    def captured_value(self, value: Any) -> Any:
        """The value a computed :class:`Sym` had at capture (plain values unchanged)."""
        if not isinstance(value, Sym):
            return value
        return evaluate(value.expr, lambda ref: SimpleNamespace(shape=self.shape(ref)), {})

    # ---------------------------------------------------------------- declaring
    def set_output(self, labeling: Labeling | None, path: tuple = ()) -> None:
        """Give the node's output (or the part at ``path``) a labeling."""
        if labeling is not None and labeling.factors:
            self._analysis.values[(self.index, path)] = labeling

    def new(self, shape: tuple[int, ...]) -> np.ndarray:
        """Fresh element ids."""
        return self.record.new(shape)

    def member(self, tensor: str, dim: int, ids: np.ndarray | None, role: str) -> None:
        """Declare that this node's ``tensor`` (attribute path of its module) is sliced along ``dim`` by ``ids``."""
        if ids is not None:
            member = Member(self.index, tensor, dim, np.asarray(ids), role)
            self._analysis.members.append(member)
            self._analysis.member_at[(self.index, tensor, dim)] = member

    def consumed(self, ref: Any, dims: list[int]) -> None:
        """A parameter node's ``dims`` are contracted here: masking zeroes them (its members get role ``in``)."""
        if isinstance(ref, Ref) and not ref.path:
            for dim in dims:
                member = self._analysis.member_at.get((ref.index, "value", dim))
                if member is not None:
                    member.role = "in"

    def size_arg(self, path: tuple, ids: np.ndarray | None) -> None:
        """Declare that the constant at ``path`` (``("args", i, ...)`` or ``("kwargs", name, ...)``) counts ``ids``."""
        if ids is not None:
            self._analysis.size_args.append(SizeArg(self.index, path, np.asarray(ids)))

    def rewrite(self, function) -> None:
        """Register ``function(node, removed)`` to rewrite this node's arguments after pruning.

        ``removed(ids)`` returns a boolean mask of which of ``ids`` are being removed.
        """
        self._analysis.rewrites.append((self.index, function))

    def block(self, labeling: Labeling | Factor | np.ndarray | None, reason: str) -> None:
        """Never remove these elements."""
        ids = _ids(labeling)
        if ids is not None and ids.size:
            self.record.block(ids, f"{reason} at {self.node.describe()}")

    def inexact(self, labeling: Labeling | Factor | np.ndarray | None, reason: str) -> None:
        """Removing these elements changes remaining values (so pruning equals masking only approximately)."""
        ids = _ids(labeling)
        if ids is not None and ids.size:
            self.record.mark_inexact(ids, f"{reason} at {self.node.describe()}")

    def size_constraint(self, ids: np.ndarray, sources: np.ndarray, reason: str) -> None:
        """A dim (``ids``, positions along axis 0) whose size is computed from the sizes of ``sources``: unless its
        elements end up coupled with those sources, its positions are coupled (never sliced) after resolution."""
        self._analysis.size_constraints.append((np.asarray(ids), np.asarray(sources).ravel(),
                                                f"{reason} at {self.node.describe()}"))

    def explicit_only(self, labeling: Labeling | Factor | np.ndarray | None, reason: str) -> None:
        """Automatic plans (``plan_by_ratio``) leave these elements alone; a plan naming their group prunes them."""
        ids = _ids(labeling)
        if ids is not None and ids.size:
            self.record.mark_explicit(ids, reason)

    def collapse(self, labeling: Labeling | None, dim: int,
                 reason: str = "all channels of a dim are coupled") -> Labeling | None:
        """Couple all positions along ``dim`` so it is never sliced; ``None`` when no labelled dim is left.

        A factor left with no dim is blocked with ``reason``.
        """
        if labeling is None:
            return None
        factor = labeling.factor_at(dim)
        if factor is None:
            return labeling
        axis = factor.dims.index(dim % labeling.rank)
        moved = np.moveaxis(factor.ids, axis, 0)
        self.record.union(moved[:1], moved)
        dims = tuple(d for d in factor.dims if d != dim % labeling.rank)
        if not dims:
            self.record.block(moved[0], f"{reason} at {self.node.describe()}")
            return labeling.replace(factor, None)
        return labeling.replace(factor, Factor(dims, moved[0]))

    def along(self, ref_or_labeling: Any, dim: int) -> np.ndarray | None:
        """One id per position along ``dim`` (the other dims of its factor are collapsed), or ``None``."""
        labeling = ref_or_labeling if isinstance(ref_or_labeling, Labeling) else self.labels(ref_or_labeling)
        if labeling is None:
            return None
        factor = labeling.factor_at(dim)
        if factor is None:
            return None
        for other in factor.dims:
            if other != dim % labeling.rank:
                labeling = self.collapse(labeling, other)
        factor = labeling.factor_at(dim) if labeling is not None else None
        return factor.ids if factor is not None else None


def _ids(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, Labeling):
        return value.all_ids()
    if isinstance(value, Factor):
        return value.ids.ravel()
    return np.asarray(value).ravel()
