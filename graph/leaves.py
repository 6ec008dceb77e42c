"""Which ``nn.Module`` types become a single node instead of being traced into.

A module is a leaf when its ``forward`` is the ``forward`` of one of the types below: the type itself or a subclass
that only changes construction. Subclasses that override ``forward`` and all user modules are traced into.
"""
from __future__ import annotations

import importlib
import sys

import torch.nn as nn

LEAF_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.Bilinear, nn.Identity, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Threshold, nn.LogSigmoid, nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.GLU,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ChannelShuffle, nn.Flatten, nn.Unflatten,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)
# Leaf types from optional packages, by name and defining module: they are looked up only once that module has been
# imported (a model cannot hold one before), so ``graph`` never imports torchvision itself. StochasticDepth is a leaf
# because its forward branches on ``self.training``: as one node it replays correctly in both modes.
OPTIONAL_LEAF_MODULES: dict[str, str] = {"StochasticDepth": "torchvision.ops.stochastic_depth"}
_LEAF_SET = frozenset(LEAF_TYPES)
LEAF_BY_NAME: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in LEAF_TYPES}


def _optional_leaf(name: str, load: bool) -> type[nn.Module] | None:
    module_name = OPTIONAL_LEAF_MODULES.get(name)
    if module_name is None:
        return None
    module = importlib.import_module(module_name) if load else sys.modules.get(module_name)
    return getattr(module, name, None)


def _is_leaf_class(cls: type) -> bool:
    return cls in _LEAF_SET or (cls.__name__ in OPTIONAL_LEAF_MODULES and _optional_leaf(cls.__name__, False) is cls)


def leaf_type(module: nn.Module) -> type[nn.Module] | None:
    """The registered type whose semantics ``module`` has, or ``None`` when it must be traced into."""
    for cls in type(module).__mro__:
        if _is_leaf_class(cls):
            return cls if cls.forward is type(module).forward else None
    return None


def leaf_class(name: str) -> type[nn.Module] | None:
    """The leaf type called ``name`` (importing its optional package if needed), or ``None`` if not a leaf."""
    return LEAF_BY_NAME.get(name) or _optional_leaf(name, True)
