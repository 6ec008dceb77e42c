"""Constructor arguments of leaf modules, read off a module so that a file can rebuild it by calling its class.

Most leaf types keep each constructor argument in an attribute of the same name (``Conv2d.in_channels``,
``MaxPool2d.kernel_size``), so the arguments are read generically from ``inspect.signature(cls.__init__)``. Types
whose attributes differ register a small reader for those arguments only. Sizes come from the attributes, so a
channel-pruned module (attributes and weights shrunk together) rebuilds at its new size; :func:`shape_mismatches`
checks that the rebuilt module's tensors have the shapes of the stored ones.
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn as nn

from ..registry import registers_in

ArgumentReader = Callable[[nn.Module], dict[str, Any]]
_READERS: dict[type[nn.Module], ArgumentReader] = {}
_NOT_ARGUMENTS = frozenset({"self", "device", "dtype"})
# ``@reads_arguments(*types)``: a function giving the constructor arguments of ``types`` that have no same-named
# attribute on the module (the others are still read generically).
reads_arguments = registers_in(_READERS)


@lru_cache(maxsize=None)
def constructor_arguments(cls: type[nn.Module]) -> tuple[str, ...]:
    """Names of the keyword arguments of ``cls.__init__`` that define the module (no device/dtype/private ones)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return tuple(p.name for p in parameters if p.name not in _NOT_ARGUMENTS and not p.name.startswith("_")
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def leaf_config(module: nn.Module, cls: type[nn.Module]) -> dict[str, Any]:
    """The keyword arguments that rebuild ``module`` as ``cls(**config)``; raises ``TypeError`` if one is unknown."""
    special = _READERS.get(cls, _no_special_arguments)(module)
    config: dict[str, Any] = {}
    for name in constructor_arguments(cls):
        if name in special:
            config[name] = special[name]
            continue
        if not hasattr(module, name):
            raise TypeError(f"cannot read constructor argument {name!r} of {cls.__name__}: the module has no "
                            "attribute of that name (register a reader in graph.serialization.leaf_configs)")
        value = getattr(module, name)
        if isinstance(value, (torch.Tensor, nn.Module)):
            raise TypeError(f"constructor argument {name!r} of {cls.__name__} is not a plain value on the module "
                            "(register a reader in graph.serialization.leaf_configs)")
        config[name] = value
    return config


def build_leaf(cls: type[nn.Module], config: dict[str, Any]) -> nn.Module:
    """``cls(**config)`` on the ``meta`` device: no memory and no initialisation cost until tensors are assigned."""
    with torch.device("meta"):
        return cls(**config)


def shape_mismatches(expected: nn.Module, actual: dict[str, torch.Tensor]) -> list[str]:
    """``name: got vs expected`` for each tensor of ``actual`` whose shape differs from ``expected``'s tensor."""
    own = dict(expected.named_parameters(remove_duplicate=False))
    own.update(expected.named_buffers(remove_duplicate=False))
    problems = []
    for name, tensor in actual.items():
        reference = own.get(name)
        if reference is None:
            problems.append(f"{name}: not a tensor of {type(expected).__name__} built from its arguments")
        elif tuple(reference.shape) != tuple(tensor.shape):
            problems.append(f"{name}: {tuple(tensor.shape)} but the arguments give {tuple(reference.shape)}")
    problems.extend(f"{name}: missing" for name in own.keys() - actual.keys())
    return problems


def _no_special_arguments(module: nn.Module) -> dict[str, Any]:
    return {}


@reads_arguments(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.Linear, nn.Bilinear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
                 nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _bias_flag(module: nn.Module) -> dict[str, Any]:
    return {"bias": module.bias is not None}


@reads_arguments(nn.SyncBatchNorm)
def _sync_batch_norm(module: nn.Module) -> dict[str, Any]:
    return {"bias": module.bias is not None, "process_group": None}


@reads_arguments(nn.MultiheadAttention)
def _multihead_attention(module: nn.Module) -> dict[str, Any]:
    return {"bias": module.out_proj.bias is not None, "add_bias_kv": module.bias_k is not None}


@reads_arguments(nn.Hardtanh)
def _hardtanh(module: nn.Module) -> dict[str, Any]:
    return {"min_value": None, "max_value": None}
