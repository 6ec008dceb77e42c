"""One graph for both modes: merge a train-mode capture into an eval-mode one (or the reverse).

A forward that branches on ``self.training`` records a guard, so a network captured in eval mode refuses to replay in
train mode. Most such branches only pick a constant (``dropout=p if self.training else 0.0`` in every Hugging Face
attention layer): the two modes execute the same ops and differ in a few scalars. :func:`merge_modes` compares the
two captures node by node and, when they line up, turns each differing scalar into the expression
``("if_training", value_in_train, value_in_eval)`` and drops the training guards, so the one network replays
exactly in both modes. Captures that execute different ops keep their guards (replay then names the branch).
"""
from __future__ import annotations

from typing import Any

import torch

from .ir import Ref, Struct, Sym

_SCALARS = (bool, int, float, type(None))


class _Mismatch(Exception):
    """The two captures differ in more than scalar constants."""


def branches_on_training(guards: dict[tuple, Any]) -> bool:
    """True when one of the guards tests the training flag."""
    return any(_mentions_training(expr) for expr, _ in guards)


def merge_modes(primary, other) -> bool:
    """Make ``primary`` (a tracer) replay in both modes using ``other``, a capture of the same forward in the other
    mode; returns False (and leaves ``primary`` unchanged) when the two executed different ops."""
    if not _same_structure(primary, other):
        return False
    train, evaluation = (primary, other) if primary.training else (other, primary)
    try:
        merged = [(_merge(a.args, b.args), _merge(a.kwargs, b.kwargs))
                  for a, b in zip(train.nodes, evaluation.nodes)]
        output = _merge(train.output_template, evaluation.output_template)
    except _Mismatch:
        return False
    for node, (args, kwargs) in zip(primary.nodes, merged):
        node.args, node.kwargs = args, kwargs
    primary.output_template = output
    primary.guards = {key: source for key, source in primary.guards.items() if not _mentions_training(key[0])}
    return True


def _same_structure(a, b) -> bool:
    if len(a.nodes) != len(b.nodes) or len(a.node_modules) != len(b.node_modules):
        return False
    if _shape_guards(a.guards) != _shape_guards(b.guards) or a.input_constants.keys() != b.input_constants.keys():
        return False
    for x, y, mx, my in zip(a.nodes, b.nodes, a.node_modules, b.node_modules):
        if (x.name, x.op, x.out_shape, x.meta.get("no_grad")) != (y.name, y.op, y.out_shape, y.meta.get("no_grad")):
            return False
        if type(mx) is not type(my) or not _same_tensors(mx, my):
            return False
    return True


def _shape_guards(guards: dict[tuple, Any]) -> set[tuple]:
    return {key for key in guards if not _mentions_training(key[0])}


def _same_tensors(a, b) -> bool:
    if a is None or b is None:
        return a is b
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(
        first[k].shape == second[k].shape and torch.equal(first[k], second[k]) for k in first)


def _mentions_training(expr: Any) -> bool:
    if isinstance(expr, tuple):
        return expr == ("training",) or any(_mentions_training(e) for e in expr)
    return False


def _merge(train: Any, evaluation: Any) -> Any:
    """The template that gives ``train`` in train mode and ``evaluation`` in eval mode."""
    if type(train) is not type(evaluation):
        if isinstance(train, _SCALARS) and isinstance(evaluation, _SCALARS):
            return Sym(("if_training", train, evaluation))
        raise _Mismatch
    if isinstance(train, (Ref, Sym)):
        if train != evaluation:
            raise _Mismatch
        return train
    if isinstance(train, (tuple, list)):
        if len(train) != len(evaluation):
            raise _Mismatch
        merged = [_merge(a, b) for a, b in zip(train, evaluation)]
        if isinstance(train, list):
            return merged
        return type(train)(*merged) if hasattr(train, "_fields") else tuple(merged)
    if isinstance(train, dict):
        if train.keys() != evaluation.keys():
            raise _Mismatch
        return {key: _merge(train[key], evaluation[key]) for key in train}
    if isinstance(train, slice):
        return slice(*(_merge(getattr(train, part), getattr(evaluation, part)) for part in ("start", "stop", "step")))
    if isinstance(train, Struct):
        if train.cls is not evaluation.cls:
            raise _Mismatch
        return Struct(train.cls, _merge(train.fields, evaluation.fields))
    if isinstance(train, _SCALARS):
        return train if train == evaluation and type(train) is type(evaluation) else Sym(
            ("if_training", train, evaluation))
    if isinstance(train, torch.Tensor):
        if train.shape == evaluation.shape and torch.equal(train, evaluation):
            return train
        raise _Mismatch
    if train == evaluation:
        return train
    raise _Mismatch
