"""The small modules that functional nodes, parameters and constants live in.

Each functional node holds a :class:`FunctionalOp` naming one allow-listed torch function. Some op kinds have a
subclass of their own (the AMC names ``ElemAdd``, ``Concatenate``, ``TensorReshape`` …), registered by target name,
so user code and analysis passes can recognise them with ``isinstance``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from . import oplib

FUNCTIONAL_CLASSES: dict[str, type["FunctionalOp"]] = {}


def functional_class(*targets: str) -> Callable[[type], type]:
    """Register a :class:`FunctionalOp` subclass as the node module for the given op names."""

    def register(cls: type) -> type:
        cls.targets = targets
        for target in targets:
            FUNCTIONAL_CLASSES[target] = cls
        return cls

    return register


class FunctionalOp(nn.Module):
    """Node module that calls one allow-listed torch function (``target``) with the node's arguments."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.fn = oplib.resolve(target)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return self.target


def make_functional(target: str) -> FunctionalOp:
    """The node module for op ``target``: its registered subclass, else a plain :class:`FunctionalOp`."""
    return FUNCTIONAL_CLASSES.get(target, FunctionalOp)(target)


@functional_class("torch.add", "Tensor.add", "Tensor.add_", "Tensor.__add__", "Tensor.__radd__", "Tensor.__iadd__")
class ElemAdd(FunctionalOp):
    """Element-wise addition (``a + b``, ``torch.add``, ``a += b``)."""


@functional_class("torch.cat", "torch.concat", "torch.concatenate")
class Concatenate(FunctionalOp):
    """Concatenation of tensors along a dimension."""


@functional_class("Tensor.view", "Tensor.reshape", "torch.reshape", "torch.flatten", "Tensor.flatten",
                  "Tensor.unflatten", "torch.unflatten", "Tensor.view_as", "Tensor.reshape_as")
class TensorReshape(FunctionalOp):
    """A reshape (``view``, ``reshape``, ``flatten``, ``unflatten``)."""


@functional_class("Tensor.permute", "torch.permute", "Tensor.transpose", "torch.transpose", "Tensor.t",
                  "Tensor.T", "Tensor.mT", "torch.swapaxes", "Tensor.swapaxes", "torch.movedim", "Tensor.movedim")
class TensorTranspose(FunctionalOp):
    """A permutation of dimensions (``permute``, ``transpose``, ``.T``)."""


@functional_class("Tensor.squeeze", "torch.squeeze", "Tensor.unsqueeze", "torch.unsqueeze")
class TensorSqueeze(FunctionalOp):
    """Removal or insertion of a size-one dimension."""


@functional_class("torch.nn.functional.interpolate", "torch.nn.functional.upsample",
                  "torch.nn.functional.upsample_nearest", "torch.nn.functional.upsample_bilinear")
class Interpolate(FunctionalOp):
    """Spatial resampling (``F.interpolate``)."""


@functional_class("torch.nn.functional.pixel_shuffle", "torch.pixel_shuffle")
class PixelShuffle(FunctionalOp):
    """Depth-to-space rearrangement (``F.pixel_shuffle``)."""


@functional_class("Tensor.__setitem__")
class SetItem(FunctionalOp):
    """In-place ``x[index] = value``; returns ``x`` so later ops can refer to the updated tensor."""

    def forward(self, tensor: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
        self.fn(tensor, index, value)
        return tensor


MODE_SELECT = "mode_select"


class ModeSelect(FunctionalOp):
    """Node that passes on one of two tensors by the network's mode, for a node whose input differs between train and
    eval mode (:mod:`graph.modes`); its one argument is ``Sym(("by_mode", train_ref, eval_ref))``, which replay
    fills in from the current mode only."""

    def __init__(self):
        nn.Module.__init__(self)
        self.target = MODE_SELECT
        self.fn = _passed_on


def _passed_on(value: Any) -> Any:
    return value


class ParameterNode(nn.Module):
    """Node for a parameter or buffer that a traced forward reads directly (class tokens, position embeddings)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        if isinstance(value, nn.Parameter):
            self.value = value
        else:
            self.register_buffer("value", value)

    def forward(self) -> torch.Tensor:
        return self.value


class ConstantNode(ParameterNode):
    """Node for a tensor the forward used that is neither an input, a parameter nor computed from them."""
