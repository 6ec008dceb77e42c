"""One graph for both modes: merge a train-mode capture and an eval-mode capture of the same forward.

A forward that branches on ``self.training`` records a guard, so a single capture only replays in its own mode.
:func:`merge_modes` aligns the two captures node by node (:class:`difflib.SequenceMatcher` over op and module
identity) and builds their union, sharing every module, parameter and buffer:

* nodes both modes run once; where their arguments differ only in scalars (``dropout=p if self.training else 0``,
  the momentum of a norm) the argument becomes the expression ``("if_training", value_in_train, value_in_eval)``;
* nodes only one mode runs (timm's norm-activation layers updating ``num_batches_tracked``, DropPath, a module that
  reads a cached tensor in eval mode and recomputes it in train mode) carry ``meta["mode"]`` (``"train"`` or
  ``"eval"``) and replay only in that mode;
* where a shared node reads different tensors in the two modes, a :class:`~graph.modules.ModeSelect` node in front
  of it passes on the tensor of the current mode (its argument is ``Sym(("by_mode", train_ref, eval_ref))``), so
  dependency analysis sees both producers and couples their channels;
* guards checked in one mode only are wrapped as ``("if_training", expr, value)`` so the other mode passes them, and
  the guards on the training flag itself are dropped.

Pruning, masking, FLOPs, saving and ONNX export then work on the one graph in either mode.
"""
from __future__ import annotations

import re
from collections import Counter
from difflib import SequenceMatcher
from typing import Any, Callable

import torch
import torch.nn as nn

from .ir import Node, Ref, Struct, Sym, shift_refs
from .modules import MODE_SELECT, ConstantNode, FunctionalOp, ModeSelect, ParameterNode

_SCALARS = (bool, int, float, type(None))
_SUFFIX = re.compile(r"_\d+$")
TRAIN, EVAL = "train", "eval"


class _Mismatch(Exception):
    """Two aligned nodes (or outputs) differ in more than scalars and tensor sources."""


def branches_on_training(guards: dict[tuple, Any]) -> bool:
    """True when one of the guards tests the training flag."""
    return any(_mentions_training(expr) for expr, _ in guards)


def node_mode(node: Node) -> bool | None:
    """``True`` for a node that replays only in train mode, ``False`` for eval mode only, ``None`` for both."""
    mode = node.meta.get("mode")
    return None if mode is None else mode == TRAIN


def merge_modes(primary, other) -> bool:
    """Make ``primary`` (a finished :class:`~graph.capture.Tracer`) replay in both modes using ``other``, a trace of
    the same forward in the other mode (of a copy of the same model, on the same inputs or on inputs that differ only
    in size). Returns False, leaving ``primary`` unchanged, when the two traces do not have the same inputs."""
    if [(n.name, n.meta.get("path")) for n in primary.nodes if n.op == "input"] != \
            [(n.name, n.meta.get("path")) for n in other.nodes if n.op == "input"]:
        return False
    if primary.input_constants.keys() != other.input_constants.keys():
        return False
    _ModeMerge(primary, other).run()
    return True


class _ModeMerge:
    """The union of two traces, built in one pass over their alignment."""

    def __init__(self, primary, other):
        self.primary, self.other = primary, other
        self.primary_is_train = bool(primary.training)
        self.nodes: list[Node] = []
        self.modules: list[nn.Module | None] = []
        self.maps: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self.names: Counter = Counter()
        self.selects: dict[tuple[Ref, Ref], int] = {}
        self.params: dict[str, int] = {}  # tensor name -> merged index of its one parameter node
        self.primary_params = {self._tensor_name(primary, m): i for i, (n, m) in
                               enumerate(zip(primary.nodes, primary.node_modules)) if n.op == "param"}
        self.modules_by_name = dict(primary.root.named_modules(remove_duplicate=False))
        self.tensors_by_name = {**dict(primary.root.named_parameters(remove_duplicate=False)),
                                **dict(primary.root.named_buffers(remove_duplicate=False))}

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        first, second = self.primary, self.other
        keys = [self._keys(trace) for trace in (first, second)]
        matcher = SequenceMatcher(None, keys[0], keys[1], autojunk=False)
        i = j = 0
        for a, b, size in matcher.get_matching_blocks():
            self._emit_alone(0, range(i, a))
            self._emit_alone(1, range(j, b))
            for k in range(size):
                self._emit_pair(a + k, b + k)
            i, j = a + size, b + size
        train, evaluation = self._oriented(self._remapped(0, first.output_template),
                                           self._remapped(1, second.output_template))
        output = _merge(train, evaluation, on_refs=lambda t, e: Sym(("by_mode", t, e)), whole=True)
        guards = self._guards()
        first.nodes, first.node_modules = self.nodes, self.modules
        first.output_template, first.guards = output, guards

    def _keys(self, trace) -> list[tuple]:
        """What must agree for two nodes to be the same computation: op and module (or tensor) identity."""
        keys = []
        for node, module in zip(trace.nodes, trace.node_modules):
            if node.op == "param":
                keys.append(("param", self._tensor_name(trace, module)))
            elif module is not None and not isinstance(module, (FunctionalOp, ParameterNode)):
                keys.append((node.op, trace._module_names.get(id(module)), node.meta.get("no_grad", False)))
            else:
                keys.append((node.op, _SUFFIX.sub("", node.name), node.meta.get("no_grad", False)))
        return keys

    @staticmethod
    def _tensor_name(trace, module: ParameterNode) -> str:
        return trace._tensor_names[id(module.value)]

    # ------------------------------------------------------------------ emitting
    def _emit_alone(self, side: int, indices: range) -> None:
        trace = (self.primary, self.other)[side]
        for index in indices:
            if index in self.maps[side]:
                continue
            node, module = trace.nodes[index], trace.node_modules[index]
            if node.op == "param":
                self.maps[side][index] = self._param(side, node, module)
                continue
            if side == 1:
                module = self._shared_module(module)
            mode = None if node.op in ("input", "constant") else self._mode_of(side)
            self._append(node, module, self._remapped(side, node.args), self._remapped(side, node.kwargs),
                         dict(node.meta), mode, side, index)

    def _emit_pair(self, i: int, j: int) -> None:
        node, other_node = self.primary.nodes[i], self.other.nodes[j]
        module, other_module = self.primary.node_modules[i], self.other.node_modules[j]
        if node.op == "param":
            self.maps[0][i] = self._param(0, node, module)
            self.maps[1][j] = self.maps[0][i]
            return
        if isinstance(module, ConstantNode) and not _same_tensor(module.value, other_module.value):
            self._emit_alone(0, range(i, i + 1))
            self._emit_alone(1, range(j, j + 1))
            return
        pending: list[tuple[Ref, Ref]] = []
        try:
            train, evaluation = self._oriented((self._remapped(0, node.args), self._remapped(0, node.kwargs)),
                                               (self._remapped(1, other_node.args),
                                                self._remapped(1, other_node.kwargs)))
            args, kwargs = _merge(train, evaluation, on_refs=lambda t, e: self._select_ref(t, e, pending))
        except _Mismatch:
            self._emit_alone(0, range(i, i + 1))
            self._emit_alone(1, range(j, j + 1))
            return
        for train_ref, eval_ref in pending:
            self._add_select(train_ref, eval_ref, node)
        args, kwargs = _resolve_selects((args, kwargs), self.selects)
        index = self._append(node, module, args, kwargs, dict(node.meta), None, 0, i)
        self.maps[1][j] = index

    def _append(self, node: Node, module: nn.Module | None, args: Any, kwargs: Any, meta: dict, mode: str | None,
                side: int, index: int | None) -> int:
        """Add a merged node standing for node ``index`` of trace ``side`` (``None``: a node of neither trace)."""
        if mode is not None:
            meta["mode"] = mode
        merged = Node(name=self._unique(node.name), op=node.op, args=args, kwargs=kwargs, source=node.source,
                      meta=meta)
        self.nodes.append(merged)
        self.modules.append(module)
        if index is not None:
            self.maps[side][index] = len(self.nodes) - 1
        return len(self.nodes) - 1

    def _param(self, side: int, node: Node, module: ParameterNode) -> int:
        """The merged index of a parameter node: one node per tensor, placed where either mode first reads it."""
        name = self._tensor_name((self.primary, self.other)[side], module)
        if name not in self.params:
            primary_index = self.primary_params.get(name)
            if primary_index is not None:
                primary_node = self.primary.nodes[primary_index]
                self.params[name] = self._append(primary_node, self.primary.node_modules[primary_index], (), {},
                                                 dict(primary_node.meta), None, 0, primary_index)
            else:
                self.params[name] = self._append(node, ParameterNode(self.tensors_by_name[name]), (), {},
                                                 dict(node.meta), None, side, None)
        return self.params[name]

    def _shared_module(self, module: nn.Module | None) -> nn.Module | None:
        """The primary copy's module standing for a module of the other trace's copy of the model."""
        if module is None or isinstance(module, (FunctionalOp, ConstantNode)):  # stateless, or a copy of its own
            return module
        return self.modules_by_name[self.other._module_names[id(module)]]

    def _select_ref(self, train: Ref, evaluation: Ref, pending: list[tuple[Ref, Ref]]) -> Any:
        if (train, evaluation) not in self.selects and (train, evaluation) not in pending:
            pending.append((train, evaluation))
        return _SelectPlaceholder(train, evaluation)

    def _add_select(self, train: Ref, evaluation: Ref, consumer: Node) -> None:
        if (train, evaluation) in self.selects:
            return
        primary_ref = train if self.primary_is_train else evaluation
        shape = self.nodes[primary_ref.index].meta.get("out")
        for key in primary_ref.path:  # outputs are described as lists and dicts of shape tuples
            shape = shape[key] if isinstance(shape, (list, dict)) else None
        scope = consumer.name.rpartition(".")[0]
        meta = {"out": shape}
        dtype = self.nodes[primary_ref.index].meta.get("dtype")
        if dtype is not None and not primary_ref.path:
            meta["dtype"] = dtype
        self.nodes.append(Node(name=self._unique(f"{scope}.{MODE_SELECT}" if scope else MODE_SELECT),
                               op=MODE_SELECT, args=(Sym(("by_mode", train, evaluation)),), kwargs={},
                               source=consumer.source, meta=meta))
        self.modules.append(ModeSelect())
        self.selects[(train, evaluation)] = len(self.nodes) - 1

    # ------------------------------------------------------------------ helpers
    def _mode_of(self, side: int) -> str:
        return TRAIN if (side == 0) == self.primary_is_train else EVAL

    def _oriented(self, primary_value: Any, other_value: Any) -> tuple[Any, Any]:
        return (primary_value, other_value) if self.primary_is_train else (other_value, primary_value)

    def _remapped(self, side: int, template: Any) -> Any:
        return shift_refs(template, self.maps[side])

    def _unique(self, name: str) -> str:
        self.names[name] += 1
        if self.names[name] == 1:
            return name
        base, k = _SUFFIX.sub("", name), 1
        while self.names[f"{base}_{k}"]:
            k += 1
        self.names[f"{base}_{k}"] += 1
        return f"{base}_{k}"

    def _guards(self) -> dict[tuple, str | None]:
        per_side = []
        for side, trace in enumerate((self.primary, self.other)):
            mapping = self.maps[side]
            per_side.append({(shift_refs(Sym(expr), mapping).expr, value): source
                             for (expr, value), source in trace.guards.items() if not _mentions_training(expr)})
        guards: dict[tuple, str | None] = {}
        for side, own in enumerate(per_side):
            train_side = (side == 0) == self.primary_is_train
            for (expr, value), source in own.items():
                if (expr, value) in per_side[1 - side]:
                    guards[(expr, value)] = source
                else:
                    branches = (expr, value) if train_side else (value, expr)
                    guards[(("if_training", *branches), value)] = source
        return guards


class _SelectPlaceholder:
    """Where a merged argument reads a mode select that is added in front of its node."""

    def __init__(self, train: Ref, evaluation: Ref):
        self.key = (train, evaluation)


def _resolve_selects(template: Any, selects: dict[tuple[Ref, Ref], int]) -> Any:
    if isinstance(template, _SelectPlaceholder):
        return Ref(selects[template.key])
    if isinstance(template, (tuple, list)) and not isinstance(template, torch.Size):
        items = [_resolve_selects(t, selects) for t in template]
        if isinstance(template, list):
            return items
        return type(template)(*items) if hasattr(template, "_fields") else tuple(items)
    if isinstance(template, dict):
        return {k: _resolve_selects(v, selects) for k, v in template.items()}
    if isinstance(template, slice):
        return slice(*(_resolve_selects(getattr(template, p), selects) for p in ("start", "stop", "step")))
    if isinstance(template, Struct):
        return Struct(template.cls, _resolve_selects(template.fields, selects))
    return template


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _mentions_training(expr: Any) -> bool:
    if isinstance(expr, tuple):
        return expr == ("training",) or any(_mentions_training(e) for e in expr)
    return False


def _expression(value: Any) -> Any:
    return value.expr if isinstance(value, Sym) else value


def _merge(train: Any, evaluation: Any, on_refs: Callable[[Ref, Ref], Any], whole: bool = False) -> Any:
    """The template that gives ``train`` in train mode and ``evaluation`` in eval mode: differing scalars and sizes
    become ``("if_training", ...)`` expressions, differing tensors ``on_refs(train_ref, eval_ref)``; with ``whole``
    (the output), containers that differ in structure become one ``("by_mode", ...)`` choice."""
    try:
        return _merge_parts(train, evaluation, on_refs)
    except _Mismatch:
        if whole:
            return Sym(("by_mode", train, evaluation))
        raise


def _merge_parts(train: Any, evaluation: Any, on_refs: Callable[[Ref, Ref], Any]) -> Any:
    if isinstance(train, Ref) and isinstance(evaluation, Ref):
        return train if train == evaluation else on_refs(train, evaluation)
    if isinstance(train, (Sym, *_SCALARS)) and isinstance(evaluation, (Sym, *_SCALARS)):
        if type(train) is type(evaluation) and train == evaluation:
            return train
        return Sym(("if_training", _expression(train), _expression(evaluation)))
    if type(train) is not type(evaluation):
        raise _Mismatch
    if isinstance(train, (tuple, list)):
        if len(train) != len(evaluation):
            raise _Mismatch
        merged = [_merge_parts(a, b, on_refs) for a, b in zip(train, evaluation)]
        if isinstance(train, list):
            return merged
        return type(train)(*merged) if hasattr(train, "_fields") else tuple(merged)
    if isinstance(train, dict):
        if train.keys() != evaluation.keys():
            raise _Mismatch
        return {key: _merge_parts(train[key], evaluation[key], on_refs) for key in train}
    if isinstance(train, slice):
        return slice(*(_merge_parts(getattr(train, p), getattr(evaluation, p), on_refs)
                       for p in ("start", "stop", "step")))
    if isinstance(train, Struct):
        if train.cls is not evaluation.cls:
            raise _Mismatch
        return Struct(train.cls, _merge_parts(train.fields, evaluation.fields, on_refs))
    if isinstance(train, torch.Tensor):
        if _same_tensor(train, evaluation):
            return train
        raise _Mismatch
    if train == evaluation:
        return train
    raise _Mismatch
